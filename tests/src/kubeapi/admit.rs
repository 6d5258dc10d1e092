//! What a body goes through before it is stored: the checks of the object
//! against its path (kind, namespace, name), unknown-field handling per
//! `fieldValidation`, defaulting, and validation (422 for custom resources,
//! 400 decode errors for built-ins, as their typed decoders give).

use super::crd::crd_errors;
use super::meta::{label_errors, name_errors, prune_metadata};
use super::resources::ResourceType;
use super::status::{ApiError, FieldError, FieldErrorKind};
use serde_json::Value;

/// `?fieldValidation=`: what to do with fields the schema does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    /// The server's default since 1.27: accept, drop, and warn.
    Warn,
    Ignore,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> Result<FieldValidation, ApiError> {
        match s {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other}. Valid values: Ignore, Warn, Strict"
            ))),
        }
    }
}

/// The object's name, as it is in its metadata.
pub fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or("")
}

fn decode_error(rt: &ResourceType, detail: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{} in version \"{}\" cannot be handled as a {}: {detail}",
        rt.kind, rt.version, rt.kind
    ))
}

/// Checks a body against the resource its path names and makes it that
/// resource's: apiVersion/kind filled in, the namespace the path's. Returns
/// the body ready to prune.
pub fn shape(rt: &ResourceType, namespace: Option<&str>, body: Value) -> Result<Value, ApiError> {
    let Value::Object(mut m) = body else {
        return Err(decode_error(
            rt,
            "json: cannot unmarshal non-object into Go value of type map[string]interface {}",
        ));
    };
    let want = rt.api_version();
    match m.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != want => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({want})"
            )));
        }
        None if rt.custom => {
            return Err(ApiError::bad_request(format!(
                "Object 'apiVersion' is missing in '{}'",
                Value::Object(m)
            )));
        }
        _ => {}
    }
    match m.get("kind").and_then(Value::as_str) {
        Some(k) if k != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        None if rt.custom => {
            return Err(ApiError::bad_request(format!(
                "Object 'Kind' is missing in '{}'",
                Value::Object(m)
            )));
        }
        _ => {}
    }
    m.insert("apiVersion".into(), want.into());
    m.insert("kind".into(), rt.kind.clone().into());
    let mut obj = Value::Object(m);
    if !obj["metadata"].is_object() {
        obj["metadata"] = serde_json::json!({});
    }
    let meta = obj["metadata"].as_object_mut().expect("an object");
    match namespace.filter(|_| rt.namespaced) {
        Some(ns) => {
            let body_ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            meta.insert("namespace".into(), ns.into());
        }
        None => {
            meta.remove("namespace");
        }
    }
    Ok(obj)
}

/// Drops unknown fields; under Strict they refuse the request, under Warn
/// each becomes a warning (`unknown field "spec.foo"`).
pub fn prune(
    rt: &ResourceType,
    obj: &mut Value,
    fv: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let mut unknown = prune_metadata(obj);
    if let Some(schema) = &rt.schema {
        schema.prune(obj, "", &mut unknown);
        schema.apply_defaults(obj);
    }
    let msgs: Vec<String> = unknown
        .iter()
        .map(|p| format!("unknown field \"{p}\""))
        .collect();
    match fv {
        _ if msgs.is_empty() => Ok(Vec::new()),
        FieldValidation::Strict => Err(decode_error(
            rt,
            &format!("strict decoding error: {}", msgs.join(", ")),
        )),
        FieldValidation::Warn => Ok(msgs),
        FieldValidation::Ignore => Ok(Vec::new()),
    }
}

/// Everything wrong with an object about to be stored.
pub fn validate(rt: &ResourceType, obj: &Value, update: bool) -> Result<(), ApiError> {
    let name = name_of(obj);
    let mut errs: Vec<FieldError> = Vec::new();
    if name.is_empty() {
        errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else if !update {
        errs.extend(name_errors(rt.name_rule, name, "metadata.name"));
    }
    errs.extend(label_errors(obj));
    if let Some(schema) = &rt.schema {
        let mut schema_errs = Vec::new();
        schema.validate(obj, "", &mut schema_errs);
        if !rt.custom
            && let Some(e) = schema_errs
                .iter()
                .find(|e| e.kind == FieldErrorKind::TypeInvalid)
        {
            let want = e
                .detail
                .rsplit("must be of type ")
                .next()
                .unwrap_or("")
                .split(':')
                .next()
                .unwrap_or("");
            return Err(decode_error(
                rt,
                &format!(
                    "json: cannot unmarshal {} into Go struct field {}.{} of type {want}",
                    e.value.as_str().unwrap_or(""),
                    rt.kind,
                    e.field
                ),
            ));
        }
        errs.extend(schema_errs);
    }
    if rt.plural == "customresourcedefinitions" {
        errs.extend(crd_errors(obj));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&rt.group, &rt.kind, name, &errs))
    }
}

/// A PUT must say which version it replaces for custom resources (their
/// strategy refuses unconditional updates); built-ins accept it unsaid.
pub fn check_update_precondition(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
    if rt.custom && rv.is_empty() {
        let e = FieldError::new(
            "metadata.resourceVersion",
            FieldErrorKind::Invalid,
            &Value::Null,
            "must be specified for an update",
        );
        let mut err = ApiError::invalid(&rt.group, &rt.kind, name_of(obj), &[e]);
        err.message = err
            .message
            .replace("Invalid value: null", "Invalid value: 0x0");
        if let Some(c) = err.details.get_mut("causes").and_then(|c| c.get_mut(0)) {
            c["message"] = "Invalid value: 0x0: must be specified for an update".into();
        }
        return Err(err);
    }
    if !rv.is_empty() && rv.parse::<u64>().is_err() {
        return Err(ApiError::bad_request(format!(
            "invalid resource version: {rv}"
        )));
    }
    Ok(())
}
