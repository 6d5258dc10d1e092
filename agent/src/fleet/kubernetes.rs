//! The Kubernetes side of the fleet: the Lease loop that elects the
//! deciding agent, and the leader's writes of each CanaryRelease's status
//! (through the status subresource) and Events.
//!
//! Lease writes are client-go's: read, then replace with the
//! resourceVersion read, so of two agents racing one gets `409 Conflict`.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    lease::{Elector, Record, Step},
    status::{self, ReleaseView, Writer},
};
use crate::{discovery::watch::canary_release, snapshot::Snapshot};

/// Who leads, as this agent last knew it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    /// Our term while we lead.
    pub term: Option<u32>,
    /// The holder of the lease when last read (us, another, or unknown).
    pub holder: Option<String>,
}

/// `kubernetes.lease`, resolved.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub duration: Duration,
    pub identity: String,
}

/// The lease settings of `k`: the node's name is the agent's identity.
pub fn settings(k: &crate::config::Kubernetes) -> LeaseSettings {
    let node = k
        .node
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "kanari".into());
    // In a pod: its own namespace (the service account's), where its RBAC
    // lets it hold the lease.
    let namespace = k
        .lease_namespace
        .clone()
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty())
        })
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| "kanari".into());
    LeaseSettings {
        namespace,
        name: k.lease_name.clone(),
        duration: k.lease_duration,
        identity: node,
    }
}

/// The URL the other agents pull this one's telemetry from.
pub fn advertise(k: &crate::config::Kubernetes, metrics: std::net::SocketAddr) -> Option<String> {
    let addr = match k.advertise {
        Some(a) => std::net::SocketAddr::V4(a),
        None if !metrics.ip().is_unspecified() => metrics,
        None => {
            let ip: std::net::IpAddr = std::env::var("HOST_IP").ok()?.parse().ok()?;
            std::net::SocketAddr::new(ip, metrics.port())
        }
    };
    Some(format!("http://{addr}/telemetry"))
}

fn record(l: &Lease) -> Record {
    let spec = l.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity,
        renew: spec.renew_time.map(|t| t.0.to_string()),
        duration_s: spec.lease_duration_seconds.unwrap_or(0).max(0) as u32,
        transitions: spec.lease_transitions.unwrap_or(0).max(0) as u32,
    }
}

/// Runs the election; its view is published on the returned channel.
/// When `stop` turns true (the agent stops) a lease this agent holds is
/// released, so another takes it at once instead of a duration later; the
/// returned task ends then.
pub fn elect(
    client: Client,
    s: LeaseSettings,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Leadership>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Leadership::default());
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    let origin = Instant::now();
    let now_ms = move || origin.elapsed().as_millis() as u64;
    let retry = (s.duration / 5).max(Duration::from_millis(200));
    let task = tokio::spawn(async move {
        let mut elector = Elector::new(s.identity.clone(), s.duration.as_millis() as u64);
        let mut failing = false;
        loop {
            let began = now_ms();
            let outcome = try_once(&api, &s, &mut elector, began).await;
            let holder = match outcome {
                Ok(holder) => {
                    if failing {
                        info!(lease = %s.name, "the lease is readable again");
                    }
                    failing = false;
                    holder
                }
                Err(e) => {
                    if !failing {
                        warn!(lease = %s.name, "the lease cannot be read or written: {e}");
                    }
                    failing = true;
                    None
                }
            };
            let now = Leadership {
                term: elector.leading(now_ms()),
                holder: holder.or_else(|| tx.borrow().holder.clone()),
            };
            if *tx.borrow() != now {
                match (now.term, tx.borrow().term) {
                    (Some(t), None) => info!(term = t, "leading: this agent decides"),
                    (None, Some(_)) => info!(holder = ?now.holder, "no longer leading"),
                    _ => {}
                }
                if tx.send(now).is_err() {
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.changed() => {
                    if elector.leading(now_ms()).is_some() {
                        match release(&api, &s).await {
                            Ok(()) => info!(lease = %s.name, "released the lease: another agent decides now"),
                            Err(e) => warn!(lease = %s.name, "releasing the lease failed (another agent takes it when it lapses): {e}"),
                        }
                    }
                    break;
                }
            }
        }
    });
    (rx, task)
}

/// Clears the holder of a lease this agent holds (client-go's release).
async fn release(api: &Api<Lease>, s: &LeaseSettings) -> Result<(), kube::Error> {
    let Some(mut l) = api.get_opt(&s.name).await? else {
        return Ok(());
    };
    let spec = l.spec.get_or_insert_default();
    if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&s.name, &PostParams::default(), &l)
        .await
        .map(|_| ())
}

/// One round: read the lease, then take, renew or follow. The holder.
async fn try_once(
    api: &Api<Lease>,
    s: &LeaseSettings,
    elector: &mut Elector,
    began: u64,
) -> Result<Option<String>, kube::Error> {
    let lease = api.get_opt(&s.name).await?;
    let step = elector.next(lease.as_ref().map(record).as_ref(), began);
    let (term, taking) = match step {
        Step::Follow { holder } => {
            elector.lost();
            return Ok(Some(holder));
        }
        Step::Take { term } => (term, true),
        Step::Renew { term } => (term, false),
    };
    let now = MicroTime(Timestamp::now());
    let mut l = lease.clone().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(s.name.clone()),
            namespace: Some(s.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    });
    let mut spec = l.spec.take().unwrap_or_else(LeaseSpec::default);
    spec.holder_identity = Some(s.identity.clone());
    spec.lease_duration_seconds = Some(s.duration.as_secs().max(1) as i32);
    spec.renew_time = Some(now.clone());
    spec.lease_transitions = Some(term as i32);
    if taking {
        spec.acquire_time = Some(now);
    }
    l.spec = Some(spec);
    let written = match lease {
        None => api.create(&PostParams::default(), &l).await,
        Some(_) => api.replace(&s.name, &PostParams::default(), &l).await,
    };
    match written {
        Ok(_) => {
            elector.wrote(term, began);
            Ok(Some(s.identity.clone()))
        }
        // Another agent wrote first: it leads.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            elector.lost();
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What the writer last wrote of one release.
#[derive(Default)]
struct Written {
    status: Option<Value>,
    /// Phase and step, and since when (RFC 3339) the phase holds.
    seen: Option<(&'static str, usize)>,
    since: String,
}

/// While this agent leads, writes every CanaryRelease's status when it
/// changes, and an Event for each phase or step change.
pub fn write_status(
    client: Client,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut leadership: watch::Receiver<Leadership>,
    peers: watch::Receiver<Arc<super::peers::Peers>>,
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
                // A new leader's first sight of a release is no event.
                let event = match w.seen {
                    None => {
                        w.seen = Some(now);
                        None
                    }
                    Some(_) => status::event(w.seen, now, state),
                };
                let phase_changed = w.seen.is_some_and(|s| s.0 != now.0);
                if w.since.is_empty() || phase_changed {
                    w.since = Timestamp::now().to_string();
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
                let Some((namespace, name)) = key.split_once('/') else {
                    continue;
                };
                if w.status.as_ref() != Some(&st) {
                    let api: Api<DynamicObject> =
                        Api::namespaced_with(client.clone(), namespace, &canary_release());
                    let patch = Patch::Merge(json!({"status": st}));
                    match api
                        .patch_status(name, &PatchParams::default(), &patch)
                        .await
                    {
                        Ok(_) => {
                            w.status = Some(st);
                            failing = false;
                        }
                        Err(e) => {
                            if !failing {
                                warn!(release = %key, "writing the CanaryRelease's status failed, retrying: {e}");
                            }
                            failing = true;
                            continue;
                        }
                    }
                }
                if let Some((kind, reason, message)) = event {
                    w.seen = Some(now);
                    post_event(&client, namespace, name, &node, kind, reason, &message).await;
                }
            }
        }
    });
}

/// A core/v1 Event on a CanaryRelease; a failure is logged, not retried.
async fn post_event(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
    kind: &str,
    reason: &str,
    message: &str,
) {
    use k8s_openapi::api::core::v1::Event;
    let now = Timestamp::now().to_string();
    let event: Result<Event, _> = serde_json::from_value(json!({
        "metadata": {"generateName": format!("{name}."), "namespace": namespace},
        "involvedObject": {"apiVersion": "kanari.dev/v1alpha1", "kind": "CanaryRelease",
                           "name": name, "namespace": namespace},
        "type": kind,
        "reason": reason,
        "message": message,
        "source": {"component": "kanari", "host": node},
        "reportingComponent": "kanari.dev/agent",
        "reportingInstance": node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }));
    let Ok(event) = event else { return };
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        warn!(release = %format!("{namespace}/{name}"), reason, "posting an Event failed: {e}");
    }
}

/// The views the status writer reads, by release key.
pub type Releases = BTreeMap<String, ReleaseView>;
