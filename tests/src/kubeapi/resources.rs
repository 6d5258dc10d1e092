//! The kinds of object served: the built-in ones (with enough of their
//! schema to catch unknown fields and wrong types) and the ones each
//! CustomResourceDefinition adds, looked up by path (group, version, plural)
//! or by body (apiVersion, kind).

use super::builtin::builtins;
use super::crd::from_crd;
use super::meta::NameRule;
use super::schema::Schema;
use super::store::Rules;
use super::table::Column;
use serde_json::Value;
use std::sync::Arc;

/// One served resource (one version of it).
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub rules: Rules,
    /// PUT of an absent object creates it (leases, events, services).
    pub create_on_update: bool,
    /// Defined by a CRD: unconditional updates and strategic merge patch
    /// are refused, DELETE returns the object.
    pub custom: bool,
    pub name_rule: NameRule,
    pub schema: Option<Arc<Schema>>,
    /// The schema as declared, for the OpenAPI documents.
    pub raw_schema: Value,
    /// Printer columns after Name (custom resources); built-ins show Name, Age.
    pub columns: Vec<Column>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The storage key: `leases.coordination.k8s.io`, `services`.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

pub(super) fn singular(kind: &str) -> String {
    kind.to_lowercase()
}

/// Every served resource, built-ins first.
#[derive(Debug, Clone)]
pub struct Registry {
    types: Vec<Arc<ResourceType>>,
}

impl Registry {
    /// The built-ins plus what the given CRDs define (a CRD that cannot be
    /// served, e.g. with a bad pattern, adds nothing; it was refused on write).
    pub fn new(crds: &[&Value]) -> Registry {
        let mut types: Vec<Arc<ResourceType>> = builtins()
            .into_iter()
            .map(|b| {
                Arc::new(ResourceType {
                    group: b.group.into(),
                    version: "v1".into(),
                    plural: b.plural.into(),
                    singular: singular(b.kind),
                    kind: b.kind.into(),
                    list_kind: format!("{}List", b.kind),
                    namespaced: b.namespaced,
                    short_names: b.short.iter().map(|s| s.to_string()).collect(),
                    categories: if matches!(b.plural, "services" | "pods") {
                        vec!["all".into()]
                    } else {
                        vec![]
                    },
                    rules: Rules {
                        generation: b.generation,
                        status_subresource: b.status,
                    },
                    create_on_update: b.create_on_update,
                    custom: false,
                    name_rule: b.name_rule,
                    schema: Some(Arc::new(
                        Schema::parse(&b.schema).expect("built-in schemas parse"),
                    )),
                    raw_schema: b.schema,
                    columns: Vec::new(),
                })
            })
            .collect();
        for crd in crds {
            types.extend(from_crd(crd).unwrap_or_default().into_iter().map(Arc::new));
        }
        Registry { types }
    }

    pub fn types(&self) -> &[Arc<ResourceType>] {
        &self.types
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.api_version() == api_version && t.kind == kind)
            .cloned()
    }

    /// The API groups (not the core one) with their versions, in order served.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for t in self.types.iter().filter(|t| !t.group.is_empty()) {
            match out.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, vs)) if !vs.contains(&t.version) => vs.push(t.version.clone()),
                Some(_) => {}
                None => out.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        out
    }
}
