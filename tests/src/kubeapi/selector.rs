//! Label and field selectors: the `labelSelector=` and `fieldSelector=`
//! query parameters, parsed and matched the way apimachinery's `labels` and
//! `fields` packages do (comma is AND; set-based `in`/`notin`, `a`, `!a`).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty one matches everything.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LabelSelector(Vec<Req>);

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
    let ok = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    name.len() <= 63
        && ok(name, &['-', '_', '.'])
        && (!k.contains('/') || (prefix.len() <= 253 && ok(prefix, &['-', '.'])))
}

/// A label value: empty, or up to 63 of `[A-Za-z0-9_.-]`, alphanumeric at
/// both ends (`validation.IsValidLabelValue`).
pub fn valid_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn parse_set(rest: &str) -> Option<Vec<String>> {
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    let vals: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    vals.iter().all(|v| valid_value(v)).then_some(vals)
}

fn parse_req(term: &str) -> Result<Req, String> {
    let t = term.trim();
    let err = || {
        format!(
            "unable to parse requirement: found '{t}', expected: key, !key, key=value, key!=value, key in (v), key notin (v)"
        )
    };
    let checked = |k: &str, r: Req| {
        if valid_key(k) {
            Ok(r)
        } else {
            Err(format!(
                "unable to parse requirement: invalid label key \"{k}\""
            ))
        }
    };
    if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        return checked(k, Req::NotExists(k.to_string()));
    }
    if let Some((k, v)) = t.split_once("!=") {
        let (k, v) = (k.trim(), v.trim());
        return if valid_value(v) {
            checked(k, Req::NotEq(k.into(), v.into()))
        } else {
            Err(err())
        };
    }
    if let Some((k, v)) = t.split_once('=') {
        let (k, v) = (k.trim(), v.trim_start_matches('=').trim());
        return if valid_value(v) {
            checked(k, Req::Eq(k.into(), v.into()))
        } else {
            Err(err())
        };
    }
    if let Some((k, rest)) = t.split_once(" notin ") {
        let set = parse_set(rest).ok_or_else(err)?;
        return checked(k.trim(), Req::NotIn(k.trim().into(), set));
    }
    if let Some((k, rest)) = t.split_once(" in ") {
        let set = parse_set(rest).ok_or_else(err)?;
        return checked(k.trim(), Req::In(k.trim().into(), set));
    }
    checked(t, Req::Exists(t.to_string()))
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        if s.trim().is_empty() {
            return Ok(LabelSelector::default());
        }
        split_top(s)
            .into_iter()
            .map(parse_req)
            .collect::<Result<_, _>>()
            .map(LabelSelector)
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v),
            Req::NotEq(k, v) => get(k) != Some(v),
            Req::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Req::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector over `metadata.name` and `metadata.namespace`,
/// the fields every resource supports.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<FieldSelector, String> {
        let mut out = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(format!(
                    "\"{field}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
                ));
            }
            out.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, value)| {
            let got = obj["metadata"][field.trim_start_matches("metadata.")]
                .as_str()
                .unwrap_or("");
            (got == value) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn o(labels: Value) -> Value {
        json!({"metadata": {"name": "n", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn equality_set_and_existence_requirements_all_must_hold() {
        let web = o(json!({"app": "web", "tier": "front"}));
        let db = o(json!({"app": "db"}));
        let cases = [
            ("app=web", true, false),
            ("app==web", true, false),
            ("app!=web", false, true),
            ("tier", true, false),
            ("!tier", false, true),
            ("app in (web, db)", true, true),
            ("app notin (db)", true, false),
            ("app in (web,db),tier", true, false),
            ("app=web,tier=back", false, false),
            ("", true, true),
        ];
        for (sel, w, d) in cases {
            let s = LabelSelector::parse(sel).unwrap();
            assert_eq!((s.matches(&web), s.matches(&db)), (w, d), "{sel}");
        }
        assert!(
            LabelSelector::parse("kubernetes.io/service-name=web-stable")
                .unwrap()
                .matches(&o(json!({"kubernetes.io/service-name": "web-stable"})))
        );
    }

    #[test]
    fn malformed_selectors_are_refused() {
        for bad in ["app in web", "a b=c", "app=we b", "-x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
        assert!(
            FieldSelector::parse("spec.nodeName=x")
                .unwrap_err()
                .contains("not a known field selector")
        );
    }

    #[test]
    fn field_selectors_match_name_and_namespace() {
        let obj = o(json!({}));
        assert!(
            FieldSelector::parse("metadata.name=n,metadata.namespace==ns")
                .unwrap()
                .matches(&obj)
        );
        assert!(
            !FieldSelector::parse("metadata.name!=n")
                .unwrap()
                .matches(&obj)
        );
        assert!(FieldSelector::parse("").unwrap().matches(&obj));
    }
}
