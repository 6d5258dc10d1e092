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

use kanari_common::maps::Group;
use kanari_tests::{
    agent::{Agent, kanari_bin},
    client::{http_get, runtime},
    control::{rollout, wait_rollout},
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

/// The agent's /metrics.
fn metrics(topo: &Topology) -> String {
    let addr: SocketAddr = "127.0.0.1:9477".parse().unwrap();
    let (_, body) = topo
        .node
        .run_in(|| runtime().block_on(http_get(addr, "/metrics")))
        .unwrap()
        .expect("/metrics");
    body
}

/// Sum of `kanari_requests_total` on the agent's /metrics.
fn requests_total(topo: &Topology) -> f64 {
    metrics(topo)
        .lines()
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
            "    rollout: {steps: [10, 20, 30, 40, 50, 100], interval: 1s, checks_per_step: 3, min_requests: 10}\n    analysis: {compare_to_stable: {max_latency_increase: 300, max_error_rate_increase: 5, tail_quantile: 0.9}}\n",
            "tc",
        ),
        state.display()
    );
    let agent = Agent::start_keeping(&topo.node, &yaml).expect("kanari starts");
    let kept = KeepAlive::start(&topo.client, VIP, 50, Duration::from_millis(20), 50_000)
        .expect("keep-alive connections");
    let load = Load::start(&topo.client, VIP, 600.0, 12, 0).expect("load");
    let (weight, before) = wait_rollout(&agent.socket, 30, "the second step", |_, r| r.step >= 1);
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
    let (_, on) = wait_rollout(&again.socket, 30, "the rollout goes on", |_, r| {
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
    // The rate of new connections over the whole time they were sent.
    let sent_over_ms = outcomes.last().expect("requests").sent_ms - outcomes[0].sent_ms;
    let rate = outcomes.len() as f64 / (sent_over_ms as f64 / 1000.0);
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

/// A SYN flood far beyond the conntrack table (60,000 new tuples into room
/// for 1,024 connections) while 50 keep-alive connections sit idle; then the
/// weight moves to 100 %. `guard` is the new-connection rate guard.
/// Returns the keep-alive requests that failed or moved, the SYNs shed, the
/// SYNs sent and the new connections recorded.
fn flood(guard: u32) -> (usize, u64, u32, u64) {
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let small = |weight: f64| {
        topo.config(weight, "", "tc").replace(
            "connections: 65536",
            &format!("connections: 1024\n  new_per_second: {guard}"),
        )
    };
    let agent = Agent::start(&topo.node, &small(0.0)).expect("kanari starts");
    let (broken, sent) = topo
        .client
        .run_in(|| {
            runtime().block_on(async {
                let mut conns = Vec::new();
                for i in 0..50 {
                    let mut c = kanari_tests::client::Conn::open(
                        kanari_tests::topology::client_addr(i),
                        VIP,
                    )
                    .await
                    .expect("connect");
                    let first = c.get().await.expect("first request").backend;
                    conns.push((c, first));
                }
                let sent =
                    kanari_tests::flood::syn_flood(&topo.client, VIP, 60_000, 7).expect("flood");
                agent.reload(&small(100.0)).expect("reload to 100 %");
                let mut broken = 0;
                for (c, first) in &mut conns {
                    for _ in 0..3 {
                        match c.get().await {
                            Ok(r) if r.backend == *first && r.status == 200 => {}
                            _ => broken += 1,
                        }
                    }
                }
                (broken, sent)
            })
        })
        .expect("client thread");
    let stopped = agent.stop().expect("kanari stops");
    let shed = *stopped.counters.get("shed").expect("a shed counter");
    let recorded = stopped.counters.get("tc_steered_new").copied().unwrap_or(0);
    (broken, shed, sent, recorded)
}

#[test]
fn a_syn_flood_does_not_push_established_connections_out() {
    if !require_root() {
        return;
    }
    let (broken, shed, sent, _) = flood(200);
    eprintln!(
        "guard 200/s: {sent} flood SYNs sent, {shed} shed, {broken} of 150 keep-alive requests failed or moved"
    );
    assert_eq!(
        broken, 0,
        "established connections keep working through the flood"
    );
    assert!(
        shed as f64 >= sent as f64 * 0.9,
        "the guard shed {shed} of {sent}"
    );
}

/// The same flood without the guard: nothing is shed and the flood's
/// connections go into the table, many times its size — the evictions the
/// guard prevents. (Whether a given idle connection is evicted then depends
/// on the LRU's per-CPU lists and the load, so the broken requests are
/// reported, not asserted: runs here broke 150, 90 and 0 of 150.)
#[test]
fn without_the_guard_a_syn_flood_overruns_the_table() {
    if !require_root() {
        return;
    }
    let (broken, shed, sent, recorded) = flood(0);
    eprintln!(
        "no guard: {sent} flood SYNs sent, {shed} shed, {recorded} connections recorded, {broken} of 150 keep-alive requests failed or moved"
    );
    assert_eq!(shed, 0);
    assert!(
        recorded >= 10 * 1024,
        "the flood recorded {recorded} connections in a table for 1,024"
    );
}

/// The weight changes every 100 ms for 60 s while 200 keep-alive connections
/// exchange requests: no connection is reset, none is answered by another
/// backend than its own.
#[test]
fn weight_churn_moves_no_established_connection() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let yaml = topo.config(
        0.0,
        "    rollout: {steps: [10, 100], interval: 1h, progress_deadline: 2h}\n",
        "tc",
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let kept = KeepAlive::start(&topo.client, VIP, 200, Duration::from_millis(100), 20_000)
        .expect("keep-alive connections");
    let started = Instant::now();
    let mut changes = 0u32;
    let mut x = 12345u32;
    while started.elapsed() < Duration::from_secs(60) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let percent = [0.0, 5.0, 25.0, 50.0, 75.0, 100.0][(x >> 16) as usize % 6];
        let body = format!("{{\"percent\": {percent}}}");
        let (status, answer) = runtime()
            .block_on(kanari::api::control_request(
                &agent.socket,
                "/v1/services/web/weight",
                Some(body),
            ))
            .expect("set-weight");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        changes += 1;
        let next = started + Duration::from_millis(100 * changes as u64);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let outcomes = kept.stop();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .collect();
    let mut backend_of: BTreeMap<usize, std::net::SocketAddrV4> = BTreeMap::new();
    let mut moved = 0;
    for o in outcomes.iter().filter(|o| o.result.is_ok()) {
        let (b, _) = o.result.clone().unwrap();
        if *backend_of.entry(o.conn).or_insert(b) != b {
            moved += 1;
        }
    }
    let used: std::collections::BTreeSet<_> = backend_of.values().collect();
    eprintln!(
        "{changes} weight changes in 60 s; {} requests on 200 keep-alive connections over {} backends: {} failed, {moved} moved",
        outcomes.len(),
        used.len(),
        failed.len()
    );
    assert!(changes >= 500, "only {changes} weight changes");
    assert!(failed.is_empty(), "{:?}", failed.first());
    assert_eq!(moved, 0);
    assert!(outcomes.len() >= 200 * 400, "{} requests", outcomes.len());
    agent.stop().expect("kanari stops");
}

/// A canary backend removed and another added under load: connections to
/// the remaining backends carry on untouched; a removed backend's
/// established connections drain (they keep their backend until they
/// close); new connections go only to the backends configured.
#[test]
fn backends_removed_and_added_under_load() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 3,
        ..Default::default()
    })
    .expect("topology");
    let canaries = topo.backends_of(Group::Canary);
    let with = |list: &[std::net::SocketAddrV4]| {
        let all = topo.config(50.0, "", "tc");
        let wanted = list
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let current = canaries
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        all.replace(
            &format!("canary:\n      backends: [{current}]"),
            &format!("canary:\n      backends: [{wanted}]"),
        )
    };
    let agent = Agent::start(&topo.node, &with(&canaries[..2])).expect("kanari starts");
    let kept = KeepAlive::start(&topo.client, VIP, 60, Duration::from_millis(50), 30_000)
        .expect("keep-alive connections");
    let load = Load::start(&topo.client, VIP, 300.0, 8, 0).expect("load");
    std::thread::sleep(Duration::from_secs(1));
    let removed_ms = unix_ms();
    agent
        .reload(&with(&canaries[..1]))
        .expect("remove a canary backend");
    std::thread::sleep(Duration::from_secs(2));
    let added_ms = unix_ms();
    agent
        .reload(&with(&[canaries[0], canaries[2]]))
        .expect("add one");
    std::thread::sleep(Duration::from_secs(2));
    let fresh = load.stop();
    let kept = kept.stop();

    assert!(
        kept.iter().all(|o| matches!(o.result, Ok((_, 200)))),
        "a keep-alive request failed: {:?}",
        kept.iter().find(|o| o.result.is_err())
    );
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
    let drained = backend_of.values().filter(|b| **b == canaries[1]).count();
    assert!(
        fresh.iter().all(|o| matches!(o.result, Ok((_, 200)))),
        "a new connection failed"
    );
    let to = |b, from, until| {
        fresh
            .iter()
            .filter(|o| o.sent_ms > from && o.sent_ms < until && o.result.as_ref().unwrap().0 == b)
            .count()
    };
    assert!(
        to(canaries[1], removed_ms + 100, u64::MAX) == 0,
        "a new connection reached the removed backend"
    );
    assert!(
        to(canaries[2], removed_ms, added_ms) == 0,
        "a new connection reached the backend before it was added"
    );
    assert!(
        to(canaries[2], added_ms + 100, u64::MAX) > 0,
        "the added backend gets new connections"
    );
    eprintln!(
        "{} keep-alive requests ({drained} connections drained from the removed backend) and {} new connections: none failed or moved",
        kept.len(),
        fresh.len()
    );
    agent.stop().expect("kanari stops");
}

/// Only the socket's owner (root) can talk to the control API; /metrics is
/// read-only. Nothing changes for a refused caller.
#[test]
fn the_control_socket_is_root_only_and_metrics_read_only() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
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
        "    rollout: {steps: [10, 100], interval: 1h, progress_deadline: 2h}\n",
        "tc",
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let meta = std::fs::metadata(&agent.socket).expect("socket");
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o600));
    // The socket's directory must let nobody through for this check to mean
    // anything about the socket itself.
    let dir = agent.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(kanari_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .args(["promote", "web"])
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unprivileged user promoted the canary: {stderr}"
    );
    assert!(stderr.contains("ermission denied"), "{stderr}");
    let (w, r) = rollout(&agent.socket);
    assert_eq!(
        (r.phase.as_str(), w),
        ("progressing", 10.0),
        "nothing changed"
    );
    let addr: SocketAddr = "127.0.0.1:9477".parse().unwrap();
    let post = topo
        .node
        .run_in(|| {
            runtime().block_on(async {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut s, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let req = hyper::Request::post("/metrics")
                    .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                    .unwrap();
                s.send_request(req).await.unwrap().status().as_u16()
            })
        })
        .unwrap();
    assert_eq!(post, 405, "/metrics takes no POST");
    agent.stop().expect("kanari stops");
}

/// Builds the `upgrade-marker` variant of the eBPF object (once per target
/// directory): a different build of the data path for the upgrade test.
fn upgrade_object() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let target = root.join("target/upgrade-marker");
    let mut cmd = std::process::Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "kanari-ebpf",
        "--features",
        "upgrade-marker",
        "--bins",
        "--release",
    ])
    .args([
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
    ])
    .arg(&target)
    .current_dir(&root);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "building the upgrade-marker object: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("bpfel-unknown-none/release/kanari")
}

/// An upgrade: the agent restarts with a different build of the eBPF
/// object. The pinned links switch to the new programs in place: every
/// established connection carries on and new ones are served, and the new
/// programs are the ones running.
#[test]
fn an_upgraded_data_path_keeps_every_established_connection() {
    if !require_root() {
        return;
    }
    let object_b = upgrade_object();
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let yaml = topo.config(20.0, "", "tc");
    let a = Agent::start_keeping(&topo.node, &yaml).expect("kanari (build A) starts");
    let kept = KeepAlive::start(&topo.client, VIP, 50, Duration::from_millis(20), 50_000)
        .expect("keep-alive connections");
    let load = Load::start(&topo.client, VIP, 400.0, 8, 0).expect("load");
    std::thread::sleep(Duration::from_secs(1));
    let stopped = a.stop().expect("build A stops");
    assert!(stopped.status.success());
    let b = Agent::start_keeping_env(
        &topo.node,
        &yaml,
        &[("KANARI_EBPF_OBJECT", object_b.as_path())],
    )
    .expect("kanari (build B) starts");
    assert!(
        b.logs()
            .iter()
            .any(|l| l.contains("adopted the pinned attachment")),
        "{}",
        b.logs().join("\n")
    );
    std::thread::sleep(Duration::from_secs(2));
    let outcomes = load.stop();
    let kept = kept.stop();

    // Build B's programs run: its marker counts the packets they steer.
    let marker = topo
        .node
        .run_in(|| {
            let data = aya::maps::MapData::from_pin(topo.pin_dir().join("maps/KN_COUNTERS_V2"))
                .expect("pinned counters");
            let map = aya::maps::Map::PerCpuHashMap(data);
            let counters: aya::maps::PerCpuHashMap<_, kanari_common::maps::CounterKey, u64> =
                map.try_into().expect("a per-CPU hash");
            counters
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| k.counter == 255)
                .map(|(_, v)| v.iter().sum::<u64>())
                .sum::<u64>()
        })
        .unwrap();
    let failed = outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .count();
    let kept_failed = kept
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .count();
    let mut backend_of: BTreeMap<usize, std::net::SocketAddrV4> = BTreeMap::new();
    for o in kept.iter().filter(|o| o.result.is_ok()) {
        let (backend, _) = o.result.clone().unwrap();
        assert_eq!(
            *backend_of.entry(o.conn).or_insert(backend),
            backend,
            "connection {} moved",
            o.conn
        );
    }
    eprintln!(
        "upgrade A -> B under load: {} new connections ({failed} failed), {} keep-alive requests ({kept_failed} failed); build B steered {marker} packets",
        outcomes.len(),
        kept.len()
    );
    assert_eq!((failed, kept_failed), (0, 0));
    assert!(marker > 0, "the new build's programs are the ones running");
    b.stop().expect("kanari stops");
    uninstall(&topo, &yaml);
}

/// A keep-alive connection from the client namespace to the VIP, driven
/// by `rt` (it outlives agent restarts), and its first answer.
fn kept_connection(
    topo: &Topology,
    rt: &tokio::runtime::Runtime,
) -> (kanari_tests::client::Conn, kanari_tests::client::Reply) {
    let client = kanari_tests::topology::client_addr(7);
    let mut kept = topo
        .client
        .run_in(|| rt.block_on(kanari_tests::client::Conn::open(client, VIP)))
        .unwrap()
        .expect("a connection");
    let first = topo
        .client
        .run_in(|| rt.block_on(kept.get()))
        .unwrap()
        .expect("answered");
    (kept, first)
}

/// `kanari uninstall --config` with `yaml`: removes the pinned data path.
fn uninstall(topo: &Topology, yaml: &str) {
    let config = std::env::temp_dir().join(format!("kanari-test-{}-uninstall.yaml", topo.tag));
    std::fs::write(&config, yaml).expect("write config");
    let out = std::process::Command::new(kanari_bin())
        .args(["uninstall", "--config"])
        .arg(&config)
        .output()
        .expect("uninstall runs");
    let _ = std::fs::remove_file(&config);
    assert!(out.status.success());
}

/// A restart with a larger `conntrack.connections` and `limits.backends`
/// takes effect: the pinned maps are made anew at the sizes configured,
/// their contents carried over — a connection established before stays on
/// its backend although the weight changed (chosen anew it would go to the
/// canary), and the request counters carry on.
#[test]
fn a_restart_with_larger_maps_resizes_them_keeping_connections_and_counters() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let with = |connections: u32, backends: u32, percent: f64| {
        topo.config(percent, "", "tc").replacen(
            "conntrack:\n  connections: 65536\n",
            &format!("conntrack:\n  connections: {connections}\nlimits:\n  backends: {backends}\n"),
            1,
        )
    };
    let first = with(65_536, 8, 0.0);
    assert!(first.contains("backends: 8"), "{first}");
    let a = Agent::start_keeping(&topo.node, &first).expect("kanari starts");
    let rt = runtime();
    let (mut kept, before) = kept_connection(&topo, &rt);
    let deadline = Instant::now() + Duration::from_secs(5);
    while requests_total(&topo) < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let counted = requests_total(&topo);
    assert_eq!(counted, 1.0);
    assert!(a.stop().expect("stops").status.success());

    let second = with(131_072, 16, 100.0);
    let b = Agent::start_keeping(&topo.node, &second).expect("kanari starts again");
    let logs = b.logs().join("\n");
    for (map, from, to) in [("KN_CT_V2", 131_072, 262_144), ("KN_STATS_V2", 8, 16)] {
        assert!(
            logs.lines().any(|l| l.contains("resizing a pinned map")
                && l.contains(&format!("map=\"{map}\""))
                && l.contains(&format!("from={from} to={to}"))),
            "{map} {from} -> {to} in:\n{logs}"
        );
    }
    let capacity = metrics(&topo)
        .lines()
        .find_map(|l| l.strip_prefix("kanari_conntrack_capacity "))
        .map(|v| v.trim().parse::<f64>().unwrap());
    assert_eq!(
        capacity,
        Some(262_144.0),
        "two entries per connection configured"
    );
    let after = topo
        .client
        .run_in(|| rt.block_on(kept.get()))
        .unwrap()
        .expect("the kept connection answered after the resize");
    assert_eq!(after.backend, before.backend, "on its backend still");
    let deadline = Instant::now() + Duration::from_secs(5);
    while requests_total(&topo) < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(requests_total(&topo), 2.0, "the counters carried on");
    b.stop().expect("stops");
    uninstall(&topo, &second);
}

/// Removing a service drains it: its established connections keep their
/// backends (their conntrack entries), new ones are no longer steered, and
/// the service comes back on the same entry when it is added again.
#[test]
fn a_removed_service_drains_its_established_connections() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let with = topo.config(0.0, "", "tc");
    let without = with[..with.find("services:").expect("services")].to_string();
    let agent = Agent::start(&topo.node, &with).expect("kanari starts");
    let client = kanari_tests::topology::client_addr(7);
    let stable = topo.backends_of(Group::Stable);
    topo.client
        .run_in(|| {
            runtime().block_on(async {
                let mut kept = kanari_tests::client::Conn::open(client, VIP)
                    .await
                    .expect("a connection");
                let before = kept.get().await.expect("answered");
                assert!(stable.contains(&before.backend), "{before:?}");
                agent.reload(&without).expect("the service removed");
                for _ in 0..20 {
                    let r = kept
                        .get()
                        .await
                        .expect("the established connection still answered");
                    assert_eq!(r.backend, before.backend, "same backend");
                }
                // A new connection is no longer steered (the node itself
                // answers the VIP: refused).
                let fresh =
                    kanari_tests::client::get_once(kanari_tests::topology::client_addr(8), VIP)
                        .await;
                assert!(
                    fresh.is_err(),
                    "a new connection to a removed service: {fresh:?}"
                );
                agent.reload(&with).expect("the service back");
                let again =
                    kanari_tests::client::get_once(kanari_tests::topology::client_addr(9), VIP)
                        .await
                        .expect("steered again");
                assert!(stable.contains(&again.backend), "{again:?}");
                let r = kept.get().await.expect("the kept connection, still");
                assert_eq!(r.backend, before.backend);
            })
        })
        .expect("client thread");
    agent.stop().expect("kanari stops");
}

/// The sum of a metric's samples whose line starts with `prefix` (name and labels).
fn metric_sum(topo: &Topology, prefix: &str) -> f64 {
    metrics(topo)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Polls `metric_sum(prefix)` until it reaches `at_least`, for at most
/// `within`; sleeps on the caller's runtime, which keeps running its tasks
/// (a dropped connection's socket is closed by them).
async fn wait_metric(topo: &Topology, prefix: &str, at_least: f64, within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = metric_sum(topo, prefix);
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent ages conntrack entries by their connection's state
/// (`conntrack.timeouts`): ended connections free theirs after `closed`; an
/// idle keep-alive connection keeps its entries through a gap shorter than
/// `established`, and after a longer one — its entries gone — still answers
/// from the same backend (the Maglev table finds it again).
#[test]
fn idle_entries_expire_by_state_and_a_live_connection_outlives_them() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let config = topo.config(0.0, "", "tc").replace(
        "conntrack:\n  connections: 65536\n",
        "conntrack:\n  connections: 65536\n  timeouts: {established: 4s, closed: 1s}\n",
    );
    assert!(config.contains("established: 4s"), "{config}");
    let agent = Agent::start(&topo.node, &config).expect("kanari starts");
    let closed = "kanari_conntrack_expired_total{state=\"closed\"}";
    let established = "kanari_conntrack_expired_total{state=\"established\"}";
    topo.client
        .run_in(|| {
            runtime().block_on(async {
                let client = kanari_tests::topology::client_addr(7);
                let mut kept = kanari_tests::client::Conn::open(client, VIP)
                    .await
                    .expect("a connection");
                let first = kept.get().await.expect("answered");
                // Twenty connections, each ended (a FIN each way).
                for i in 0..20 {
                    let c = kanari_tests::topology::client_addr(100 + i);
                    kanari_tests::client::get_once(c, VIP)
                        .await
                        .expect("a one-request connection");
                }
                let t = Instant::now();
                let n = wait_metric(&topo, closed, 20.0, Duration::from_secs(5)).await;
                assert_eq!(
                    n,
                    20.0,
                    "ended connections expired (after {:?})",
                    t.elapsed()
                );
                // An idle gap shorter than the established timeout: the
                // kept connection's entries stay.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let r = kept.get().await.expect("answered after 2 s idle");
                assert_eq!(r.backend, first.backend);
                assert_eq!(metric_sum(&topo, established), 0.0);
                // Longer than it: the entries go, the connection lives on.
                let n = wait_metric(&topo, established, 1.0, Duration::from_secs(8)).await;
                assert_eq!(n, 1.0, "the idle connection's entries expired");
                let r = kept
                    .get()
                    .await
                    .expect("answered after its entries expired");
                assert_eq!(r.backend, first.backend, "the same backend");
            })
        })
        .expect("client thread");
    agent.stop().expect("kanari stops");
}

/// `bpf(cmd, attr)`: the kernel's answer (a descriptor, 0, or -1 with errno).
fn bpf<T>(cmd: libc::c_long, attr: &T) -> libc::c_long {
    // SAFETY: every attr given here is a `union bpf_attr` member for `cmd`,
    // whose pointers are alive for the call.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>() as u32) }
}

/// Creates a pinned LRU hash map at `path` named `name` (raw `bpf()`: the
/// layout of an earlier build, which no object here has).
fn pin_lru_map(
    path: &Path,
    name: &str,
    key: u32,
    value: u32,
    entries: u32,
) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut map_name = [0u8; 16];
    map_name[..name.len()].copy_from_slice(name.as_bytes());
    let create = Create {
        map_type: 9, // BPF_MAP_TYPE_LRU_HASH
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    let fd = bpf(0, &create); // BPF_MAP_CREATE
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just gave us.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let pin = Pin {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    let r = bpf(6, &pin); // BPF_OBJ_PIN
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    fd
}

/// Writes `key` -> `value` into the map behind `fd` (raw `BPF_MAP_UPDATE_ELEM`).
fn update_elem<K, V>(fd: &std::os::fd::OwnedFd, key: &K, value: &V) {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct Elem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let e = Elem {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags: 0,
    };
    let r = bpf(2, &e); // BPF_MAP_UPDATE_ELEM
    assert_eq!(
        r,
        0,
        "BPF_MAP_UPDATE_ELEM: {}",
        std::io::Error::last_os_error()
    );
}

/// Upgrading from a build whose conntrack table was `KN_CT_V1` (entries
/// without the time they were last seen): the new agent carries every entry
/// over, so a connection established before the upgrade stays on its
/// backend although the weight changed meanwhile (chosen anew, it would go
/// to the canary), and the old table's pin goes.
#[test]
fn an_upgrade_from_the_previous_conntrack_layout_keeps_established_connections() {
    use kanari_common::maps::{CtEntry, CtEntryV1, FlowKey};
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let at = |percent: f64| topo.config(percent, "", "tc");
    let a = Agent::start_keeping(&topo.node, &at(0.0)).expect("kanari starts");
    let rt = runtime();
    let (mut kept, first) = kept_connection(&topo, &rt);
    assert_eq!(topo.group_of(first.backend), Some(Group::Stable));
    assert!(a.stop().expect("stops").status.success());

    // The pins as the previous build left them: its table, not this one's.
    let maps = topo.pin_dir().join("maps");
    let current = maps.join("KN_CT_V2");
    let entries: Vec<(FlowKey, CtEntry)> = {
        let data = aya::maps::MapData::from_pin(&current).expect("the pinned conntrack");
        let m: aya::maps::HashMap<_, FlowKey, CtEntry> = aya::maps::Map::LruHashMap(data)
            .try_into()
            .expect("a hash map");
        m.iter().map(Result::unwrap).collect()
    };
    assert_eq!(entries.len(), 2, "the kept connection's two entries");
    let old = pin_lru_map(&maps.join("KN_CT_V1"), "KN_CT_V1", 16, 40, 65_536 * 2);
    for (k, e) in &entries {
        let v1 = CtEntryV1 {
            addr: e.addr,
            port: e.port,
            group: e.group,
            kind: e.kind,
            backend_id: e.backend_id,
            service_id: e.service_id,
            syn_ns: e.syn_ns,
            req_ns: e.req_ns,
            status_pos: e.status_pos,
            flags: e.flags,
            status_code: e.status_code,
            isn: e.isn,
        };
        update_elem(&old, k, &v1);
    }
    drop(old);
    std::fs::remove_file(&current).expect("unpinning this build's table");

    let b = Agent::start_keeping(&topo.node, &at(100.0)).expect("kanari starts again");
    let logs = b.logs().join("\n");
    assert!(
        logs.contains("carried the conntrack entries") && logs.contains("entries=2"),
        "{logs}"
    );
    assert!(
        !maps.join("KN_CT_V1").exists(),
        "the old table's pin is removed"
    );
    let again = topo
        .client
        .run_in(|| rt.block_on(kept.get()))
        .unwrap()
        .expect("the kept connection answered after the upgrade");
    assert_eq!(again.backend, first.backend, "on its backend still");
    let fresh = topo
        .client
        .run_in(|| {
            rt.block_on(kanari_tests::client::get_once(
                kanari_tests::topology::client_addr(8),
                VIP,
            ))
        })
        .unwrap()
        .expect("a new connection");
    assert_eq!(
        topo.group_of(fresh.backend),
        Some(Group::Canary),
        "{fresh:?}"
    );
    b.stop().expect("kanari stops");
    uninstall(&topo, &at(100.0));
}

/// A long poll (the backend answers after 45 s of silence) waits while
/// 10,240 one-request connections — ten times the table's 1,024 — come and
/// go around it at 260/s. Ended connections' entries age out after
/// `closed` (1 s), so the table never fills and the LRU never takes the
/// idle connection's entries: its answer arrives, from the VIP.
#[test]
fn a_long_poll_reply_arrives_after_ten_table_turnovers() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if !require_root() {
        return;
    }
    const TABLE: usize = 1024;
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let config = topo.config(0.0, "", "tc").replace(
        "conntrack:\n  connections: 65536\n",
        &format!(
            "conntrack:\n  connections: {TABLE}\n  new_per_second: 100000\n  timeouts: {{closed: 1s}}\n"
        ),
    );
    assert!(config.contains("closed: 1s"), "{config}");
    let agent = Agent::start(&topo.node, &config).expect("kanari starts");
    let poll = topo
        .client
        .spawn(move || {
            runtime().block_on(async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(
                    std::net::SocketAddrV4::new(kanari_tests::topology::client_addr(7), 0).into(),
                )?;
                let mut s = socket.connect(VIP.into()).await?;
                s.write_all(
                    b"GET /delay/45000 HTTP/1.1\r\nHost: kanari\r\nConnection: close\r\n\r\n",
                )
                .await?;
                let mut answer = Vec::new();
                tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut answer))
                    .await
                    .map_err(|_| anyhow::anyhow!("no answer within 60 s"))??;
                anyhow::Ok((
                    String::from_utf8_lossy(&answer).into_owned(),
                    Instant::now(),
                ))
            })
        })
        .expect("the long poll");
    let started = Instant::now();
    let load = Load::start(&topo.client, VIP, 260.0, 8, 1000).expect("load");
    while started.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let outcomes = load.stop();
    let churn_ended = Instant::now();
    let failed = outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .count();
    let (answer, answered_at) = poll
        .join()
        .expect("the long poll's thread")
        .expect("in the client's namespace")
        .expect("the long poll answered");
    let expired = metric_sum(&topo, "kanari_conntrack_expired_total{state=\"closed\"}");
    eprintln!(
        "{} one-request connections ({failed} failed) through room for {TABLE}, {expired} expired as closed; the long poll answered {:?} after the churn",
        outcomes.len(),
        answered_at.saturating_duration_since(churn_ended)
    );
    assert!(
        outcomes.len() >= 10 * TABLE,
        "{} connections",
        outcomes.len()
    );
    assert_eq!(failed, 0);
    assert!(answered_at > churn_ended, "the answer came after the churn");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    agent.stop().expect("kanari stops");
}
