//! What an operator sees of a running agent, for the tests: `kanari status`
//! over the control socket, the CLI's verbs, `/metrics` and `/healthz`.
//! Polling helpers wait with a deadline, never a fixed sleep.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use kanari::status::{RolloutStatus, ServiceStatus, StatusReport};

use crate::{
    agent::kanari_bin,
    client::{http_get, runtime},
    netns::Netns,
};

/// Where agents in the tests serve `/metrics` and `/healthz` (the default).
pub const METRICS: &str = "127.0.0.1:9477";

/// `GET /v1/status` on the agent's control socket.
pub fn report(socket: &Path) -> StatusReport {
    let body = runtime()
        .block_on(kanari::api::control_get(socket, "/v1/status"))
        .expect("status");
    serde_json::from_slice(&body).expect("a status report")
}

/// The first service's status.
pub fn service(socket: &Path) -> ServiceStatus {
    report(socket).services.remove(0)
}

/// The first service's canary weight (as the kernel holds it) and rollout.
pub fn rollout(socket: &Path) -> (f64, RolloutStatus) {
    let s = service(socket);
    (
        s.canary_weight_percent,
        s.rollout.expect("the service has a rollout"),
    )
}

/// Polls the first service's rollout until `done`, failing after `secs`.
pub fn wait_rollout(
    socket: &Path,
    secs: u64,
    what: &str,
    done: impl Fn(f64, &RolloutStatus) -> bool,
) -> (f64, RolloutStatus) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (w, r) = rollout(socket);
        if done(w, &r) {
            return (w, r);
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached in {secs} s: weight {w}%, {r:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a CLI verb against the agent: whether it succeeded, and its output.
pub fn cli(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(kanari_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("kanari runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `GET path` on the agent's metrics listener in `ns`: status and body.
pub fn get(ns: &Netns, path: &str) -> (u16, String) {
    let addr: SocketAddr = METRICS.parse().expect("an address");
    ns.run_in(|| runtime().block_on(http_get(addr, path)))
        .expect("the namespace's thread")
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

/// `/metrics` of the agent in `ns`.
pub fn scrape(ns: &Netns) -> String {
    let (status, body) = get(ns, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Sum of the samples of `name` whose labels include all of `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Polls every 50 ms until `poll` returns `Ok`, failing after `secs` with
/// the last `Err`'s reason.
pub fn until<T>(secs: u64, what: &str, mut poll: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match poll() {
            Ok(v) => return v,
            Err(why) => assert!(
                Instant::now() < deadline,
                "{what} not reached in {secs} s: {why}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
