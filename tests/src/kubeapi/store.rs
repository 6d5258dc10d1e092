//! The objects, the one global resourceVersion, and the history of changes
//! that watches are served from. Pure: no I/O, no clock (the caller passes
//! the time), so its rules can be unit-tested. The rules are etcd's and the
//! generic registry's: every write bumps the counter, a write that changes
//! nothing does not, `metadata.generation` counts changes to what is not
//! metadata (nor status, when status is a subresource).

use serde_json::{Map, Value};
use std::collections::{BTreeMap, VecDeque};

/// Why a store operation was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreError {
    NotFound,
    AlreadyExists,
    /// A precondition on `metadata.resourceVersion` did not hold.
    Conflict,
    /// The history asked for was compacted; `oldest` is the first kept.
    Gone {
        oldest: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as watches see it. `object` is the new state (for a delete,
/// the last state with the deletion's resourceVersion); `prev` is the state
/// before, so a label-selector watch can tell an object that stopped matching.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub kind: ChangeType,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub object: Value,
    pub prev: Option<Value>,
}

/// What the kind of object decides about writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// Keeps `metadata.generation` (custom resources, CRDs, EndpointSlices).
    pub generation: bool,
    /// `status` is a subresource: the main resource's writes keep the old
    /// status, and status changes do not raise the generation.
    pub status_subresource: bool,
}

/// Which part of the object an update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

type Key = (String, String, String);

/// All objects of all resources, keyed by (resource, namespace, name); the
/// resource is its group-resource (`leases.coordination.k8s.io`).
#[derive(Debug, Default, Clone)]
pub struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Change>,
    /// Watches and lists from before this resourceVersion get 410 Gone.
    oldest: u64,
    uids: u64,
}

fn key(resource: &str, namespace: &str, name: &str) -> Key {
    (
        resource.to_string(),
        namespace.to_string(),
        name.to_string(),
    )
}

fn meta(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = Value::Object(Map::new());
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

/// The object without what does not count for `metadata.generation`.
fn spec_part(obj: &Value, rules: Rules) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        if rules.status_subresource {
            m.remove("status");
        }
    }
    o
}

/// What an update of `part` makes of `old`: a main write keeps the old
/// status (when status is a subresource), a status write keeps all but it.
pub fn merge_part(old: &Value, obj: Value, rules: Rules, part: Part) -> Value {
    let (mut base, from) = match part {
        Part::Main if rules.status_subresource => (obj, old),
        Part::Main => return obj,
        Part::Status => (old.clone(), &obj),
    };
    let m = base.as_object_mut().expect("an object");
    match from.get("status") {
        Some(s) => m.insert("status".into(), s.clone()),
        None => m.remove("status"),
    };
    base
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// The current resourceVersion: that of the last write.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch or a paginated list may start from.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(&key(resource, namespace, name))
    }

    /// Objects of one resource (in one namespace, or all), in key order
    /// (namespace, then name), as etcd returns them.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .range(key(resource, "", "")..)
            .take_while(|((r, _, _), _)| r == resource)
            .filter(|((_, ns, _), _)| namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v)
            .collect()
    }

    /// The same list as it was at resourceVersion `rv`, rebuilt by undoing the
    /// changes since; refused once those changes are compacted.
    pub fn list_at(
        &self,
        resource: &str,
        namespace: Option<&str>,
        rv: u64,
    ) -> Result<Vec<Value>, StoreError> {
        if rv < self.oldest {
            return Err(StoreError::Gone {
                oldest: self.oldest,
            });
        }
        let mut snapshot: BTreeMap<Key, Value> = self
            .list(resource, namespace)
            .into_iter()
            .map(|o| {
                (
                    key(resource, meta_str(o, "namespace"), meta_str(o, "name")),
                    o.clone(),
                )
            })
            .collect();
        for c in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if c.resource != resource || namespace.is_some_and(|n| n != c.namespace) {
                continue;
            }
            let k = key(resource, &c.namespace, &c.name);
            match (&c.kind, &c.prev) {
                (ChangeType::Added, _) => {
                    snapshot.remove(&k);
                }
                (_, Some(prev)) => {
                    snapshot.insert(k, prev.clone());
                }
                (_, None) => {}
            }
        }
        Ok(snapshot.into_values().collect())
    }

    /// Changes to `resource` after `rv`, oldest first.
    pub fn changes_since(&self, rv: u64, resource: &str) -> Result<Vec<Change>, StoreError> {
        if rv < self.oldest {
            return Err(StoreError::Gone {
                oldest: self.oldest,
            });
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self
            .history
            .range(start..)
            .filter(|c| c.resource == resource)
            .cloned()
            .collect())
    }

    /// Forgets the history before the current resourceVersion, as etcd's
    /// compaction does.
    pub fn compact(&mut self) {
        self.oldest = self.rv;
        self.history.clear();
    }

    fn record(&mut self, kind: ChangeType, resource: &str, object: &Value, prev: Option<Value>) {
        self.history.push_back(Change {
            rv: self.rv,
            kind,
            resource: resource.to_string(),
            namespace: meta_str(object, "namespace").to_string(),
            name: meta_str(object, "name").to_string(),
            object: object.clone(),
            prev,
        });
    }

    /// Stores a new object (its metadata.name and namespace already final):
    /// sets uid, creationTimestamp (`now`), resourceVersion and generation.
    pub fn create(
        &mut self,
        resource: &str,
        mut obj: Value,
        rules: Rules,
        now: &str,
    ) -> Result<Value, StoreError> {
        let k = key(
            resource,
            meta_str(&obj, "namespace"),
            meta_str(&obj, "name"),
        );
        if self.objects.contains_key(&k) {
            return Err(StoreError::AlreadyExists);
        }
        self.rv += 1;
        self.uids += 1;
        let m = meta(&mut obj);
        m.insert(
            "uid".into(),
            format!("6b616e61-7269-4000-8000-{:012x}", self.uids).into(),
        );
        m.insert("creationTimestamp".into(), now.into());
        m.insert("resourceVersion".into(), self.rv.to_string().into());
        if rules.generation {
            m.insert("generation".into(), 1.into());
        } else {
            m.remove("generation");
        }
        self.record(ChangeType::Added, resource, &obj, None);
        self.objects.insert(k, obj.clone());
        Ok(obj)
    }

    /// Replaces an object, or the part of it `part` names. A non-empty
    /// `metadata.resourceVersion` in `obj` is a precondition. System fields
    /// (uid, creationTimestamp, generation) come from the stored object.
    /// A write that changes nothing returns the stored object unchanged.
    pub fn update(
        &mut self,
        resource: &str,
        obj: Value,
        rules: Rules,
        part: Part,
    ) -> Result<Value, StoreError> {
        let k = key(
            resource,
            meta_str(&obj, "namespace"),
            meta_str(&obj, "name"),
        );
        let old = self.objects.get(&k).ok_or(StoreError::NotFound)?;
        let want = meta_str(&obj, "resourceVersion");
        if !want.is_empty() && want != meta_str(old, "resourceVersion") {
            return Err(StoreError::Conflict);
        }
        let mut new = merge_part(old, obj, rules, part);
        for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
            match old["metadata"].get(field) {
                Some(v) => meta(&mut new).insert(field.into(), v.clone()),
                None => meta(&mut new).remove(field),
            };
        }
        if &new == old {
            return Ok(new);
        }
        if rules.generation && spec_part(&new, rules) != spec_part(old, rules) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            meta(&mut new).insert("generation".into(), g.into());
        }
        let prev = old.clone();
        self.rv += 1;
        meta(&mut new).insert("resourceVersion".into(), self.rv.to_string().into());
        self.record(ChangeType::Modified, resource, &new, Some(prev));
        self.objects.insert(k, new.clone());
        Ok(new)
    }

    /// Removes an object; `precondition` is a resourceVersion it must have.
    /// Returns it with the deletion's resourceVersion, as the DELETED event has it.
    pub fn delete(
        &mut self,
        resource: &str,
        namespace: &str,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<Value, StoreError> {
        let k = key(resource, namespace, name);
        let old = self.objects.get(&k).ok_or(StoreError::NotFound)?;
        if precondition.is_some_and(|rv| rv != meta_str(old, "resourceVersion")) {
            return Err(StoreError::Conflict);
        }
        let prev = self.objects.remove(&k).expect("present");
        self.rv += 1;
        let mut gone = prev.clone();
        meta(&mut gone).insert("resourceVersion".into(), self.rv.to_string().into());
        self.record(ChangeType::Deleted, resource, &gone, Some(prev));
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CR: Rules = Rules {
        generation: true,
        status_subresource: true,
    };
    const NOW: &str = "2026-01-01T00:00:00Z";

    fn obj(name: &str, spec: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec})
    }

    fn rv(o: &Value) -> String {
        o["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn every_write_bumps_one_global_counter_and_no_op_writes_do_not() {
        let mut s = Store::new();
        let a = s.create("r", obj("a", json!({"x": 1})), CR, NOW).unwrap();
        let b = s.create("r2", obj("b", json!({})), CR, NOW).unwrap();
        assert_eq!((rv(&a), rv(&b)), ("1".into(), "2".into()));
        assert_eq!(
            s.create("r", obj("a", json!({})), CR, NOW),
            Err(StoreError::AlreadyExists)
        );
        let same = s
            .update("r", obj("a", json!({"x": 1})), CR, Part::Main)
            .unwrap();
        assert_eq!(rv(&same), "1");
        assert_eq!(s.rv(), 2);
        let changed = s
            .update("r", obj("a", json!({"x": 2})), CR, Part::Main)
            .unwrap();
        assert_eq!(rv(&changed), "3");
        assert_eq!(changed["metadata"]["uid"], a["metadata"]["uid"]);
    }

    #[test]
    fn generation_counts_spec_changes_only() {
        let mut s = Store::new();
        s.create("r", obj("a", json!({"x": 1})), CR, NOW).unwrap();
        let mut labelled = obj("a", json!({"x": 1}));
        labelled["metadata"]["labels"] = json!({"l": "v"});
        let o = s.update("r", labelled, CR, Part::Main).unwrap();
        assert_eq!(
            (rv(&o).as_str(), o["metadata"]["generation"].as_i64()),
            ("2", Some(1))
        );
        let mut st = obj("a", json!({"x": 999}));
        st["status"] = json!({"phase": "Progressing"});
        let o = s.update("r", st, CR, Part::Status).unwrap();
        assert_eq!(o["spec"], json!({"x": 1}), "a status write ignores spec");
        assert_eq!(o["status"]["phase"], "Progressing");
        assert_eq!(o["metadata"]["generation"], 1);
        let mut main = obj("a", json!({"x": 5}));
        main["status"] = json!({"phase": "Hacked"});
        let o = s.update("r", main, CR, Part::Main).unwrap();
        assert_eq!(
            o["status"]["phase"], "Progressing",
            "a main write keeps the status"
        );
        assert_eq!(o["metadata"]["generation"], 2);
        let plain = Rules::default();
        let l = s.create("leases", obj("l", json!({})), plain, NOW).unwrap();
        assert!(l["metadata"].get("generation").is_none());
    }

    #[test]
    fn stale_resource_version_conflicts() {
        let mut s = Store::new();
        s.create("r", obj("a", json!({})), CR, NOW).unwrap();
        let mut first = obj("a", json!({"x": 1}));
        first["metadata"]["resourceVersion"] = json!("1");
        let second = first.clone();
        s.update("r", first, CR, Part::Main).unwrap();
        assert_eq!(
            s.update("r", second, CR, Part::Main),
            Err(StoreError::Conflict)
        );
        assert_eq!(
            s.update("r", obj("zz", json!({})), CR, Part::Main),
            Err(StoreError::NotFound)
        );
        assert_eq!(
            s.delete("r", "ns", "a", Some("1")),
            Err(StoreError::Conflict)
        );
    }

    #[test]
    fn history_serves_changes_and_snapshots_until_compacted() {
        let mut s = Store::new();
        s.create("r", obj("a", json!({"v": 1})), CR, NOW).unwrap();
        s.create("r", obj("b", json!({})), CR, NOW).unwrap();
        s.update("r", obj("a", json!({"v": 2})), CR, Part::Main)
            .unwrap();
        let gone = s.delete("r", "ns", "b", None).unwrap();
        assert_eq!(rv(&gone), "4");
        let kinds: Vec<_> = s
            .changes_since(1, "r")
            .unwrap()
            .iter()
            .map(|c| (c.kind, c.rv))
            .collect();
        assert_eq!(
            kinds,
            [
                (ChangeType::Added, 2),
                (ChangeType::Modified, 3),
                (ChangeType::Deleted, 4)
            ]
        );
        let at2 = s.list_at("r", None, 2).unwrap();
        assert_eq!(at2.len(), 2);
        assert_eq!(at2[0]["spec"]["v"], 1);
        assert_eq!(s.list("r", Some("ns")).len(), 1);
        s.compact();
        assert_eq!(
            s.changes_since(3, "r").unwrap_err(),
            StoreError::Gone { oldest: 4 }
        );
        assert!(s.list_at("r", None, 2).is_err());
        assert!(s.changes_since(4, "r").unwrap().is_empty());
    }
}
