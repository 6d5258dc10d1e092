//! Server-side apply (`PATCH` with `application/apply-patch+yaml`): the
//! configuration is decoded (YAML or JSON), checked like any body, merged
//! by field ownership (`ownership::apply`), and stored through the same
//! create or update path, creating the object when it is absent.

use super::admit::{self, name_of};
use super::cluster::{Cluster, WriteOptions, Written};
use super::ownership::{self, Writer, conflict_message};
use super::resources::ResourceType;
use super::status::{ApiError, FieldError};
use super::store::Part;
use serde_json::{Value, json};
use std::time::SystemTime;

impl Cluster {
    #[allow(clippy::too_many_arguments)]
    pub fn server_side_apply(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        body: &[u8],
        part: Part,
        force: bool,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let Some(manager) = opts.manager.clone().filter(|m| !m.is_empty()) else {
            let e = FieldError::required("fieldManager", "is required for apply patch");
            return Err(ApiError::invalid("meta.k8s.io", "PatchOptions", "", &[e]));
        };
        let config: Value = serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        for field in ["apiVersion", "kind"] {
            if config
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(ApiError::bad_request(format!("{field} must be set")));
            }
        }
        let mut config = admit::shape(rt, ns, config)?;
        // The URL names the object when the configuration does not (what
        // kube-lease-manager relies on).
        if name_of(&config).is_empty() {
            config["metadata"]["name"] = name.into();
        }
        if name_of(&config) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&config)
            )));
        }
        let warnings = admit::prune(rt, &mut config, opts.field_validation)?;
        let current = self
            .store
            .get(&rt.group_resource(), ns.unwrap_or(""), name)
            .cloned();
        if current.is_none() && part == Part::Status {
            return Err(self.get(rt, ns, name).expect_err("absent"));
        }
        let now = crate::kubeapi::meta::rfc3339(SystemTime::now());
        let w = Writer {
            manager: &manager,
            api_version: &rt.api_version(),
            now: &now,
            rules: rt.rules,
            part,
        };
        let merged = ownership::apply(current.as_ref(), &config, &w, force).map_err(|conflicts| {
            let mut e = ApiError::new(409, "Conflict", conflict_message(&conflicts));
            let causes: Vec<Value> = conflicts
                .iter()
                .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.field}))
                .collect();
            e.details.insert("causes".into(), causes.into());
            e
        })?;
        let recorded = WriteOptions {
            manager: None,
            ..opts.clone()
        };
        let mut written = match current {
            None => self.create(rt, ns, merged, &recorded)?,
            Some(old) => self.replace(rt, &old, merged, part, &recorded, Vec::new())?,
        };
        written.warnings.extend(warnings);
        Ok(written)
    }
}
