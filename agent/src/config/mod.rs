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
//!   timeouts:               # an idle connection's entries are removed after
//!     syn_sent: 10s         #   not answered by the backend yet
//!     established: 6h
//!     closing: 2m           #   one side sent a FIN
//!     closed: 10s           #   both sent a FIN, or one a RST
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
//!     protocol: http        # http (status classes) | tcp (timing only) | udp (socket path)
//!     canary_weight: 10     # percent of new clients sent to the canary
//!     stable:
//!       backends: [10.0.2.1:8080, 10.0.2.2:8080]
//!     canary:
//!       backends: [10.0.3.1:8080]
//!     segments:             # client CIDRs pinned to a group, whatever the weight
//!       - cidr: 10.1.5.0/24
//!         group: canary
//! ```

use std::{path::Path, time::Duration};

mod locate;
mod model;
mod raw;
mod rollout;
mod validate;
mod webhooks;

use locate::{context_line, is_syntax_error, path_at_line, yaml_message};
use raw::RawConfig;

pub use model::*;
pub use raw::percent_to_basis_points;
pub use rollout::{
    DEFAULT_CONFIDENCE, DEFAULT_CRITICAL_MIN_REQUESTS, DEFAULT_CRITICAL_RATE,
    DEFAULT_MAX_ERROR_RATE_INCREASE, DEFAULT_MAX_LATENCY_INCREASE, DEFAULT_MIN_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_WATCH_AFTER_PROMOTION, MAX_CONFIDENCE,
    MAX_WATCH_AFTER_PROMOTION, MIN_CONFIDENCE, MIN_CRITICAL_MIN_REQUESTS, MIN_CRITICAL_RATE,
    MIN_MIN_REQUESTS,
};
pub use validate::default_salt;
pub use webhooks::{
    DEFAULT_WEBHOOK_RETRIES, DEFAULT_WEBHOOK_TIMEOUT, MAX_WEBHOOK_RETRIES, MAX_WEBHOOK_TIMEOUT,
    MIN_WEBHOOK_TIMEOUT,
};

/// Bounds of `conntrack.connections`.
pub const MIN_CONNTRACK_CONNECTIONS: u32 = 1024;
pub const MAX_CONNTRACK_CONNECTIONS: u32 = 16 * 1024 * 1024;
/// Bounds of each of `conntrack.timeouts`.
pub const MIN_CONNTRACK_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_CONNTRACK_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Upper bound of `limits.backends` (the size of the kernel's per-CPU statistics).
pub const MAX_LIMIT_BACKENDS: u32 = 65_536;
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9477";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/kanari/kanari.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kanari";
pub const DEFAULT_TICK: Duration = Duration::from_millis(250);
/// Bounds of `telemetry.tick`.
pub const MIN_TICK: Duration = Duration::from_millis(10);
pub const MAX_TICK: Duration = Duration::from_secs(10);
/// `compare_to_stable.min_latency_increase` by default: below a millisecond,
/// a slower median is noise of the machine, not of the release (measured: a
/// healthy canary 21 % "slower" than stable's 0.05 ms failed the test).
pub const DEFAULT_MIN_LATENCY_INCREASE: Duration = Duration::from_millis(1);

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

// ---- Loading and validation -----------------------------------------------------------------

/// Reads and validates a configuration file.
pub fn load(path: &Path, interface_exists: &dyn Fn(&str) -> bool) -> Result<Config, ConfigError> {
    parse(&path.display().to_string(), &read(path)?, interface_exists)
}

/// A configuration file's text.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        field: "(file)".into(),
        message: format!("cannot read it: {e}"),
    })
}

/// Parses and validates a configuration's text; `file` names it in errors.
pub fn parse(
    file: &str,
    text: &str,
    interface_exists: &dyn Fn(&str) -> bool,
) -> Result<Config, ConfigError> {
    let raw = parse_raw(file, text)?;
    validate::validate(raw, interface_exists).map_err(|(field, message)| ConfigError {
        file: file.to_string(),
        field,
        message,
    })
}

/// A CanaryRelease's service as a `services:` entry of the file would write
/// it (built by [`crate::discovery`]), so one validator checks both.
#[derive(Clone, Debug, PartialEq)]
pub struct Release {
    /// NAMESPACE/NAME of the CanaryRelease.
    pub key: String,
    pub service: serde_json::Value,
    /// The Service's other VIPs (external and LoadBalancer IPs): each is a
    /// service of its own that takes this one's weight.
    pub extra_vips: Vec<std::net::SocketAddrV4>,
}

/// The name of a release's service at another VIP.
pub fn vip_service_name(service: &str, vip: std::net::SocketAddrV4) -> String {
    format!(
        "{service}.vip-{}-{}",
        vip.ip().to_string().replace('.', "-"),
        vip.port()
    )
}

/// A release left out, with the field in the CanaryRelease's terms and the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub key: String,
    pub field: String,
    pub message: String,
}

/// The file's configuration with every release that fits beside it and
/// the others; the file's own errors are the file's (and nothing is taken).
pub fn parse_with_releases(
    file: &str,
    text: &str,
    interface_exists: &dyn Fn(&str) -> bool,
    releases: &[Release],
) -> Result<(Config, Vec<Refused>), ConfigError> {
    let alone = parse(file, text, interface_exists)?;
    if releases.is_empty() {
        return Ok((alone, Vec::new()));
    }
    let with = |list: &[&Release]| -> Result<Config, FieldError> {
        let mut raw = parse_raw(file, text).map_err(|e| (e.field, e.message))?;
        for r in list {
            raw.services.extend(raw_services(r)?);
        }
        validate::validate(raw, interface_exists)
    };
    let refuse = |r: &Release, (field, message): FieldError| Refused {
        key: r.key.clone(),
        field: release_field(&field),
        message,
    };
    let mut refused = Vec::new();
    let mut fit = Vec::new();
    for r in releases {
        match with(&[r]) {
            Ok(_) => fit.push(r),
            Err(e) => refused.push(refuse(r, e)),
        }
    }
    if let Ok(c) = with(&fit) {
        return Ok((c, refused));
    }
    // Some conflict between releases (a VIP, the backend budget): the
    // earlier ones (by key) win, each later one is told why.
    let mut taken: Vec<&Release> = Vec::new();
    for r in fit {
        taken.push(r);
        if let Err(e) = with(&taken) {
            taken.pop();
            refused.push(refuse(r, e));
        }
    }
    let config = with(&taken).map_err(|(field, message)| ConfigError {
        file: file.to_string(),
        field,
        message,
    })?;
    Ok((config, refused))
}

/// A release's services: the one at its ClusterIP (with the rollout), then
/// one at each other VIP that follows it.
fn raw_services(r: &Release) -> Result<Vec<raw::RawService>, FieldError> {
    let parse = |v: &serde_json::Value| -> Result<raw::RawService, FieldError> {
        let mut s: raw::RawService = serde_path_to_error::deserialize(v).map_err(|e| {
            (
                format!("services[0].{}", e.path()),
                e.into_inner().to_string(),
            )
        })?;
        s.discovered = true;
        Ok(s)
    };
    let primary = parse(&r.service)?;
    let mut out = Vec::new();
    for vip in &r.extra_vips {
        let mut v = r.service.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("rollout");
            o.remove("analysis");
        }
        v["name"] = serde_json::json!(vip_service_name(&primary.name, *vip));
        v["vip"] = serde_json::json!(vip.to_string());
        let mut s = parse(&v)?;
        s.follows = Some(primary.name.clone());
        out.push(s);
    }
    out.insert(0, primary);
    Ok(out)
}

/// A field of a validated service (`services[3].canary.revision`) as the
/// CanaryRelease spells it (`spec.revision`).
fn release_field(field: &str) -> String {
    let Some(f) = field
        .strip_prefix("services[")
        .and_then(|r| r.split_once("]."))
        .map(|(_, f)| f)
    else {
        return field.to_string();
    };
    let head = f.split(['.', '[']).next().unwrap_or(f);
    match head {
        "name" => "metadata.name".into(),
        "vip" => "spec.service".into(),
        "canary" if f == "canary.revision" => "spec.revision".into(),
        "stable" if f == "stable.revision" => "spec.stableRevision".into(),
        "canary" | "stable" => format!("spec.{head}"),
        _ => format!("spec.{f}"),
    }
}

/// The file's text as written, or where it is wrong.
fn parse_raw(file: &str, text: &str) -> Result<RawConfig, ConfigError> {
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
    Ok(raw)
}

type FieldError = (String, String);

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err((field.into(), message.into()))
}

#[cfg(test)]
mod tests;
