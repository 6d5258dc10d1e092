//! The kinds of object served: the built-in ones (with enough of their
//! schema to catch unknown fields and wrong types) and the ones each
//! CustomResourceDefinition adds, looked up by path (group, version, plural)
//! or by body (apiVersion, kind).

use super::meta::NameRule;
use super::schema::Schema;
use super::status::{FieldError, FieldErrorKind};
use super::store::Rules;
use super::table::Column;
use serde_json::{Value, json};
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

/// A structural schema whose nested objects keep whatever they hold.
fn open(ty: &str) -> Value {
    json!({"type": ty, "x-kubernetes-preserve-unknown-fields": true})
}

fn top(fields: &[(&str, Value)]) -> Value {
    let mut props = serde_json::Map::new();
    props.insert("apiVersion".into(), json!({"type": "string"}));
    props.insert("kind".into(), json!({"type": "string"}));
    props.insert("metadata".into(), json!({"type": "object"}));
    for (k, v) in fields {
        props.insert((*k).into(), v.clone());
    }
    json!({"type": "object", "properties": props})
}

struct Builtin {
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    generation: bool,
    create_on_update: bool,
    name_rule: NameRule,
    schema: Value,
}

fn builtins() -> Vec<Builtin> {
    let s = || json!({"type": "string"});
    let i = || json!({"type": "integer"});
    let time = || json!({"type": "string", "format": "date-time"});
    let b = |group, plural, kind, namespaced, short, schema| Builtin {
        group,
        plural,
        kind,
        namespaced,
        short,
        status: false,
        generation: false,
        create_on_update: false,
        name_rule: NameRule::Subdomain,
        schema,
    };
    let core_event = top(&[
        ("involvedObject", open("object")),
        ("reason", s()),
        ("message", s()),
        ("source", open("object")),
        ("firstTimestamp", time()),
        ("lastTimestamp", time()),
        ("count", i()),
        ("type", s()),
        ("eventTime", time()),
        ("series", open("object")),
        ("action", s()),
        ("related", open("object")),
        ("reportingComponent", s()),
        ("reportingInstance", s()),
    ]);
    let events_event = top(&[
        ("eventTime", time()),
        ("series", open("object")),
        ("reportingController", s()),
        ("reportingInstance", s()),
        ("action", s()),
        ("reason", s()),
        ("regarding", open("object")),
        ("related", open("object")),
        ("note", s()),
        ("type", s()),
        ("deprecatedSource", open("object")),
        ("deprecatedFirstTimestamp", time()),
        ("deprecatedLastTimestamp", time()),
        ("deprecatedCount", i()),
    ]);
    let lease_spec = json!({"type": "object", "properties": {"holderIdentity": s(), "leaseDurationSeconds": i(),
        "acquireTime": time(), "renewTime": time(), "leaseTransitions": i(), "strategy": s(), "preferredHolder": s()}});
    let spec_status = || top(&[("spec", open("object")), ("status", open("object"))]);
    vec![
        Builtin {
            status: true,
            name_rule: NameRule::Label1123,
            ..b("", "namespaces", "Namespace", false, &["ns"], spec_status())
        },
        Builtin {
            status: true,
            create_on_update: true,
            name_rule: NameRule::Label1035,
            ..b("", "services", "Service", true, &["svc"], spec_status())
        },
        Builtin {
            create_on_update: true,
            ..b("", "events", "Event", true, &["ev"], core_event)
        },
        Builtin {
            status: true,
            ..b("", "pods", "Pod", true, &["po"], spec_status())
        },
        b(
            "",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            top(&[
                (
                    "data",
                    json!({"type": "object", "additionalProperties": s()}),
                ),
                (
                    "binaryData",
                    json!({"type": "object", "additionalProperties": s()}),
                ),
                ("immutable", json!({"type": "boolean"})),
            ]),
        ),
        Builtin {
            generation: true,
            ..b(
                "discovery.k8s.io",
                "endpointslices",
                "EndpointSlice",
                true,
                &[],
                top(&[
                    ("addressType", s()),
                    (
                        "endpoints",
                        json!({"type": "array", "items": open("object")}),
                    ),
                    ("ports", json!({"type": "array", "items": open("object")})),
                ]),
            )
        },
        Builtin {
            create_on_update: true,
            ..b(
                "coordination.k8s.io",
                "leases",
                "Lease",
                true,
                &[],
                top(&[("spec", lease_spec)]),
            )
        },
        Builtin {
            create_on_update: true,
            ..b(
                "events.k8s.io",
                "events",
                "Event",
                true,
                &["ev"],
                events_event,
            )
        },
        Builtin {
            status: true,
            generation: true,
            ..b(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                &["crd", "crds"],
                spec_status(),
            )
        },
    ]
}

fn singular(kind: &str) -> String {
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

/// The resources a CRD serves: one per served version.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let list = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for v in spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"].as_bool() == Some(true))
    {
        let raw_schema = v
            .pointer("/schema/openAPIV3Schema")
            .cloned()
            .unwrap_or(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        let schema = match v.pointer("/schema/openAPIV3Schema") {
            Some(sch) => Some(Arc::new(Schema::parse(sch)?)),
            None => None,
        };
        let columns = v["additionalPrinterColumns"]
            .as_array()
            .map(|cols| cols.iter().map(Column::from_crd).collect())
            .unwrap_or_default();
        let kind = s(&names["kind"]);
        out.push(ResourceType {
            group: s(&spec["group"]),
            version: s(&v["name"]),
            plural: s(&names["plural"]),
            singular: names["singular"]
                .as_str()
                .map_or_else(|| singular(&kind), str::to_string),
            list_kind: names["listKind"]
                .as_str()
                .map_or_else(|| format!("{kind}List"), str::to_string),
            kind,
            namespaced: spec["scope"] == "Namespaced",
            short_names: list(&names["shortNames"]),
            categories: list(&names["categories"]),
            rules: Rules {
                generation: true,
                status_subresource: v.pointer("/subresources/status").is_some(),
            },
            create_on_update: false,
            custom: true,
            name_rule: NameRule::Subdomain,
            schema,
            raw_schema,
            columns,
        });
    }
    Ok(out)
}

/// What the API server checks in a CRD before serving it (a subset of
/// `ValidateCustomResourceDefinition`: names, scope, versions, schema).
pub fn crd_errors(crd: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &crd["spec"];
    let str_at = |p: &str| crd.pointer(p).and_then(Value::as_str).unwrap_or("");
    let required = [
        ("/spec/group", "spec.group"),
        ("/spec/names/plural", "spec.names.plural"),
        ("/spec/names/kind", "spec.names.kind"),
    ];
    for (ptr, field) in required {
        if str_at(ptr).is_empty() {
            errs.push(FieldError::required(field, ""));
        }
    }
    let want = format!("{}.{}", str_at("/spec/names/plural"), str_at("/spec/group"));
    let name = str_at("/metadata/name");
    if name != want {
        errs.push(FieldError::new(
            "metadata.name",
            FieldErrorKind::Invalid,
            &Value::from(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    if !str_at("/spec/group").is_empty() && !str_at("/spec/group").contains('.') {
        errs.push(FieldError::new(
            "spec.group",
            FieldErrorKind::Invalid,
            &spec["group"],
            "should be a domain with at least one dot",
        ));
    }
    if !matches!(str_at("/spec/scope"), "Namespaced" | "Cluster") {
        errs.push(FieldError::new(
            "spec.scope",
            FieldErrorKind::NotSupported(vec!["Cluster".into(), "Namespaced".into()]),
            &spec["scope"],
            "",
        ));
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        errs.push(FieldError::required(
            "spec.versions",
            "must have at least one version",
        ));
    } else if versions
        .iter()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .count()
        != 1
    {
        errs.push(FieldError::new(
            "spec.versions",
            FieldErrorKind::Invalid,
            &Value::Null,
            "must have exactly one version marked as storage version",
        ));
    }
    if let Err(e) = from_crd(crd) {
        errs.push(FieldError::new(
            "spec.versions[0].schema.openAPIV3Schema",
            FieldErrorKind::Invalid,
            &Value::Null,
            e,
        ));
    }
    errs
}
