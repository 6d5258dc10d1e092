//! What a CustomResourceDefinition defines: the resources it serves (one
//! per served version, with its schema, printer columns and subresources),
//! and the checks the API server makes of a CRD before serving it.

use super::meta::NameRule;
use super::resources::{ResourceType, singular};
use super::schema::Schema;
use super::status::{FieldError, FieldErrorKind};
use super::store::Rules;
use super::table::Column;
use serde_json::{Value, json};
use std::sync::Arc;

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
