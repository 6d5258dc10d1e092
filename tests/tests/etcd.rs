//! Kanari fleets coordinated through etcd: a real etcd cluster (the
//! system's `etcd`, `kanari_tests::etcd`) beside a fleet, on a control
//! network of its own apart from the fabric. These first tests prove the
//! harness: every node reaches the cluster, a node cut off etcd still
//! reaches its backends, two members of three away lose the quorum, and
//! a member killed comes back on its data.
//!
//! They need root and `etcd`/`etcdctl` on the PATH (without them they
//! fail; `KANARI_SKIP_PRIVILEGED=1` skips them explicitly outside CI).

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use kanari_tests::{
    control::until,
    etcd::{Etcd, etcdctl},
    fleet::Fleet,
    netns::{Netns, require_root},
};

/// `etcdctl ARGS...` from `ns` to every member, with short timeouts.
fn ctl(etcd: &Etcd, ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["--dial-timeout=1s", "--command-timeout=1s"];
    all.extend_from_slice(args);
    etcd.etcdctl_in(ns, &all)
}

/// Whether node `k` of `fleet` reaches its first backend over the fabric.
fn reaches_backend(fleet: &Fleet, k: usize) -> bool {
    let addr = SocketAddr::V4(fleet.backends[0].addr);
    fleet.nodes[k]
        .node
        .run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
        .expect("the node's namespace")
}

#[test]
fn a_key_put_from_one_node_is_read_from_another_through_a_single_member() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let fleet = Fleet::new(2, 1, 1).expect("fleet");
    let etcd = Etcd::start(&fleet, 1).expect("etcd");
    assert_eq!(etcd.endpoints(), ["http://10.4.0.1:2379"]);
    let one = ["http://10.4.0.1:2379".to_string()];
    etcdctl(&fleet.nodes[0].node, &one, &["put", "k", "v"]).expect("put from node 0");
    let got = etcdctl(
        &fleet.nodes[1].node,
        &one,
        &["get", "k", "--print-value-only"],
    )
    .expect("get from node 1");
    assert_eq!(got.trim(), "v");
    assert_eq!(
        etcd.etcdctl(&["get", "k", "--print-value-only"])
            .expect("get from ctl")
            .trim(),
        "v"
    );
    eprintln!("one member: {:?}", started.elapsed());
}

#[test]
fn three_members_a_node_cut_off_etcd_keeps_its_backends_and_two_members_away_lose_the_quorum() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let fleet = Fleet::new(2, 1, 1).expect("fleet");
    let mut etcd = Etcd::start(&fleet, 3).expect("etcd");
    eprintln!("three members healthy after {:?}", started.elapsed());
    let (n0, n1) = (&fleet.nodes[0].node, &fleet.nodes[1].node);
    ctl(&etcd, n0, &["put", "k", "v"]).expect("put from node 0");
    let got = ctl(&etcd, n1, &["get", "k", "--print-value-only"]).expect("get from node 1");
    assert_eq!(got.trim(), "v");

    // Node 0 cut off etcd: it fails, node 1 does not, node 0 still serves.
    etcd.cut_node(&fleet, 0, true).expect("cut node 0");
    let err = ctl(&etcd, n0, &["get", "k"]).expect_err("node 0 is cut off etcd");
    eprintln!("node 0 cut off: {err:#}");
    ctl(&etcd, n1, &["get", "k"]).expect("node 1 still reaches etcd");
    assert!(reaches_backend(&fleet, 0), "node 0 lost its backends");
    etcd.cut_node(&fleet, 0, false).expect("rejoin node 0");
    let got = until(10, "node 0 back on etcd", || {
        ctl(&etcd, n0, &["get", "k", "--print-value-only"]).map_err(|e| format!("{e:#}"))
    });
    assert_eq!(got.trim(), "v");

    // Two of three members away: member 0, still reachable, cannot commit.
    let put = |etcd: &Etcd, value: &str| {
        etcdctl(
            &etcd.ctl,
            &[etcd.endpoint(0)],
            &[
                "--dial-timeout=1s",
                "--command-timeout=1s",
                "put",
                "q",
                value,
            ],
        )
    };
    put(&etcd, "before").expect("put with the quorum");
    etcd.cut_member(1, true).expect("cut member 1");
    etcd.cut_member(2, true).expect("cut member 2");
    let err = put(&etcd, "lost").expect_err("a put without a quorum");
    eprintln!("no quorum: {err:#}");
    etcd.cut_member(1, false).expect("restore member 1");
    etcd.cut_member(2, false).expect("restore member 2");
    let back = Instant::now();
    until(20, "the quorum back", || {
        put(&etcd, "after").map_err(|e| format!("{e:#}"))
    });
    eprintln!("quorum back after {:?}", back.elapsed());
    etcd.wait_healthy(Duration::from_secs(20))
        .expect("every member back");
    let got = ctl(&etcd, n1, &["get", "q", "--print-value-only"]).expect("get from node 1");
    assert_eq!(got.trim(), "after");

    // A member killed and restarted on its data dir catches up.
    etcd.kill_member(2).expect("kill member 2");
    // Member 2 may have led: the put waits for an election.
    until(10, "a put with two of three", || {
        put(&etcd, "one down").map_err(|e| format!("{e:#}"))
    });
    etcd.restart_member(2).expect("restart member 2");
    etcd.wait_healthy(Duration::from_secs(20))
        .expect("member 2 back");
    let m2 = [etcd.endpoint(2)];
    let got =
        etcdctl(&etcd.ctl, &m2, &["get", "q", "--print-value-only"]).expect("get from member 2");
    assert_eq!(got.trim(), "one down");
    eprintln!("three members: {:?}", started.elapsed());
}

// ---- kanari hosts coordinated through etcd ---------------------------------

mod hosts {
    //! Three kanari hosts (node namespaces with clients of their own, the
    //! same backends) in one fleet: one agent leads through etcd's election
    //! and writes each service's state under /kanari/shop/services/; the
    //! others take its decisions from a watch; any host lowers at once.

    use std::time::{Duration, Instant};

    use kanari_common::maps::Group;
    use kanari_tests::{
        agent::Agent,
        control::{cli, report, until},
        etcd::Etcd,
        fleet::{Fleet, all_at, check_no_failures, check_split, weights},
        load::unix_ms,
        netns::require_root,
        topology::{NODE_IFACE, VIP},
    };
    use serde_json::Value;

    const SERVICE: &str = "web";
    const NODES: usize = 3;
    /// fleet.etcd.ttl.
    const TTL_S: u64 = 3;
    const KEY: &str = "/kanari/shop/services/web";

    /// Host `k`'s agent (node-K), with `rollout` and `analysis` for the service.
    fn host(fleet: &Fleet, etcd: &Etcd, k: usize, rollout: &str, analysis: &str) -> Agent {
        let config = host_config(fleet, etcd, k, rollout, analysis, "");
        Agent::start(&fleet.nodes[k].node, &config).expect("kanari starts")
    }

    /// Host `k`'s configuration; `etcd_extra` goes in its `fleet.etcd`.
    fn host_config(
        fleet: &Fleet,
        etcd: &Etcd,
        k: usize,
        rollout: &str,
        analysis: &str,
        etcd_extra: &str,
    ) -> String {
        let list = |g| {
            fleet
                .backends_of(g)
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "interfaces:\n  - name: {NODE_IFACE}\n    mode: tc\nconntrack:\n  connections: 65536\nbpf:\n  pin_dir: {}\nfleet:\n  name: shop\n  node: node-{k}\n  advertise: {}:9477\n  etcd:\n    endpoints: [{}]\n    ttl: {TTL_S}s\n{etcd_extra}services:\n  - name: {SERVICE}\n    vip: {VIP}\n    salt: 42\n    stable:\n      backends: [{}]\n    canary:\n      revision: web-2\n      backends: [{}]\n    rollout: {rollout}\n    analysis: {analysis}\n",
            fleet.nodes[k].pin_dir().display(),
            fleet.nodes[k].addr,
            etcd.endpoints().join(", "),
            list(Group::Stable),
            list(Group::Canary),
        )
    }

    /// Each node's clients see about 25 canary requests a second at 10 %:
    /// the critical path may judge on 5.
    const CRITICAL: &str = "{critical: {min_requests: 5}}";

    fn hosts(fleet: &Fleet, etcd: &Etcd, rollout: &str, analysis: &str) -> Vec<Option<Agent>> {
        (0..NODES)
            .map(|k| Some(host(fleet, etcd, k, rollout, analysis)))
            .collect()
    }

    /// The leader's state of the service, as etcd holds it.
    fn state(etcd: &Etcd) -> Value {
        etcd.etcdctl(&["--command-timeout=1s", "get", KEY, "--print-value-only"])
            .ok()
            .and_then(|v| serde_json::from_str(v.trim()).ok())
            .unwrap_or_default()
    }

    /// The state once `pred` holds, within `secs`.
    fn state_until(etcd: &Etcd, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        until(secs, what, || {
            let s = state(etcd);
            pred(&s).then_some(s.clone()).ok_or(s.to_string())
        })
    }

    /// The host that says it leads, and its term.
    fn leader(agents: &[Option<Agent>]) -> Option<(usize, u32)> {
        agents.iter().enumerate().find_map(|(k, a)| {
            let f = report(&a.as_ref()?.socket).fleet?;
            Some((k, f.term?))
        })
    }

    #[test]
    fn every_host_splits_at_the_leaders_weight_and_a_failing_canary_is_at_0_on_every_host_within_a_second()
     {
        if !require_root() {
            return;
        }
        let fleet = Fleet::new(NODES, 2, 1).expect("fleet");
        let etcd = Etcd::start(&fleet, 1).expect("etcd");
        let agents = hosts(
            &fleet,
            &etcd,
            "{steps: [10, 100], interval: 1h, progress_deadline: 2h}",
            CRITICAL,
        );
        all_at(&agents, SERVICE, 10.0, 10);
        let (k, term) = until(10, "a leader", || {
            leader(&agents).ok_or("none yet".to_string())
        });
        let s = state_until(&etcd, 10, "the leader's state", |s| {
            s["phase"] == "Progressing" && s["nodes"]["inSync"] == 3
        });
        assert_eq!(s["leader"]["agent"], format!("node-{k}"), "{s}");
        assert_eq!(s["leader"]["term"], term, "{s}");
        assert_eq!(s["canaryWeight"], 10.0, "{s}");
        // `kanari status` on a follower shows the fleet.
        let follower = &agents[(k + 1) % NODES].as_ref().expect("running").socket;
        let text = until(5, "the fleet in `kanari status`", || {
            let (ok, text) = cli(follower, &["status"]);
            (ok && text.contains(&format!("leader node-{k}, 3 hosts reporting")))
                .then_some(text.clone())
                .ok_or(text)
        });
        assert!(text.contains("fleet: decision"), "{text}");

        let loads = fleet.loads(250.0);
        std::thread::sleep(Duration::from_secs(8));
        let canary = fleet.backends_of(Group::Canary)[0];
        let broke_ms = unix_ms();
        fleet.server(canary).behavior.set_error_rate(1.0);
        let started = Instant::now();
        all_at(&agents, SERVICE, 0.0, 5);
        let to_zero = started.elapsed();
        let s = state_until(&etcd, 10, "the state rolled back", |s| {
            s["phase"] == "Failed"
        });
        assert_eq!(s["canaryWeight"], 0.0, "{s}");
        check_split(loads, broke_ms, canary, 0.1);
        eprintln!(
            "etcd fleet: a failing canary at weight 0 on every host {} ms after the fault",
            to_zero.as_millis()
        );
        assert!(to_zero < Duration::from_secs(1), "{to_zero:?}");
    }

    #[test]
    fn a_healthy_canary_is_promoted_on_the_whole_fleets_traffic_each_step_held_by_every_host() {
        if !require_root() {
            return;
        }
        let fleet = Fleet::new(NODES, 2, 1).expect("fleet");
        let etcd = Etcd::start(&fleet, 1).expect("etcd");
        // Judged as the single-node rollout test is: latency loosely (nine
        // processes share two cores here), errors as by default.
        let agents = hosts(
            &fleet,
            &etcd,
            "{steps: [10, 50, 100], interval: 2s, min_requests: 40, progress_deadline: 60s}",
            "{compare_to_stable: {max_latency_increase: 300, max_error_rate_increase: 5, tail_quantile: 0.9}}",
        );
        all_at(&agents, SERVICE, 10.0, 10);
        state_until(&etcd, 10, "every host in sync", |s| {
            s["nodes"]["total"] == 3 && s["nodes"]["inSync"] == 3
        });
        let loads = fleet.loads(150.0);
        let mut steps = Vec::new();
        let s = until(60, "the release promoted", || {
            let s = state(&etcd);
            let step = (s["canaryWeight"].as_f64(), s["nodes"]["inSync"].as_u64());
            if steps.last() != Some(&step) {
                steps.push(step);
            }
            (s["phase"] == "Succeeded")
                .then_some(s.clone())
                .ok_or(s.to_string())
        });
        assert_eq!(s["canaryWeight"], 100.0, "{s}");
        all_at(&agents, SERVICE, 100.0, 5);
        check_no_failures(loads, true, "during the rollout");
        eprintln!("etcd fleet promoted; state (weight, hosts in sync): {steps:?}");
        for w in [10.0, 50.0] {
            assert!(
                steps
                    .iter()
                    .any(|(weight, sync)| *weight == Some(w) && *sync == Some(3)),
                "every host held {w} % before it was judged: {steps:?}"
            );
        }
    }

    #[test]
    fn the_leader_killed_is_replaced_within_the_ttl_no_host_raising_and_a_stopped_one_hands_over_at_once()
     {
        if !require_root() {
            return;
        }
        let fleet = Fleet::new(NODES, 2, 1).expect("fleet");
        let etcd = Etcd::start(&fleet, 1).expect("etcd");
        let mut agents = hosts(
            &fleet,
            &etcd,
            "{steps: [10, 50, 100], interval: 1h, progress_deadline: 2h}",
            CRITICAL,
        );
        all_at(&agents, SERVICE, 10.0, 10);
        let (k, term) = until(10, "a leader", || {
            leader(&agents).ok_or("none yet".to_string())
        });
        state_until(&etcd, 10, "the leader's state", |s| {
            s["leader"]["term"] == term
        });
        // SIGKILL: its pinned data path keeps steering without it.
        drop(agents[k].take());
        let killed = Instant::now();
        let mut seen = Vec::new();
        let (new, new_term) = until(TTL_S + 5, "a new leader", || {
            seen.push(weights(&agents, SERVICE));
            match leader(&agents) {
                Some((n, t)) if t > term => Ok((n, t)),
                other => Err(format!("{other:?}")),
            }
        });
        let failover = killed.elapsed();
        for w in seen.iter().flatten().flatten() {
            assert!(
                *w <= 10.0,
                "a host raised the weight without a leader: {seen:?}"
            );
        }
        let s = state_until(&etcd, 5, "the new leader's state", |s| {
            s["leader"]["term"] == new_term
        });
        assert_eq!(s["phase"], "Progressing", "{s}");
        assert_eq!(s["step"], 0, "the rollout continues at its step: {s}");
        assert_eq!(s["canaryWeight"], 10.0, "{s}");
        all_at(&agents, SERVICE, 10.0, 5);
        eprintln!(
            "etcd fleet: leader node-{k} killed, node-{new} leads (term {new_term}) after {} ms (ttl {TTL_S} s)",
            failover.as_millis()
        );
        assert!(failover < Duration::from_secs(TTL_S + 2), "{failover:?}");

        // Stopped (SIGTERM), it resigns and revokes its lease: the last
        // host leads at once.
        let stopping = Instant::now();
        let logs = agents[new]
            .take()
            .expect("running")
            .stop()
            .expect("stops")
            .logs;
        assert!(
            logs.iter()
                .any(|l| l.contains("resigned") || l.contains("revoked this agent's lease")),
            "{}",
            logs.join("\n")
        );
        let (third, _) = until(TTL_S + 5, "the last host leading", || {
            leader(&agents).ok_or("none yet".to_string())
        });
        let handover = stopping.elapsed();
        assert!(third != k && third != new);
        all_at(&agents, SERVICE, 10.0, 5);
        eprintln!(
            "etcd fleet: node-{new} stopped (SIGTERM): node-{third} leads {} ms later",
            handover.as_millis()
        );
        assert!(handover < Duration::from_secs(TTL_S), "{handover:?}");
    }

    #[test]
    fn a_host_cut_off_etcd_keeps_serving_rolls_back_on_its_own_and_converges_when_it_returns() {
        if !require_root() {
            return;
        }
        let fleet = Fleet::new(NODES, 2, 1).expect("fleet");
        let etcd = Etcd::start(&fleet, 3).expect("etcd");
        let agents = hosts(
            &fleet,
            &etcd,
            "{steps: [10, 50, 100], interval: 1h, progress_deadline: 2h}",
            CRITICAL,
        );
        all_at(&agents, SERVICE, 10.0, 10);
        let (k, _) = until(10, "a leader", || {
            leader(&agents).ok_or("none yet".to_string())
        });
        let c = (k + 1) % NODES;
        let running = |n: usize| agents[n].as_ref().expect("running");
        let loads = fleet.loads(200.0);
        std::thread::sleep(Duration::from_millis(500));

        // Cut off: it keeps its weight while the leader raises the others'.
        etcd.cut_node(&fleet, c, true).expect("cut");
        running(c)
            .wait_for("lease is lost", 1)
            .expect("the cut host notices");
        let (ok, out) = cli(&running(k).socket, &["set-weight", SERVICE, "50"]);
        assert!(ok, "{out}");
        until(5, "the others at 50 %", || {
            let w = weights(&agents, SERVICE);
            let others = (0..NODES).filter(|n| *n != c).all(|n| w[n] == Some(50.0));
            if others && w[c] == Some(10.0) {
                Ok(())
            } else {
                Err(format!("{w:?}"))
            }
        });
        std::thread::sleep(Duration::from_secs(TTL_S));
        assert_eq!(
            weights(&agents, SERVICE)[c],
            Some(10.0),
            "the cut host kept its weight"
        );
        let back = Instant::now();
        etcd.cut_node(&fleet, c, false).expect("rejoin");
        all_at(&agents, SERVICE, 50.0, 20);
        let converged = back.elapsed();
        // It reports again: the leader counts it in sync.
        state_until(&etcd, 20, "the host back in the fleet", |s| {
            s["nodes"]["total"] == 3 && s["nodes"]["inSync"] == 3
        });
        let rejoined = back.elapsed();

        // Cut off again, the canary fails: it rolls back on its own.
        etcd.cut_node(&fleet, c, true).expect("cut");
        running(c)
            .wait_for("lease is lost", 2)
            .expect("the cut host notices");
        let canary = fleet.backends_of(Group::Canary)[0];
        fleet.server(canary).behavior.set_error_rate(1.0);
        let started = Instant::now();
        until(5, "the cut host at 0 %", || {
            let w = weights(&agents, SERVICE)[c];
            (w == Some(0.0)).then_some(()).ok_or(format!("{w:?}"))
        });
        let cut_to_zero = started.elapsed();
        all_at(&agents, SERVICE, 0.0, 5);
        fleet.server(canary).behavior.set_error_rate(0.0);
        etcd.cut_node(&fleet, c, false).expect("rejoin");
        let s = state_until(&etcd, 10, "the state rolled back", |s| {
            s["phase"] == "Failed" && s["nodes"]["total"] == 3
        });
        assert_eq!(s["canaryWeight"], 0.0, "{s}");
        std::thread::sleep(Duration::from_secs(1));
        all_at(&agents, SERVICE, 0.0, 1);
        check_no_failures(loads, false, "while cut off and back");
        eprintln!(
            "etcd fleet: a host cut off kept serving at its weight, took the leader's weight {} ms after it returned (reporting again after {} ms), rolled back a failing canary on its own in {} ms",
            converged.as_millis(),
            rejoined.as_millis(),
            cut_to_zero.as_millis()
        );
        assert!(cut_to_zero < Duration::from_secs(1), "{cut_to_zero:?}");
    }

    #[test]
    fn with_the_quorum_lost_every_data_path_is_unchanged_still_rolls_back_and_a_leader_returns() {
        if !require_root() {
            return;
        }
        let fleet = Fleet::new(NODES, 2, 1).expect("fleet");
        let etcd = Etcd::start(&fleet, 3).expect("etcd");
        let agents = hosts(
            &fleet,
            &etcd,
            "{steps: [10, 100], interval: 1h, progress_deadline: 2h}",
            CRITICAL,
        );
        all_at(&agents, SERVICE, 10.0, 10);
        until(10, "a leader", || {
            leader(&agents).ok_or("none yet".to_string())
        });
        let loads = fleet.loads(250.0);
        etcd.cut_member(1, true).expect("cut");
        etcd.cut_member(2, true).expect("cut");
        let away = Instant::now();
        // Longer than the TTL: nobody leads, everybody steers.
        until(2 * TTL_S + 5, "no leader", || match leader(&agents) {
            None => Ok(()),
            Some(l) => Err(format!("{l:?}")),
        });
        std::thread::sleep(Duration::from_secs(TTL_S));
        assert!(
            weights(&agents, SERVICE).iter().all(|w| *w == Some(10.0)),
            "{:?}",
            weights(&agents, SERVICE)
        );
        let canary = fleet.backends_of(Group::Canary)[0];
        fleet.server(canary).behavior.set_error_rate(1.0);
        let started = Instant::now();
        all_at(&agents, SERVICE, 0.0, 5);
        let to_zero = started.elapsed();
        fleet.server(canary).behavior.set_error_rate(0.0);
        let lost_for = away.elapsed();
        etcd.cut_member(1, false).expect("restore");
        etcd.cut_member(2, false).expect("restore");
        let back = Instant::now();
        until(20, "a leader again", || {
            leader(&agents).ok_or("none yet".to_string())
        });
        let s = state_until(&etcd, 10, "the state rolled back", |s| {
            s["phase"] == "Failed"
        });
        let reconverged = back.elapsed();
        assert_eq!(s["canaryWeight"], 0.0, "{s}");
        std::thread::sleep(Duration::from_secs(1));
        all_at(&agents, SERVICE, 0.0, 1);
        check_no_failures(loads, false, "without a quorum");
        eprintln!(
            "etcd quorum lost {} s: every split kept, a failing canary at 0 on every host in {} ms, a leader and the state back {} ms after the quorum",
            lost_for.as_secs(),
            to_zero.as_millis(),
            reconverged.as_millis()
        );
        assert!(to_zero < Duration::from_secs(1), "{to_zero:?}");
    }

    #[test]
    fn over_tls_with_client_certificates_the_fleet_decides_and_a_host_without_one_is_refused() {
        if !require_root() {
            return;
        }
        let fleet = Fleet::new(2, 1, 1).expect("fleet");
        let etcd = Etcd::start_tls(&fleet, 1).expect("etcd over TLS");
        let t = etcd.tls.clone().expect("TLS files");
        let rollout = "{steps: [10, 100], interval: 1h, progress_deadline: 2h}";
        let tls = format!(
            "    tls:\n      ca: {}\n      cert: {}\n      key: {}\n",
            t.ca.display(),
            t.client_cert.display(),
            t.client_key.display()
        );
        let mut agents: Vec<Option<Agent>> = (0..2)
            .map(|k| {
                let config = host_config(&fleet, &etcd, k, rollout, CRITICAL, &tls);
                Some(Agent::start(&fleet.nodes[k].node, &config).expect("kanari starts"))
            })
            .collect();
        all_at(&agents, SERVICE, 10.0, 10);
        let s = state_until(&etcd, 10, "the leader's state over TLS", |s| {
            s["phase"] == "Progressing" && s["nodes"]["total"] == 2 && s["nodes"]["inSync"] == 2
        });
        assert!(s["leader"]["agent"].is_string(), "{s}");

        // Without a client certificate etcd refuses it: it steers on, alone.
        drop(agents[1].take());
        let ca_only = format!("    tls:\n      ca: {}\n", t.ca.display());
        let config = host_config(&fleet, &etcd, 1, rollout, CRITICAL, &ca_only);
        let refused = Agent::start(&fleet.nodes[1].node, &config).expect("kanari starts");
        refused
            .wait_for("granting a lease failed", 1)
            .expect("etcd refuses it");
        agents[1] = Some(refused);
        all_at(&agents, SERVICE, 10.0, 5);
        state_until(
            &etcd,
            10,
            "only the host with a certificate reporting",
            |s| s["nodes"]["total"] == 1,
        );

        // A TLS file that cannot be read stops the start, naming the field.
        drop(agents[1].take());
        let missing = format!(
            "    tls:\n      ca: {}\n      cert: /nonexistent/client.pem\n      key: {}\n",
            t.ca.display(),
            t.client_key.display()
        );
        let config = host_config(&fleet, &etcd, 1, rollout, CRITICAL, &missing);
        let stopped = Agent::spawn(&fleet.nodes[1].node, &config)
            .expect("kanari runs")
            .wait_exit()
            .expect("it exits");
        assert!(!stopped.status.success(), "{:?}", stopped.status);
        assert!(
            stopped
                .logs
                .iter()
                .any(|l| l.contains("fleet.etcd.tls.cert: reading /nonexistent/client.pem")),
            "{}",
            stopped.logs.join("\n")
        );
    }
}
