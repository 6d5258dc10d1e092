//! The server's state behind one lock: the store, the registry its CRDs
//! imply, and the write path every create, update and patch takes, from
//! HTTP and from `ApiServer`'s direct access alike (deletes and the control
//! plane's side effects are in `controllers`).

use super::admit::{self, FieldValidation, name_of};
use super::controllers::{established, name_label};
use super::meta::{generated_name, rfc3339};
use super::ownership::{Writer, record_update};
use super::patch::{PatchError, json_patch, merge_patch};
use super::resources::{Registry, ResourceType};
use super::status::{ApiError, Subject};
use super::store::{Part, Store, StoreError, merge_part};
use serde_json::{Value, json};
use std::time::SystemTime;

pub const CRDS: &str = "customresourcedefinitions.apiextensions.k8s.io";

/// How a write is to be done (`?fieldValidation=`, `?dryRun=All`), and by
/// which field manager (None: ownership already recorded, by an apply).
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub field_validation: FieldValidation,
    pub dry_run: bool,
    pub manager: Option<String>,
}

/// A write's outcome: the stored object, whether it was created (201), and
/// the warnings for the `Warning` header.
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

/// A PATCH body and its type.
#[derive(Debug, Clone, Copy)]
pub struct PatchBody<'a> {
    pub ty: PatchType,
    pub bytes: &'a [u8],
}

/// The PATCH body types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    /// Server-side apply (`application/apply-patch+yaml`).
    Apply {
        force: bool,
    },
}

pub struct Cluster {
    pub store: Store,
    pub registry: Registry,
    seeds: u64,
}

fn subject<'a>(rt: &'a ResourceType, name: &'a str) -> Subject<'a> {
    Subject {
        group: &rt.group,
        plural: &rt.plural,
        name,
    }
}

/// The error a store refusal is, for this resource and name.
pub fn store_error(rt: &ResourceType, name: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::not_found(subject(rt, name)),
        StoreError::AlreadyExists => ApiError::already_exists(subject(rt, name)),
        StoreError::Conflict => ApiError::conflict(subject(rt, name)),
        StoreError::Gone { .. } => {
            ApiError::expired("The resourceVersion for the provided request is too old.")
        }
    }
}

/// An object as served at `rt`'s version (versions share storage; with no
/// conversion webhook only apiVersion changes).
pub fn present(rt: &ResourceType, mut obj: Value) -> Value {
    obj["apiVersion"] = rt.api_version().into();
    obj["kind"] = rt.kind.clone().into();
    obj
}

impl Cluster {
    /// A cluster as a fresh API server has it: four namespaces.
    pub fn new() -> Cluster {
        let mut c = Cluster {
            store: Store::new(),
            registry: Registry::new(&[]),
            seeds: 0,
        };
        let ns = c
            .registry
            .find("", "v1", "namespaces")
            .expect("namespaces are built in");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            let opts = WriteOptions {
                field_validation: FieldValidation::Strict,
                dry_run: false,
                manager: Some("kube-apiserver".into()),
            };
            c.create(&ns, None, body, &opts)
                .expect("a fresh cluster takes its namespaces");
        }
        c
    }

    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.store
            .get(&rt.group_resource(), ns.unwrap_or(""), name)
            .map(|o| present(rt, o.clone()))
            .ok_or_else(|| ApiError::not_found(subject(rt, name)))
    }

    fn require_namespace(&self, rt: &ResourceType, ns: Option<&str>) -> Result<(), ApiError> {
        match ns.filter(|_| rt.namespaced) {
            Some(ns) if self.store.get("namespaces", "", ns).is_none() => {
                Err(ApiError::not_found(Subject {
                    group: "",
                    plural: "namespaces",
                    name: ns,
                }))
            }
            _ => Ok(()),
        }
    }

    /// Runs `f` on the store, or on a copy of it for a dry run.
    pub(super) fn commit<T>(&mut self, dry_run: bool, f: impl FnOnce(&mut Store) -> T) -> T {
        if dry_run {
            f(&mut self.store.clone())
        } else {
            f(&mut self.store)
        }
    }

    pub(super) fn after_write(&mut self, rt: &ResourceType) {
        if rt.group_resource() == CRDS {
            let crds: Vec<Value> = self.store.list(CRDS, None).into_iter().cloned().collect();
            self.registry = Registry::new(&crds.iter().collect::<Vec<_>>());
        }
    }

    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        body: Value,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let mut obj = admit::shape(rt, ns, body)?;
        let warnings = admit::prune(rt, &mut obj, opts.field_validation)?;
        if name_of(&obj).is_empty()
            && let Some(prefix) = obj["metadata"]["generateName"].as_str().map(str::to_string)
        {
            loop {
                self.seeds += 1;
                let name = generated_name(&prefix, self.seeds);
                if self
                    .store
                    .get(&rt.group_resource(), ns.unwrap_or(""), &name)
                    .is_none()
                {
                    obj["metadata"]["name"] = name.into();
                    break;
                }
            }
        }
        if rt.rules.status_subresource {
            obj.as_object_mut().expect("an object").remove("status");
        }
        if rt.group_resource() == CRDS {
            obj["status"] = established(&obj);
        }
        if rt.group_resource() == "namespaces" {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        obj["metadata"]
            .as_object_mut()
            .expect("an object")
            .remove("resourceVersion");
        name_label(rt, &mut obj);
        let now = rfc3339(SystemTime::now());
        if let Some(manager) = &opts.manager {
            obj["metadata"]
                .as_object_mut()
                .expect("an object")
                .remove("managedFields");
            let w = Writer {
                manager,
                api_version: &rt.api_version(),
                now: &now,
                rules: rt.rules,
                part: Part::Main,
            };
            record_update(None, &mut obj, &w);
        }
        admit::validate(rt, &obj, false)?;
        self.require_namespace(rt, ns)?;
        let name = name_of(&obj).to_string();
        let stored = self.commit(opts.dry_run, |s| {
            s.create(&rt.group_resource(), obj, rt.rules, &now)
        });
        let object = present(rt, stored.map_err(|e| store_error(rt, &name, e))?);
        self.after_write(rt);
        Ok(Written {
            object,
            created: true,
            warnings,
        })
    }

    /// PUT of the object or of its status.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        body: Value,
        part: Part,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let mut obj = admit::shape(rt, ns, body)?;
        if name_of(&obj) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&obj)
            )));
        }
        let Some(old) = self
            .store
            .get(&rt.group_resource(), ns.unwrap_or(""), name)
            .cloned()
        else {
            if rt.create_on_update && part == Part::Main {
                return self.create(rt, ns, obj, opts);
            }
            return Err(ApiError::not_found(subject(rt, name)));
        };
        admit::check_update_precondition(rt, &obj)?;
        let warnings = admit::prune(rt, &mut obj, opts.field_validation)?;
        self.replace(rt, &old, obj, part, opts, warnings)
    }

    pub(super) fn replace(
        &mut self,
        rt: &ResourceType,
        old: &Value,
        obj: Value,
        part: Part,
        opts: &WriteOptions,
        warnings: Vec<String>,
    ) -> Result<Written, ApiError> {
        let name = name_of(old).to_string();
        let mut candidate = merge_part(old, obj, rt.rules, part);
        name_label(rt, &mut candidate);
        if let Some(manager) = &opts.manager {
            match old["metadata"].get("managedFields") {
                Some(m) => candidate["metadata"]["managedFields"] = m.clone(),
                None => {
                    candidate["metadata"]
                        .as_object_mut()
                        .expect("an object")
                        .remove("managedFields");
                }
            }
            let now = rfc3339(SystemTime::now());
            let w = Writer {
                manager,
                api_version: &rt.api_version(),
                now: &now,
                rules: rt.rules,
                part,
            };
            record_update(Some(old), &mut candidate, &w);
        }
        admit::validate(rt, &candidate, true)?;
        let stored = self.commit(opts.dry_run, |s| {
            s.update(&rt.group_resource(), candidate, rt.rules, part)
        });
        let object = present(rt, stored.map_err(|e| store_error(rt, &name, e))?);
        self.after_write(rt);
        Ok(Written {
            object,
            created: false,
            warnings,
        })
    }

    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        PatchBody { ty, bytes: body }: PatchBody,
        part: Part,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if ty == PatchType::Strategic && rt.custom {
            return Err(ApiError::unsupported_media_type(
                "application/strategic-merge-patch+json",
                &[
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/apply-patch+yaml",
                ],
            ));
        }
        if let PatchType::Apply { force } = ty {
            return self.server_side_apply(rt, ns, name, body, part, force, opts);
        }
        let old = self.get(rt, ns, name)?;
        let patch: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
        let patched = match ty {
            PatchType::Json => json_patch(&old, &patch).map_err(|e| match e {
                PatchError::Malformed(m) => ApiError::bad_request(m),
                PatchError::Failed(_) => ApiError::new(
                    422,
                    "Invalid",
                    "the server rejected our request due to an error in our request",
                ),
            })?,
            PatchType::Merge | PatchType::Strategic | PatchType::Apply { .. } => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request(
                        "error decoding patch: a merge patch must be a JSON object",
                    ));
                }
                let mut o = old.clone();
                merge_patch(&mut o, &patch);
                o
            }
        };
        let mut obj = admit::shape(rt, ns, patched)?;
        if name_of(&obj) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&obj)
            )));
        }
        let warnings = admit::prune(rt, &mut obj, opts.field_validation)?;
        self.replace(rt, &old, obj, part, opts, warnings)
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}
