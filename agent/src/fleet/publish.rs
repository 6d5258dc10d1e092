//! While this agent leads: each key's status (the decision the followers
//! take, and what operators read) written when it changes, and an event
//! for each phase or step change.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::warn;

use super::{
    Coordination, Leadership, Peers,
    status::{self, Writer},
};
use crate::snapshot::Snapshot;

/// What the writer last wrote of one key.
#[derive(Default)]
struct Written {
    status: Option<Value>,
    /// Phase and step, and since when (RFC 3339) the phase holds.
    seen: Option<(&'static str, usize)>,
    since: String,
}

/// Runs the writer until the snapshots end.
pub fn spawn<C: Coordination>(
    c: Arc<C>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut leadership: watch::Receiver<Leadership>,
    peers: watch::Receiver<Arc<Peers>>,
    node: String,
) {
    tokio::spawn(async move {
        let mut written: BTreeMap<String, Written> = BTreeMap::new();
        let mut failing = false;
        loop {
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { break },
                r = leadership.changed() => if r.is_err() { break },
            }
            let Some(term) = leadership.borrow().term else {
                // A new leader writes everything once.
                written.clear();
                continue;
            };
            let snapshot = snapshots.borrow().clone();
            let by = Writer { agent: &node, term };
            written.retain(|k, _| snapshot.releases.contains_key(k));
            for (key, view) in snapshot.releases.iter() {
                let state = snapshot.rollouts.get(&view.service).map(|r| &r.state);
                let w = written.entry(key.clone()).or_default();
                let now = (status::phase(view, state), state.map_or(0, |s| s.step));
                // A new leader's first sight of a key is no event.
                let event = match w.seen {
                    None => {
                        w.seen = Some(now);
                        None
                    }
                    Some(_) => status::event(w.seen, now, state),
                };
                let phase_changed = w.seen.is_some_and(|s| s.0 != now.0);
                if w.since.is_empty() || phase_changed {
                    w.since = jiff_now();
                }
                let mut st = status::status(view, state, &by);
                let peers = peers.borrow().clone();
                let generation = st["weightGeneration"].as_u64();
                let in_sync = peers
                    .values()
                    .filter(|p| generation.is_some() && p.held.get(key).copied() == generation)
                    .count();
                st["nodes"] = json!({"total": peers.len(), "inSync": in_sync});
                st["lastTransitionTime"] = json!(w.since);
                st["conditions"][0]["lastTransitionTime"] = json!(w.since);
                if w.status.as_ref() != Some(&st) {
                    match c.publish(key, &st, term).await {
                        Ok(()) => {
                            w.status = Some(st);
                            failing = false;
                        }
                        Err(e) => {
                            if !failing {
                                warn!(key = %key, "writing the status failed, retrying: {e:#}");
                            }
                            failing = true;
                            continue;
                        }
                    }
                }
                if let Some((kind, reason, message)) = event {
                    w.seen = Some(now);
                    c.event(key, kind, reason, &message).await;
                }
            }
        }
    });
}

/// Now, in RFC 3339.
fn jiff_now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}
