//! A rollout's `webhooks:` — Flagger's lifecycle hooks, for the tools that
//! already listen to Flagger: events POSTed as they happen, and gates that
//! hold a step until they answer 2xx.
//!
//! ```yaml
//! rollout:
//!   webhooks:
//!     - name: chat                     # 1-63 of a-z A-Z 0-9 - _ . ; unique per service
//!       type: event                    # event | confirm-traffic-increase | confirm-promotion
//!       url: http://relay.ops:8080/kanari   # plain HTTP (a relay terminates TLS)
//!       timeout: 10s                   # per attempt (100ms to 1m)
//!       retries: 2                     # attempts after a failed one (0 to 10)
//!       metadata: {team: payments}     # sent as is in every payload
//! ```

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::{FieldError, HookKind, Webhook, err, raw::DurationField};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    name: String,
    #[serde(rename = "type")]
    kind: HookKind,
    url: String,
    timeout: Option<DurationField>,
    retries: Option<u32>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// A webhook's attempt timeout by default, and its bounds.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
pub const MIN_WEBHOOK_TIMEOUT: Duration = Duration::from_millis(100);
pub const MAX_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts after a failed one, by default and at most.
pub const DEFAULT_WEBHOOK_RETRIES: u32 = 2;
pub const MAX_WEBHOOK_RETRIES: u32 = 10;

/// Validates `rollout.webhooks`; `at` turns a field into its full path.
pub(super) fn validate(
    raw: Vec<RawWebhook>,
    at: &dyn Fn(&str) -> String,
) -> Result<Vec<Webhook>, FieldError> {
    let mut out: Vec<Webhook> = Vec::new();
    for (i, w) in raw.into_iter().enumerate() {
        let field = |f: &str| at(&format!("rollout.webhooks[{i}].{f}"));
        let name_ok = (1..=63).contains(&w.name.len())
            && w.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return err(field("name"), "1 to 63 of a-z A-Z 0-9 - _ .");
        }
        if out.iter().any(|o| o.name == w.name) {
            return err(
                field("name"),
                format!("{} names another webhook of this service too", w.name),
            );
        }
        let uri: hyper::Uri = w
            .url
            .parse()
            .or_else(|e| err(field("url"), format!("`{}` is not a URL: {e}", w.url)))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return err(
                    field("url"),
                    "https is not supported: kanari posts over plain HTTP; point the URL at \
                     a relay that terminates TLS (on the node, or a Service in the cluster)",
                );
            }
            _ => {
                return err(
                    field("url"),
                    format!("`{}` needs http://HOST[:PORT]/PATH", w.url),
                );
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return err(field("url"), format!("`{}` has no host", w.url));
        }
        let timeout = w.timeout.map_or(DEFAULT_WEBHOOK_TIMEOUT, |d| d.0);
        if !(MIN_WEBHOOK_TIMEOUT..=MAX_WEBHOOK_TIMEOUT).contains(&timeout) {
            return err(
                field("timeout"),
                format!(
                    "must be {} to {}",
                    humantime::format_duration(MIN_WEBHOOK_TIMEOUT),
                    humantime::format_duration(MAX_WEBHOOK_TIMEOUT)
                ),
            );
        }
        let retries = w.retries.unwrap_or(DEFAULT_WEBHOOK_RETRIES);
        if retries > MAX_WEBHOOK_RETRIES {
            return err(
                field("retries"),
                format!("{retries} is more than {MAX_WEBHOOK_RETRIES}"),
            );
        }
        out.push(Webhook {
            name: w.name,
            kind: w.kind,
            url: w.url,
            timeout,
            retries,
            metadata: w.metadata,
        });
    }
    Ok(out)
}
