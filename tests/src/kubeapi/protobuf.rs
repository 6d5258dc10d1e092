//! The protobuf request bodies kubectl's typed clients send
//! (`kubectl create namespace`, `kubectl create configmap`): the `k8s\0`
//! envelope (a `runtime.Unknown`) around the object, decoded into JSON for
//! the kinds whose protobuf shape is small enough to know here. Other kinds
//! get 415, which a real server does not give; answers are always JSON.

use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of one message, in order.
fn fields(b: &[u8]) -> Option<Vec<(u64, Wire<'_>)>> {
    let (mut i, mut out) = (0, Vec::new());
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let value = match key & 7 {
            0 => Wire::Varint(varint(b, &mut i)?),
            2 => {
                let n = usize::try_from(varint(b, &mut i)?).ok()?;
                let v = b.get(i..i.checked_add(n)?)?;
                i += n;
                Wire::Bytes(v)
            }
            1 => {
                i += 8;
                Wire::Varint(0)
            }
            5 => {
                i += 4;
                Wire::Varint(0)
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

fn text(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

/// A `map<string, string>` entry into `m`.
fn entry(b: &[u8], m: &mut Map<String, Value>) -> Option<()> {
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => k = String::from_utf8_lossy(x).into_owned(),
            (2, Wire::Bytes(x)) => v = text(x),
            _ => {}
        }
    }
    m.insert(k, v);
    Some(())
}

fn object_meta(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    let (mut labels, mut annotations, mut finalizers) = (Map::new(), Map::new(), Vec::new());
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => drop(m.insert("name".into(), text(x))),
            (2, Wire::Bytes(x)) => drop(m.insert("generateName".into(), text(x))),
            (3, Wire::Bytes(x)) => drop(m.insert("namespace".into(), text(x))),
            (6, Wire::Bytes(x)) => drop(m.insert("resourceVersion".into(), text(x))),
            (11, Wire::Bytes(x)) => entry(x, &mut labels)?,
            (12, Wire::Bytes(x)) => entry(x, &mut annotations)?,
            (14, Wire::Bytes(x)) => finalizers.push(text(x)),
            _ => {}
        }
    }
    for (k, v) in [
        ("labels", Value::Object(labels)),
        ("annotations", Value::Object(annotations)),
        ("finalizers", Value::Array(finalizers)),
    ] {
        if v.as_object().is_some_and(|o| !o.is_empty())
            || v.as_array().is_some_and(|a| !a.is_empty())
        {
            m.insert(k.into(), v);
        }
    }
    Some(Value::Object(m))
}

/// The object a protobuf body holds, as JSON; None when it is not one of
/// the kinds known here or not well formed.
pub fn decode(body: &[u8]) -> Option<Value> {
    let unknown = fields(body.strip_prefix(MAGIC)?)?;
    let (mut api_version, mut kind, mut raw) = (Value::Null, Value::Null, &[][..]);
    for (n, w) in unknown {
        match (n, w) {
            (1, Wire::Bytes(tm)) => {
                for (n, w) in fields(tm)? {
                    match (n, w) {
                        (1, Wire::Bytes(x)) => api_version = text(x),
                        (2, Wire::Bytes(x)) => kind = text(x),
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    for (n, w) in fields(raw)? {
        match (kind.as_str()?, n, w) {
            (_, 1, Wire::Bytes(x)) => obj["metadata"] = object_meta(x)?,
            ("Namespace", 2 | 3, _) => {}
            ("ConfigMap", 2, Wire::Bytes(x)) => {
                let mut data = obj["data"].as_object().cloned().unwrap_or_default();
                entry(x, &mut data)?;
                obj["data"] = Value::Object(data);
            }
            ("ConfigMap", 4, Wire::Varint(v)) => obj["immutable"] = Value::Bool(v != 0),
            _ => return None,
        }
    }
    matches!(kind.as_str()?, "Namespace" | "ConfigMap").then_some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![(n << 3) | 2, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn a_namespace_and_a_configmap_decode_from_their_envelopes() {
        let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let label = [field(1, b"app"), field(2, b"web")].concat();
        let meta = [field(1, b"cfg"), field(11, &label)].concat();
        let data = [field(1, b"k"), field(2, b"v")].concat();
        let raw = [field(1, &meta), field(2, &data), vec![4 << 3, 1]].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &raw)].concat();
        assert_eq!(
            decode(&body),
            Some(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "labels": {"app": "web"}},
                "data": {"k": "v"}, "immutable": true})
            )
        );
        let ns = [
            MAGIC.to_vec(),
            field(1, &[field(1, b"v1"), field(2, b"Namespace")].concat()),
            field(2, &field(1, &field(1, b"x"))),
        ]
        .concat();
        assert_eq!(decode(&ns).unwrap()["metadata"], json!({"name": "x"}));
        let svc = [
            MAGIC.to_vec(),
            field(1, &[field(1, b"v1"), field(2, b"Service")].concat()),
            field(2, &field(1, &field(1, b"x"))),
        ]
        .concat();
        assert_eq!(decode(&svc), None);
    }
}
