//! The peer tools a benchmark runs (wrk, oha, nginx, haproxy, iptables),
//! found on PATH; `cargo xtask bench` installs them.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// `name` on PATH (and /usr/sbin, /sbin, where Debian puts nginx, haproxy and iptables).
pub fn require(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]);
    for dir in dirs {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("`{name}` is not installed; `cargo xtask bench` installs what the benchmarks use")
}
