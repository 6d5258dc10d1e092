//! What a real control plane's controllers add to writes, done here at
//! once: a CRD is Established with its names accepted, a namespace gets its
//! name label, finalizer and phase, and deleting a namespace or a CRD
//! deletes what it held (a real server does so in the background).

use super::admit::name_of;
use super::cluster::{CRDS, Cluster, present, store_error};
use super::meta::rfc3339;
use super::resources::ResourceType;
use super::status::ApiError;
use serde_json::{Value, json};
use std::time::SystemTime;

impl Cluster {
    /// Deletes an object, and what it held: a namespace's objects, a CRD's
    /// custom resources (a real server does so in the background).
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        precondition: Option<&str>,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let gr = rt.group_resource();
        let gone = self
            .commit(dry_run, |s| {
                s.delete(&gr, ns.unwrap_or(""), name, precondition)
            })
            .map_err(|e| store_error(rt, name, e))?;
        if dry_run {
            return Ok(present(rt, gone));
        }
        if gr == "namespaces" {
            let types: Vec<_> = self
                .registry
                .types()
                .iter()
                .filter(|t| t.namespaced)
                .map(|t| t.group_resource())
                .collect();
            for t in types {
                let names: Vec<String> = self
                    .store
                    .list(&t, Some(name))
                    .iter()
                    .map(|o| name_of(o).to_string())
                    .collect();
                for n in names {
                    let _ = self.store.delete(&t, name, &n, None);
                }
            }
        }
        if gr == CRDS {
            let plural = gone["spec"]["names"]["plural"].as_str().unwrap_or("");
            let cr = format!("{plural}.{}", gone["spec"]["group"].as_str().unwrap_or(""));
            let keys: Vec<(String, String)> = self
                .store
                .list(&cr, None)
                .iter()
                .map(|o| {
                    (
                        o["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        name_of(o).to_string(),
                    )
                })
                .collect();
            for (n, o) in keys {
                let _ = self.store.delete(&cr, &n, &o, None);
            }
        }
        self.after_write(rt);
        Ok(present(rt, gone))
    }
}

/// The label every namespace carries with its name (which selectors on
/// namespaces rely on); the server sets it, whatever the client sent.
pub(super) fn name_label(rt: &ResourceType, obj: &mut Value) {
    if rt.group_resource() == "namespaces" {
        let name = obj["metadata"]["name"].clone();
        if !obj["metadata"]["labels"].is_object() {
            obj["metadata"]["labels"] = json!({});
        }
        obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
    }
}

/// The status the apiextensions controllers give a CRD whose names are free.
pub(super) fn established(crd: &Value) -> Value {
    let now = rfc3339(SystemTime::now());
    let cond = |ty: &str, reason: &str, msg: &str| json!({"type": ty, "status": "True", "lastTransitionTime": now, "reason": reason, "message": msg});
    let stored: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .map(|v| v["name"].clone())
        .collect();
    json!({
        "acceptedNames": crd["spec"]["names"],
        "conditions": [
            cond("NamesAccepted", "NoConflicts", "no conflicts found"),
            cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    })
}
