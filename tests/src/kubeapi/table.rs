//! `meta.k8s.io/v1` Table output (what `kubectl get` asks for): the Name
//! column, a custom resource's additionalPrinterColumns evaluated by their
//! simple JSONPaths, and Age; cells typed as the apiextensions server types
//! them (dates become ages, numbers stay numbers).

use super::meta::{human_duration, parse_rfc3339};
use serde_json::{Map, Value, json};
use std::time::SystemTime;

const NAME_DOC: &str = "Name must be unique within a namespace. Is required when creating resources, although \
some resources may allow a client to request the generation of an appropriate name automatically. Name is \
primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: \
https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DOC: &str = "CreationTimestamp is a timestamp representing the server time when this object was \
created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not \
set this value. It is represented in RFC3339 form and is in UTC.";

/// One printer column.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

impl Column {
    pub fn from_crd(c: &Value) -> Column {
        let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
        let json_path = s("jsonPath");
        let description = c["description"].as_str().map_or_else(
            || format!("Custom resource definition column (in JSONPath format): {json_path}"),
            str::to_string,
        );
        Column {
            name: s("name"),
            ty: s("type"),
            format: s("format"),
            description,
            priority: c["priority"].as_i64().unwrap_or(0),
            json_path,
        }
    }

    fn definition(&self) -> Value {
        json!({"name": self.name, "type": self.ty, "format": self.format, "description": self.description, "priority": self.priority})
    }
}

/// What each row carries besides its cells (`?includeObject=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// Evaluates the JSONPaths printer columns use: `.a.b`, `.a[0].b`,
/// `.a[?(@.type=="Ready")].status` (first match).
pub fn jsonpath(obj: &Value, path: &str) -> Option<Value> {
    let mut cur = obj.clone();
    let mut rest = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            cur = cur.get(&r[..end])?.clone();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            rest = &r[end + 1..];
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (field, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches(['"', '\'']);
                cur = cur
                    .as_array()?
                    .iter()
                    .find(|e| e.get(field.trim()).and_then(Value::as_str) == Some(want))?
                    .clone();
            } else {
                cur = cur.get(inner.parse::<usize>().ok()?)?.clone();
            }
        } else {
            return None;
        }
    }
    Some(cur)
}

fn age(timestamp: Option<&str>, now: SystemTime) -> Value {
    match timestamp.and_then(parse_rfc3339) {
        Some(t) => human_duration(now.duration_since(t).unwrap_or_default()).into(),
        None if timestamp.is_some() => "<invalid>".into(),
        None => "<unknown>".into(),
    }
}

/// A cell as the apiextensions table convertor makes it: `string` columns
/// print the value, the others keep its type or are null when it has another.
pub fn cell(column: &Column, value: Option<&Value>, now: SystemTime) -> Value {
    let Some(v) = value.filter(|v| !v.is_null()) else {
        return Value::Null;
    };
    match column.ty.as_str() {
        "string" => match v {
            Value::String(s) => s.clone().into(),
            other => other.to_string().into(),
        },
        "integer" => v.as_f64().map_or(Value::Null, |f| (f as i64).into()),
        "number" => match v.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => (f as i64).into(),
            Some(f) => f.into(),
            None => Value::Null,
        },
        "boolean" => v.as_bool().map_or(Value::Null, Value::from),
        "date" => match v.as_str() {
            Some(s) => age(Some(s), now),
            None => Value::Null,
        },
        _ => Value::Null,
    }
}

fn row_object(obj: &Value, include: Include) -> Option<Value> {
    match include {
        Include::None => None,
        Include::Object => Some(obj.clone()),
        Include::Metadata => Some(
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}),
        ),
    }
}

/// The Table for `objects`; `columns` empty means a built-in's Name, Age.
pub fn render(
    columns: &[Column],
    objects: &[Value],
    include: Include,
    list_meta: Map<String, Value>,
    now: SystemTime,
) -> Value {
    let name = json!({"name": "Name", "type": "string", "format": "name", "description": NAME_DOC, "priority": 0});
    let mut defs = vec![name];
    if columns.is_empty() {
        defs.push(json!({"name": "Age", "type": "string", "format": "", "description": AGE_DOC, "priority": 0}));
    }
    defs.extend(columns.iter().map(Column::definition));
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            if columns.is_empty() {
                cells.push(age(o["metadata"]["creationTimestamp"].as_str(), now));
            }
            cells.extend(
                columns
                    .iter()
                    .map(|c| cell(c, jsonpath(o, &c.json_path).as_ref(), now)),
            );
            let mut row = json!({"cells": cells});
            if let Some(obj) = row_object(o, include) {
                row["object"] = obj;
            }
            row
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeapi::meta::rfc3339;
    use std::time::Duration;

    fn col(name: &str, ty: &str, path: &str) -> Column {
        Column::from_crd(&json!({"name": name, "type": ty, "jsonPath": path}))
    }

    #[test]
    fn jsonpaths_reach_fields_indices_and_filters() {
        let o = json!({"status": {"phase": "Progressing", "conditions": [{"type": "Ready", "status": "True"}]}, "spec": {"steps": [5, 25]}});
        assert_eq!(jsonpath(&o, ".status.phase"), Some(json!("Progressing")));
        assert_eq!(jsonpath(&o, ".spec.steps[1]"), Some(json!(25)));
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(json!("True"))
        );
        assert_eq!(jsonpath(&o, ".status.missing"), None);
    }

    #[test]
    fn cells_are_typed_like_the_apiextensions_convertor() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let created = rfc3339(now - Duration::from_secs(5));
        assert_eq!(
            cell(&col("W", "number", ""), Some(&json!(25.0)), now),
            json!(25)
        );
        assert_eq!(
            cell(&col("W", "number", ""), Some(&json!(12.5)), now),
            json!(12.5)
        );
        assert_eq!(
            cell(&col("S", "integer", ""), Some(&json!("x")), now),
            Value::Null
        );
        assert_eq!(
            cell(&col("P", "string", ""), Some(&json!(3)), now),
            json!("3")
        );
        assert_eq!(
            cell(&col("A", "date", ""), Some(&json!(created)), now),
            json!("5s")
        );
        assert_eq!(
            cell(&col("A", "date", ""), Some(&json!("nonsense")), now),
            json!("<invalid>")
        );
        assert_eq!(cell(&col("P", "string", ""), None, now), Value::Null);
    }

    #[test]
    fn a_table_has_name_then_the_columns_and_rows_carry_partial_metadata() {
        let cols = [
            col("Phase", "string", ".status.phase"),
            Column {
                priority: 1,
                ..col("Rev", "string", ".spec.revision")
            },
        ];
        let objs = [
            json!({"metadata": {"name": "web", "uid": "u"}, "status": {"phase": "Paused"}, "spec": {"revision": "r1"}}),
        ];
        let t = render(
            &cols,
            &objs,
            Include::Metadata,
            Map::new(),
            SystemTime::now(),
        );
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Name", "Phase", "Rev"]);
        assert_eq!(t["columnDefinitions"][2]["priority"], 1);
        assert_eq!(t["rows"][0]["cells"], json!(["web", "Paused", "r1"]));
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let builtin = render(&[], &objs, Include::None, Map::new(), SystemTime::now());
        assert_eq!(builtin["rows"][0]["cells"], json!(["web", "<unknown>"]));
        assert!(builtin["rows"][0].get("object").is_none());
    }
}
