//! The configuration once validated: what the rest of the agent is given.
//! Plain data; [`super::validate`] builds it from the file as written.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use kanari_common::maps::Group;
use serde::{Deserialize, Serialize};

/// `conntrack.timeouts`: an entry idle (no packet either way) for longer
/// than its connection's state allows is removed by the agent. A
/// connection idle for hours keeps its backend; a closed or unanswered one
/// frees its entries within seconds: at the guard's default rate (a
/// sixteenth of the table a second) such entries fill at most 10/16 of it,
/// so live connections are not the LRU's to evict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    /// A connection the backend has not answered yet (its SYN, or a later
    /// packet of a connection without entry).
    pub syn_sent: Duration,
    pub established: Duration,
    /// One side sent a FIN.
    pub closing: Duration,
    /// Both sides sent a FIN, or one a RST.
    pub closed: Duration,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        Self {
            syn_sent: Duration::from_secs(10),
            established: Duration::from_secs(6 * 3600),
            closing: Duration::from_secs(120),
            closed: Duration::from_secs(10),
        }
    }
}

impl ConntrackTimeouts {
    /// The timeout of `state`.
    pub fn of(&self, state: kanari_common::maps::CtState) -> Duration {
        use kanari_common::maps::CtState;
        match state {
            CtState::SynSent => self.syn_sent,
            CtState::Established => self.established,
            CtState::Closing => self.closing,
            CtState::Closed => self.closed,
        }
    }
}

/// A configuration that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub interfaces: Vec<Interface>,
    pub conntrack_connections: u32,
    /// How long an idle connection's conntrack entries stay, by state.
    pub conntrack_timeouts: ConntrackTimeouts,
    /// The new-connection rate guard: new connections recorded per second
    /// over the node (0: no limit). Past it, new connections are shed so a
    /// SYN flood cannot push established ones out of conntrack.
    pub new_connections_per_second: u32,
    /// Backends with kernel statistics, over all services (backend ids are below it).
    pub max_backends: u32,
    pub metrics_listen: SocketAddr,
    pub control_socket: PathBuf,
    /// Where rollout state is kept across restarts.
    pub state_dir: PathBuf,
    /// Where the data path's maps and links are pinned (on a bpf filesystem).
    pub pin_dir: PathBuf,
    pub tick: Duration,
    /// `telemetry.record`: where the judges' per-tick telemetry is written.
    pub record: Option<RecordTo>,
    /// `kubernetes:`: services discovered from CanaryReleases as well.
    pub kubernetes: Option<Kubernetes>,
    /// `fleet:`: the rollouts decided once for many hosts, through etcd.
    pub fleet: Option<Fleet>,
    /// `socket_lb:` when enabled: connect() to a VIP steered at the socket.
    pub socket_lb: Option<SocketLb>,
    pub services: Vec<Service>,
}

/// `socket_lb:` (fixed at start): kanari's cgroup v2 programs steer
/// connect() calls of the processes in a cgroup (and below it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLb {
    /// `None`: the unified hierarchy's root (every process on the host).
    pub cgroup: Option<PathBuf>,
}

/// The cgroup the socket path attaches to: `socket_lb.cgroup`, else the
/// root of the unified (v2) hierarchy, from `/proc/self/mountinfo`.
pub fn socket_cgroup(s: &SocketLb) -> anyhow::Result<PathBuf> {
    if let Some(c) = &s.cgroup {
        return Ok(c.clone());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| anyhow::anyhow!("socket_lb: reading /proc/self/mountinfo: {e}"))?;
    unified_root(&mounts).ok_or_else(|| {
        anyhow::anyhow!(
            "socket_lb: no cgroup2 filesystem is mounted (see /proc/self/mountinfo); mount one or set socket_lb.cgroup"
        )
    })
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text
/// (`ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE ...`).
pub fn unified_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(point)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `fleet:` (fixed at start): hosts that run one rollout per service
/// together, coordinated through etcd (see [`crate::fleet::etcd`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    /// Its keys live under `/kanari/NAME/`.
    pub name: String,
    /// This host's name; `None`: the host name.
    pub node: Option<String>,
    /// Where the other agents pull this one's telemetry; `None`:
    /// `metrics.listen` when it names an address.
    pub advertise: Option<SocketAddrV4>,
    /// Client URLs (`http://` or, with `tls`, `https://`).
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    /// The lease TTL: a silent leader's term ends (and a silent host leaves
    /// the fleet) this long after its last keep-alive.
    pub ttl: Duration,
}

/// `fleet.etcd.tls` (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    /// A client certificate and its key, when etcd asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// `fleet.etcd.ttl` by default, and its bounds (etcd's minimum TTL is 5 s
/// by default; a shorter one is raised by the server).
pub const DEFAULT_ETCD_TTL: Duration = Duration::from_secs(10);
pub const MIN_ETCD_TTL: Duration = Duration::from_secs(2);
pub const MAX_ETCD_TTL: Duration = Duration::from_secs(300);

/// `kubernetes:` (fixed at start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kubernetes {
    /// A kubeconfig file; `None`: the pod's service account.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name in reports; `None`: `$NODE_NAME`, else the host name.
    pub node: Option<String>,
    /// `kubernetes.lease.namespace`; `None`: the pod's namespace, else `kanari`.
    pub lease_namespace: Option<String>,
    /// `kubernetes.lease.name`.
    pub lease_name: String,
    /// `kubernetes.lease.duration`: how long a silent leader keeps the lease.
    pub lease_duration: Duration,
    /// `kubernetes.advertise`: where the other agents pull this one's
    /// telemetry; `None`: `metrics.listen`'s address, or `$HOST_IP` at its
    /// port when it listens on every address.
    pub advertise: Option<SocketAddrV4>,
}

/// `kubernetes.lease` by default, and its bounds.
pub const DEFAULT_LEASE_NAME: &str = "kanari";
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const MIN_LEASE_DURATION: Duration = Duration::from_secs(2);
pub const MAX_LEASE_DURATION: Duration = Duration::from_secs(300);

/// `telemetry.record` and `telemetry.record_max_mb` (see [`crate::record`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RecordTo {
    pub path: PathBuf,
    /// Past this size the file is renamed to `PATH.1` and a new one begun.
    pub max_bytes: u64,
}

/// `telemetry.record_max_mb` by default, and at most.
pub const DEFAULT_RECORD_MAX_MB: u64 = 64;
pub const MAX_RECORD_MAX_MB: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mode: AttachMode,
}

/// How the ingress program is attached to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// XDP in the driver where the interface supports it, else TC.
    #[default]
    Auto,
    /// XDP in the driver; an error where the interface does not support it.
    Xdp,
    /// TC ingress (tcx on kernels >= 6.6, clsact before).
    Tc,
}

/// What a new connection's group is decided by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// The client address: a client sees one version across connections.
    #[default]
    Client,
    /// The connection's 5-tuple: finer split, no per-client consistency.
    Connection,
}

/// What the service speaks: how its exchanges are observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.x: each exchange is timed and classed by its status (2xx..5xx).
    #[default]
    Http,
    /// Any TCP protocol: exchanges are timed, without a class.
    Tcp,
    /// UDP, through the socket path only (`socket_lb:`): each datagram
    /// answered is an exchange, timed from the datagram that asked.
    Udp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: SocketAddrV4,
    pub affinity: Affinity,
    pub protocol: Protocol,
    /// Basis points, 0..=10000.
    pub canary_weight: u32,
    pub salt: u32,
    pub stable: Vec<SocketAddrV4>,
    pub canary: Vec<SocketAddrV4>,
    /// What stable runs (`stable.revision`), when the file says.
    pub stable_revision: Option<String>,
    /// What the canary runs (`canary.revision`), when the file says; else a
    /// rollout tells revisions apart by their backends.
    pub canary_revision: Option<String>,
    pub segments: Vec<SegmentRule>,
    /// How the canary's weight is driven; `None`: `canary_weight` is fixed.
    pub rollout: Option<RolloutSpec>,
    /// From a CanaryRelease: a canary without endpoints (pods restarting)
    /// holds the rollout, its share going to stable, instead of ending it.
    pub discovered: bool,
    /// Another VIP of a CanaryRelease's Service (an external or
    /// LoadBalancer IP): it takes the weight of `follows`'s rollout, and its
    /// traffic is judged as `follows`'s.
    pub follows: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RolloutSpec {
    pub rollout: Rollout,
    pub analysis: Analysis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentRule {
    pub cidr: Cidr,
    pub group: Group,
}

/// An IPv4 prefix with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = prefix_mask(self.prefix_len);
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

fn prefix_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.split_once('/').ok_or_else(|| {
            format!("`{s}` is not a CIDR; expected ADDRESS/PREFIX, e.g. 10.1.5.0/24")
        })?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            format!("`{addr}` in `{s}` is not an IPv4 address; expected e.g. 10.1.5.0/24")
        })?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("prefix length `{len}` in `{s}` must be 0 to 32"))?;
        let net = Ipv4Addr::from(u32::from(addr) & prefix_mask(prefix_len));
        if net != addr {
            return Err(format!("`{s}` has host bits set; write {net}/{prefix_len}"));
        }
        Ok(Cidr { addr, prefix_len })
    }
}

// ---- A service's rollout ----------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The weight goes up step by step while checks pass.
    #[default]
    Canary,
    /// Analysis on segment traffic only (weight 0), then one switch to 100 %.
    BlueGreen,
    /// Segments only: the weight stays 0; analysis runs until an operator promotes.
    Ab,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRollback {
    /// Weight 0: new connections go to stable, existing canary connections finish.
    #[default]
    Drain,
    /// Weight 0 and the canary's conntrack entries dropped: its connections stop.
    Cut,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    pub strategy: Strategy,
    /// Canary weights in basis points, strictly increasing (`canary` strategy).
    pub steps: Vec<u32>,
    pub interval: Duration,
    pub checks_per_step: u32,
    pub min_requests: u64,
    pub failure_limit: u32,
    pub progress_deadline: Duration,
    pub on_rollback: OnRollback,
    /// After a promotion, how long the critical path keeps judging the
    /// promoted canary while the previous version's backends are still
    /// configured (a failure there rolls back to them).
    pub watch_after_promotion: Duration,
    /// `ab` only: how long the experiment runs before it is promoted on a
    /// passing check; `None`: until an operator decides.
    pub duration: Option<Duration>,
    /// Lifecycle events posted, and gates asked before a step up or the promotion.
    pub webhooks: Vec<Webhook>,
}

impl Rollout {
    /// Whether a webhook of this kind is configured (a gate then holds until it answers 2xx).
    pub fn has_hook(&self, kind: HookKind) -> bool {
        self.webhooks.iter().any(|w| w.kind == kind)
    }
}

/// What a webhook is for (Flagger's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    /// Told of every step, pause, promotion and rollback; its answer is ignored.
    Event,
    /// Asked before each weight increase: a non-2xx answer holds the step.
    ConfirmTrafficIncrease,
    /// Asked before the promotion: a non-2xx answer holds the last step.
    ConfirmPromotion,
}

impl HookKind {
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Event => "event",
            HookKind::ConfirmTrafficIncrease => "confirm-traffic-increase",
            HookKind::ConfirmPromotion => "confirm-promotion",
        }
    }
}

/// One of `rollout.webhooks` (see [`super::webhooks`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Webhook {
    pub name: String,
    pub kind: HookKind,
    /// `http://HOST[:PORT]/PATH`.
    pub url: String,
    /// Per attempt.
    pub timeout: Duration,
    /// Attempts after a failed one.
    pub retries: u32,
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Fractions (0..=1).
    pub max_error_rate: Option<f64>,
    pub max_latency_p99: Option<Duration>,
    pub max_latency_p50: Option<Duration>,
    pub max_connect_errors_rate: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Compare {
    /// Absolute increase of the 5xx share (fraction).
    pub max_error_rate_increase: Option<f64>,
    /// Relative increase of the median time to first byte (fraction).
    pub max_latency_increase: Option<f64>,
    /// The smallest increase of the median that can fail the latency
    /// comparison: with thousands of samples a microsecond is significant.
    pub min_latency_increase: Duration,
    /// The tail compared beside the median (0.99: p99).
    pub tail_quantile: f64,
    pub confidence: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Critical {
    pub error_rate: Option<f64>,
    pub connect_error_rate: Option<f64>,
    pub min_requests: u64,
    /// How far back the critical path looks, at most.
    pub window: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    pub limits: Limits,
    pub compare: Option<Compare>,
    pub critical: Critical,
    /// A request unanswered this long is a failure (a timeout).
    pub request_timeout: Duration,
    /// After each weight change, data counts only after this long.
    pub warmup: Duration,
    /// Judges evaluated, shown and exported but never acted on, by name.
    pub dry_run: Vec<String>,
}

/// Every judge's name, as `analysis.dry_run` and the metrics spell them.
pub const JUDGE_NAMES: [&str; 9] = [
    "error_rate",
    "latency_p99",
    "latency_p50",
    "connect_errors",
    "error_rate_vs_stable",
    "latency_vs_stable",
    "tail_latency_vs_stable",
    "critical_error_rate",
    "critical_connect_errors",
];

pub const DEFAULT_STEPS: [u32; 6] = [1, 5, 10, 25, 50, 100];
