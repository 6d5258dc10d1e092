//! One decision per service across the nodes, through a coordination
//! engine the fleet already runs: the Kubernetes API in a cluster
//! ([`kubernetes`]: a Lease, each CanaryRelease's status, Events), etcd on
//! bare-metal hosts ([`etcd`]: an election over a lease, a key per service).
//!
//! The rollout logic is written once, over [`Coordination`]: [`peers`]
//! reports this agent and, while it leads, pulls the others' telemetry into
//! [`merge::Merged`]; [`publish`] writes the leader's decisions when they
//! change; the loop (`daemon`) follows decisions it reads back. Each engine
//! brings its election (a [`Leadership`] channel) and how decisions reach
//! the followers (CanaryRelease readings; an etcd watch).
//!
//! [`lease`], [`merge`] and [`status`] are pure.

use std::{collections::BTreeMap, future::Future};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod etcd;
pub mod kubernetes;
pub mod lease;
pub mod merge;
pub mod peers;
pub mod publish;
pub mod status;

/// Who leads, as this agent last knew it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    /// Our term while we lead.
    pub term: Option<u32>,
    /// The leader when last read (us, another, or unknown).
    pub holder: Option<String>,
}

/// One agent, as its report says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub node: String,
    /// Where its telemetry is served (`http://IP:PORT/telemetry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<String>,
    /// Weight generation held, by key (a release, or a service with etcd).
    #[serde(default)]
    pub held: BTreeMap<String, u64>,
    /// The canary weight its kernel holds (basis points), by key.
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
}

/// The fresh peers (this agent among them), by node.
pub type Peers = BTreeMap<String, Peer>;

/// What a coordination engine does for the fleet; the loops around it are
/// [`peers::spawn`] and [`publish::spawn`].
pub trait Coordination: Send + Sync + 'static {
    /// Writes (creates or renews) this agent's report.
    fn report(&self, me: &Peer) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// The agents whose reports are fresh.
    fn peers(&self) -> impl Future<Output = anyhow::Result<Peers>> + Send;
    /// Writes the leader's status of `key` (a decision for the followers
    /// among it), refused when `term` no longer leads where the engine can
    /// tell (etcd fences the write on the leader's key).
    fn publish(
        &self,
        key: &str,
        status: &Value,
        term: u32,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Records a transition of `key` for operators (a Kubernetes Event); a
    /// failure is logged, not retried.
    fn event(
        &self,
        key: &str,
        kind: &str,
        reason: &str,
        message: &str,
    ) -> impl Future<Output = ()> + Send;
}

/// The URL the other agents pull this one's telemetry from: `advertise`,
/// else `metrics.listen` when it names an address, else `$HOST_IP` at its
/// port.
pub fn telemetry_url(
    advertise: Option<std::net::SocketAddrV4>,
    metrics: std::net::SocketAddr,
) -> Option<String> {
    let addr = match advertise {
        Some(a) => std::net::SocketAddr::V4(a),
        None if !metrics.ip().is_unspecified() => metrics,
        None => {
            let ip: std::net::IpAddr = std::env::var("HOST_IP").ok()?.parse().ok()?;
            std::net::SocketAddr::new(ip, metrics.port())
        }
    };
    Some(format!("http://{addr}/telemetry"))
}

/// This host's name (gethostname(2): readable under systemd's
/// `ProcSubset=pid`, which hides /proc/sys), else `kanari`.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its length; the call writes at
    // most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    if ok && !name.is_empty() {
        name
    } else {
        "kanari".into()
    }
}
