//! The file as written: serde shapes of every section and the field types
//! whose parse errors say what was expected. Nothing here is validated
//! beyond a single field's syntax; [`super::validate`] does the rest.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use kanari_common::maps::{
    BASIS_POINTS, DEFAULT_CONNTRACK_CONNECTIONS, DEFAULT_MAX_BACKENDS, Group,
};
use serde::Deserialize;

use super::{
    Affinity, AttachMode, Cidr, DEFAULT_CONTROL_SOCKET, DEFAULT_METRICS_LISTEN, DEFAULT_STATE_DIR,
    DEFAULT_TICK, OnRollback, Protocol, Strategy,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) interfaces: Vec<RawInterface>,
    #[serde(default)]
    pub(super) conntrack: RawConntrack,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) control: RawControl,
    #[serde(default)]
    pub(super) state: RawState,
    #[serde(default)]
    pub(super) bpf: RawBpf,
    #[serde(default)]
    pub(super) telemetry: RawTelemetry,
    pub(super) kubernetes: Option<RawKubernetes>,
    pub(super) fleet: Option<RawFleet>,
    pub(super) socket_lb: Option<RawSocketLb>,
    #[serde(default)]
    pub(super) services: Vec<RawService>,
}

/// `socket_lb:`: the socket path for processes in a cgroup.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSocketLb {
    #[serde(default)]
    pub(super) enabled: bool,
    /// A cgroup v2 directory; absent: the unified hierarchy's root.
    pub(super) cgroup: Option<PathBuf>,
}

/// `fleet:`: hosts outside Kubernetes that decide each rollout once,
/// coordinated through etcd.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    /// The fleet's name: its keys live under `/kanari/NAME/`.
    pub(super) name: String,
    /// This host's name in the fleet; absent: the host name.
    pub(super) node: Option<String>,
    /// Where the other agents reach this one's telemetry (IP:port).
    pub(super) advertise: Option<Endpoint>,
    pub(super) etcd: RawEtcd,
}

/// `fleet.etcd`: the cluster, and how to reach it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEtcd {
    pub(super) endpoints: Vec<String>,
    pub(super) tls: Option<RawEtcdTls>,
    /// The lease a leader and each host's report are bound to.
    pub(super) ttl: Option<DurationField>,
}

/// `fleet.etcd.tls`: files (PEM).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEtcdTls {
    pub(super) ca: PathBuf,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

/// `kubernetes:`: services from CanaryReleases, Services and EndpointSlices.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    /// A kubeconfig file; absent: the pod's service account (in-cluster).
    pub(super) kubeconfig: Option<PathBuf>,
    /// The node's name in reports; absent: `$NODE_NAME`, else the host name.
    pub(super) node: Option<String>,
    #[serde(default)]
    pub(super) lease: RawLease,
    /// Where the other agents reach this one's telemetry (IP:port).
    pub(super) advertise: Option<Endpoint>,
}

/// `kubernetes.lease`: the Lease that elects the deciding agent.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLease {
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) duration: Option<DurationField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub(super) backends: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            backends: DEFAULT_MAX_BACKENDS,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    pub(super) listen: ListenField,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: ListenField(DEFAULT_METRICS_LISTEN.parse().expect("a valid default")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawControl {
    pub(super) socket: PathBuf,
}

impl Default for RawControl {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBpf {
    pub(super) pin_dir: PathBuf,
}

impl Default for RawBpf {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(crate::pins::PIN_ROOT),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawState {
    pub(super) dir: PathBuf,
}

impl Default for RawState {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTelemetry {
    pub(super) tick: DurationField,
    pub(super) record: Option<PathBuf>,
    pub(super) record_max_mb: Option<u64>,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            tick: DurationField(DEFAULT_TICK),
            record: None,
            record_max_mb: None,
        }
    }
}

/// `IP:port` to listen on (IPv4 or IPv6).
pub(super) struct ListenField(pub(super) SocketAddr);

impl<'de> Deserialize<'de> for ListenField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(ListenField).map_err(|_| {
            serde::de::Error::custom(format!("`{s}` is not an address to listen on; expected IP:port, e.g. 0.0.0.0:9477 or 127.0.0.1:9477"))
        })
    }
}

/// A duration written as `250ms`, `10s`, `2m`.
pub(crate) struct DurationField(pub(crate) Duration);

impl<'de> Deserialize<'de> for DurationField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(DurationField)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{s}` is not a duration; expected a number with a unit, e.g. 250ms, 10s, 2m"
                ))
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInterface {
    pub(super) name: String,
    #[serde(default)]
    pub(super) mode: AttachMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConntrack {
    #[serde(default = "default_conntrack")]
    pub(super) connections: u32,
    /// New connections recorded per second over the node; absent: a
    /// sixteenth of `connections`; 0: no limit.
    pub(super) new_per_second: Option<u32>,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
}

impl Default for RawConntrack {
    fn default() -> Self {
        Self {
            connections: default_conntrack(),
            new_per_second: None,
            timeouts: RawTimeouts::default(),
        }
    }
}

/// `conntrack.timeouts`: how long an idle connection's entries stay, by state.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) syn_sent: Option<DurationField>,
    pub(super) established: Option<DurationField>,
    pub(super) closing: Option<DurationField>,
    pub(super) closed: Option<DurationField>,
}

fn default_conntrack() -> u32 {
    DEFAULT_CONNTRACK_CONNECTIONS
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: String,
    pub(super) vip: Endpoint,
    #[serde(default)]
    pub(super) affinity: Affinity,
    #[serde(default)]
    pub(super) protocol: Protocol,
    pub(super) canary_weight: Option<Weight>,
    #[serde(default)]
    pub(super) salt: Option<u32>,
    pub(super) stable: RawGroup,
    #[serde(default)]
    pub(super) canary: RawGroup,
    #[serde(default)]
    pub(super) segments: Vec<RawSegment>,
    pub(super) rollout: Option<RawRollout>,
    pub(super) analysis: Option<RawAnalysis>,
    /// From a CanaryRelease (never from the file): its canary may have no
    /// endpoints for a while, which holds the rollout instead of ending it.
    #[serde(skip)]
    pub(super) discovered: bool,
    /// Another VIP of the CanaryRelease's Service (never from the file).
    #[serde(skip)]
    pub(super) follows: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    /// What the group runs (an image tag, a build id): free text.
    pub(super) revision: Option<String>,
    #[serde(default)]
    pub(super) backends: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSegment {
    pub(super) cidr: CidrField,
    pub(super) group: GroupField,
}

/// `IPv4:port`, with errors that say which half is wrong.
#[derive(Clone, Copy)]
pub(super) struct Endpoint(pub(super) SocketAddrV4);

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_endpoint(&s)
            .map(Endpoint)
            .map_err(serde::de::Error::custom)
    }
}

fn parse_endpoint(s: &str) -> Result<SocketAddrV4, String> {
    if let Ok(sa) = s.parse::<SocketAddrV4>() {
        if sa.port() == 0 {
            return Err(format!("`{s}` has port 0; expected a port from 1 to 65535"));
        }
        return Ok(sa);
    }
    if s.parse::<Ipv4Addr>().is_ok() {
        return Err(format!(
            "`{s}` has no port; expected IPv4:port, e.g. {s}:80"
        ));
    }
    match s.rsplit_once(':') {
        Some((ip, port)) if ip.parse::<Ipv4Addr>().is_ok() => Err(format!(
            "`{port}` in `{s}` is not a port; expected 1 to 65535"
        )),
        Some((ip, _)) => Err(format!(
            "`{ip}` in `{s}` is not an IPv4 address; expected e.g. 10.0.0.100:80"
        )),
        None => Err(format!(
            "`{s}` is not an IPv4 address and port; expected e.g. 10.0.0.100:80"
        )),
    }
}

/// A percentage: `10`, `0.5`, `"12.5%"`. Stored in basis points.
#[derive(Clone, Copy, Default)]
pub(crate) struct Weight(pub(crate) u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let percent = match Raw::deserialize(d)? {
            Raw::Number(n) => n,
            Raw::Text(t) => t.trim().trim_end_matches('%').trim().parse::<f64>().map_err(|_| {
                serde::de::Error::custom(format!("`{t}` is not a percentage; expected a number from 0 to 100, e.g. 10 or \"12.5%\""))
            })?,
        };
        percent_to_basis_points(percent)
            .map(Weight)
            .map_err(serde::de::Error::custom)
    }
}

/// Converts a percentage to basis points: 0 to 100, at most two decimals.
pub fn percent_to_basis_points(percent: f64) -> Result<u32, String> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(format!("{percent} is outside 0 to 100 (percent)"));
    }
    let bp = percent * 100.0;
    if (bp - bp.round()).abs() > 1e-6 {
        return Err(format!(
            "{percent} has more than two decimals; the split is in steps of 0.01 %"
        ));
    }
    Ok(bp.round() as u32)
}

pub(super) struct CidrField(pub(super) Cidr);

impl<'de> Deserialize<'de> for CidrField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(CidrField).map_err(serde::de::Error::custom)
    }
}

pub(super) struct GroupField(pub(super) Group);

impl<'de> Deserialize<'de> for GroupField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "stable" => Ok(GroupField(Group::Stable)),
            "canary" => Ok(GroupField(Group::Canary)),
            _ => Err(serde::de::Error::custom(format!(
                "`{s}` is not a group; expected `stable` or `canary`"
            ))),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRollout {
    #[serde(default)]
    pub(super) strategy: Strategy,
    pub(super) steps: Option<Vec<PercentField>>,
    pub(super) step_weight: Option<PercentField>,
    pub(super) max_weight: Option<PercentField>,
    pub(super) interval: Option<DurationField>,
    pub(super) checks_per_step: Option<u32>,
    pub(super) min_requests: Option<u64>,
    pub(super) failure_limit: Option<u32>,
    pub(super) progress_deadline: Option<DurationField>,
    #[serde(default)]
    pub(super) on_rollback: OnRollback,
    pub(super) watch_after_promotion: Option<DurationField>,
    pub(super) duration: Option<DurationField>,
    #[serde(default)]
    pub(super) webhooks: Vec<super::webhooks::RawWebhook>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnalysis {
    #[serde(default)]
    pub(super) limits: RawAnalysisLimits,
    pub(super) request_timeout: Option<DurationField>,
    pub(super) warmup: Option<DurationField>,
    #[serde(default)]
    pub(super) dry_run: Vec<String>,
    pub(super) compare_to_stable: Option<RawCompare>,
    #[serde(default)]
    pub(super) critical: RawCritical,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnalysisLimits {
    pub(super) max_error_rate: Option<PercentField>,
    pub(super) max_latency_p99: Option<DurationField>,
    pub(super) max_latency_p50: Option<DurationField>,
    pub(super) max_connect_errors_rate: Option<PercentField>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCompare {
    pub(super) enabled: Option<bool>,
    pub(super) max_error_rate_increase: Option<PercentField>,
    pub(super) max_latency_increase: Option<IncreaseField>,
    pub(super) min_latency_increase: Option<DurationField>,
    pub(super) tail_quantile: Option<f64>,
    pub(super) confidence: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCritical {
    pub(super) error_rate: Option<PercentField>,
    pub(super) connect_error_rate: Option<PercentField>,
    pub(super) min_requests: Option<u64>,
    pub(super) window: Option<DurationField>,
}

/// A percentage as written (`1`, `0.5`, `"12.5%"`), kept in basis points.
#[derive(Clone, Copy)]
pub(super) struct PercentField(pub(super) u32);

impl<'de> Deserialize<'de> for PercentField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Weight::deserialize(d).map(|w| PercentField(w.0))
    }
}

/// A relative increase in percent (`20`, `"150%"`): 0 to 10,000 %, kept as a fraction.
#[derive(Clone, Copy)]
pub(super) struct IncreaseField(pub(super) f64);

impl<'de> Deserialize<'de> for IncreaseField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let p = match Raw::deserialize(d)? {
            Raw::Number(n) => n,
            Raw::Text(t) => t
                .trim()
                .trim_end_matches('%')
                .trim()
                .parse::<f64>()
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{t}` is not a percentage; expected e.g. 20 or \"150%\""
                    ))
                })?,
        };
        if !p.is_finite() || !(0.0..=10_000.0).contains(&p) {
            return Err(serde::de::Error::custom(format!(
                "{p} is outside 0 to 10000 (percent of stable's median)"
            )));
        }
        Ok(IncreaseField(p / 100.0))
    }
}

impl PercentField {
    pub(super) fn fraction(self) -> f64 {
        self.0 as f64 / BASIS_POINTS as f64
    }
}
