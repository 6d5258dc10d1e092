//! OpenAPI v3 structural schemas, as a CRD's `openAPIV3Schema` declares them:
//! pruning of unknown fields, defaulting, and validation with the error
//! wording of kube-openapi's validator (what `kubectl` shows a user).

use super::status::{FieldError, FieldErrorKind};
use regex::Regex;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One node of a structural schema.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    ty: Option<String>,
    int_or_string: bool,
    preserve_unknown: bool,
    nullable: bool,
    required: Vec<String>,
    enumeration: Option<Vec<Value>>,
    minimum: Option<f64>,
    exclusive_minimum: bool,
    maximum: Option<f64>,
    exclusive_maximum: bool,
    min_length: Option<u64>,
    max_length: Option<u64>,
    pattern: Option<(String, Regex)>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    format: Option<String>,
    properties: BTreeMap<String, Schema>,
    additional: Option<Box<Schema>>,
    items: Option<Box<Schema>>,
    default: Option<Value>,
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn is_integer(v: &Value) -> bool {
    v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0)
}

/// The JSON type of a value, as the validator names it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_integer(v) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn date_time() -> Regex {
    Regex::new(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
        .expect("a valid regex")
}

impl Schema {
    /// Reads a schema node; refuses only what cannot be used (a bad pattern).
    pub fn parse(v: &Value) -> Result<Schema, String> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        let mut out = Schema {
            ty: s("type"),
            int_or_string: b("x-kubernetes-int-or-string"),
            preserve_unknown: b("x-kubernetes-preserve-unknown-fields"),
            nullable: b("nullable"),
            enumeration: v.get("enum").and_then(Value::as_array).cloned(),
            minimum: f("minimum"),
            exclusive_minimum: b("exclusiveMinimum"),
            maximum: f("maximum"),
            exclusive_maximum: b("exclusiveMaximum"),
            min_length: u("minLength"),
            max_length: u("maxLength"),
            min_items: u("minItems"),
            max_items: u("maxItems"),
            format: s("format"),
            default: v.get("default").cloned(),
            ..Schema::default()
        };
        if let Some(req) = v.get("required").and_then(Value::as_array) {
            out.required = req
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
        }
        if let Some(p) = s("pattern") {
            let re = Regex::new(&p).map_err(|e| format!("invalid pattern {p:?}: {e}"))?;
            out.pattern = Some((p, re));
        }
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (k, pv) in props {
                out.properties.insert(k.clone(), Schema::parse(pv)?);
            }
        }
        match v.get("additionalProperties") {
            Some(Value::Bool(true)) => out.preserve_unknown = true,
            Some(a @ Value::Object(_)) => out.additional = Some(Box::new(Schema::parse(a)?)),
            _ => {}
        }
        if let Some(items) = v.get("items") {
            out.items = Some(Box::new(Schema::parse(items)?));
        }
        Ok(out)
    }

    /// Removes the fields the schema does not declare, noting each one's path
    /// (`spec.foo`) for strict field validation. At the root, `apiVersion`,
    /// `kind` and `metadata` are always kept (metadata has its own rules).
    pub fn prune(&self, v: &mut Value, path: &str, unknown: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(add) = &self.additional {
                    for (k, x) in m.iter_mut() {
                        add.prune(x, &format!("{path}[{k}]"), unknown);
                    }
                    return;
                }
                let keep =
                    |k: &str| path.is_empty() && matches!(k, "apiVersion" | "kind" | "metadata");
                if !self.preserve_unknown {
                    let drop: Vec<String> = m
                        .keys()
                        .filter(|k| !self.properties.contains_key(*k) && !keep(k))
                        .cloned()
                        .collect();
                    for k in drop {
                        m.remove(&k);
                        unknown.push(child(path, &k));
                    }
                }
                for (k, s) in &self.properties {
                    if let Some(x) = m.get_mut(k)
                        && !(path.is_empty() && k == "metadata")
                    {
                        s.prune(x, &child(path, k), unknown);
                    }
                }
            }
            Value::Array(a) => {
                if let Some(items) = &self.items {
                    for (i, x) in a.iter_mut().enumerate() {
                        items.prune(x, &format!("{path}[{i}]"), unknown);
                    }
                }
            }
            _ => {}
        }
    }

    /// Fills in the `default`s of absent properties.
    pub fn apply_defaults(&self, v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, s) in &self.properties {
                    if let (None, Some(d)) = (m.get(k), &s.default) {
                        m.insert(k.clone(), d.clone());
                    }
                    if let Some(x) = m.get_mut(k) {
                        s.apply_defaults(x);
                    }
                }
                if let Some(add) = &self.additional {
                    m.values_mut().for_each(|x| add.apply_defaults(x));
                }
            }
            Value::Array(a) => {
                if let Some(items) = &self.items {
                    a.iter_mut().for_each(|x| items.apply_defaults(x));
                }
            }
            _ => {}
        }
    }

    fn type_ok(&self, v: &Value) -> Option<String> {
        if self.int_or_string {
            return (!(v.is_string() || is_integer(v))).then(|| "integer,string".to_string());
        }
        let t = self.ty.as_deref()?;
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_number() && is_integer(v),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        (!ok).then(|| t.to_string())
    }

    /// Checks `v` (at `path`, "" for the root) and everything under it.
    pub fn validate(&self, v: &Value, path: &str, errs: &mut Vec<FieldError>) {
        use FieldErrorKind as K;
        if v.is_null() && self.nullable {
            return;
        }
        if let Some(want) = self.type_ok(v) {
            let actual = type_name(v);
            let detail = format!("{path} in body must be of type {want}: \"{actual}\"");
            errs.push(FieldError::new(
                path,
                K::TypeInvalid,
                &Value::String(actual.into()),
                detail,
            ));
            return;
        }
        if let Some(allowed) = &self.enumeration
            && !allowed.contains(v)
        {
            let names = allowed
                .iter()
                .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string))
                .collect();
            errs.push(FieldError::new(path, K::NotSupported(names), v, ""));
        }
        let invalid = |errs: &mut Vec<FieldError>, detail: String| {
            errs.push(FieldError::new(path, K::Invalid, v, detail))
        };
        match v {
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(0.0);
                let show = |b: f64| {
                    if b.fract() == 0.0 {
                        format!("{}", b as i64)
                    } else {
                        b.to_string()
                    }
                };
                if let Some(max) = self.maximum {
                    if self.exclusive_maximum && x >= max {
                        invalid(
                            errs,
                            format!("{path} in body should be less than {}", show(max)),
                        );
                    } else if x > max {
                        invalid(
                            errs,
                            format!(
                                "{path} in body should be less than or equal to {}",
                                show(max)
                            ),
                        );
                    }
                }
                if let Some(min) = self.minimum {
                    if self.exclusive_minimum && x <= min {
                        invalid(
                            errs,
                            format!("{path} in body should be greater than {}", show(min)),
                        );
                    } else if x < min {
                        invalid(
                            errs,
                            format!(
                                "{path} in body should be greater than or equal to {}",
                                show(min)
                            ),
                        );
                    }
                }
            }
            Value::String(s) if !self.int_or_string => {
                let len = s.chars().count() as u64;
                if let Some(max) = self.max_length.filter(|m| len > *m) {
                    errs.push(FieldError::new(path, K::TooLong(max), v, ""));
                }
                if let Some(min) = self.min_length.filter(|m| len < *m) {
                    invalid(
                        errs,
                        format!("{path} in body should be at least {min} chars long"),
                    );
                }
                if let Some((p, re)) = &self.pattern
                    && !re.is_match(s)
                {
                    invalid(errs, format!("{path} in body should match '{p}'"));
                }
                if self.format.as_deref() == Some("date-time") && !date_time().is_match(s) {
                    invalid(
                        errs,
                        format!("{path} in body must be of type date-time: \"{s}\""),
                    );
                }
            }
            Value::Array(a) => {
                if let Some(max) = self.max_items.filter(|m| a.len() as u64 > *m) {
                    errs.push(FieldError::new(
                        path,
                        K::TooMany(max),
                        &Value::from(a.len()),
                        "",
                    ));
                }
                if let Some(min) = self.min_items.filter(|m| (a.len() as u64) < *m) {
                    invalid(
                        errs,
                        format!("{path} in body should have at least {min} items"),
                    );
                }
                if let Some(items) = &self.items {
                    for (i, x) in a.iter().enumerate() {
                        items.validate(x, &format!("{path}[{i}]"), errs);
                    }
                }
            }
            Value::Object(m) => self.validate_object(m, path, errs),
            _ => {}
        }
    }

    fn validate_object(&self, m: &Map<String, Value>, path: &str, errs: &mut Vec<FieldError>) {
        for r in self.required.iter().filter(|r| !m.contains_key(*r)) {
            errs.push(FieldError::required(&child(path, r), ""));
        }
        for (k, x) in m {
            if path.is_empty() && k == "metadata" {
                continue;
            }
            if let Some(s) = self.properties.get(k) {
                s.validate(x, &child(path, k), errs);
            } else if let Some(add) = &self.additional {
                add.validate(x, &format!("{path}[{k}]"), errs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::parse(&json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["service", "canary"],
                    "properties": {
                        "service": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": "^[a-z]+$"},
                        "canary": {"type": "string"},
                        "port": {"x-kubernetes-int-or-string": true},
                        "affinity": {"type": "string", "enum": ["client", "connection"], "default": "client"},
                        "paused": {"type": "boolean"},
                        "steps": {"type": "array", "maxItems": 2, "items": {"type": "number", "minimum": 0, "maximum": 100}},
                        "q": {"type": "number", "exclusiveMinimum": true, "minimum": 0, "exclusiveMaximum": true, "maximum": 1},
                        "n": {"type": "integer"},
                        "at": {"type": "string", "format": "date-time"},
                        "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "hooks": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}
                    }
                }
            }
        }))
        .unwrap()
    }

    fn errors(obj: Value) -> Vec<String> {
        let mut errs = Vec::new();
        schema().validate(&obj, "", &mut errs);
        errs.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_valid_object_has_no_errors() {
        let ok = json!({"spec": {"service": "web", "canary": "c", "port": "http", "steps": [5, 100], "q": 0.5,
            "n": 3, "at": "2026-12-04T01:02:03.123456Z", "tags": {"a": "b"}, "free": {"x": {"y": 1}}}});
        assert_eq!(errors(ok), Vec::<String>::new());
        assert_eq!(
            errors(json!({"spec": {"service": "web", "canary": "c", "port": 8080, "n": 2.0}})),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_rule_names_the_nested_field_in_the_api_servers_words() {
        let got = errors(
            json!({"spec": {"service": "Web-too-long", "affinity": "sideways", "paused": "yes",
            "steps": [150, -1, 3], "q": 1, "n": 1.5, "port": true, "at": "yesterday", "tags": {"k": 1}}}),
        );
        let want = [
            "spec.canary: Required value",
            "spec.affinity: Unsupported value: \"sideways\": supported values: \"client\", \"connection\"",
            "spec.at: Invalid value: \"yesterday\": spec.at in body must be of type date-time: \"yesterday\"",
            "spec.n: Invalid value: \"number\": spec.n in body must be of type integer: \"number\"",
            "spec.paused: Invalid value: \"string\": spec.paused in body must be of type boolean: \"string\"",
            "spec.port: Invalid value: \"boolean\": spec.port in body must be of type integer,string: \"boolean\"",
            "spec.q: Invalid value: 1: spec.q in body should be less than 1",
            "spec.service: Too long: may not be more than 5 bytes",
            "spec.service: Invalid value: \"Web-too-long\": spec.service in body should match '^[a-z]+$'",
            "spec.steps: Too many: 3: must have at most 2 items",
            "spec.steps[0]: Invalid value: 150: spec.steps[0] in body should be less than or equal to 100",
            "spec.steps[1]: Invalid value: -1: spec.steps[1] in body should be greater than or equal to 0",
            "spec.tags[k]: Invalid value: \"integer\": spec.tags[k] in body must be of type string: \"integer\"",
        ];
        assert_eq!(got, want);
        assert_eq!(errors(json!({})), ["spec: Required value"]);
    }

    #[test]
    fn pruning_drops_undeclared_fields_except_where_unknown_fields_are_preserved() {
        let mut obj = json!({"apiVersion": "v", "kind": "K", "metadata": {"name": "x", "odd": 1}, "extra": 1,
            "spec": {"service": "a", "foo": 1, "free": {"bar": 2}, "tags": {"t": "v"}, "hooks": [{"name": "h", "zap": 1}]}});
        let mut unknown = Vec::new();
        schema().prune(&mut obj, "", &mut unknown);
        assert_eq!(unknown, ["extra", "spec.foo", "spec.hooks[0].zap"]);
        assert_eq!(
            obj["spec"],
            json!({"service": "a", "free": {"bar": 2}, "tags": {"t": "v"}, "hooks": [{"name": "h"}]})
        );
        assert_eq!(
            obj["metadata"]["odd"], 1,
            "metadata is not the schema's to prune"
        );
        schema().apply_defaults(&mut obj);
        assert_eq!(obj["spec"]["affinity"], "client");
    }
}
