//! Field ownership, as `metadata.managedFields` records it: which field
//! manager set which fields, by Update (PUT, PATCH, POST) or by Apply
//! (server-side apply). Apply merges a manager's configuration, removes
//! what it stopped applying, and refuses, with 409 Conflict, to change a
//! field another manager owns unless forced; kube-lease-manager's locking
//! rests on that. Lists are atomic (owned whole).

use super::store::{Part, Rules};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// One field, as the segments of its path (`["spec", "holderIdentity"]`).
pub type Path = Vec<String>;

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub apply: bool,
    pub api_version: String,
    pub time: String,
    pub status: bool,
    pub fields: BTreeSet<Path>,
}

/// The fields `part` of an object sets: its leaves (scalars and lists),
/// labels and annotations by key; identity and system metadata are no one's.
pub fn leaves(obj: &Value, rules: Rules, part: Part) -> BTreeSet<Path> {
    fn walk(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        match v.as_object() {
            // An empty object sets nothing (as an apply of `spec: {}` merges nothing).
            Some(m) => {
                for (k, x) in m {
                    path.push(k.clone());
                    walk(x, path, out);
                    path.pop();
                }
            }
            None => {
                out.insert(path.clone());
            }
        }
    }
    let mut out = BTreeSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, v) in m {
        let is_status = k == "status";
        let wanted = match part {
            Part::Status => is_status,
            Part::Main => {
                !(is_status && rules.status_subresource) && k != "apiVersion" && k != "kind"
            }
        };
        if !wanted {
            continue;
        }
        if k == "metadata" {
            for sub in ["labels", "annotations"] {
                for key in v[sub].as_object().into_iter().flat_map(Map::keys) {
                    out.insert(vec!["metadata".into(), sub.into(), key.clone()]);
                }
            }
        } else {
            walk(v, &mut vec![k.clone()], &mut out);
        }
    }
    out
}

fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, seg| cur.get(seg))
}

fn remove(v: &mut Value, path: &[String]) {
    let Some((last, init)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in init {
        match cur.get_mut(seg) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

fn set(v: &mut Value, path: &[String], value: Value) {
    let mut cur = v;
    for seg in &path[..path.len() - 1] {
        if !cur[seg.as_str()].is_object() {
            cur[seg.as_str()] = json!({});
        }
        cur = &mut cur[seg.as_str()];
    }
    cur[path[path.len() - 1].as_str()] = value;
}

fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The entries of an object's `metadata.managedFields`.
pub fn entries(obj: &Value) -> Vec<Entry> {
    fn fields(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        let m = v
            .as_object()
            .filter(|m| m.keys().any(|k| k.starts_with("f:")));
        match m {
            Some(m) => {
                for (k, x) in m.iter().filter(|(k, _)| k.starts_with("f:")) {
                    path.push(k[2..].to_string());
                    fields(x, path, out);
                    path.pop();
                }
            }
            None if !path.is_empty() => {
                out.insert(path.clone());
            }
            None => {}
        }
    }
    let list = obj["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.iter()
        .map(|e| {
            let mut fs = BTreeSet::new();
            fields(&e["fieldsV1"], &mut Vec::new(), &mut fs);
            Entry {
                manager: e["manager"].as_str().unwrap_or("").into(),
                apply: e["operation"] == "Apply",
                api_version: e["apiVersion"].as_str().unwrap_or("").into(),
                time: e["time"].as_str().unwrap_or("").into(),
                status: e["subresource"] == "status",
                fields: fs,
            }
        })
        .collect()
}

/// Writes the entries back (dropping the empty ones), in the API's format.
pub fn set_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut f = json!({});
            for p in &e.fields {
                let prefixed: Path = p.iter().map(|s| format!("f:{s}")).collect();
                set(&mut f, &prefixed, json!({}));
            }
            let mut v = json!({"manager": e.manager, "operation": if e.apply { "Apply" } else { "Update" },
                "apiVersion": e.api_version, "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": f});
            if e.status {
                v["subresource"] = "status".into();
            }
            v
        })
        .collect();
    if list.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = list.into();
    }
}

/// Who a write is by, and how.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub now: &'a str,
    pub rules: Rules,
    pub part: Part,
}

/// Records an Update by `w`: the fields it changed become its own (and no
/// one else's); fields that are gone are no one's.
pub fn record_update(old: Option<&Value>, new: &mut Value, w: &Writer) {
    let mut all = old.map(entries).unwrap_or_default();
    let before = old.map(|o| leaves(o, w.rules, w.part)).unwrap_or_default();
    let after = leaves(new, w.rules, w.part);
    let changed: BTreeSet<Path> = after
        .iter()
        .filter(|p| old.and_then(|o| get(o, p)) != get(new, p))
        .cloned()
        .collect();
    let status = w.part == Part::Status;
    for e in all.iter_mut().filter(|e| e.status == status) {
        e.fields
            .retain(|p| !changed.contains(p) && (after.contains(p) || !before.contains(p)));
    }
    if !changed.is_empty() {
        match all
            .iter_mut()
            .find(|e| e.manager == w.manager && !e.apply && e.status == status)
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = w.now.into();
            }
            None => all.push(Entry {
                manager: w.manager.into(),
                apply: false,
                api_version: w.api_version.into(),
                time: w.now.into(),
                status,
                fields: changed,
            }),
        }
    }
    set_entries(new, &all);
}

/// A field another manager owns and an apply would change.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: Option<String>,
    pub field: String,
}

/// Applies `config` for `w.manager` on `current` (None: creates). Returns
/// the merged object, or the conflicts when not `force`d.
pub fn apply(
    current: Option<&Value>,
    config: &Value,
    w: &Writer,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let mut merged = current.cloned().unwrap_or_else(|| config.clone());
    let mut all = current.map(entries).unwrap_or_default();
    let status = w.part == Part::Status;
    let wanted = leaves(config, w.rules, w.part);
    let mut conflicts = Vec::new();
    for p in wanted
        .iter()
        .filter(|p| current.and_then(|c| get(c, p)) != get(config, p))
    {
        for e in all
            .iter_mut()
            .filter(|e| e.manager != w.manager && e.status == status)
        {
            if e.fields.iter().any(|f| overlaps(f, p)) {
                if force {
                    e.fields.retain(|f| !overlaps(f, p));
                } else {
                    conflicts.push(Conflict {
                        manager: e.manager.clone(),
                        api_version: (!e.apply).then(|| e.api_version.clone()),
                        field: format!(".{}", p.join(".")),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let others: BTreeSet<Path> = all
        .iter()
        .filter(|e| e.manager != w.manager && e.status == status)
        .flat_map(|e| e.fields.clone())
        .collect();
    let mine = all
        .iter()
        .position(|e| e.manager == w.manager && e.apply && e.status == status);
    if let Some(i) = mine {
        for p in all[i]
            .fields
            .iter()
            .filter(|p| !wanted.contains(*p) && !others.contains(*p))
        {
            remove(&mut merged, p);
        }
    }
    for p in &wanted {
        set(
            &mut merged,
            p,
            get(config, p).cloned().unwrap_or(Value::Null),
        );
    }
    let entry = Entry {
        manager: w.manager.into(),
        apply: true,
        api_version: w.api_version.into(),
        time: w.now.into(),
        status,
        fields: wanted,
    };
    match mine {
        Some(i) if all[i].fields == entry.fields => {}
        Some(i) => all[i] = entry,
        None => all.push(entry),
    }
    set_entries(&mut merged, &all);
    Ok(merged)
}

/// The message a real server gives for apply conflicts.
pub fn conflict_message(conflicts: &[Conflict]) -> String {
    let who = |c: &Conflict| match &c.api_version {
        Some(v) => format!("\"{}\" using {v}", c.manager),
        None => format!("\"{}\"", c.manager),
    };
    if let [c] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            who(c),
            c.field
        );
    }
    let lines: Vec<String> = conflicts
        .iter()
        .map(|c| format!("conflict with {}: {}", who(c), c.field))
        .collect();
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Rules = Rules {
        generation: false,
        status_subresource: false,
    };

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "coordination.k8s.io/v1",
            now: "2026-01-01T00:00:00Z",
            rules: LEASE,
            part: Part::Main,
        }
    }

    #[test]
    fn an_apply_that_changes_anothers_field_conflicts_unless_forced() {
        let cfg_a = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 5}});
        let a = apply(None, &cfg_a, &writer("mgr-a"), false).unwrap();
        assert_eq!(
            a["metadata"]["managedFields"][0]["fieldsV1"],
            json!({"f:spec": {"f:holderIdentity": {}, "f:leaseDurationSeconds": {}}})
        );
        let same = json!({"spec": {"holderIdentity": "a"}});
        assert!(
            apply(Some(&a), &same, &writer("mgr-b"), false).is_ok(),
            "the same value is shared, not a conflict"
        );
        let cfg_b = json!({"spec": {"holderIdentity": "b"}});
        let err = apply(Some(&a), &cfg_b, &writer("mgr-b"), false).unwrap_err();
        assert_eq!(
            conflict_message(&err),
            "Apply failed with 1 conflict: conflict with \"mgr-a\": .spec.holderIdentity"
        );
        let b = apply(Some(&a), &cfg_b, &writer("mgr-b"), true).unwrap();
        assert_eq!(
            b["spec"],
            json!({"holderIdentity": "b", "leaseDurationSeconds": 5})
        );
        let owners: Vec<_> = entries(&b)
            .into_iter()
            .map(|e| (e.manager, e.fields.len()))
            .collect();
        assert_eq!(owners, [("mgr-a".to_string(), 1), ("mgr-b".to_string(), 1)]);
    }

    #[test]
    fn an_update_takes_the_fields_it_changes_and_an_apply_drops_what_it_stopped_setting() {
        let cfg = json!({"metadata": {"name": "l", "labels": {"x": "1"}}, "spec": {"holderIdentity": "a", "renewTime": "t"}});
        let a = apply(None, &cfg, &writer("mgr-a"), false).unwrap();
        let mut nulled = a.clone();
        nulled["spec"]
            .as_object_mut()
            .unwrap()
            .remove("holderIdentity");
        record_update(Some(&a), &mut nulled, &writer("mgr-a"));
        let mut changed = nulled.clone();
        changed["spec"]["renewTime"] = json!("t2");
        record_update(Some(&nulled), &mut changed, &writer("kubectl"));
        let e = entries(&changed);
        assert_eq!(
            e[0].fields.iter().map(|p| p.join(".")).collect::<Vec<_>>(),
            ["metadata.labels.x"]
        );
        assert_eq!((e[1].manager.as_str(), e[1].apply), ("kubectl", false));
        let err = apply(
            Some(&changed),
            &json!({"spec": {"renewTime": "t3"}}),
            &writer("mgr-a"),
            false,
        )
        .unwrap_err();
        assert_eq!(
            err[0].api_version.as_deref(),
            Some("coordination.k8s.io/v1")
        );
        let shrunk = apply(
            Some(&changed),
            &json!({"spec": {}}),
            &writer("mgr-a"),
            false,
        )
        .unwrap();
        assert_eq!(
            shrunk["metadata"].get("labels").and_then(|l| l.get("x")),
            None,
            "a label no longer applied is removed"
        );
        assert_eq!(shrunk["spec"]["renewTime"], "t2", "what another owns stays");
    }
}
