//! Lists: the list/watch query parameters and the checks apimachinery makes
//! of their combinations, resourceVersion semantics (any, NotOlderThan,
//! Exact), selectors, and `limit`/`continue` pagination over a consistent
//! snapshot (the token carries the list's resourceVersion; once compacted
//! away it is 410 Expired).

use super::Shared;
use super::cluster::present;
use super::resources::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::status::{ApiError, FieldError, FieldErrorKind};
use crate::kubeapi::http::Req;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// The parameters of a list or watch.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_from: Option<(u64, String)>,
    pub rv: String,
    pub rv_match: String,
    pub watch: bool,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
}

fn forbidden(field: &str, detail: &str) -> ApiError {
    let e = FieldError::new(field, FieldErrorKind::Forbidden, &Value::Null, detail);
    ApiError::invalid("meta.k8s.io", "ListOptions", "", &[e])
}

fn is_true(v: Option<&str>) -> bool {
    matches!(v, Some("true" | "1"))
}

/// A continue token: opaque to clients, here hex of `{"rv":N,"start":key}`.
fn encode_continue(rv: u64, start: &str) -> String {
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let v: Value = serde_json::from_slice(&bytes?).ok()?;
    Some((v["rv"].as_u64()?, v["start"].as_str()?.to_string()))
}

impl ListQuery {
    pub fn parse(req: &Req) -> Result<ListQuery, ApiError> {
        let p = |k| req.param(k);
        let labels = LabelSelector::parse(p("labelSelector").unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(p("fieldSelector").unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let limit = match p("limit").filter(|l| !l.is_empty()) {
            Some(l) => Some(
                l.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit: {l}")))?,
            )
            .filter(|l| *l > 0)
            .map(|l| l as usize),
            None => None,
        };
        let continue_from = match p("continue").filter(|c| !c.is_empty()) {
            Some(c) => Some(decode_continue(c).ok_or_else(|| ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?),
            None => None,
        };
        let timeout = p("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs);
        let q = ListQuery {
            labels,
            fields,
            limit,
            continue_from,
            rv: p("resourceVersion").unwrap_or("").to_string(),
            rv_match: p("resourceVersionMatch").unwrap_or("").to_string(),
            watch: is_true(p("watch")),
            bookmarks: is_true(p("allowWatchBookmarks")),
            send_initial_events: is_true(p("sendInitialEvents")),
            timeout,
        };
        if !q.rv.is_empty() && q.rv.parse::<u64>().is_err() {
            return Err(ApiError::bad_request(format!(
                "invalid resource version: {}",
                q.rv
            )));
        }
        if q.watch {
            if q.send_initial_events {
                if q.rv_match != "NotOlderThan" {
                    return Err(forbidden(
                        "resourceVersionMatch",
                        "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                    ));
                }
                if !q.bookmarks {
                    return Err(forbidden(
                        "allowWatchBookmarks",
                        "sendInitialEvents requires setting allowWatchBookmarks to true",
                    ));
                }
            } else if !q.rv_match.is_empty() {
                return Err(forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                ));
            }
        } else {
            if q.send_initial_events {
                return Err(forbidden(
                    "sendInitialEvents",
                    "sendInitialEvents is forbidden for list",
                ));
            }
            match q.rv_match.as_str() {
                "" => {}
                _ if q.rv.is_empty() => {
                    return Err(forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    ));
                }
                "Exact" if q.rv == "0" => {
                    return Err(forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                    ));
                }
                "Exact" | "NotOlderThan" => {}
                other => {
                    let e = FieldError::new(
                        "resourceVersionMatch",
                        FieldErrorKind::NotSupported(vec![
                            "Exact".into(),
                            "NotOlderThan".into(),
                            "".into(),
                        ]),
                        &Value::from(other),
                        "",
                    );
                    return Err(ApiError::invalid("meta.k8s.io", "ListOptions", "", &[e]));
                }
            }
            if q.continue_from.is_some() && !q.rv.is_empty() && q.rv != "0" {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
        }
        Ok(q)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn rv_num(&self) -> u64 {
        self.rv.parse().unwrap_or(0)
    }
}

/// Waits (up to 3 s, as the watch cache does) until the store has seen
/// `rv`; then 504 "Too large resource version".
pub async fn wait_for_rv(shared: &Shared, rv: u64) -> Result<(), ApiError> {
    let mut changes = shared.changes.subscribe();
    let reached = tokio::time::timeout(Duration::from_secs(3), changes.wait_for(|cur| *cur >= rv))
        .await
        .is_ok_and(|r| r.is_ok());
    match reached {
        true => Ok(()),
        _ => {
            let current = *changes.borrow();
            let mut e = ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {rv}, current: {current}"),
            );
            e.details.insert("causes".into(), json!([{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]));
            e.details.insert("retryAfterSeconds".into(), 1.into());
            Err(e)
        }
    }
}

fn key_of(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or(""),
        o["metadata"]["name"].as_str().unwrap_or("")
    )
}

/// The page of matching objects and the list's metadata.
pub async fn list(
    shared: &Shared,
    rt: &ResourceType,
    ns: Option<&str>,
    q: &ListQuery,
) -> Result<(Vec<Value>, Map<String, Value>), ApiError> {
    let exact =
        q.rv_match == "Exact" || (q.rv_match.is_empty() && q.limit.is_some() && q.rv_num() > 0);
    let snapshot_rv = match &q.continue_from {
        Some((rv, _)) => Some(*rv),
        None if exact => Some(q.rv_num()),
        None => None,
    };
    let wait = snapshot_rv.unwrap_or(q.rv_num());
    if wait > 0 {
        wait_for_rv(shared, wait).await?;
    }
    let gr = rt.group_resource();
    let (rv, items) = shared.read(|c| {
        let current = c.store.rv();
        match snapshot_rv {
            Some(rv) if rv != current => c.store.list_at(&gr, ns, rv).map(|items| (rv, items)).map_err(|_| {
                if q.continue_from.is_some() {
                    ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.")
                } else {
                    ApiError::expired(format!("The resourceVersion for the provided list is too old. (requested {rv}, oldest {})", c.store.oldest()))
                }
            }),
            _ => Ok((current, c.store.list(&gr, ns).into_iter().cloned().collect())),
        }
    })?;
    let start = q.continue_from.as_ref().map(|(_, k)| k.clone());
    let mut matching = items
        .into_iter()
        .filter(|o| q.matches(o))
        .filter(|o| start.as_ref().is_none_or(|s| key_of(o) > *s));
    let mut page: Vec<Value> = match q.limit {
        Some(n) => matching.by_ref().take(n).collect(),
        None => matching.by_ref().collect(),
    };
    let remaining = matching.count();
    let mut meta = Map::new();
    meta.insert("resourceVersion".into(), rv.to_string().into());
    if remaining > 0
        && let Some(last) = page.last()
    {
        meta.insert("continue".into(), encode_continue(rv, &key_of(last)).into());
        if q.labels == LabelSelector::default() && q.fields == FieldSelector::default() {
            meta.insert("remainingItemCount".into(), remaining.into());
        }
    }
    page = page.into_iter().map(|o| present(rt, o)).collect();
    Ok((page, meta))
}

/// A list object: `ServiceList` with its items (typed lists drop the items'
/// apiVersion and kind; custom resource lists keep them).
pub fn list_object(rt: &ResourceType, items: Vec<Value>, meta: Map<String, Value>) -> Value {
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut o| {
            if !rt.custom
                && let Some(m) = o.as_object_mut()
            {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    json!({"kind": rt.list_kind, "apiVersion": rt.api_version(), "metadata": meta, "items": items})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_garbage_is_refused() {
        let t = encode_continue(42, "ns/web");
        assert_eq!(decode_continue(&t), Some((42, "ns/web".to_string())));
        assert_eq!(decode_continue("zz"), None);
    }
}
