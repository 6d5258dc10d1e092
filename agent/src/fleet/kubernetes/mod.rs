//! The Kubernetes side of the fleet: a Lease elects the deciding agent
//! ([`election`]); each agent reports itself in a Lease of its own
//! (`kanari-agent-NODE`, label `kanari.dev/agent`, renewed every few
//! seconds, annotations saying where its telemetry is served and what it
//! holds); the leader writes each CanaryRelease's status (through the
//! status subresource) and Events. Followers read the decisions back with
//! the CanaryReleases (`discovery`).

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tracing::warn;

use super::{Coordination, Peer, Peers};
use crate::discovery::watch::canary_release;

mod election;

pub use election::elect;

pub const AGENT_LABEL: &str = "kanari.dev/agent";
pub const TELEMETRY_ANNOTATION: &str = "kanari.dev/telemetry";
pub const HELD_ANNOTATION: &str = "kanari.dev/held";
pub const WEIGHTS_ANNOTATION: &str = "kanari.dev/weights";

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
        .unwrap_or_else(super::host_name);
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
    super::telemetry_url(k.advertise, metrics)
}

/// The fleet's reports and the leader's writes, through the API server.
pub struct Board {
    client: Client,
    leases: Api<Lease>,
    lease: LeaseSettings,
    /// Each agent's report's renew time as last listed, and since when
    /// (our clock): a report is fresh while it changes within a duration.
    seen: Mutex<BTreeMap<String, (Option<String>, Instant)>>,
}

impl Board {
    pub fn new(client: Client, lease: LeaseSettings) -> Board {
        Board {
            leases: Api::namespaced(client.clone(), &lease.namespace),
            client,
            lease,
            seen: Mutex::default(),
        }
    }
}

impl Coordination for Board {
    async fn report(&self, me: &Peer) -> anyhow::Result<()> {
        let name = format!("kanari-agent-{}", me.node);
        let existing = self.leases.get_opt(&name).await?;
        let mut l = existing.clone().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.lease.namespace.clone()),
                ..Default::default()
            },
            spec: None,
        });
        l.metadata
            .labels
            .get_or_insert_default()
            .insert(AGENT_LABEL.into(), "true".into());
        let a = l.metadata.annotations.get_or_insert_default();
        match &me.telemetry {
            Some(url) => a.insert(TELEMETRY_ANNOTATION.into(), url.clone()),
            None => a.remove(TELEMETRY_ANNOTATION),
        };
        a.insert(HELD_ANNOTATION.into(), serde_json::to_string(&me.held)?);
        a.insert(
            WEIGHTS_ANNOTATION.into(),
            serde_json::to_string(&me.weights)?,
        );
        let mut spec = l.spec.take().unwrap_or_else(LeaseSpec::default);
        spec.holder_identity = Some(me.node.clone());
        spec.lease_duration_seconds = Some(self.lease.duration.as_secs().max(1) as i32);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        l.spec = Some(spec);
        let pp = PostParams::default();
        match existing {
            None => self.leases.create(&pp, &l).await.map(|_| ())?,
            Some(_) => self.leases.replace(&name, &pp, &l).await.map(|_| ())?,
        }
        Ok(())
    }

    async fn peers(&self) -> anyhow::Result<Peers> {
        let lp = ListParams::default().labels(AGENT_LABEL);
        let list = self.leases.list(&lp).await?;
        let mut seen = self.seen.lock().expect("not poisoned");
        Ok(fresh(&list.items, &mut seen, self.lease.duration))
    }

    async fn publish(&self, key: &str, status: &Value, _term: u32) -> anyhow::Result<()> {
        let (namespace, name) = key
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("`{key}` is not NAMESPACE/NAME"))?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &canary_release());
        let patch = Patch::Merge(json!({ "status": status }));
        api.patch_status(name, &PatchParams::default(), &patch)
            .await?;
        Ok(())
    }

    async fn event(&self, key: &str, kind: &str, reason: &str, message: &str) {
        let Some((namespace, name)) = key.split_once('/') else {
            return;
        };
        post_event(
            &self.client,
            namespace,
            name,
            &self.lease.identity,
            kind,
            reason,
            message,
        )
        .await;
    }
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
        let held = a
            .get(HELD_ANNOTATION)
            .and_then(|h| serde_json::from_str(h).ok());
        let weights = a
            .get(WEIGHTS_ANNOTATION)
            .and_then(|h| serde_json::from_str(h).ok());
        out.insert(
            node.clone(),
            Peer {
                node,
                telemetry: a.get(TELEMETRY_ANNOTATION).cloned(),
                held: held.unwrap_or_default(),
                weights: weights.unwrap_or_default(),
            },
        );
    }
    out
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
