//! The fleet's agents, as each reports itself: a Lease of its own in the
//! election's namespace (`kanari-agent-NODE`, label `kanari.dev/agent`)
//! renewed every few seconds, saying where its telemetry is served and the
//! weight generation it holds of each release. The deciding agent lists
//! them, pulls every fresh peer's telemetry each tick into [`Merged`], and
//! counts the nodes in sync for the status.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    kubernetes::{Leadership, LeaseSettings},
    merge::{Merged, Report},
};
use crate::snapshot::Snapshot;

pub const AGENT_LABEL: &str = "kanari.dev/agent";
pub const TELEMETRY_ANNOTATION: &str = "kanari.dev/telemetry";
pub const HELD_ANNOTATION: &str = "kanari.dev/held";

/// One agent as its report says, and whether it is fresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub telemetry: Option<String>,
    /// Weight generation held, by release key.
    pub held: BTreeMap<String, u64>,
}

/// The fresh peers (this agent among them), by node.
pub type Peers = BTreeMap<String, Peer>;

/// The generations this node holds: a release's decision whose weight the
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

/// Runs the report, and while leading the listing and pulling; the fresh
/// peers are published on the returned channel.
pub fn spawn(
    client: Client,
    lease: LeaseSettings,
    advertise: Option<String>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    leadership: watch::Receiver<Leadership>,
    merged: Arc<Mutex<Merged>>,
) -> watch::Receiver<Arc<Peers>> {
    let (tx, rx) = watch::channel(Arc::new(Peers::new()));
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let every = (lease.duration / 3).max(Duration::from_millis(250));
    // Report.
    {
        let (api, lease, snapshots) = (api.clone(), lease.clone(), snapshots.clone());
        tokio::spawn(async move {
            let name = format!("kanari-agent-{}", lease.identity);
            let mut failing = false;
            loop {
                let held = held(&snapshots.borrow().clone());
                match report(&api, &name, &lease, advertise.as_deref(), &held).await {
                    Ok(()) => failing = false,
                    Err(e) => {
                        if !failing {
                            warn!(lease = %name, "reporting this agent failed, retrying: {e}");
                        }
                        failing = true;
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    // List and pull, while leading.
    tokio::spawn(async move {
        let mut seen: BTreeMap<String, (Option<String>, Instant)> = BTreeMap::new();
        let mut listed = Instant::now() - every;
        let mut peers = Peers::new();
        let tick = Duration::from_millis(250);
        loop {
            tokio::time::sleep(tick).await;
            if leadership.borrow().term.is_none() {
                continue;
            }
            if listed.elapsed() >= every {
                listed = Instant::now();
                let lp = ListParams::default().labels(AGENT_LABEL);
                match api.list(&lp).await {
                    Ok(list) => {
                        peers = fresh(&list.items, &mut seen, lease.duration);
                        if **tx.borrow() != peers {
                            let _ = tx.send(Arc::new(peers.clone()));
                        }
                    }
                    Err(e) => debug!("listing the agents' reports: {e}"),
                }
            }
            for p in peers.values().filter(|p| p.node != lease.identity) {
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

/// The peers whose report changed within `duration` (on our clock).
fn fresh(
    leases: &[Lease],
    seen: &mut BTreeMap<String, (Option<String>, Instant)>,
    duration: Duration,
) -> Peers {
    let mut out = Peers::new();
    let now = Instant::now();
    for l in leases {
        let spec = l.spec.clone().unwrap_or_default();
        let Some(node) = spec.holder_identity else {
            continue;
        };
        let renew = spec.renew_time.map(|t| t.0.to_string());
        let since = match seen.get(&node) {
            Some((r, at)) if *r == renew => *at,
            _ => now,
        };
        seen.insert(node.clone(), (renew, since));
        if now.duration_since(since) > duration {
            continue;
        }
        let a = l.metadata.annotations.clone().unwrap_or_default();
        out.insert(
            node.clone(),
            Peer {
                node,
                telemetry: a.get(TELEMETRY_ANNOTATION).cloned(),
                held: a
                    .get(HELD_ANNOTATION)
                    .and_then(|h| serde_json::from_str(h).ok())
                    .unwrap_or_default(),
            },
        );
    }
    out
}

/// Writes (creates or renews) this agent's report.
async fn report(
    api: &Api<Lease>,
    name: &str,
    lease: &LeaseSettings,
    advertise: Option<&str>,
    held: &BTreeMap<String, u64>,
) -> Result<(), kube::Error> {
    let existing = api.get_opt(name).await?;
    let mut l = existing.clone().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(lease.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    });
    l.metadata
        .labels
        .get_or_insert_default()
        .insert(AGENT_LABEL.into(), "true".into());
    let a = l.metadata.annotations.get_or_insert_default();
    match advertise {
        Some(url) => a.insert(TELEMETRY_ANNOTATION.into(), url.to_string()),
        None => a.remove(TELEMETRY_ANNOTATION),
    };
    a.insert(
        HELD_ANNOTATION.into(),
        serde_json::to_string(held).unwrap_or_default(),
    );
    let mut spec = l.spec.take().unwrap_or_else(LeaseSpec::default);
    spec.holder_identity = Some(lease.identity.clone());
    spec.lease_duration_seconds = Some(lease.duration.as_secs().max(1) as i32);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    l.spec = Some(spec);
    match existing {
        None => api.create(&PostParams::default(), &l).await.map(|_| ()),
        Some(_) => api
            .replace(name, &PostParams::default(), &l)
            .await
            .map(|_| ()),
    }
}

/// `GET url`: a peer's telemetry report.
async fn get_report(url: &str) -> anyhow::Result<Report> {
    let (status, body) = crate::api::http_once(url, None).await?;
    anyhow::ensure!(status == 200, "answered {status}");
    Ok(serde_json::from_slice(&body)?)
}
