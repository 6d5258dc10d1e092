//! Every agent watches the services' keys: the leader's decisions, sent
//! to the loop whole each time one changes. A broken watch (etcd away, a
//! compaction) starts again from a fresh read; meanwhile the decisions
//! last read stand, so every host keeps its weights.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{CALL, Keys};
use crate::rollout::Decision;

/// The decision a key's value holds.
fn parse(value: &[u8]) -> Option<Decision> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    crate::fleet::status::decision(&v)
}

/// Runs the watch; each change of the decisions goes to `to`.
pub fn spawn(client: Client, keys: Keys, to: mpsc::Sender<BTreeMap<String, Decision>>) {
    tokio::spawn(async move {
        let prefix = keys.services();
        let mut failing = false;
        loop {
            match watch(&client, &prefix, &to).await {
                Ok(()) => return,
                Err(e) => {
                    if !failing {
                        info!(
                            "etcd: watching the services' decisions: {e:#}; retrying (decisions last read stand)"
                        );
                    }
                    failing = true;
                    debug!("etcd watch: {e:#}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    });
}

/// One read and the watch after it, until it breaks (`Ok`: the loop ended).
async fn watch(
    client: &Client,
    prefix: &str,
    to: &mpsc::Sender<BTreeMap<String, Decision>>,
) -> anyhow::Result<()> {
    let mut c = client.clone();
    let got = tokio::time::timeout(CALL, c.get(prefix, Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CALL:?}"))??;
    let name = |k: &[u8]| String::from_utf8_lossy(&k[prefix.len().min(k.len())..]).into_owned();
    let mut decisions: BTreeMap<String, Decision> = got
        .kvs()
        .iter()
        .filter_map(|kv| Some((name(kv.key()), parse(kv.value())?)))
        .collect();
    if to.send(decisions.clone()).await.is_err() {
        return Ok(());
    }
    let revision = got.header().map_or(0, |h| h.revision());
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = tokio::time::timeout(CALL, c.watch(prefix, Some(opts)))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CALL:?} opening the watch"))??;
    loop {
        // Progress notifications come every few minutes at most; a dead
        // connection is found by the channel's keep-alive pings.
        let Some(r) = stream.message().await? else {
            anyhow::bail!("the watch ended");
        };
        if r.canceled() {
            anyhow::bail!("the watch was cancelled: {}", r.cancel_reason());
        }
        let before = decisions.clone();
        for e in r.events() {
            let Some(kv) = e.kv() else { continue };
            let key = name(kv.key());
            match (e.event_type(), parse(kv.value())) {
                (EventType::Put, Some(d)) => {
                    decisions.insert(key, d);
                }
                _ => {
                    decisions.remove(&key);
                }
            }
        }
        if decisions != before && to.send(decisions.clone()).await.is_err() {
            return Ok(());
        }
    }
}
