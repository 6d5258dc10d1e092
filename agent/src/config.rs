//! The configuration file: its YAML shape, and validation into [`Config`].
//!
//! Parsing and validation are pure: they take the file's text and a way to
//! ask whether an interface exists, and return a [`Config`] or one
//! [`ConfigError`] that names the file, the field and the fix. Nothing is
//! attached or written before a configuration has passed here, and a reload
//! that fails here leaves the running configuration as it was.
//!
//! ```yaml
//! interfaces:
//!   - name: eth0            # where client traffic enters the node
//!     mode: auto            # auto | xdp | tc
//! conntrack:
//!   connections: 262144     # connections tracked (LRU)
//! limits:
//!   backends: 1024          # backends with kernel statistics, over all services
//! metrics:
//!   listen: 0.0.0.0:9477    # Prometheus /metrics
//! control:
//!   socket: /run/kanari/kanari.sock
//! telemetry:
//!   tick: 250ms             # how often the kernel counters are read
//! services:
//!   - name: web
//!     vip: 10.0.0.100:80    # virtual IPv4 address and TCP port
//!     affinity: client      # client | connection
//!     protocol: http        # http (status classes) | tcp (timing only)
//!     canary_weight: 10     # percent of new clients sent to the canary
//!     stable:
//!       backends: [10.0.2.1:8080, 10.0.2.2:8080]
//!     canary:
//!       backends: [10.0.3.1:8080]
//!     segments:             # client CIDRs pinned to a group, whatever the weight
//!       - cidr: 10.1.5.0/24
//!         group: canary
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use kanari_common::maps::{
    BASIS_POINTS, DEFAULT_CONNTRACK_CONNECTIONS, DEFAULT_MAX_BACKENDS, Group,
    MAX_BACKENDS_PER_GROUP, MAX_SEGMENTS, MAX_SERVICES,
};
use serde::Deserialize;

pub mod rollout;
pub use rollout::{Analysis, Compare, Critical, Limits, OnRollback, Rollout, Strategy};

/// Bounds of `conntrack.connections`.
pub const MIN_CONNTRACK_CONNECTIONS: u32 = 1024;
pub const MAX_CONNTRACK_CONNECTIONS: u32 = 16 * 1024 * 1024;
/// Upper bound of `limits.backends` (the size of the kernel's per-CPU statistics).
pub const MAX_LIMIT_BACKENDS: u32 = 65_536;
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9477";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/kanari/kanari.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kanari";
pub const DEFAULT_TICK: Duration = Duration::from_millis(250);
/// Bounds of `telemetry.tick`.
pub const MIN_TICK: Duration = Duration::from_millis(10);
pub const MAX_TICK: Duration = Duration::from_secs(10);

/// A configuration that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub interfaces: Vec<Interface>,
    pub conntrack_connections: u32,
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
    pub services: Vec<Service>,
}

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
    pub segments: Vec<SegmentRule>,
    /// How the canary's weight is driven; `None`: `canary_weight` is fixed.
    pub rollout: Option<RolloutSpec>,
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

/// A configuration that cannot be used, with where and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct ConfigError {
    /// The file, with `:line:column` when the parser knows it.
    pub file: String,
    /// The field, as a path from the top (`services[0].vip`), or `(file)`.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

// ---- The file as written --------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    #[serde(default)]
    conntrack: RawConntrack,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    bpf: RawBpf,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    backends: u32,
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
struct RawMetrics {
    listen: ListenField,
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
struct RawControl {
    socket: PathBuf,
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
struct RawBpf {
    pin_dir: PathBuf,
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
struct RawState {
    dir: PathBuf,
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
struct RawTelemetry {
    tick: DurationField,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            tick: DurationField(DEFAULT_TICK),
        }
    }
}

/// `IP:port` to listen on (IPv4 or IPv6).
struct ListenField(SocketAddr);

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
struct RawInterface {
    name: String,
    #[serde(default)]
    mode: AttachMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    #[serde(default = "default_conntrack")]
    connections: u32,
    /// New connections recorded per second over the node; absent: a
    /// sixteenth of `connections`; 0: no limit.
    new_per_second: Option<u32>,
}

impl Default for RawConntrack {
    fn default() -> Self {
        Self {
            connections: default_conntrack(),
            new_per_second: None,
        }
    }
}

fn default_conntrack() -> u32 {
    DEFAULT_CONNTRACK_CONNECTIONS
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: Endpoint,
    #[serde(default)]
    affinity: Affinity,
    #[serde(default)]
    protocol: Protocol,
    canary_weight: Option<Weight>,
    #[serde(default)]
    salt: Option<u32>,
    stable: RawGroup,
    #[serde(default)]
    canary: RawGroup,
    #[serde(default)]
    segments: Vec<RawSegment>,
    rollout: Option<rollout::RawRollout>,
    analysis: Option<rollout::RawAnalysis>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    #[serde(default)]
    backends: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    cidr: CidrField,
    group: GroupField,
}

/// `IPv4:port`, with errors that say which half is wrong.
#[derive(Clone, Copy)]
struct Endpoint(SocketAddrV4);

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

struct CidrField(Cidr);

impl<'de> Deserialize<'de> for CidrField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(CidrField).map_err(serde::de::Error::custom)
    }
}

struct GroupField(Group);

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

// ---- Loading and validation -----------------------------------------------------------------

/// Reads and validates a configuration file.
pub fn load(path: &Path, interface_exists: &dyn Fn(&str) -> bool) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        field: "(file)".into(),
        message: format!("cannot read it: {e}"),
    })?;
    parse(&file, &text, interface_exists)
}

/// Parses and validates a configuration's text; `file` names it in errors.
pub fn parse(
    file: &str,
    text: &str,
    interface_exists: &dyn Fn(&str) -> bool,
) -> Result<Config, ConfigError> {
    let raw: RawConfig = {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = yaml_message(&inner);
            // The parser's context ("while scanning a simple key at line 5")
            // marks the broken line better than where it gave up.
            let line = context_line(&inner.to_string()).or(inner.location().map(|l| l.line()));
            // A syntax error stops the parser wherever it was; the field is
            // the key on the broken line, found by its indentation.
            let syntax = path.contains('?') || is_syntax_error(&message);
            let field = match line.filter(|_| syntax).and_then(|l| path_at_line(text, l)) {
                Some(p) => p,
                None if path == "." || path.contains('?') => "(top level)".to_string(),
                None => path,
            };
            let file = match inner.location() {
                Some(l) => format!("{file}:{}:{}", l.line(), l.column()),
                None => file.to_string(),
            };
            ConfigError {
                file,
                field,
                message,
            }
        })?
    };
    validate(raw, interface_exists).map_err(|(field, message)| ConfigError {
        file: file.to_string(),
        field,
        message,
    })
}

/// The parser's message without the location it appends (the location goes in the file part).
fn yaml_message(e: &serde_yaml_ng::Error) -> String {
    let msg = e.to_string();
    let msg = match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    // serde_yaml_ng prefixes its own path ("services[0]: ...", "telemetry: ...");
    // the field part of the error already says where.
    match msg.split_once(": ") {
        Some((head, rest)) if !head.is_empty() && !head.contains(char::is_whitespace) => {
            rest.to_string()
        }
        _ => msg,
    }
}

/// The line where the parser began what it could not finish — a key whose
/// colon never came, a quote never closed (`..., while scanning a simple key
/// at line 5 column 5`): that line is the broken one, not the line where the
/// parser gave up.
fn context_line(full: &str) -> Option<usize> {
    let start = [
        "while scanning a simple key",
        "while scanning a quoted scalar",
        "while parsing a flow sequence",
        "while parsing a flow mapping",
    ]
    .iter()
    .find_map(|c| full.find(c))?;
    let ctx = &full[start..];
    let at = ctx.find(" at line ")? + " at line ".len();
    ctx[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Whether the parser's message is about the text's syntax rather than a value.
fn is_syntax_error(message: &str) -> bool {
    [
        "did not find expected",
        "could not find expected",
        "found a tab character",
        "found unexpected",
        "mapping values are not allowed",
        "found character that cannot start any token",
        "while scanning",
        "while parsing",
    ]
    .iter()
    .any(|s| message.contains(s))
}

/// The field path of the key on `line` (1-based) of a block-style YAML text,
/// from the keys and list items that enclose it by indentation; the key on the
/// nearest line above with one when `line` has none. Tabs count as four spaces.
fn path_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| {
        l.chars()
            .take_while(|c| *c == ' ' || *c == '\t')
            .map(|c| if c == '\t' { 4 } else { 1 })
            .sum::<usize>()
    };
    // A line's key: the name before its colon, after an optional `- `.
    let key = |l: &str| -> Option<String> {
        let t = l
            .trim_start_matches([' ', '\t'])
            .trim_start_matches("- ")
            .trim_start();
        let k: String = t
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!k.is_empty() && !t.starts_with('#')).then_some(k)
    };
    let mut at = line.checked_sub(1)?.min(lines.len().checked_sub(1)?);
    while key(lines[at]).is_none() {
        at = at.checked_sub(1)?;
    }
    let item = |l: &str| l.trim_start_matches([' ', '\t']).starts_with("- ");
    let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    // The index of the list item on line `i` among the items before it.
    let index_of = |i: usize| {
        let ind = indent(lines[i]);
        let mut index = 0;
        let mut j = i;
        while j > 0 {
            j -= 1;
            let p = lines[j];
            if blank(p) || indent(p) > ind {
                continue;
            }
            if indent(p) == ind && item(p) {
                index += 1;
            } else {
                break;
            }
        }
        index
    };
    let mut parts = vec![key(lines[at])?];
    if item(lines[at]) {
        parts.push(format!("[{}]", index_of(at)));
    }
    let mut level = indent(lines[at]);
    let mut i = at;
    while i > 0 && level > 0 {
        i -= 1;
        let l = lines[i];
        if blank(l) || indent(l) >= level {
            continue;
        }
        level = indent(l);
        if item(l) {
            // Our key lives in this item (its first key shares the dash's line).
            parts.push(format!("[{}]", index_of(i)));
        } else if let Some(k) = key(l) {
            parts.push(k);
        }
    }
    let mut path = String::new();
    for p in parts.iter().rev() {
        if !p.starts_with('[') && !path.is_empty() {
            path.push('.');
        }
        path.push_str(p);
    }
    Some(path)
}

type FieldError = (String, String);

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err((field.into(), message.into()))
}

/// The salt of a service without one in the file: FNV-1a of its name, so a
/// restart or a reload keeps every client in its group.
pub fn default_salt(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

fn validate(raw: RawConfig, interface_exists: &dyn Fn(&str) -> bool) -> Result<Config, FieldError> {
    if raw.interfaces.is_empty() {
        return err(
            "interfaces",
            "at least one interface is required: the one where client traffic enters, e.g. `- name: eth0`",
        );
    }
    let mut names = BTreeSet::new();
    let mut interfaces = Vec::new();
    for (i, it) in raw.interfaces.into_iter().enumerate() {
        let field = format!("interfaces[{i}].name");
        if it.name.is_empty()
            || it.name.len() > 15
            || it.name.contains('/')
            || it.name.contains(char::is_whitespace)
        {
            return err(
                field,
                format!(
                    "`{}` is not an interface name (1 to 15 characters, no `/` or spaces)",
                    it.name
                ),
            );
        }
        if !names.insert(it.name.clone()) {
            return err(
                field,
                format!(
                    "interface `{}` is listed twice; list each interface once",
                    it.name
                ),
            );
        }
        if !interface_exists(&it.name) {
            return err(
                field,
                format!(
                    "interface `{}` does not exist on this host; `ip link` lists the interfaces",
                    it.name
                ),
            );
        }
        interfaces.push(Interface {
            name: it.name,
            mode: it.mode,
        });
    }

    let connections = raw.conntrack.connections;
    let new_connections_per_second = raw.conntrack.new_per_second.unwrap_or(connections / 16);
    if !(MIN_CONNTRACK_CONNECTIONS..=MAX_CONNTRACK_CONNECTIONS).contains(&connections) {
        return err(
            "conntrack.connections",
            format!(
                "{connections} is outside {MIN_CONNTRACK_CONNECTIONS} to {MAX_CONNTRACK_CONNECTIONS}"
            ),
        );
    }

    let max_backends = raw.limits.backends;
    if !(1..=MAX_LIMIT_BACKENDS).contains(&max_backends) {
        return err(
            "limits.backends",
            format!("{max_backends} is outside 1 to {MAX_LIMIT_BACKENDS}"),
        );
    }
    let tick = raw.telemetry.tick.0;
    if !(MIN_TICK..=MAX_TICK).contains(&tick) {
        return err(
            "telemetry.tick",
            format!(
                "{} is outside {} to {}",
                humantime::format_duration(tick),
                humantime::format_duration(MIN_TICK),
                humantime::format_duration(MAX_TICK)
            ),
        );
    }
    let pin_dir = raw.bpf.pin_dir;
    if !pin_dir.is_absolute() || pin_dir.parent().is_none() {
        return err(
            "bpf.pin_dir",
            format!(
                "`{}` is not an absolute directory below a bpf filesystem, e.g. {}",
                pin_dir.display(),
                crate::pins::PIN_ROOT
            ),
        );
    }
    let state_dir = raw.state.dir;
    if !state_dir.is_absolute() {
        return err(
            "state.dir",
            format!(
                "`{}` is not an absolute path, e.g. {DEFAULT_STATE_DIR}",
                state_dir.display()
            ),
        );
    }
    let control_socket = raw.control.socket;
    if !control_socket.is_absolute() {
        return err(
            "control.socket",
            format!(
                "`{}` is not an absolute path, e.g. {DEFAULT_CONTROL_SOCKET}",
                control_socket.display()
            ),
        );
    }

    if raw.services.len() > MAX_SERVICES as usize {
        return err(
            "services",
            format!(
                "{} services; at most {MAX_SERVICES} are supported",
                raw.services.len()
            ),
        );
    }
    let mut service_names = BTreeMap::new();
    let mut vips = BTreeMap::new();
    let mut services = Vec::new();
    let mut segments_total = 0usize;
    // Which group each client CIDR is pinned to, and by which service.
    let mut pinned: BTreeMap<Cidr, (Group, usize)> = BTreeMap::new();
    let mut backends_total = 0usize;
    for (i, s) in raw.services.into_iter().enumerate() {
        let at = |f: &str| format!("services[{i}].{f}");
        if s.name.is_empty()
            || s.name.len() > 63
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return err(
                at("name"),
                format!(
                    "`{}` is not a service name: 1 to 63 of a-z, A-Z, 0-9, `-`, `_`, `.`",
                    s.name
                ),
            );
        }
        if let Some(j) = service_names.insert(s.name.clone(), i) {
            return err(
                at("name"),
                format!(
                    "`{}` is also the name of services[{j}]; names must be unique",
                    s.name
                ),
            );
        }
        let vip = s.vip.0;
        if let Some(j) = vips.insert(vip, i) {
            return err(
                at("vip"),
                format!("{vip} is also the VIP of services[{j}]; each VIP:port is one service"),
            );
        }
        let stable: Vec<_> = s.stable.backends.iter().map(|e| e.0).collect();
        let canary: Vec<_> = s.canary.backends.iter().map(|e| e.0).collect();
        if stable.is_empty() {
            return err(
                at("stable.backends"),
                "at least one stable backend is required",
            );
        }
        for (group, list) in [("stable", &stable), ("canary", &canary)] {
            if list.len() > MAX_BACKENDS_PER_GROUP {
                return err(
                    at(&format!("{group}.backends")),
                    format!(
                        "{} backends; at most {MAX_BACKENDS_PER_GROUP} per group",
                        list.len()
                    ),
                );
            }
            let mut seen = BTreeSet::new();
            for (k, b) in list.iter().enumerate() {
                if !seen.insert(*b) {
                    return err(
                        at(&format!("{group}.backends[{k}]")),
                        format!("{b} is listed twice"),
                    );
                }
                if *b == vip {
                    return err(
                        at(&format!("{group}.backends[{k}]")),
                        format!(
                            "{b} is the service's own VIP; a backend must be a different address or port"
                        ),
                    );
                }
            }
        }
        if let Some(k) = canary.iter().position(|b| stable.contains(b)) {
            return err(
                at(&format!("canary.backends[{k}]")),
                format!(
                    "{} is also a stable backend; a backend belongs to one group",
                    canary[k]
                ),
            );
        }
        if s.rollout.is_some() && s.canary_weight.is_some_and(|w| w.0 > 0) {
            return err(
                at("canary_weight"),
                "the rollout drives this service's weight; remove canary_weight (or the rollout, for a fixed split)",
            );
        }
        if s.analysis.is_some() && s.rollout.is_none() {
            return err(
                at("analysis"),
                "analysis judges a rollout: add a rollout section (or remove analysis)",
            );
        }
        let weight = s.canary_weight.map_or(0, |w| w.0);
        if weight > 0 && canary.is_empty() {
            return err(
                at("canary_weight"),
                format!(
                    "{}% for the canary, but canary.backends is empty; add canary backends or set 0",
                    weight as f64 / 100.0
                ),
            );
        }
        let mut segments: Vec<SegmentRule> = Vec::new();
        for (k, seg) in s.segments.iter().enumerate() {
            let rule = SegmentRule {
                cidr: seg.cidr.0,
                group: seg.group.0,
            };
            if let Some(j) = segments.iter().position(|r| r.cidr == rule.cidr) {
                return err(
                    at(&format!("segments[{k}].cidr")),
                    format!("{} is also segments[{j}]", rule.cidr),
                );
            }
            if rule.group == Group::Canary && canary.is_empty() {
                return err(
                    at(&format!("segments[{k}].group")),
                    format!(
                        "{} is pinned to the canary, but canary.backends is empty",
                        rule.cidr
                    ),
                );
            }
            segments.push(rule);
        }
        backends_total += stable.len() + canary.len();
        if backends_total > max_backends as usize {
            return err(
                "limits.backends",
                format!(
                    "the services list more than {max_backends} backends; raise limits.backends (about 1 KiB of kernel memory per backend per CPU)"
                ),
            );
        }
        for (k, r) in segments.iter().enumerate() {
            match pinned.get(&r.cidr) {
                Some((g, j)) if *g != r.group => {
                    return err(
                        at(&format!("segments[{k}].group")),
                        format!(
                            "{} is pinned to {} here and to {} by services[{j}]: one group of clients sees one version; pin it to the same group in both",
                            r.cidr,
                            r.group.name(),
                            g.name()
                        ),
                    );
                }
                _ => {
                    pinned.insert(r.cidr, (r.group, i));
                }
            }
        }
        segments_total += segments.len();
        if segments_total > MAX_SEGMENTS as usize {
            return err(
                at("segments"),
                format!("more than {MAX_SEGMENTS} segments over all services"),
            );
        }
        debug_assert!(weight <= BASIS_POINTS);
        let rollout = match s.rollout {
            None => None,
            Some(r) => {
                let facts = rollout::ServiceFacts {
                    has_canary_backends: !canary.is_empty(),
                    canary_segments: segments.iter().filter(|r| r.group == Group::Canary).count(),
                    http: s.protocol == Protocol::Http,
                };
                let (rollout, analysis) =
                    rollout::validate(r, s.analysis.unwrap_or_default(), &facts, &at)?;
                Some(RolloutSpec { rollout, analysis })
            }
        };
        services.push(Service {
            salt: s.salt.unwrap_or_else(|| default_salt(&s.name)),
            name: s.name,
            vip,
            affinity: s.affinity,
            protocol: s.protocol,
            canary_weight: weight,
            stable,
            canary,
            segments,
            rollout,
        });
    }
    Ok(Config {
        interfaces,
        conntrack_connections: connections,
        new_connections_per_second,
        max_backends,
        metrics_listen: raw.metrics.listen.0,
        control_socket,
        state_dir,
        pin_dir,
        tick,
        services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interfaces:
  - name: eth0
  - name: eth1
    mode: tc
conntrack:
  connections: 65536
services:
  - name: web
    vip: 10.0.0.100:80
    canary_weight: 12.5
    stable:
      backends: [10.0.2.1:8080, 10.0.2.2:8080]
    canary:
      backends: [10.0.3.1:8080]
    segments:
      - cidr: 10.1.5.0/24
        group: canary
  - name: api
    vip: 10.0.0.101:443
    affinity: connection
    canary_weight: "5%"
    salt: 7
    stable:
      backends: [10.0.2.1:8443]
    canary:
      backends: [10.0.3.1:8443]
"#;

    fn exists(name: &str) -> bool {
        name.starts_with("eth")
    }

    fn parse_err(text: &str) -> ConfigError {
        parse("k.yaml", text, &exists).expect_err("config should be rejected")
    }

    #[test]
    fn a_good_config_parses_with_defaults_filled_in() {
        let c = parse("k.yaml", GOOD, &exists).unwrap();
        assert_eq!(c.conntrack_connections, 65536);
        assert_eq!(c.interfaces[0].mode, AttachMode::Auto);
        assert_eq!(c.interfaces[1].mode, AttachMode::Tc);
        let web = &c.services[0];
        assert_eq!(web.canary_weight, 1250);
        assert_eq!(web.affinity, Affinity::Client);
        assert_eq!(web.protocol, Protocol::Http);
        assert_eq!(web.salt, default_salt("web"));
        assert_eq!(web.segments[0].cidr.to_string(), "10.1.5.0/24");
        assert_eq!(web.segments[0].group, Group::Canary);
        let api = &c.services[1];
        assert_eq!(api.canary_weight, 500);
        assert_eq!(api.salt, 7);
        assert_eq!(api.affinity, Affinity::Connection);
        assert_eq!(api.canary.len(), 1);
    }

    #[test]
    fn defaults() {
        let c = parse("k.yaml", "interfaces: [{name: eth0}]\n", &exists).unwrap();
        assert_eq!(c.conntrack_connections, DEFAULT_CONNTRACK_CONNECTIONS);
        assert_eq!(
            c.new_connections_per_second,
            DEFAULT_CONNTRACK_CONNECTIONS / 16
        );
        assert_eq!(c.max_backends, DEFAULT_MAX_BACKENDS);
        assert_eq!(c.metrics_listen.to_string(), "0.0.0.0:9477");
        assert_eq!(c.control_socket, PathBuf::from("/run/kanari/kanari.sock"));
        assert_eq!(c.tick, Duration::from_millis(250));
        assert!(c.services.is_empty());
        let c = parse("k.yaml", "interfaces: [{name: eth0}]\ntelemetry: {tick: 1s}\nmetrics: {listen: \"[::1]:9000\"}\n", &exists).unwrap();
        assert_eq!(c.tick, Duration::from_secs(1));
        assert_eq!(c.metrics_listen.to_string(), "[::1]:9000");
    }

    /// Each bad input gives one error naming the field and saying what is expected.
    #[test]
    fn bad_inputs_name_the_field_and_the_fix() {
        let svc = |extra: &str| {
            format!(
                "interfaces: [{{name: eth0}}]\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    stable: {{backends: [10.0.2.1:8080]}}\n{extra}"
            )
        };
        let cases: Vec<(String, &str, &str)> = vec![
            (
                "interfaces: [name: eth0\n".into(),
                "interfaces",
                "expected ',' or ']'",
            ),
            (
                "interfaces: [{name: eth0, speed: 10}]\n".into(),
                "interfaces[0].speed",
                "unknown field `speed`",
            ),
            (
                "interfaces: [{name: eth0, mode: ebpf}]\n".into(),
                "interfaces[0].mode",
                "unknown variant `ebpf`",
            ),
            (
                "interfaces: []\n".into(),
                "interfaces",
                "at least one interface",
            ),
            (
                "interfaces: [{name: wlan9}]\n".into(),
                "interfaces[0].name",
                "does not exist",
            ),
            (
                "interfaces: [{name: eth0}, {name: eth0}]\n".into(),
                "interfaces[1].name",
                "listed twice",
            ),
            (
                "interfaces: [{name: eth0}]\nconntrack: {connections: 10}\n".into(),
                "conntrack.connections",
                "outside",
            ),
            (
                svc("").replace("10.0.0.100:80", "10.0.0.100"),
                "services[0].vip",
                "has no port",
            ),
            (
                svc("").replace("10.0.0.100:80", "10.0.0.300:80"),
                "services[0].vip",
                "not an IPv4 address",
            ),
            (
                svc("").replace("10.0.0.100:80", "10.0.0.100:http"),
                "services[0].vip",
                "not a port",
            ),
            (
                svc("").replace("10.0.2.1:8080", "backend-1:8080"),
                "services[0].stable.backends[0]",
                "not an IPv4 address",
            ),
            (
                svc("").replace("10.0.2.1:8080", "fd00::1:8080"),
                "services[0].stable.backends[0]",
                "not an IPv4 address",
            ),
            (
                svc("    canary_weight: 101\n    canary: {backends: [10.0.3.1:80]}\n"),
                "services[0].canary_weight",
                "outside 0 to 100",
            ),
            (
                svc("    canary_weight: -1\n    canary: {backends: [10.0.3.1:80]}\n"),
                "services[0].canary_weight",
                "outside 0 to 100",
            ),
            (
                svc("    canary_weight: 1.234\n    canary: {backends: [10.0.3.1:80]}\n"),
                "services[0].canary_weight",
                "two decimals",
            ),
            (
                svc("    canary_weight: lots\n"),
                "services[0].canary_weight",
                "not a percentage",
            ),
            (
                svc("    canary_weight: 10\n"),
                "services[0].canary_weight",
                "canary.backends is empty",
            ),
            (
                svc("    affinity: sticky\n"),
                "services[0].affinity",
                "unknown variant `sticky`",
            ),
            (
                svc("    canary: {backends: [10.0.2.1:8080]}\n"),
                "services[0].canary.backends[0]",
                "also a stable backend",
            ),
            (
                svc("").replace("[10.0.2.1:8080]", "[10.0.0.100:80]"),
                "services[0].stable.backends[0]",
                "own VIP",
            ),
            (
                svc("").replace("[10.0.2.1:8080]", "[10.0.2.1:8080, 10.0.2.1:8080]"),
                "services[0].stable.backends[1]",
                "listed twice",
            ),
            (
                svc("").replace("[10.0.2.1:8080]", "[]"),
                "services[0].stable.backends",
                "at least one stable backend",
            ),
            (
                svc("    segments: [{cidr: 10.1.5.1/24, group: stable}]\n"),
                "services[0].segments[0].cidr",
                "write 10.1.5.0/24",
            ),
            (
                svc("    segments: [{cidr: 10.1.5.0/33, group: stable}]\n"),
                "services[0].segments[0].cidr",
                "0 to 32",
            ),
            (
                svc("    segments: [{cidr: 10.1.5.0, group: stable}]\n"),
                "services[0].segments[0].cidr",
                "not a CIDR",
            ),
            (
                svc("    segments: [{cidr: 10.1.5.0/24, group: beta}]\n"),
                "services[0].segments[0].group",
                "`stable` or `canary`",
            ),
            (
                svc("    segments: [{cidr: 10.1.5.0/24, group: canary}]\n"),
                "services[0].segments[0].group",
                "canary.backends is empty",
            ),
            (
                svc(
                    "    segments: [{cidr: 10.1.5.0/24, group: stable}, {cidr: 10.1.5.0/24, group: stable}]\n",
                ),
                "services[0].segments[1].cidr",
                "also segments[0]",
            ),
            (
                svc(
                    "  - name: web\n    vip: 10.0.0.101:80\n    stable: {backends: [10.0.2.1:8080]}\n",
                ),
                "services[1].name",
                "names must be unique",
            ),
            (
                svc(
                    "  - name: web2\n    vip: 10.0.0.100:80\n    stable: {backends: [10.0.2.1:8080]}\n",
                ),
                "services[1].vip",
                "also the VIP of services[0]",
            ),
            (
                svc("").replace("name: web", "name: \"web site\""),
                "services[0].name",
                "not a service name",
            ),
            (
                "interfaces: [{name: eth0}]\nservices: [{name: web, vip: 10.0.0.1:80}]\n".into(),
                "services[0]",
                "missing field `stable`",
            ),
            (
                "interfaces: [{name: eth0}]\nservces: []\n".into(),
                "servces",
                "unknown field `servces`",
            ),
            (
                svc("    protocol: grpc\n"),
                "services[0].protocol",
                "unknown variant `grpc`",
            ),
            (
                "interfaces: [{name: eth0}]\nlimits: {backends: 0}\n".into(),
                "limits.backends",
                "outside 1 to",
            ),
            (
                svc("")
                    .replace("services:", "limits: {backends: 1}\nservices:")
                    .replace("[10.0.2.1:8080]", "[10.0.2.1:8080, 10.0.2.2:8080]"),
                "limits.backends",
                "raise limits.backends",
            ),
            (
                "interfaces: [{name: eth0}]\nmetrics: {listen: 9477}\n".into(),
                "metrics.listen",
                "not an address to listen on",
            ),
            (
                "interfaces: [{name: eth0}]\ntelemetry: {tick: fast}\n".into(),
                "telemetry.tick",
                "not a duration",
            ),
            (
                "interfaces: [{name: eth0}]\ntelemetry: {tick: 1ms}\n".into(),
                "telemetry.tick",
                "outside 10ms",
            ),
            (
                "interfaces: [{name: eth0}]\ncontrol: {socket: kanari.sock}\n".into(),
                "control.socket",
                "absolute path",
            ),
            (
                svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {steps: [10, 5]}\n"),
                "services[0].rollout.steps[1]",
                "steps must increase",
            ),
            (
                svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {steps: [0, 5]}\n"),
                "services[0].rollout.steps[0]",
                "more than 0 %",
            ),
            (
                svc(
                    "    canary: {backends: [10.0.3.1:80]}\n    rollout: {steps: [5], step_weight: 5}\n",
                ),
                "services[0].rollout.steps",
                "not both",
            ),
            (
                svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {strategy: blue-green}\n"),
                "services[0].rollout.strategy",
                "add a segment pinned to the canary",
            ),
            (
                svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {strategy: rolling}\n"),
                "services[0].rollout.strategy",
                "unknown variant `rolling`",
            ),
            (
                svc(
                    "    canary: {backends: [10.0.3.1:80]}\n    canary_weight: 10\n    rollout: {}\n",
                ),
                "services[0].canary_weight",
                "the rollout drives",
            ),
            (
                svc("    analysis: {}\n"),
                "services[0].analysis",
                "add a rollout section",
            ),
            (
                svc("    rollout: {}\n"),
                "services[0].canary.backends",
                "a rollout needs canary backends",
            ),
            (
                svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {interval: 10}\n"),
                "services[0].rollout.interval",
                "not a duration",
            ),
            (
                svc(
                    "    canary: {backends: [10.0.3.1:80]}\n    rollout: {interval: 10s, progress_deadline: 5s}\n",
                ),
                "services[0].rollout.progress_deadline",
                "at least one interval",
            ),
            (
                svc(
                    "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {compare_to_stable: {confidence: 1.5}}\n",
                ),
                "services[0].analysis.compare_to_stable.confidence",
                "below 1",
            ),
            (
                svc(
                    "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {limits: {max_latency: 1s}}\n",
                ),
                "services[0].analysis.limits.max_latency",
                "unknown field `max_latency`",
            ),
            (
                svc(
                    "    protocol: tcp\n    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {limits: {max_error_rate: 1}}\n",
                ),
                "services[0].analysis",
                "protocol: tcp",
            ),
            (
                svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {on_rollback: kill}\n"),
                "services[0].rollout.on_rollback",
                "unknown variant `kill`",
            ),
            (
                "interfaces: [{name: eth0}]\nstate: {dir: state}\n".into(),
                "state.dir",
                "absolute path",
            ),
            (
                svc(
                    "    canary: {backends: [10.0.3.1:80]}\n    segments: [{cidr: 10.9.0.0/16, group: canary}]\n  - name: api\n    vip: 10.0.0.101:80\n    stable: {backends: [10.0.2.1:81]}\n    segments: [{cidr: 10.9.0.0/16, group: stable}]\n",
                ),
                "services[1].segments[0].group",
                "pin it to the same group in both",
            ),
            (
                "interfaces: [{name: eth0}]\nbpf: {pin_dir: kanari}\n".into(),
                "bpf.pin_dir",
                "absolute directory",
            ),
        ];
        for (text, field, needle) in cases {
            let e = parse_err(&text);
            assert_eq!(e.field, field, "for:\n{text}\ngot: {e}");
            assert!(
                e.message.contains(needle),
                "for:\n{text}\nexpected `{needle}` in: {e}"
            );
            assert!(e.to_string().starts_with("k.yaml"), "{e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn rollouts_parse_with_defaults() {
        let text = "interfaces: [{name: eth0}]\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    stable: {backends: [10.0.2.1:80]}\n    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n";
        let c = parse("k.yaml", text, &exists).unwrap();
        let r = c.services[0].rollout.as_ref().unwrap();
        assert_eq!(r.rollout.strategy, Strategy::Canary);
        assert_eq!(r.rollout.steps, vec![100, 500, 1000, 2500, 5000, 10000]);
        assert_eq!(r.rollout.interval, Duration::from_secs(30));
        assert_eq!(
            (
                r.rollout.checks_per_step,
                r.rollout.failure_limit,
                r.rollout.min_requests
            ),
            (1, 1, 100)
        );
        assert_eq!(r.rollout.on_rollback, OnRollback::Drain);
        let cmp = r.analysis.compare.as_ref().unwrap();
        assert_eq!(
            (
                cmp.max_error_rate_increase,
                cmp.max_latency_increase,
                cmp.confidence
            ),
            (Some(0.01), Some(0.2), 0.99)
        );
        assert_eq!(cmp.min_latency_increase, Duration::from_millis(1));
        assert_eq!(
            (
                r.analysis.critical.error_rate,
                r.analysis.critical.min_requests
            ),
            (Some(0.5), 20)
        );
        assert_eq!(r.analysis.limits, Limits::default());
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));

        let text = text.replace(
            "rollout: {}",
            "rollout: {step_weight: 20, max_weight: 60, interval: 5s, on_rollback: cut}\n    analysis:\n      limits: {max_error_rate: 2, max_latency_p99: 250ms}\n      compare_to_stable: {max_latency_increase: \"10%\", min_latency_increase: 5ms, confidence: 0.95}\n      critical: {error_rate: 40, min_requests: 10}",
        );
        let c = parse("k.yaml", &text, &exists).unwrap();
        let r = c.services[0].rollout.as_ref().unwrap();
        assert_eq!(r.rollout.steps, vec![2000, 4000, 6000]);
        assert_eq!(r.rollout.on_rollback, OnRollback::Cut);
        assert_eq!(r.analysis.limits.max_error_rate, Some(0.02));
        assert_eq!(
            r.analysis.limits.max_latency_p99,
            Some(Duration::from_millis(250))
        );
        let cmp = r.analysis.compare.as_ref().unwrap();
        assert_eq!(
            (
                cmp.max_error_rate_increase,
                cmp.max_latency_increase,
                cmp.confidence
            ),
            (None, Some(0.1), 0.95)
        );
        assert_eq!(cmp.min_latency_increase, Duration::from_millis(5));
        assert_eq!(
            (
                r.analysis.critical.error_rate,
                r.analysis.critical.min_requests
            ),
            (Some(0.4), 10)
        );
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/kanari.yaml");
        let c = load(&path, &|_| true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.services.len(), 2);
        assert!(c.services[1].rollout.is_some());
    }

    #[test]
    fn a_line_s_field_path_comes_from_its_indentation() {
        let text = "interfaces:\n  - name: eth0\nservices:\n  - name: web\n    vip: 1\n    stable:\n      backends: [x]\n  - name: api\n    vip: 2\n\tsalt: 3\n";
        assert_eq!(path_at_line(text, 2).as_deref(), Some("interfaces[0].name"));
        assert_eq!(path_at_line(text, 5).as_deref(), Some("services[0].vip"));
        assert_eq!(
            path_at_line(text, 7).as_deref(),
            Some("services[0].stable.backends")
        );
        assert_eq!(path_at_line(text, 8).as_deref(), Some("services[1].name"));
        assert_eq!(path_at_line(text, 9).as_deref(), Some("services[1].vip"));
        assert_eq!(path_at_line(text, 10).as_deref(), Some("services[1].salt"));
        assert_eq!(path_at_line(text, 3).as_deref(), Some("services"));
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let e = parse_err("interfaces:\n  - name: eth0\n   mode: [\n");
        assert!(e.file.starts_with("k.yaml:"), "{e}");
    }

    #[test]
    fn an_unclosed_bracket_names_the_key_it_opened_on() {
        // The parser gives up on a later line; the broken one is where `[` opened.
        let e = parse_err("interfaces: [name: n0\ncontrol:\n  socket: /tmp/x.sock\n");
        assert_eq!(e.field, "interfaces", "{e}");
        let e = parse_err("state:\n  dir: /tmp/s\nservices: {name: web\ncontrol: {}\n");
        assert_eq!(e.field, "services", "{e}");
    }

    #[test]
    fn percentages_convert_to_basis_points() {
        assert_eq!(percent_to_basis_points(0.0), Ok(0));
        assert_eq!(percent_to_basis_points(0.01), Ok(1));
        assert_eq!(percent_to_basis_points(10.0), Ok(1000));
        assert_eq!(percent_to_basis_points(33.33), Ok(3333));
        assert_eq!(percent_to_basis_points(100.0), Ok(10000));
        assert!(percent_to_basis_points(100.01).is_err());
        assert!(percent_to_basis_points(f64::NAN).is_err());
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.1.5.0/24".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 1, 5, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 1, 6, 1)));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(192, 168, 1, 1)));
    }
}
