//! End to end: rollouts driven by what the kernel measures, under real load.
//!
//! A healthy canary is promoted; a canary that starts failing is at weight 0
//! within a second of its first failure; a slow one is rolled back by the
//! comparison with stable; the CLI verbs act on a running agent; a killed
//! agent's successor resumes the rollout at the same step.

use std::time::Duration;

use kanari_common::maps::Group;
use kanari_tests::{
    agent::Agent,
    client::runtime,
    control::{cli, rollout, wait_rollout},
    load::{Load, unix_ms},
    netns::require_root,
    topology::{Topology, TopologyOptions, VIP},
};

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A rollout section. Tests not about latency allow the canary a generous
/// latency margin: on a 2-core machine running many tests at once, a
/// backend's thread can be starved long enough to look slower than the others.
fn service_yaml(rollout: &str) -> String {
    format!("    rollout: {rollout}\n")
}

#[test]
fn a_healthy_canary_is_promoted_under_load() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let yaml = topo.config(
        0.0,
        &service_yaml(
            "{steps: [10, 50, 100], interval: 1s, min_requests: 20, progress_deadline: 30s}\n    analysis: {compare_to_stable: {max_latency_increase: 300, max_error_rate_increase: 5, tail_quantile: 0.9}}",
        ),
        "tc",
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let load = Load::start(&topo.client, VIP, 400.0, 8, 0).expect("load");
    let (w, r) = wait_rollout(&agent.socket, 30, "promotion", |_, r| {
        r.phase != "progressing"
    });
    let outcomes = load.stop();
    assert_eq!(r.phase, "promoted", "{r:#?}");
    assert_eq!(w, 100.0);
    let failed = outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .count();
    assert_eq!(failed, 0, "no request failed during the rollout");
    eprintln!(
        "promoted through 10 % -> 50 % -> 100 % with {} requests, none failed",
        outcomes.len()
    );
    // Every new connection now goes to the canary.
    let after = Load::start(&topo.client, VIP, 200.0, 4, 40_000).expect("load");
    std::thread::sleep(Duration::from_millis(500));
    for o in after.stop() {
        let (backend, status) = o.result.expect("answered");
        assert_eq!((topo.group_of(backend), status), (Some(Group::Canary), 200));
    }
    agent.stop().expect("kanari stops");
}

#[test]
fn a_canary_that_starts_failing_is_at_weight_0_within_a_second() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let yaml = topo.config(
        0.0,
        &service_yaml("{steps: [10, 100], interval: 60s, progress_deadline: 10m}"),
        "tc",
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let load = Load::start(&topo.client, VIP, 600.0, 12, 0).expect("load");
    std::thread::sleep(Duration::from_secs(2));
    let before = load.outcomes();
    let rate = before.len() as f64 / 2.0;
    assert!(
        rate >= 500.0,
        "the load runs at {rate:.0} requests/s, below 500"
    );
    assert!(
        before.iter().all(|o| matches!(o.result, Ok((_, 200)))),
        "healthy before the fault"
    );

    let fault_ms = unix_ms();
    topo.canary_server().behavior.set_error_rate(1.0);
    let (w, r) = wait_rollout(&agent.socket, 10, "rollback", |_, r| {
        r.phase == "rolled_back"
    });
    std::thread::sleep(Duration::from_millis(500));
    let outcomes = load.stop();
    assert_eq!(w, 0.0);
    let written = r
        .weight_written_unix_ms
        .expect("the agent recorded when it wrote the weight");
    let took = written.saturating_sub(fault_ms);
    let failed = outcomes
        .iter()
        .filter(|o| o.sent_ms >= fault_ms && !matches!(o.result, Ok((_, 200))))
        .count();
    let after: Vec<_> = outcomes
        .iter()
        .filter(|o| o.sent_ms > written + 50)
        .collect();
    eprintln!(
        "fault -> weight 0 in {took} ms at {rate:.0} requests/s (canary 10 %); {failed} requests failed; judge: {}",
        r.reason
    );
    assert!(took <= 1000, "weight 0 came {took} ms after the fault");
    assert!(
        r.reason.contains("canary requests failed"),
        "the critical path rolled it back: {}",
        r.reason
    );
    assert!(!after.is_empty());
    for o in after {
        assert!(
            matches!(o.result, Ok((b, 200)) if topo.group_of(b) == Some(Group::Stable)),
            "after the rollback: {o:?}"
        );
    }
    agent.stop().expect("kanari stops");
}

#[test]
fn a_slow_canary_is_rolled_back_by_the_comparison_with_stable() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    topo.canary_server()
        .behavior
        .set_delay(Duration::from_millis(30));
    let yaml = topo.config(
        0.0,
        &service_yaml("{steps: [20, 100], interval: 2s, min_requests: 30}\n    analysis: {limits: {max_latency_p99: 1s}}"),
        "tc",
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let load = Load::start(&topo.client, VIP, 300.0, 16, 0).expect("load");
    let (w, r) = wait_rollout(&agent.socket, 20, "rollback", |_, r| {
        r.phase != "progressing"
    });
    let outcomes = load.stop();
    assert_eq!((r.phase.as_str(), w), ("rolled_back", 0.0), "{r:#?}");
    let judge = |name: &str| {
        r.last_check
            .iter()
            .find(|j| j.judge.name() == name)
            .cloned()
    };
    let latency = judge("latency_vs_stable").expect("the comparison ran");
    assert_eq!(latency.verdict.name(), "fail", "{latency:?}");
    assert_ne!(
        judge("latency_p99").expect("the limit ran").verdict.name(),
        "fail",
        "the fixed limit does not fail"
    );
    assert!(
        outcomes.iter().all(|o| matches!(o.result, Ok((_, 200)))),
        "slow, not failing"
    );
    eprintln!("slow canary: {}", r.reason);
    // What Argo Rollouts' web metric reads (deploy/argo/analysis-template.yaml).
    let (code, body) = kanari_tests::control::get(&topo.node, "/analysis/web");
    assert_eq!(code, 200, "{body}");
    let a: kanari::status::AnalysisReport =
        serde_json::from_str(&body).expect("an analysis report");
    assert_eq!(
        (a.verdict.as_str(), a.phase.as_str()),
        ("fail", "rolled_back"),
        "{a:#?}"
    );
    assert!(
        a.judges
            .iter()
            .any(|j| j.judge.name() == "latency_vs_stable")
    );
    assert_eq!(
        kanari_tests::control::get(&topo.node, "/analysis/nosuch").0,
        404
    );
    agent.stop().expect("kanari stops");
}

#[test]
fn cli_verbs_act_on_a_running_agent() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 1,
        ..Default::default()
    })
    .expect("topology");
    let yaml = topo.config(
        0.0,
        &service_yaml("{steps: [10, 50, 100], interval: 1h, progress_deadline: 2h}"),
        "tc",
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let s = agent.socket.as_path();
    let steps: [(&[&str], bool, &str, f64); 10] = [
        (&["pause", "web"], true, "paused", 10.0),
        (&["pause", "web"], false, "paused", 10.0),
        (&["set-weight", "web", "30"], true, "paused", 30.0),
        (&["resume", "web"], true, "progressing", 10.0),
        (&["promote", "web"], true, "promoted", 100.0),
        (&["abort", "web"], true, "rolled_back", 0.0),
        (&["resume", "web"], false, "rolled_back", 0.0),
        (&["rollout", "start", "web"], true, "progressing", 10.0),
        (&["set-weight", "web", "101"], false, "progressing", 10.0),
        (&["pause", "nosuch"], false, "progressing", 10.0),
    ];
    for (args, ok, phase, weight) in steps {
        let (success, out) = cli(s, args);
        assert_eq!(success, ok, "kanari {args:?}: {out}");
        let (w, r) = rollout(s);
        assert_eq!(
            (r.phase.as_str(), w),
            (phase, weight),
            "after kanari {args:?}: {out}"
        );
    }
    let (_, out) = cli(s, &["pause", "nosuch"]);
    assert!(out.contains("no service named nosuch"), "{out}");
    let (_, out) = cli(s, &["status"]);
    assert!(
        out.contains("rollout (canary): progressing") && out.contains("[10%]"),
        "{out}"
    );
    // Malformed, unknown and oversized requests change nothing.
    let post = |path: &str, body: String| {
        runtime()
            .block_on(kanari::api::control_request(s, path, Some(body)))
            .expect("answered")
    };
    assert_eq!(
        post("/v1/services/web/weight", "{\"percent\": \"x\"}".into()).0,
        400
    );
    assert_eq!(post("/v1/services/web/explode", String::new()).0, 404);
    assert_eq!(
        post(
            "/v1/services/web/weight",
            format!("{{\"percent\": 5, \"pad\": \"{}\"}}", "x".repeat(10_000))
        )
        .0,
        413
    );
    let (w, r) = rollout(s);
    assert_eq!((r.phase.as_str(), w), ("progressing", 10.0));
    agent.stop().expect("kanari stops");
}

#[test]
fn a_restarted_agent_resumes_the_rollout_at_the_same_step() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    // The state directory outlives the first agent (whose own directory goes with it).
    let state_dir = std::env::temp_dir().join(format!("kanari-test-state-{}", topo.tag));
    let _cleanup = RemoveOnDrop(state_dir.clone());
    let yaml = format!(
        "{}\nstate:\n  dir: {}\n",
        topo.config(
            0.0,
            &service_yaml("{steps: [10, 20, 30, 40, 50, 100], interval: 1s, checks_per_step: 2, min_requests: 10}\n    analysis: {compare_to_stable: {max_latency_increase: 300, max_error_rate_increase: 5, tail_quantile: 0.9}}"),
            "tc",
        ),
        state_dir.display()
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let load = Load::start(&topo.client, VIP, 300.0, 8, 0).expect("load");
    let (_, before) = wait_rollout(&agent.socket, 30, "step 3", |_, r| r.step >= 2);
    // SIGKILL: no chance to clean up or persist anything more.
    let pid = agent.pid().expect("running");
    // SAFETY: killing our own child by its PID.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let _ = agent.wait_exit();
    assert!(state_dir.join("rollouts/web.json").exists());
    // A new agent with the same configuration and state directory.
    let again = Agent::start(&topo.node, &yaml).expect("kanari starts again");
    let (w, after) = rollout(&again.socket);
    eprintln!(
        "killed at step {} ({}%), resumed at step {} ({w}%)",
        before.step + 1,
        before.steps_percent[before.step],
        after.step + 1
    );
    assert!(
        after.step >= before.step,
        "resumed at step {} after step {}",
        after.step,
        before.step
    );
    assert_eq!(after.phase, "progressing");
    assert_eq!(w, after.steps_percent[after.step]);
    wait_rollout(&again.socket, 30, "the rollout goes on", |_, r| {
        r.step > after.step || r.phase == "promoted"
    });
    drop(load);
    again.stop().expect("kanari stops");
}
