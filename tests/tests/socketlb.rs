//! End to end: the socket path (`socket_lb:`). kanari's cgroup v2 programs
//! on a test cgroup of the test's own steer the connect() calls of the
//! processes placed in it — here `kanari-test-client`, run in the node's
//! namespace as a process on the node would — straight to a backend; the
//! kernel's observer on the same cgroup measures those connections.
//!
//! The agent runs under `ip netns exec`, which remounts /sys: it reaches
//! the test cgroup through a second mount of the unified hierarchy
//! ([`CgroupMount`]).
//!
//! They need root (without it they fail; `KANARI_SKIP_PRIVILEGED=1` skips
//! them explicitly outside CI).

use std::{
    net::SocketAddrV4,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use kanari_common::maps::Group;
use kanari_tests::{
    agent::Agent,
    cgroup::{SocketLbCgroup, TestCgroup},
    control::{report, scrape, sum, until},
    netns::require_root,
    socket_client::{run_client, spawn_client, tcp_requests},
    topology::{Topology, TopologyOptions, VIP},
};
use serde_json::Value;

/// Held by the tests that load both cores (hundreds to thousands of
/// connections or datagrams) and by the one that times a rollback, so the
/// timing measures kanari and not its sibling tests: beside them it took
/// 0.37–1.13 s, alone 0.36 s.
static BUSY: Mutex<()> = Mutex::new(());

fn busy() -> MutexGuard<'static, ()> {
    // A test that failed holding it leaves nothing half-done for the next.
    BUSY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The topology, a test cgroup, and what the agent sees of it.
struct Setup {
    topo: Topology,
    sock: SocketLbCgroup,
}

fn setup() -> Setup {
    setup_with(&TopologyOptions::default())
}

fn setup_with(opts: &TopologyOptions) -> Setup {
    let topo = Topology::new(opts).expect("topology");
    let sock = SocketLbCgroup::new(&topo.tag).expect("a test cgroup");
    Setup { topo, sock }
}

impl Setup {
    /// A configuration with the socket path on the test cgroup.
    fn config(&self, canary_percent: f64, service: &str) -> String {
        format!(
            "{}{}",
            self.topo.config(canary_percent, service, "tc"),
            self.sock.config().expect("the cgroup's path")
        )
    }

    /// `kanari-test-client tcp`: `count` requests, each on a new connection,
    /// from inside the cgroup.
    fn requests(&self, count: usize) -> Vec<Value> {
        tcp_requests(&self.topo.node, Some(&self.sock.cgroup), VIP, count, 4)
            .expect("the client runs")
    }

    fn group(&self, line: &Value) -> Option<Group> {
        let addr: SocketAddrV4 = line["backend"].as_str()?.parse().ok()?;
        self.topo.group_of(addr)
    }
}

#[test]
fn a_process_in_the_cgroup_reaches_the_split_sees_the_vip_and_one_outside_is_untouched() {
    if !require_root() {
        return;
    }
    let _busy = busy();
    let s = setup();
    let agent = Agent::start(&s.topo.node, &s.config(10.0, "    affinity: connection\n"))
        .expect("kanari starts");
    let lines = s.requests(2000);
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] != true).collect();
    assert!(failed.is_empty(), "{failed:?}");
    // getpeername() answers the address dialled, not the backend's.
    for l in &lines {
        assert_eq!(l["peer"], VIP.to_string(), "{l}");
        assert_eq!(l["status"], 200, "{l}");
    }
    let n = lines.len() as f64;
    let canary = lines
        .iter()
        .filter(|l| s.group(l) == Some(Group::Canary))
        .count() as f64;
    // 99.9 %: 3.29 standard deviations of a binomial share at 10 %.
    let bound = 3.29 * (0.1 * 0.9 / n).sqrt();
    let share = canary / n;
    eprintln!(
        "socket path: canary share {:.2} % of {n} connections (bound ±{:.2} points)",
        share * 100.0,
        bound * 100.0
    );
    assert!((share - 0.1).abs() <= bound, "{share} of {n}");

    // The kernel counted them on the socket path, per backend, and the
    // packet path saw none of them.
    let text = until(5, "the counters", || {
        let text = scrape(&s.topo.node);
        let steered = sum(
            &text,
            "kanari_datapath_packets_total",
            &[("action", "socket_steered")],
        );
        // Both: a tick during the run may have read every connect() but
        // not yet the last answers.
        let answered = sum(&text, "kanari_requests_total", &[("service", "web")]);
        (steered >= n && answered >= n)
            .then_some(text.clone())
            .ok_or(format!("{steered} steered, {answered} answered"))
    });
    for action in ["tc_steered_new", "tc_steered", "xdp_steered_new"] {
        let v = sum(
            &text,
            "kanari_datapath_packets_total",
            &[("action", action)],
        );
        assert_eq!(v, 0.0, "the packet path translated {action}: {v}");
    }
    let counted = sum(
        &text,
        "kanari_connections_total",
        &[("service", "web"), ("version", "canary")],
    );
    assert_eq!(
        counted, canary,
        "the canary's connections as the kernel counted them"
    );
    let answered = sum(&text, "kanari_requests_total", &[("service", "web")]);
    assert_eq!(answered, n, "every request's answer counted: {answered}");
    // Labelled by the path that counted them.
    for (path, want) in [("socket", n), ("packet", 0.0)] {
        let v = sum(
            &text,
            "kanari_requests_total",
            &[("service", "web"), ("path", path)],
        );
        assert_eq!(v, want, "requests counted by the {path} path");
    }
    let served: u64 = s
        .topo
        .backends
        .iter()
        .filter(|b| b.group == Group::Canary)
        .map(|b| b.server.as_ref().expect("running").stats.requests())
        .sum();
    assert_eq!(
        served as f64, canary,
        "the canary served what the kernel counted"
    );

    // Outside the cgroup nothing changes: the VIP is the node's own
    // address, where nothing listens.
    let outside = tcp_requests(&s.topo.node, None, VIP, 3, 1).expect("the client runs");
    assert!(
        outside.iter().all(|l| l["ok"] == false),
        "a process outside the cgroup was steered: {outside:?}"
    );
    drop(agent);
}

#[test]
fn a_pod_sees_one_version_and_an_established_socket_stays_through_a_weight_change() {
    if !require_root() {
        return;
    }
    let s = setup();
    let agent = Agent::start(&s.topo.node, &s.config(50.0, "")).expect("kanari starts");
    // Client affinity: one network namespace (one pod, here the node's
    // processes), one version, whatever the connection.
    let lines = s.requests(200);
    let groups: std::collections::BTreeSet<Option<Group>> =
        lines.iter().map(|l| s.group(l)).collect();
    assert_eq!(groups.len(), 1, "one pod saw {groups:?}");
    let first = *groups.iter().next().expect("a group");
    let other = match first {
        Some(Group::Stable) => 100.0,
        _ => 0.0,
    };
    // A keep-alive connection, and the weight moved away from its group.
    let mut hold = spawn_client(
        &s.topo.node,
        Some(&s.sock.cgroup),
        &[
            "hold",
            "--to",
            &VIP.to_string(),
            "--requests-every-ms",
            "50",
            "--for-ms",
            "3000",
        ],
    )
    .expect("the client runs");
    hold.wait_for_lines(5, Duration::from_secs(10))
        .expect("the held connection answers");
    agent.reload(&s.config(other, "")).expect("SIGHUP");
    until(5, "the new weight", || {
        let w = report(&agent.socket).services[0].canary_weight_percent;
        (w == other).then_some(()).ok_or(format!("{w}"))
    });
    let lines = s.requests(50);
    assert!(
        lines.iter().all(|l| s.group(l) != first),
        "new connections follow the new weight: {lines:?}"
    );
    let held = hold.wait().expect("the held connection");
    let backends: std::collections::BTreeSet<&str> =
        held.iter().filter_map(|l| l["backend"].as_str()).collect();
    assert!(held.len() >= 40, "{held:?}");
    assert!(held.iter().all(|l| l["ok"] == true), "{held:?}");
    assert_eq!(
        backends.len(),
        1,
        "the established socket moved: {backends:?}"
    );
}

#[test]
fn a_failing_canary_reached_only_through_the_socket_path_is_rolled_back_within_a_second() {
    if !require_root() {
        return;
    }
    let _busy = busy();
    let s = setup();
    let agent = Agent::start(
        &s.topo.node,
        &s.config(
            0.0,
            "    affinity: connection\n    rollout: {steps: [20, 100], interval: 1h, progress_deadline: 2h}\n    analysis: {critical: {min_requests: 5}}\n",
        ),
    )
    .expect("kanari starts");
    until(10, "the first step", || {
        let w = report(&agent.socket).services[0].canary_weight_percent;
        (w == 20.0).then_some(()).ok_or(format!("{w}"))
    });
    let _load = spawn_client(
        &s.topo.node,
        Some(&s.sock.cgroup),
        &[
            "tcp",
            "--to",
            &VIP.to_string(),
            "--count",
            "1000000",
            "--concurrency",
            "2",
        ],
    )
    .expect("the client runs");
    std::thread::sleep(Duration::from_secs(2));
    s.topo.canary_server().behavior.set_error_rate(1.0);
    let broke = Instant::now();
    until(5, "the canary at 0 %", || {
        let w = report(&agent.socket).services[0].canary_weight_percent;
        (w == 0.0).then_some(()).ok_or(format!("{w}"))
    });
    let took = broke.elapsed();
    let r = report(&agent.socket).services.remove(0);
    let ro = r.rollout.expect("a rollout");
    assert_eq!(ro.phase, "rolled_back", "{ro:#?}");
    eprintln!(
        "socket path: a failing canary at weight 0 {} ms after the fault",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn with_the_agent_killed_the_pinned_programs_keep_steering() {
    if !require_root() {
        return;
    }
    let _busy = busy();
    let s = setup();
    let agent = Agent::start_keeping(&s.topo.node, &s.config(10.0, "    affinity: connection\n"))
        .expect("kanari starts");
    // SIGKILL.
    drop(agent);
    let lines = s.requests(500);
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");
    assert!(lines.iter().all(|l| l["peer"] == VIP.to_string()));
    let canary = lines
        .iter()
        .filter(|l| s.group(l) == Some(Group::Canary))
        .count() as f64;
    let n = lines.len() as f64;
    let bound = 3.29 * (0.1 * 0.9 / n).sqrt();
    assert!((canary / n - 0.1).abs() <= bound, "{canary} of {n}");
    // A new agent adopts the pinned socket path in place.
    let agent = Agent::start(&s.topo.node, &s.config(10.0, "    affinity: connection\n"))
        .expect("kanari starts again");
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("adopted the pinned socket path")),
        "{}",
        agent.logs().join("\n")
    );
    let lines = s.requests(20);
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");
}

#[test]
fn udp_datagrams_are_split_answered_from_the_vip_and_measured() {
    if !require_root() {
        return;
    }
    let _busy = busy();
    let s = setup_with(&TopologyOptions {
        udp_echo: true,
        ..Default::default()
    });
    let list = |g| {
        s.topo
            .backends_of(g)
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The same VIP:port for TCP (web) and UDP (echo), as DNS has.
    let echo = format!(
        "  - name: echo\n    vip: {VIP}\n    protocol: udp\n    affinity: connection\n    canary_weight: 10\n    salt: 7\n    stable:\n      backends: [{}]\n    canary:\n      backends: [{}]\n",
        list(Group::Stable),
        list(Group::Canary)
    );
    let agent = Agent::start(&s.topo.node, &s.config(10.0, &echo)).expect("kanari starts");
    let udp = |cgroup: Option<&TestCgroup>, count: usize, each: bool| {
        let n = count.to_string();
        let mut args = vec!["udp", "--to", "", "--count", &n];
        let to = VIP.to_string();
        args[2] = &to;
        if each {
            args.push("--new-socket-each");
        }
        run_client(&s.topo.node, cgroup, &args).expect("the client runs")
    };
    // sendmsg4 picks a backend per socket; recvmsg4 answers the VIP.
    let n = 2000;
    let lines = udp(Some(&s.sock.cgroup), n, true);
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] != true).collect();
    assert!(failed.is_empty() && lines.len() == n, "{failed:?}");
    for l in &lines {
        assert_eq!(l["from"], VIP.to_string(), "{l}");
    }
    let canary = lines
        .iter()
        .filter(|l| s.group(l) == Some(Group::Canary))
        .count() as f64;
    let share = canary / n as f64;
    let bound = 3.29 * (0.1 * 0.9 / n as f64).sqrt();
    eprintln!(
        "socket path, UDP: canary share {:.2} % of {n} sockets (bound ±{:.2} points)",
        share * 100.0,
        bound * 100.0
    );
    assert!((share - 0.1).abs() <= bound, "{share} of {n}");

    // One socket's datagrams stay on one backend.
    let one = udp(Some(&s.sock.cgroup), 50, false);
    let backends: std::collections::BTreeSet<&str> =
        one.iter().filter_map(|l| l["backend"].as_str()).collect();
    assert!(
        one.iter().all(|l| l["ok"] == true) && backends.len() == 1,
        "one socket reached {backends:?}: {one:?}"
    );

    // The kernel timed every exchange, per backend, on the socket path.
    let want = (n + one.len()) as f64;
    let text = until(5, "the exchanges counted", || {
        let text = scrape(&s.topo.node);
        let answered = sum(&text, "kanari_requests_total", &[("service", "echo")]);
        (answered >= want)
            .then_some(text.clone())
            .ok_or(format!("{answered} of {want}"))
    });
    let canary_counted = sum(
        &text,
        "kanari_requests_total",
        &[("service", "echo"), ("version", "canary")],
    );
    let canary_sent = canary
        + if one.iter().any(|l| s.group(l) == Some(Group::Canary)) {
            one.len() as f64
        } else {
            0.0
        };
    assert_eq!(canary_counted, canary_sent, "the canary's exchanges");
    assert_eq!(
        sum(
            &text,
            "kanari_requests_total",
            &[("service", "echo"), ("path", "socket")]
        ),
        want,
        "counted by the socket path"
    );
    assert_eq!(
        sum(&text, "kanari_requests_total", &[("service", "web")]),
        0.0,
        "the TCP service on the same VIP:port saw none"
    );

    // A socket's backend removed from the service: its next datagrams go to
    // one that is still there (a UDP socket has no connection to drain).
    let mut socket = spawn_client(
        &s.topo.node,
        Some(&s.sock.cgroup),
        &[
            "udp",
            "--to",
            &VIP.to_string(),
            "--count",
            "100",
            "--every-ms",
            "50",
        ],
    )
    .expect("the client runs");
    let early = socket
        .wait_for_lines(3, Duration::from_secs(10))
        .expect("the socket's first answers");
    let gone: SocketAddrV4 = early[0]["backend"]
        .as_str()
        .and_then(|b| b.parse().ok())
        .expect("a backend");
    let keep = |g| {
        s.topo
            .backends_of(g)
            .iter()
            .filter(|b| **b != gone)
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let canary_weight = if s.topo.backends_of(Group::Canary).contains(&gone) {
        0
    } else {
        10
    };
    let without = format!(
        "  - name: echo\n    vip: {VIP}\n    protocol: udp\n    affinity: connection\n    canary_weight: {canary_weight}\n    salt: 7\n    stable:\n      backends: [{}]\n    canary:\n      backends: [{}]\n",
        keep(Group::Stable),
        keep(Group::Canary)
    );
    agent
        .reload(&s.config(10.0, &without))
        .expect("SIGHUP without the socket's backend");
    until(5, "the service without the backend", || {
        let r = report(&agent.socket);
        let n: usize = r
            .services
            .iter()
            .filter(|x| x.name == "echo")
            .flat_map(|x| x.versions.iter().map(|v| v.backends))
            .sum();
        (n == 2).then_some(()).ok_or(format!("{n} backends"))
    });
    // Datagrams sent from here on (one may be on its way) avoid it.
    let applied_at = socket.lines().expect("the socket's lines").len() + 1;
    assert!(
        applied_at < 95,
        "the reload took most of the client's 5 s ({applied_at} datagrams)"
    );
    let lines = socket.wait().expect("the socket's datagrams");
    assert!(
        lines.len() == 100
            && lines
                .iter()
                .all(|l| l["ok"] == true && l["from"] == VIP.to_string()),
        "{lines:?}"
    );
    let last: Vec<&str> = lines[applied_at..]
        .iter()
        .filter_map(|l| l["backend"].as_str())
        .collect();
    assert!(
        last.iter().all(|b| *b != gone.to_string()),
        "datagrams still reach the removed {gone}: {last:?}"
    );
    let reached: std::collections::BTreeSet<&&str> = last.iter().collect();
    eprintln!(
        "socket path, UDP: a socket's backend {gone} removed (applied after {} datagrams); its {} datagrams after reached {reached:?}",
        applied_at - 1,
        last.len()
    );

    // Outside the cgroup a datagram to the VIP is not steered: nothing
    // answers it.
    let outside = udp(None, 2, false);
    assert!(
        outside.iter().all(|l| l["ok"] == false),
        "a process outside the cgroup was steered: {outside:?}"
    );
    drop(agent);
}
