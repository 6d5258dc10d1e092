//! End to end: failures that are not 5xx answers are failures too.
//!
//! - a canary that accepts connections and resets them instead of answering
//!   is at weight 0 within 2 s;
//! - a canary that accepts and never answers (a deadlocked worker) is at
//!   weight 0 within `analysis.request_timeout` + 1 s, seen while it hangs.
//!
//! They need root (without it they fail; `KANARI_SKIP_PRIVILEGED=1` skips them
//! explicitly outside CI).

use std::time::Duration;

use kanari_common::maps::Group;
use kanari_tests::{
    agent::Agent,
    control::{rollout, scrape, sum, wait_rollout},
    load::{Load, unix_ms},
    netns::require_root,
    topology::{Topology, TopologyOptions, VIP},
};

const ROLLOUT: &str = "    rollout: {steps: [10, 100], interval: 1h, progress_deadline: 2h}\n    analysis: {request_timeout: 2s}\n";

/// Starts a rollout at 10 % under 600 requests/s, breaks the canary with
/// `fault`, and returns how long after the fault the kernel took weight 0,
/// with the rollout's state then and the agent's /metrics.
fn rolled_back_after(
    topo: &Topology,
    fault: impl FnOnce(),
) -> (u64, kanari::status::RolloutStatus, String) {
    let agent = Agent::start(&topo.node, &topo.config(0.0, ROLLOUT, "tc")).expect("kanari starts");
    // Many workers: the ones waiting on a hung canary do not slow the rest.
    let load = Load::start(&topo.client, VIP, 600.0, 200, 0).expect("load");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rollout(&agent.socket).0, 10.0);
    let fault_ms = unix_ms();
    fault();
    let (w, r) = wait_rollout(&agent.socket, 15, "rollback", |_, r| {
        r.phase == "rolled_back"
    });
    assert_eq!(w, 0.0);
    let written = r.weight_written_unix_ms.expect("the weight's write time");
    let metrics = scrape(&topo.node);
    // After the rollback new connections go to stable only.
    let after = unix_ms() + 100;
    std::thread::sleep(Duration::from_millis(600));
    let outcomes = load.stop();
    let later: Vec<_> = outcomes.iter().filter(|o| o.sent_ms > after).collect();
    assert!(!later.is_empty());
    for o in later {
        assert!(
            matches!(o.result, Ok((b, 200)) if topo.group_of(b) == Some(Group::Stable)),
            "after the rollback: {o:?}"
        );
    }
    agent.stop().expect("kanari stops");
    (written.saturating_sub(fault_ms), r, metrics)
}

#[test]
fn a_canary_that_resets_after_accept_is_at_weight_0_within_2_seconds() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let (took, r, metrics) =
        rolled_back_after(&topo, || topo.canary_server().behavior.set_reset(true));
    eprintln!(
        "resets after accept: weight 0 {took} ms after the fault: {}",
        r.reason
    );
    assert!(took <= 2000, "weight 0 came {took} ms after the fault");
    assert_eq!(r.rolled_back_by.as_deref(), Some("critical_error_rate"));
    assert!(
        sum(
            &metrics,
            "kanari_tcp_errors_total",
            &[("version", "canary"), ("kind", "reset")]
        ) > 0.0
    );
}

#[test]
fn a_canary_that_never_answers_is_at_weight_0_within_request_timeout_plus_1_second() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let (took, r, metrics) =
        rolled_back_after(&topo, || topo.canary_server().behavior.set_hang(true));
    eprintln!(
        "hung canary (request_timeout 2 s): weight 0 {took} ms after the fault: {}",
        r.reason
    );
    assert!(took <= 3000, "weight 0 came {took} ms after the fault");
    assert_eq!(r.rolled_back_by.as_deref(), Some("critical_error_rate"));
    assert!(
        sum(
            &metrics,
            "kanari_tcp_errors_total",
            &[("version", "canary"), ("kind", "timeout")]
        ) >= 20.0,
        "the hung requests are counted as timeouts"
    );
}

#[test]
fn a_shared_outage_holds_the_rollout_instead_of_rolling_it_back() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let section = "    rollout: {steps: [10, 100], interval: 2s, progress_deadline: 1h}\n    analysis: {limits: {max_error_rate: 5}}\n";
    let agent = Agent::start(&topo.node, &topo.config(0.0, section, "tc")).expect("kanari starts");
    let load = Load::start(&topo.client, VIP, 600.0, 24, 0).expect("load");
    std::thread::sleep(Duration::from_secs(2));
    // A database both versions need goes down: 60 % of every answer is a 500.
    for b in &topo.backends {
        b.server
            .as_ref()
            .expect("a server")
            .behavior
            .set_error_rate(0.6);
    }
    let (_, held) = wait_rollout(&agent.socket, 10, "the hold", |_, r| {
        r.reason.contains("shared outage")
    });
    std::thread::sleep(Duration::from_secs(8));
    let (w, r) = rollout(&agent.socket);
    assert_eq!((r.phase.as_str(), w), ("progressing", 10.0), "{r:#?}");
    assert!(r.reason.contains("held: a shared outage"), "{}", r.reason);
    // The outage ends: once it has left the critical window, the rollout goes on.
    for b in &topo.backends {
        b.server
            .as_ref()
            .expect("a server")
            .behavior
            .set_error_rate(0.0);
    }
    let (_, on) = wait_rollout(&agent.socket, 30, "the end of the hold", |_, r| {
        !r.reason.starts_with("held")
    });
    drop(load);
    eprintln!("shared outage: {}; then: {}", held.reason, on.reason);
    assert_ne!(on.phase, "rolled_back", "{on:#?}");
    agent.stop().expect("kanari stops");
}
