//! End to end: release after release, with operators acting, reloads,
//! restarts and the agent's own writes failing — the decisions stay right.
//!
//! - a release train v1 -> v2 (promoted) -> v3 keeps clients on v2, never v1,
//!   and configurations that would send them back are refused;
//! - reloaded steps never raise the weight;
//! - the critical path watches a canary held by hand and a promoted one;
//! - a failed map write is retried, counted and reported, then converges;
//! - a drained canary's requests are never counted for the next one;
//! - the agent's downtime does not count towards the progress deadline.
//!
//! Every test builds its own namespaces (client, node, backends), so they run
//! in parallel; they need root (without it they fail;
//! `KANARI_SKIP_PRIVILEGED=1` skips them explicitly outside CI).

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use kanari_common::maps::Group;
use kanari_tests::{
    agent::Agent,
    control::{cli, get, rollout, scrape, service, sum, until, wait_rollout},
    load::{KeepAlive, Load, Outcome, unix_ms},
    netns::require_root,
    topology::{NODE_IFACE, Topology, TopologyOptions, VIP},
};

/// One service at [`VIP`] with the given stable and canary (revision,
/// backend) and extra service lines.
fn yaml(
    topo: &Topology,
    stable: (&str, SocketAddrV4),
    canary: (&str, SocketAddrV4),
    extra: &str,
) -> String {
    format!(
        "interfaces:\n  - name: {NODE_IFACE}\n    mode: tc\nconntrack:\n  connections: 65536\nbpf:\n  pin_dir: {}\nservices:\n  - name: web\n    vip: {VIP}\n    salt: 42\n    stable:\n      revision: {}\n      backends: [{}]\n    canary:\n      revision: {}\n      backends: [{}]\n{extra}",
        topo.pin_dir().display(),
        stable.0,
        stable.1,
        canary.0,
        canary.1
    )
}

/// The backends answering outcomes sent after `from_ms`, by address.
fn answered_by(outcomes: &[Outcome], from_ms: u64) -> Vec<SocketAddrV4> {
    outcomes
        .iter()
        .filter(|o| o.sent_ms >= from_ms)
        .map(|o| match &o.result {
            Ok((b, 200)) => *b,
            other => panic!("a request failed: {other:?}"),
        })
        .collect()
}

/// Binomial bound at 99.9 % (3.29 standard deviations) for `n` trials at `p`.
fn bound(n: usize, p: f64) -> f64 {
    3.29 * (n as f64 * p * (1.0 - p)).sqrt()
}

/// Removes a file or directory on every exit path.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

const WATCHED: &str = "    rollout: {steps: [5, 50, 100], interval: 1h, progress_deadline: 2h}\n";

#[test]
fn a_release_train_never_sends_clients_back_to_an_older_version() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 2,
        ..Default::default()
    })
    .expect("topology");
    let (v1, v2, v3) = (
        topo.backends[0].addr,
        topo.backends[1].addr,
        topo.backends[2].addr,
    );
    let agent = Agent::start(&topo.node, &yaml(&topo, ("v1", v1), ("v2", v2), WATCHED))
        .expect("kanari starts");
    let s = agent.socket.as_path();
    let (ok, out) = cli(s, &["promote", "web"]);
    assert!(ok, "{out}");
    assert_eq!(rollout(s).0, 100.0);

    // v3 judged against v1 while v2 serves everyone: refused, nothing changes.
    let refused = agent
        .reload_rejected(&yaml(&topo, ("v1", v1), ("v3", v3), WATCHED))
        .expect("the reload is refused");
    assert!(
        refused.contains("canary v2 was promoted and serves every client")
            && refused.contains(&v2.to_string()),
        "{refused}"
    );
    let (w, r) = rollout(s);
    assert_eq!(
        (w, r.phase.as_str(), r.revision.as_str()),
        (100.0, "promoted", "v2")
    );

    // The next release: v2 stable, v3 the canary at its first step.
    agent
        .reload(&yaml(&topo, ("v2", v2), ("v3", v3), WATCHED))
        .expect("the next release is taken");
    let (w, r) = rollout(s);
    assert_eq!(
        (
            w,
            r.phase.as_str(),
            r.revision.as_str(),
            r.stable_revision.as_deref()
        ),
        (5.0, "progressing", "v3", Some("v2"))
    );
    let from = unix_ms();
    let load = Load::start(&topo.client, VIP, 400.0, 8, 0).expect("load");
    std::thread::sleep(Duration::from_secs(3));
    let during = answered_by(&load.outcomes(), from);
    let count = |b| during.iter().filter(|a| **a == b).count();
    let n = during.len();
    eprintln!(
        "v3 at 5 %: {n} new connections: v1 {}, v2 {}, v3 {}",
        count(v1),
        count(v2),
        count(v3)
    );
    assert!(n > 600, "{n} connections");
    assert_eq!(count(v1), 0, "no new connection reaches v1");
    assert!(
        (count(v2) as f64) >= n as f64 * 0.95 - bound(n, 0.05),
        "v2 took {} of {n}",
        count(v2)
    );

    // v1 back as stable under v3: refused; the split stays v2/v3.
    let refused = agent
        .reload_rejected(&yaml(&topo, ("v1", v1), ("v3", v3), WATCHED))
        .expect("the reload is refused");
    assert!(
        refused.contains("stable v1 is older than the version serving now (v2)"),
        "{refused}"
    );
    let after = unix_ms();
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = load.stop();
    let later = answered_by(&outcomes, after);
    assert!(!later.is_empty());
    assert!(later.iter().all(|b| *b == v2 || *b == v3), "only v2 and v3");
    let (w, r) = rollout(s);
    assert_eq!(
        (w, r.revision.as_str(), r.stable_revision.as_deref()),
        (5.0, "v3", Some("v2"))
    );
    agent.stop().expect("kanari stops");
}

#[test]
fn reloaded_steps_never_raise_the_weight() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let steps = |s: &str| {
        format!(
            "    rollout: {{steps: {s}, interval: 1s, min_requests: 10}}\n    analysis: {{compare_to_stable: {{max_latency_increase: 300, max_error_rate_increase: 5, tail_quantile: 0.9}}}}\n"
        )
    };
    let six = topo.config(0.0, &steps("[20, 30, 40, 45, 50, 100]"), "tc");
    let agent = Agent::start(&topo.node, &six).expect("kanari starts");
    let s = agent.socket.as_path();
    let load = Load::start(&topo.client, VIP, 400.0, 8, 0).expect("load");
    // Step 5 of six (50 %), then paused.
    wait_rollout(s, 30, "step 5", |_, r| r.step >= 4);
    let (ok, out) = cli(s, &["pause", "web"]);
    assert!(ok, "{out}");
    let (w, r) = rollout(s);
    assert_eq!((r.phase.as_str(), r.step, w), ("paused", 4, 50.0), "{r:#?}");
    // Reloaded with two steps, then resumed: still 50 %, not 100 % at once.
    agent
        .reload(&topo.config(0.0, &steps("[10, 100]"), "tc"))
        .expect("reload");
    let (w, r) = rollout(s);
    assert_eq!((r.phase.as_str(), r.step, w), ("paused", 1, 50.0), "{r:#?}");
    let (ok, out) = cli(s, &["resume", "web"]);
    assert!(ok, "{out}");
    let (w, r) = rollout(s);
    assert_eq!((r.phase.as_str(), w), ("progressing", 50.0), "{r:#?}");
    // The next passing check is the next step up: the promotion.
    let (w, r) = wait_rollout(s, 10, "the next step", |w, _| w != 50.0);
    assert_eq!((r.phase.as_str(), w), ("promoted", 100.0));
    drop(load);
    agent.stop().expect("kanari stops");
}

/// Fails the first canary backend with 5xx once `load` runs; returns when
/// the weight went to 0, how long after the fault.
fn fail_canary(topo: &Topology, agent: &Agent) -> (u64, kanari::status::RolloutStatus) {
    let fault_ms = unix_ms();
    topo.canary_server().behavior.set_error_rate(1.0);
    let (w, r) = wait_rollout(&agent.socket, 10, "rollback", |_, r| {
        r.phase == "rolled_back"
    });
    assert_eq!(w, 0.0);
    let written = r
        .weight_written_unix_ms
        .expect("the agent recorded when the kernel took the weight");
    (written.saturating_sub(fault_ms), r)
}

#[test]
fn a_canary_held_by_hand_that_fails_is_at_weight_0_within_a_second() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(0.0, WATCHED, "tc")).expect("kanari starts");
    let (ok, out) = cli(&agent.socket, &["set-weight", "web", "50"]);
    assert!(ok, "{out}");
    let load = Load::start(&topo.client, VIP, 600.0, 12, 0).expect("load");
    std::thread::sleep(Duration::from_secs(1));
    let (w, r) = rollout(&agent.socket);
    assert_eq!((r.phase.as_str(), r.manual, w), ("paused", true, 50.0));
    let (took, r) = fail_canary(&topo, &agent);
    drop(load);
    eprintln!(
        "held at 50 %: weight 0 {took} ms after the fault: {}",
        r.reason
    );
    assert!(took <= 1000, "weight 0 came {took} ms after the fault");
    assert_eq!(r.rolled_back_by.as_deref(), Some("critical_error_rate"));
    agent.stop().expect("kanari stops");
}

#[test]
fn a_promoted_canary_that_fails_within_its_watch_goes_back_to_the_previous_version() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(0.0, WATCHED, "tc")).expect("kanari starts");
    let (ok, out) = cli(&agent.socket, &["promote", "web"]);
    assert!(ok, "{out}");
    let load = Load::start(&topo.client, VIP, 600.0, 12, 0).expect("load");
    std::thread::sleep(Duration::from_secs(1));
    let (w, r) = rollout(&agent.socket);
    assert_eq!((r.phase.as_str(), w), ("promoted", 100.0));
    let watched = r.watched_for_seconds.expect("watched after its promotion");
    assert!((290.0..=300.0).contains(&watched), "{watched}");
    let (took, r) = fail_canary(&topo, &agent);
    std::thread::sleep(Duration::from_millis(300));
    let after = unix_ms();
    std::thread::sleep(Duration::from_millis(500));
    let outcomes = load.stop();
    eprintln!(
        "promoted, then failing: weight 0 {took} ms after the fault: {}",
        r.reason
    );
    assert!(took <= 1000, "weight 0 came {took} ms after the fault");
    let back: Vec<_> = outcomes.iter().filter(|o| o.sent_ms > after).collect();
    assert!(!back.is_empty());
    for o in back {
        assert!(
            matches!(o.result, Ok((b, 200)) if topo.group_of(b) == Some(Group::Stable)),
            "after the rollback: {o:?}"
        );
    }
    agent.stop().expect("kanari stops");
}

#[test]
fn a_failed_map_write_is_retried_counted_reported_and_converges() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let faults = std::env::temp_dir().join(format!("kanari-test-{}-faults", topo.tag));
    let _cleanup = RemoveOnDrop(faults.clone());
    let agent = Agent::start_env(
        &topo.node,
        &topo.config(
            0.0,
            "    rollout: {steps: [10, 100], interval: 1h, progress_deadline: 2h}\n",
            "tc",
        ),
        &[("KANARI_FAULTS", &faults)],
    )
    .expect("kanari starts");
    let s = agent.socket.as_path();
    assert_eq!(get(&topo.node, "/healthz").0, 200);
    std::fs::write(&faults, "map-writes\n").expect("switch the fault on");

    // The abort is decided, but the kernel keeps 10 %: the verb says so.
    let (ok, out) = cli(s, &["abort", "web"]);
    assert!(
        !ok && out.contains("the kernel does not hold it yet"),
        "{out}"
    );
    let svc = service(s);
    assert_eq!(
        (svc.canary_weight_percent, svc.wanted_canary_weight_percent),
        (10.0, Some(0.0)),
        "{svc:#?}"
    );
    assert_eq!(svc.rollout.as_ref().unwrap().phase, "rolled_back");
    // Retried every tick, counted; not ready after a few seconds.
    let retried = until(10, "retries", || {
        let n = sum(
            &scrape(&topo.node),
            "kanari_datapath_write_failures_total",
            &[],
        );
        if n >= 4.0 {
            Ok(n)
        } else {
            Err(format!("{n} failures"))
        }
    });
    let body = until(10, "healthz not ready", || {
        match get(&topo.node, "/healthz") {
            (503, body) => Ok(body),
            (code, body) => Err(format!("{code} {body}")),
        }
    });
    assert!(body.contains("has not held the wanted data path"), "{body}");
    assert!(scrape(&topo.node).contains("kanari_datapath_in_sync 0"));
    let report = kanari_tests::control::report(s);
    assert!(
        report
            .kernel_error
            .as_deref()
            .is_some_and(|e| e.contains("injected fault"))
    );
    // Meanwhile the kernel still splits at 10 %.
    let load = Load::start(&topo.client, VIP, 300.0, 8, 0).expect("load");
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<_> = answered_by(&load.outcomes(), 0);
    let canary = before
        .iter()
        .filter(|b| topo.group_of(**b) == Some(Group::Canary))
        .count();
    assert!(canary > 0, "the kernel kept the canary's 10 %");

    // The fault ends: the next tick converges.
    std::fs::remove_file(&faults).expect("switch the fault off");
    let converged = Instant::now();
    until(5, "convergence", || {
        let svc = service(s);
        match (svc.canary_weight_percent, svc.wanted_canary_weight_percent) {
            (0.0, None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let took = converged.elapsed();
    assert_eq!(get(&topo.node, "/healthz").0, 200);
    assert!(kanari_tests::control::report(s).kernel_error.is_none());
    let after = unix_ms() + 100;
    std::thread::sleep(Duration::from_millis(800));
    let outcomes = load.stop();
    let later = answered_by(&outcomes, after);
    assert!(!later.is_empty());
    assert!(
        later
            .iter()
            .all(|b| topo.group_of(*b) == Some(Group::Stable)),
        "after convergence only stable"
    );
    eprintln!(
        "map writes failing: {retried} retries counted, healthz 503, kernel at 10 %; fault off -> converged in {} ms",
        took.as_millis()
    );
    agent.stop().expect("kanari stops");
}

#[test]
fn a_drained_canary_s_requests_never_count_for_the_next_one() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 2,
        ..Default::default()
    })
    .expect("topology");
    let (stable, old, new) = (
        topo.backends[0].addr,
        topo.backends[1].addr,
        topo.backends[2].addr,
    );
    let fixed = |canary: SocketAddrV4| {
        yaml(
            &topo,
            ("v1", stable),
            ("v2", canary),
            "    canary_weight: 100\n",
        )
    };
    let agent = Agent::start(&topo.node, &fixed(old)).expect("kanari starts");
    // 20 keep-alive connections on the old canary, which then answers 5xx.
    let kept = KeepAlive::start(&topo.client, VIP, 20, Duration::from_millis(20), 50_000)
        .expect("keep-alive connections");
    topo.server(old).behavior.set_error_rate(1.0);
    std::thread::sleep(Duration::from_millis(500));
    // A new canary replaces it; the old one drains its connections.
    agent.reload(&fixed(new)).expect("reload");
    let served_before = topo.server(old).stats.requests();
    let load = Load::start(&topo.client, VIP, 200.0, 4, 0).expect("load");
    std::thread::sleep(Duration::from_secs(3));
    drop(load);
    let kept = kept.stop();
    let drained = topo.server(old).stats.requests() - served_before;
    assert!(
        drained > 100,
        "the old canary served {drained} drained requests"
    );
    assert!(
        kept.iter()
            .all(|o| matches!(o.result, Ok((b, _)) if b == old))
    );
    // The kernel's counts of the new canary are exactly what it served.
    let served = topo.server(new).stats.requests() as f64;
    let n = new.to_string();
    let text = until(5, "the new canary's counts", || {
        let text = scrape(&topo.node);
        let counted = sum(&text, "kanari_requests_total", &[("backend", &n)]);
        if counted == served {
            Ok(text)
        } else {
            Err(format!("{counted} counted, {served} served"))
        }
    });
    assert!(served > 300.0, "{served}");
    assert_eq!(
        sum(
            &text,
            "kanari_requests_total",
            &[("backend", &n), ("class", "5xx")]
        ),
        0.0,
        "none of the drained canary's 5xx"
    );
    eprintln!(
        "old canary drained {drained} requests (5xx) after its removal; the new one served {served}, counted {served} with 0 5xx; quarantined ids: {}",
        sum(&text, "kanari_backend_ids_quarantined", &[])
    );
    agent.stop().expect("kanari stops");
}

#[test]
fn the_agent_s_downtime_does_not_count_towards_the_progress_deadline() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let state = std::env::temp_dir().join(format!("kanari-test-{}-state", topo.tag));
    let _cleanup = RemoveOnDrop(state.clone());
    // No traffic: every check is inconclusive, and the deadline (4 s of the
    // agent's running time) ends the rollout.
    let config = format!(
        "{}\nstate:\n  dir: {}\n",
        topo.config(
            0.0,
            "    rollout: {steps: [10, 100], interval: 1s, progress_deadline: 4s}\n",
            "tc"
        ),
        state.display()
    );
    let agent = Agent::start(&topo.node, &config).expect("kanari starts");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rollout(&agent.socket).1.phase, "progressing");
    agent.stop().expect("kanari stops");
    // Down for twice the deadline.
    std::thread::sleep(Duration::from_secs(8));
    let again = Agent::start(&topo.node, &config).expect("kanari starts again");
    let restarted = Instant::now();
    assert!(
        again
            .logs()
            .iter()
            .any(|l| l.contains("its clocks restart")),
        "the agent says the step's clock restarts"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (w, r) = rollout(&again.socket);
    assert_eq!((r.phase.as_str(), w), ("progressing", 10.0), "{r:#?}");
    // The deadline counts this agent's running time.
    let (_, r) = wait_rollout(&again.socket, 10, "the deadline", |_, r| {
        r.phase == "rolled_back"
    });
    let at = restarted.elapsed().as_secs_f64();
    assert_eq!(r.rolled_back_by.as_deref(), Some("progress_deadline"));
    assert!(
        (3.5..6.0).contains(&at),
        "rolled back {at:.1} s after the restart"
    );
    again.stop().expect("kanari stops");
}
