//! The PATCH bodies: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).
//! Strategic merge patch for built-ins is served as a merge patch (lists are
//! replaced, not merged by key), which is what the tests' patches need.

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Why a JSON patch failed: a malformed patch document (400) or one that
/// does not apply to this object (422), as the API server tells them apart.
#[derive(Debug, Clone, PartialEq)]
pub enum PatchError {
    Malformed(String),
    Failed(String),
}

/// RFC 6901 pointer, unescaped into its tokens.
fn tokens(pointer: &str) -> Result<Vec<String>, PatchError> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer.strip_prefix('/').ok_or_else(|| {
        PatchError::Malformed(format!("JSON pointer must start with '/': {pointer:?}"))
    })?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn index(tok: &str, len: usize, allow_end: bool) -> Result<usize, PatchError> {
    if allow_end && tok == "-" {
        return Ok(len);
    }
    let i: usize = tok
        .parse()
        .map_err(|_| PatchError::Failed(format!("invalid array index: {tok}")))?;
    if i > len || (!allow_end && i == len) {
        return Err(PatchError::Failed(format!(
            "array index out of bounds: {i}"
        )));
    }
    Ok(i)
}

fn parent<'a>(doc: &'a mut Value, toks: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m.get_mut(t),
            Value::Array(a) => {
                let i = index(t, a.len(), false)?;
                a.get_mut(i)
            }
            _ => None,
        }
        .ok_or_else(|| PatchError::Failed(format!("missing value at /{}", toks.join("/"))))?;
    }
    Ok(cur)
}

fn get(doc: &Value, path: &str) -> Result<Value, PatchError> {
    let mut d = doc.clone();
    parent(&mut d, &tokens(path)?).map(|v| v.clone())
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    let toks = tokens(path)?;
    let Some((last, init)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent(doc, init)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = index(last, a.len(), true)?;
            a.insert(i, value);
        }
        _ => {
            return Err(PatchError::Failed(format!(
                "cannot add at {path}: parent is not a container"
            )));
        }
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let toks = tokens(path)?;
    let (last, init) = toks
        .split_last()
        .ok_or_else(|| PatchError::Failed("cannot remove the root".into()))?;
    let missing = || {
        PatchError::Failed(format!(
            "unable to remove nonexistent key: {last}: missing value"
        ))
    };
    match parent(doc, init)? {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let i = index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(missing()),
    }
}

/// Applies an RFC 6902 patch (add, remove, replace, move, copy, test).
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::Malformed("a JSON patch must be an array".into()))?;
    let mut doc = doc.clone();
    for op in ops {
        let field = |name: &str| {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Malformed(format!("operation missing {name:?}: {op}")))
        };
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Malformed(format!("operation missing \"value\": {op}")))
        };
        let path = field("path")?;
        match field("op")? {
            "add" => add(&mut doc, path, value()?)?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                remove(&mut doc, path).map_err(|_| {
                    PatchError::Failed(format!(
                        "replace operation does not apply: doc is missing key: {path}"
                    ))
                })?;
                add(&mut doc, path, value()?)?;
            }
            "move" => {
                let v = remove(&mut doc, field("from")?)?;
                add(&mut doc, path, v)?;
            }
            "copy" => {
                let v = get(&doc, field("from")?)?;
                add(&mut doc, path, v)?;
            }
            "test" => {
                if get(&doc, path).ok() != Some(value()?) {
                    return Err(PatchError::Failed(format!(
                        "testing value {path} failed: test failed"
                    )));
                }
            }
            other => {
                return Err(PatchError::Malformed(format!(
                    "unexpected operation {other:?}"
                )));
            }
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut doc,
            &json!({"a": "z", "c": {"f": null, "n": 1}, "l": [3]}),
        );
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e", "n": 1}, "l": [3]}));
        let mut s = json!("x");
        merge_patch(&mut s, &json!({"k": {"deep": null}}));
        assert_eq!(s, json!({"k": {}}));
    }

    #[test]
    fn json_patch_applies_every_operation() {
        let doc = json!({"spec": {"steps": [5, 50], "a/b": 1}, "x": 1});
        let out = json_patch(
            &doc,
            &json!([
                {"op": "test", "path": "/x", "value": 1},
                {"op": "add", "path": "/spec/steps/1", "value": 25},
                {"op": "add", "path": "/spec/steps/-", "value": 100},
                {"op": "replace", "path": "/x", "value": 2},
                {"op": "move", "from": "/spec/a~1b", "path": "/moved"},
                {"op": "copy", "from": "/moved", "path": "/copied"},
                {"op": "remove", "path": "/spec/steps/0"},
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"spec": {"steps": [25, 50, 100]}, "x": 2, "moved": 1, "copied": 1})
        );
    }

    #[test]
    fn json_patch_failures_are_told_apart_from_malformed_patches() {
        let doc = json!({"x": 1});
        assert!(matches!(
            json_patch(&doc, &json!([{"op": "test", "path": "/x", "value": 2}])),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op": "remove", "path": "/nope"}])),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(
                &doc,
                &json!([{"op": "replace", "path": "/nope", "value": 1}])
            ),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op": "frob", "path": "/x"}])),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            json_patch(&doc, &json!({"op": "add"})),
            Err(PatchError::Malformed(_))
        ));
    }
}
