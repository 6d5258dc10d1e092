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
    validate::validate(raw, interface_exists).map_err(|(field, message)| ConfigError {
        file: file.to_string(),
        field,
        message,
    })
}

type FieldError = (String, String);

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err((field.into(), message.into()))
}

#[cfg(test)]
mod tests;
