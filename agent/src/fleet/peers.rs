//! The fleet's agents, as each reports itself through the coordination
//! engine: where its telemetry is served, the weight generation it holds of
//! each key and the weight its kernel holds. Every agent reports and lists
//! (so `kanari status` shows the fleet anywhere); the deciding agent also
//! pulls every fresh peer's telemetry each tick into [`Merged`].

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    Coordination, Leadership, Peer, Peers,
    merge::{Merged, Report},
};
use crate::snapshot::Snapshot;

/// The generations this node holds: a key's decision whose weight the
/// kernel holds.
pub fn held(s: &Snapshot) -> BTreeMap<String, u64> {
    s.releases
        .iter()
        .filter_map(|(key, v)| {
            let d = v.decision.as_ref()?;
            let state = s.rollouts.get(&v.service)?;
            let kernel = s.kernel_weights.get(&v.service)?;
            (*kernel == d.weight
                && state.state.weight == d.weight
                && state.state.revision == d.revision)
                .then_some((key.clone(), d.generation))
        })
        .collect()
}

/// The canary weight the kernel holds, by key.
pub fn weights(s: &Snapshot) -> BTreeMap<String, u32> {
    s.releases
        .iter()
        .filter_map(|(key, v)| Some((key.clone(), *s.kernel_weights.get(&v.service)?)))
        .collect()
}

/// How often an agent reports and lists, at most and at least.
pub struct Cadence {
    /// A report that changed is written at most this often.
    pub report_at_most: Duration,
    /// An unchanged report is renewed (and the fleet listed) this often.
    pub every: Duration,
    /// The leader lists this often: a step's window waits for every node.
    pub list_leading: Duration,
}

/// Runs the report and the listing, and while leading the pulling; the
/// fresh peers are published on the returned channel.
pub fn spawn<C: Coordination>(
    c: Arc<C>,
    node: String,
    advertise: Option<String>,
    cadence: Cadence,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    leadership: watch::Receiver<Leadership>,
    merged: Arc<Mutex<Merged>>,
) -> watch::Receiver<Arc<Peers>> {
    let (tx, rx) = watch::channel(Arc::new(Peers::new()));
    let Cadence {
        report_at_most,
        every,
        list_leading,
    } = cadence;
    // Report: when what it says changes (a generation taken: the leader's
    // window waits for it), and every `every` regardless.
    {
        let (c, node) = (c.clone(), node.clone());
        tokio::spawn(async move {
            let mut failing = false;
            let mut last: Option<(Peer, Instant)> = None;
            loop {
                let s = snapshots.borrow_and_update().clone();
                let me = Peer {
                    node: node.clone(),
                    telemetry: advertise.clone(),
                    held: held(&s),
                    weights: weights(&s),
                };
                let due = last
                    .as_ref()
                    .is_none_or(|(p, at)| *p != me || at.elapsed() >= every);
                if due {
                    match c.report(&me).await {
                        Ok(()) => {
                            failing = false;
                            last = Some((me, Instant::now()));
                        }
                        Err(e) => {
                            if !failing {
                                warn!(node, "reporting this agent failed, retrying: {e:#}");
                            }
                            failing = true;
                        }
                    }
                }
                tokio::time::sleep(report_at_most).await;
                // Wait for a change, or the renewal.
                let _ = tokio::time::timeout(every, snapshots.changed()).await;
            }
        });
    }
    // List, and pull while leading.
    tokio::spawn(async move {
        let mut listed = Instant::now() - every;
        let mut peers = Peers::new();
        let tick = Duration::from_millis(250);
        loop {
            tokio::time::sleep(tick).await;
            let leading = leadership.borrow().term.is_some();
            let list_every = if leading { list_leading } else { every };
            if listed.elapsed() >= list_every {
                listed = Instant::now();
                match c.peers().await {
                    Ok(now) => {
                        peers = now;
                        if **tx.borrow() != peers {
                            let _ = tx.send(Arc::new(peers.clone()));
                        }
                    }
                    Err(e) => debug!("listing the agents' reports: {e:#}"),
                }
            }
            if !leading {
                continue;
            }
            for p in peers.values().filter(|p| p.node != node) {
                let Some(url) = &p.telemetry else { continue };
                match tokio::time::timeout(tick, get_report(url))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {tick:?}")))
                {
                    Ok(r) if r.node == p.node => {
                        merged.lock().expect("not poisoned").take(&r);
                    }
                    Ok(r) => {
                        debug!(url, node = %r.node, "a report from another node than announced")
                    }
                    Err(e) => debug!(url, "pulling a peer's telemetry: {e}"),
                }
            }
        }
    });
    rx
}

/// `GET url`: a peer's telemetry report.
async fn get_report(url: &str) -> anyhow::Result<Report> {
    let (status, body) = crate::api::http_once(url, None).await?;
    anyhow::ensure!(status == 200, "answered {status}");
    Ok(serde_json::from_slice(&body)?)
}
