//! OpenAPI v3 documents, enough for kubectl: its field-validation check
//! looks for a `fieldValidation` parameter on the PATCH operation of the
//! kind's path (then it validates on the server with `?fieldValidation=Strict`
//! instead of on the client), and `kubectl explain` reads the schemas.

use super::discovery::{GIT_VERSION, short_hash};
use super::resources::{Registry, ResourceType};
use super::status::ApiError;
use serde_json::{Map, Value, json};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The component name a kind's schema has (`dev.kanari.v1alpha1.CanaryRelease`).
fn component(t: &ResourceType) -> String {
    if t.custom {
        let rev: Vec<&str> = t.group.split('.').rev().collect();
        format!("{}.{}.{}", rev.join("."), t.version, t.kind)
    } else {
        let g = if t.group.is_empty() {
            "core"
        } else {
            t.group.split('.').next().unwrap_or("")
        };
        format!("io.k8s.api.{g}.{}.{}", t.version, t.kind)
    }
}

fn operation(t: &ResourceType, action: &str, write: bool) -> Value {
    let mut params = vec![
        json!({"name": "pretty", "in": "query", "schema": {"type": "string", "uniqueItems": true}}),
    ];
    if write {
        for p in ["dryRun", "fieldManager", "fieldValidation"] {
            params.push(json!({"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": true}}));
        }
    }
    let reference = json!({"$ref": format!("#/components/schemas/{}", component(t))});
    json!({
        "operationId": format!("{action}{}", t.kind),
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
    })
}

fn document(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<_> = reg
        .types()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let (mut paths, mut schemas) = (Map::new(), Map::new());
    for t in types {
        let base = format!(
            "/{}/{}",
            gv_path(group, version),
            if t.namespaced {
                "namespaces/{namespace}/"
            } else {
                ""
            }
        );
        let item = json!({"get": operation(t, "get", false), "put": operation(t, "put", true),
            "patch": operation(t, "patch", true), "delete": operation(t, "delete", true)});
        paths.insert(
            format!("{base}{}", t.plural),
            json!({"get": operation(t, "list", false), "post": operation(t, "post", true)}),
        );
        paths.insert(format!("{base}{}/{{name}}", t.plural), item);
        if t.rules.status_subresource {
            paths.insert(format!("{base}{}/{{name}}/status", t.plural),
                json!({"get": operation(t, "get", false), "put": operation(t, "put", true), "patch": operation(t, "patch", true)}));
        }
        let mut schema = t.raw_schema.clone();
        schema["x-kubernetes-group-version-kind"] =
            json!([{"group": t.group, "version": t.version, "kind": t.kind}]);
        schemas.insert(component(t), schema);
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths, "components": {"schemas": schemas}}),
    )
}

/// `/openapi/v3`: where each group-version's document is, with a hash that
/// changes with it (kubectl caches by URL).
pub fn root(reg: &Registry) -> Value {
    let mut gvs = vec![(String::new(), "v1".to_string())];
    for (g, vs) in reg.groups() {
        gvs.extend(vs.into_iter().map(|v| (g.clone(), v)));
    }
    let mut paths = Map::new();
    for (g, v) in gvs {
        let doc = document(reg, &g, &v)
            .map(|d| d.to_string())
            .unwrap_or_default();
        let p = gv_path(&g, &v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", short_hash(&doc))}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1`, `/openapi/v3/apis/{group}/{version}`.
pub fn group_version(reg: &Registry, path: &str) -> Result<Value, ApiError> {
    let parts: Vec<&str> = path.split('/').collect();
    let doc = match parts.as_slice() {
        ["api", v] => document(reg, "", v),
        ["apis", g, v] => document(reg, g, v),
        _ => None,
    };
    doc.ok_or_else(ApiError::path_not_found)
}
