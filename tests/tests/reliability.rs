//! End to end: the data path keeps steering while the agent is gone, and
//! holds up under churn.
//!
//! The agent pins its maps and links in a bpffs of the test's own; killed
//! with SIGKILL it leaves them, and the next agent adopts them (maps reused,
//! programs replaced in place through the pinned links).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use kanari::status::{RolloutStatus, StatusReport};
use kanari_common::maps::Group;
use kanari_tests::{
    agent::{Agent, kanari_bin},
    client::{http_get, runtime},
    load::{KeepAlive, Load, unix_ms},
    netns::require_root,
    topology::{Topology, TopologyOptions, VIP},
};

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rollout(socket: &Path) -> (f64, RolloutStatus) {
    let body = runtime()
        .block_on(kanari::api::control_get(socket, "/v1/status"))
        .expect("status");
    let r: StatusReport = serde_json::from_slice(&body).expect("a status report");
    (
        r.services[0].canary_weight_percent,
        r.services[0].rollout.clone().expect("a rollout"),
    )
}

fn wait_rollout(
    socket: &Path,
    secs: u64,
    what: &str,
    done: impl Fn(&RolloutStatus) -> bool,
) -> (f64, RolloutStatus) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (w, r) = rollout(socket);
        if done(&r) {
            return (w, r);
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached in {secs} s: {r:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sum of `kanari_requests_total` on the agent's /metrics.
fn requests_total(topo: &Topology) -> f64 {
    let addr: SocketAddr = "127.0.0.1:9477".parse().unwrap();
    let (_, body) = topo
        .node
        .run_in(|| runtime().block_on(http_get(addr, "/metrics")))
        .unwrap()
        .expect("/metrics");
    body.lines()
        .filter(|l| l.starts_with("kanari_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// SIGKILL mid-rollout under ≥ 500 requests/s of new connections and 50
/// keep-alive connections: for 5 s no agent runs, then a new one adopts the
/// pinned data path. No request fails, no connection is reset, the split
/// holds while the agent is gone, the rollout resumes at its step and the
/// counters carry on.
#[test]
fn a_killed_agent_loses_no_request_and_its_successor_resumes() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    // Rollout state outlives the first agent (its own directory goes with it).
    let state = std::env::temp_dir().join(format!("kanari-test-{}-state", topo.tag));
    let _state = RemoveOnDrop(state.clone());
    let yaml = format!(
        "{}\nstate:\n  dir: {}\n",
        topo.config(
            0.0,
            "    rollout: {steps: [10, 20, 30, 40, 50, 100], interval: 1s, checks_per_step: 3, min_requests: 10}\n    analysis: {compare_to_stable: {max_latency_increase: 300}}\n",
            "tc",
        ),
        state.display()
    );
    let agent = Agent::start_keeping(&topo.node, &yaml).expect("kanari starts");
    let kept = KeepAlive::start(&topo.client, VIP, 50, Duration::from_millis(20), 50_000)
        .expect("keep-alive connections");
    let load = Load::start(&topo.client, VIP, 600.0, 12, 0).expect("load");
    let (weight, before) = wait_rollout(&agent.socket, 30, "the second step", |r| r.step >= 1);
    std::thread::sleep(Duration::from_millis(500));
    let counted_before = requests_total(&topo);

    let pid = agent.pid().expect("running");
    // SAFETY: killing our own child by its PID.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let killed_ms = unix_ms();
    let _ = agent.wait_exit();
    std::thread::sleep(Duration::from_secs(5));
    let restarted_ms = unix_ms();
    let again = Agent::start_keeping(&topo.node, &yaml).expect("kanari starts again");
    let (w_after, after) = rollout(&again.socket);
    std::thread::sleep(Duration::from_secs(1));
    let counted_after = requests_total(&topo);
    let (_, on) = wait_rollout(&again.socket, 30, "the rollout goes on", |r| {
        r.step > after.step
    });

    let outcomes = load.stop();
    let kept = kept.stop();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .collect();
    let kept_failed: Vec<_> = kept
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    assert!(
        kept_failed.is_empty(),
        "keep-alive requests failed: {:?}",
        kept_failed.first()
    );
    // Every keep-alive connection stayed on its backend throughout.
    let mut backend_of: BTreeMap<usize, std::net::SocketAddrV4> = BTreeMap::new();
    for o in &kept {
        let (b, _) = o.result.clone().unwrap();
        assert_eq!(
            *backend_of.entry(o.conn).or_insert(b),
            b,
            "connection {} moved",
            o.conn
        );
    }
    let rate = outcomes.len() as f64 / ((restarted_ms - outcomes[0].sent_ms) as f64 / 1000.0);
    assert!(rate >= 500.0, "{rate:.0} requests/s");

    // While no agent ran, every new connection went where the weight in the maps said.
    let down: Vec<_> = outcomes
        .iter()
        .filter(|o| o.sent_ms > killed_ms + 100 && o.sent_ms < restarted_ms)
        .collect();
    assert!(
        down.len() > 2000,
        "{} requests while the agent was down",
        down.len()
    );
    let canary = down
        .iter()
        .filter(|o| topo.group_of(o.result.clone().unwrap().0) == Some(Group::Canary))
        .count();
    eprintln!(
        "killed at step {} ({weight}%); {} requests while down, canary share {:.1} %; {} requests and {} keep-alive requests, none failed ({rate:.0} requests/s); resumed at step {} ({w_after}%); kanari_requests_total {counted_before} -> {counted_after}",
        before.step + 1,
        down.len(),
        canary as f64 * 100.0 / down.len() as f64,
        outcomes.len(),
        kept.len(),
        after.step + 1
    );
    // Client affinity over sequential client addresses: a binomial bound at 99.9 %.
    let p = weight / 100.0;
    let n = down.len() as f64;
    let bound = 3.29 * (n * p * (1.0 - p)).sqrt();
    assert!(
        (canary as f64 - n * p).abs() <= bound,
        "canary took {canary} of {n} at {weight}% while the agent was down"
    );

    assert_eq!(after.step, before.step, "the same step after the restart");
    assert_eq!(after.phase, "progressing");
    assert_eq!(w_after, weight);
    assert!(
        counted_after >= counted_before,
        "requests_total went from {counted_before} to {counted_after}"
    );
    assert!(on.step > after.step);

    // SIGTERM leaves the data path steering; `kanari uninstall` removes it.
    let stopped = again.stop().expect("kanari stops");
    assert!(stopped.status.success());
    assert_eq!(
        topo.attached_programs().expect("query").len(),
        2,
        "TC ingress and egress still attached"
    );
    let config = std::env::temp_dir().join(format!("kanari-test-{}-uninstall.yaml", topo.tag));
    std::fs::write(&config, &yaml).expect("write config");
    let out = std::process::Command::new(kanari_bin())
        .args(["uninstall", "--config"])
        .arg(&config)
        .output()
        .expect("uninstall runs");
    let _ = std::fs::remove_file(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        topo.attached_programs().expect("query").is_empty(),
        "nothing left after uninstall"
    );
}
