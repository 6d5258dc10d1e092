//! End to end: the real agent and eBPF programs steering real HTTP traffic
//! between network namespaces, in both ingress modes.
//!
//! Every test builds its own namespaces (unique names, removed on every exit
//! path) and needs root; without it the test fails (see `require_root`).
//! The service salt is fixed (42) so where each client lands is predicted
//! exactly with the same hash the kernel uses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result};
use kanari_common::{
    hash,
    maps::{FlowKey, Group},
    select, wire,
};
use kanari_tests::{
    agent::{Agent, Stopped, kanari_bin},
    backend::{BackendHandle, Behavior},
    client::{Conn, Reply, get_once, run_bounded, runtime},
    frames,
    netns::require_root,
    topology::{NODE_ADDR, Topology, TopologyOptions, VIP, client_addr},
};

const SALT: u32 = 42;

/// The group a client lands in at `weight_bp` (client affinity, no segments).
fn predicted_group(client: Ipv4Addr, weight_bp: u32) -> Group {
    select::wanted_group(
        weight_bp,
        select::bucket(hash::client_hash(wire::addr(client), SALT)),
        None,
    )
}

/// The backend the kernel picks for a connection within its group.
fn predicted_backend(topo: &Topology, local: SocketAddrV4, group: Group) -> SocketAddrV4 {
    let key = FlowKey::new(
        wire::addr(*local.ip()),
        wire::addr(*VIP.ip()),
        wire::port(local.port()),
        wire::port(VIP.port()),
    );
    frames::pick(&topo.backends_of(group), hash::flow_hash(&key, SALT))
}

/// One request per client address, `concurrency` at a time, from the client namespace.
fn one_request_each(topo: &Topology, clients: Vec<Ipv4Addr>) -> Vec<Reply> {
    let replies = topo
        .client
        .run_in(|| runtime().block_on(run_bounded(clients, 64, |c| get_once(c, VIP))))
        .expect("client thread");
    let errors: Vec<_> = replies.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(e) = errors
        .iter()
        .find(|e| !e.to_string().starts_with("skipped"))
        .or(errors.first())
    {
        panic!("a request failed: {e:#}");
    }
    replies.into_iter().map(Result::unwrap).collect()
}

/// Stops the agent, checks it exited cleanly and left nothing attached.
fn stop(agent: Agent, topo: &Topology) -> Stopped {
    let stopped = agent.stop().expect("stopping kanari");
    assert!(
        stopped.status.success(),
        "kanari exited with {}; logs:\n{}",
        stopped.status,
        stopped.logs.join("\n")
    );
    let left = topo
        .attached_programs()
        .expect("querying attached programs");
    assert!(
        left.is_empty(),
        "programs still attached after the agent stopped: {left:?}"
    );
    stopped
}

fn count(stopped: &Stopped, name: &str) -> u64 {
    *stopped
        .counters
        .get(name)
        .unwrap_or_else(|| panic!("no counter {name} in {:?}", stopped.counters))
}

/// At 10 %, 2,000 clients with one connection each: the canary's share lies
/// within the 99.9 % binomial bound, and every connection lands exactly where
/// the kernel's hash says — group and backend.
fn split(mode: &str, complete_client_checksums: bool) {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        complete_client_checksums,
        ..Default::default()
    })
    .expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(10.0, "", mode)).expect("kanari starts");

    let n = 2000u32;
    let clients: Vec<Ipv4Addr> = (0..n).map(client_addr).collect();
    let replies = one_request_each(&topo, clients.clone());
    let mut canary = 0;
    for (client, reply) in clients.iter().zip(&replies) {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.local.ip(), client);
        let group = topo
            .group_of(reply.backend)
            .expect("a known backend answered");
        assert_eq!(reply.version, group.name());
        assert_eq!(group, predicted_group(*client, 1000), "client {client}");
        assert_eq!(
            reply.backend,
            predicted_backend(&topo, reply.local, group),
            "client {}",
            reply.local
        );
        canary += u32::from(group == Group::Canary);
    }
    // Binomial(2000, 0.1): sd = 13.4; the 99.9 % two-sided bound is 3.29 sd = 44.
    eprintln!(
        "{mode}: canary share {canary}/{n} = {:.2} %",
        canary as f64 * 100.0 / n as f64
    );
    assert!(
        (156..=244).contains(&canary),
        "canary took {canary} of {n} connections at 10 %"
    );

    let stopped = stop(agent, &topo);
    let new_xdp = count(&stopped, "xdp_steered_new");
    let new_tc = count(&stopped, "tc_steered_new");
    assert_eq!(
        new_xdp + new_tc,
        u64::from(n),
        "every connection recorded once: {:?}",
        stopped.counters
    );
    if mode == "xdp" {
        // Complete checksums stay in XDP; one in 65,536 looks like an offload
        // seed by chance and goes to TC (about 0.15 expected over this run).
        assert!(
            count(&stopped, "xdp_deferred") <= 5,
            "{:?}",
            stopped.counters
        );
        assert!(new_xdp >= u64::from(n) - 5, "{:?}", stopped.counters);
    } else {
        assert_eq!(new_xdp, 0);
    }
}

#[test]
fn split_xdp() {
    split("xdp", true);
}

#[test]
fn split_tc() {
    split("tc", false);
}

/// 50 keep-alive connections opened at weight 0 keep their backend when the
/// weight goes to 100 % by SIGHUP, with zero errors; new connections go to
/// the canary.
fn stickiness(mode: &str) {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(0.0, "", mode)).expect("kanari starts");

    let (first, after) = topo
        .client
        .run_in(|| {
            runtime().block_on(async {
                let mut conns = Vec::new();
                let mut first = Vec::new();
                for i in 0..50 {
                    let mut c = Conn::open(client_addr(i), VIP).await.expect("connect");
                    first.push(c.get().await.expect("first request"));
                    conns.push(c);
                }
                agent
                    .reload(&topo.config(100.0, "", mode))
                    .expect("reload to 100 %");
                let mut after = Vec::new();
                for round in 0..5 {
                    for (i, c) in conns.iter_mut().enumerate() {
                        let r = c
                            .get()
                            .await
                            .unwrap_or_else(|e| panic!("connection {i}, round {round}: {e:#}"));
                        after.push((i, r));
                    }
                }
                (first, after)
            })
        })
        .expect("client thread");
    for r in &first {
        assert_eq!(
            topo.group_of(r.backend),
            Some(Group::Stable),
            "weight 0 sends everyone to stable"
        );
    }
    for (i, r) in &after {
        assert_eq!(r.status, 200);
        assert_eq!(
            r.backend, first[*i].backend,
            "connection {i} moved after the weight change"
        );
    }
    eprintln!(
        "{mode}: {} requests on 50 established connections after 0 % -> 100 %: all on their first backend",
        after.len()
    );

    let fresh = one_request_each(&topo, (0..50).chain(1000..1050).map(client_addr).collect());
    for r in &fresh {
        assert_eq!(
            topo.group_of(r.backend),
            Some(Group::Canary),
            "a new connection at 100 % from {}",
            r.local
        );
    }

    let stopped = stop(agent, &topo);
    // 50 + 100 connections, each recorded once.
    assert_eq!(
        count(&stopped, "xdp_steered_new") + count(&stopped, "tc_steered_new"),
        150,
        "{:?}",
        stopped.counters
    );
    if mode == "xdp" {
        // The client's veth hands over offload seeds: XDP leaves those to TC.
        assert!(
            count(&stopped, "xdp_deferred") > 0,
            "{:?}",
            stopped.counters
        );
    }
}

#[test]
fn stickiness_xdp() {
    stickiness("xdp");
}

#[test]
fn stickiness_tc() {
    stickiness("tc");
}

/// At a fixed weight a client lands in the same group on every connection;
/// raising the weight from 10 % to 20 % moves only stable clients, exactly
/// those the hash says.
fn affinity(mode: &str) {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(10.0, "", mode)).expect("kanari starts");

    let clients: Vec<Ipv4Addr> = (0..300).map(|i| client_addr(3000 + i)).collect();
    let thrice: Vec<Ipv4Addr> = clients.iter().flat_map(|c| [*c, *c, *c]).collect();
    let at10 = one_request_each(&topo, thrice);
    let mut group10: BTreeMap<Ipv4Addr, Group> = BTreeMap::new();
    for r in &at10 {
        let g = topo.group_of(r.backend).expect("known backend");
        let seen = *group10.entry(*r.local.ip()).or_insert(g);
        assert_eq!(
            seen,
            g,
            "client {} saw both versions at a fixed weight",
            r.local.ip()
        );
    }

    agent
        .reload(&topo.config(20.0, "", mode))
        .expect("reload to 20 %");
    let at20 = one_request_each(&topo, clients.clone());
    let mut moved = BTreeSet::new();
    for r in &at20 {
        let client = *r.local.ip();
        let (before, now) = (
            group10[&client],
            topo.group_of(r.backend).expect("known backend"),
        );
        assert!(
            !(before == Group::Canary && now == Group::Stable),
            "client {client} went back to stable as the weight rose"
        );
        assert_eq!(now, predicted_group(client, 2000));
        if before != now {
            moved.insert(client);
        }
    }
    let expected: BTreeSet<Ipv4Addr> = clients
        .iter()
        .copied()
        .filter(|c| {
            predicted_group(*c, 1000) == Group::Stable && predicted_group(*c, 2000) == Group::Canary
        })
        .collect();
    assert_eq!(moved, expected);
    assert!(
        !moved.is_empty(),
        "some clients must move from 10 % to 20 %"
    );
    eprintln!(
        "{mode}: 10 % -> 20 % moved {} of 300 clients, all stable -> canary",
        moved.len()
    );
    stop(agent, &topo);
}

#[test]
fn affinity_xdp() {
    affinity("xdp");
}

#[test]
fn affinity_tc() {
    affinity("tc");
}

/// A client inside a segment pinned to the canary reaches it at weight 0;
/// clients outside stay on stable.
fn segments(mode: &str) {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let seg = "    segments:\n      - cidr: 10.1.5.0/24\n        group: canary\n";
    let agent = Agent::start(&topo.node, &topo.config(0.0, seg, mode)).expect("kanari starts");
    let inside: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(10, 1, 5, i)).collect();
    let outside: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(10, 1, 6, i)).collect();
    for r in one_request_each(&topo, inside) {
        assert_eq!(
            topo.group_of(r.backend),
            Some(Group::Canary),
            "{} is in the canary segment",
            r.local
        );
    }
    for r in one_request_each(&topo, outside) {
        assert_eq!(
            topo.group_of(r.backend),
            Some(Group::Stable),
            "{} is outside the segment",
            r.local
        );
    }
    stop(agent, &topo);
}

#[test]
fn segments_xdp() {
    segments("xdp");
}

#[test]
fn segments_tc() {
    segments("tc");
}

/// While kanari is attached, traffic that is not for a service passes:
/// ping to the node and to the VIP address, TCP to another port of the VIP
/// and to the node's own address.
fn untouched(mode: &str) {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(50.0, "", mode)).expect("kanari starts");
    let local_port = 9000;
    let _node_server = BackendHandle::start(
        &topo.node,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, local_port),
        Behavior::healthy("node"),
    )
    .expect("node-local server");

    for target in [NODE_ADDR, *VIP.ip()] {
        let out = topo
            .client
            .command("ping")
            .args(["-c", "3", "-i", "0.2", "-W", "2", &target.to_string()])
            .output()
            .expect("ping runs");
        assert!(
            out.status.success(),
            "ping {target} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let replies = topo
        .client
        .run_in(|| {
            runtime().block_on(async {
                let mut v = Vec::new();
                for dst in [
                    SocketAddrV4::new(*VIP.ip(), local_port),
                    SocketAddrV4::new(NODE_ADDR, local_port),
                    VIP,
                ] {
                    v.push(
                        get_once(client_addr(7), dst)
                            .await
                            .unwrap_or_else(|e| panic!("TCP to {dst}: {e:#}")),
                    );
                }
                v
            })
        })
        .expect("client thread");
    assert_eq!(
        replies[0].version, "node",
        "VIP on another port reaches the node itself"
    );
    assert_eq!(replies[1].version, "node");
    assert!(
        topo.group_of(replies[2].backend).is_some(),
        "the service still works beside it"
    );
    stop(agent, &topo);
}

#[test]
fn untouched_xdp() {
    untouched("xdp");
}

#[test]
fn untouched_tc() {
    untouched("tc");
}

/// `GET /bytes/{size}` from `src` to `dst` on a connection of its own;
/// the body's length, or an error when it does not all come within `within`.
async fn fetch(src: Ipv4Addr, dst: SocketAddrV4, size: usize, within: Duration) -> Result<usize> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddrV4::new(src, 0).into())?;
    let mut stream = socket.connect(dst.into()).await?;
    let request = format!("GET /bytes/{size} HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut got = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut got)).await {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("{} bytes of the response within {within:?}", got.len()),
    };
    let head = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    Ok(got.len() - head - 4)
}

/// A router on the client's side has a smaller MTU than the client's own
/// link, so the backend's full-size replies need path MTU discovery, whose
/// "fragmentation needed" is addressed to the VIP they came from. kanari
/// sends it on to the backend, which then sends smaller segments: the
/// transfer completes. Without it the backend sends its full-size segments
/// again and again into the narrow hop (a path MTU black hole).
fn path_mtu_discovery(mode: &str) {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 1,
        narrow_hop_mtu: Some(1280),
        ..Default::default()
    })
    .expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(0.0, "", mode)).expect("kanari starts");
    const SIZE: usize = 256 * 1024;
    let got = topo
        .client
        .run_in(|| runtime().block_on(fetch(client_addr(7), VIP, SIZE, Duration::from_secs(10))))
        .expect("client thread");
    let stopped = stop(agent, &topo);
    assert_eq!(
        got.expect("the transfer over the narrow hop completes"),
        SIZE
    );
    let translated = count(&stopped, "icmp_translated");
    eprintln!("{mode}: {SIZE} bytes over a 1280-byte hop; {translated} ICMP errors sent on");
    assert!(translated >= 1);
}

#[test]
fn path_mtu_discovery_xdp() {
    path_mtu_discovery("xdp");
}

#[test]
fn path_mtu_discovery_tc() {
    path_mtu_discovery("tc");
}

/// Broken configurations: `check-config` and `run` exit 2 with an error that
/// names the field, and nothing is attached.
#[test]
fn bad_configs_are_rejected_with_exit_2_and_nothing_attached() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 1,
        ..Default::default()
    })
    .expect("topology");
    let good = topo.config(10.0, "", "auto");
    let cases: Vec<(String, &str)> = vec![
        ("interfaces: [name: n0\n".to_string(), "interfaces"),
        (good.replace("conntrack:", "conntrak:"), "conntrak"),
        (
            good.replace("vip: 10.0.0.100:80", "vip: 10.0.0.100"),
            "services[0].vip",
        ),
        (
            good.replace("10.2.1.1:8080", "backend-1:8080"),
            "services[0].stable.backends[0]",
        ),
        (
            good.replace("canary_weight: 10", "canary_weight: 150"),
            "services[0].canary_weight",
        ),
        (
            good.replace("name: n0", "name: nosuch0"),
            "interfaces[0].name",
        ),
        (
            format!(
                "{good}  - name: web2\n    vip: 10.0.0.100:80\n    stable: {{backends: [10.2.1.1:8080]}}\n"
            ),
            "services[1].vip",
        ),
    ];
    let dir = std::env::temp_dir().join(format!("kanari-test-{}-bad", topo.tag));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (i, (text, field)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.yaml"));
        std::fs::write(&path, text).expect("write config");
        let out = topo
            .node
            .command(kanari_bin().to_str().unwrap())
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("check-config runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "check-config on case {i}: {stderr}"
        );
        assert!(
            stderr.contains(&*path.to_string_lossy()) && stderr.contains(field),
            "case {i}: expected the file and `{field}` in: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

        let agent = Agent::spawn(&topo.node, text).expect("spawn kanari");
        let stopped = agent.wait_exit().expect("kanari exits");
        assert_eq!(
            stopped.status.code(),
            Some(2),
            "run on case {i}: {}",
            stopped.logs.join("\n")
        );
        assert!(
            stopped.logs.iter().any(|l| l.contains(field)),
            "case {i}: {}",
            stopped.logs.join("\n")
        );
        assert!(
            topo.attached_programs().expect("query").is_empty(),
            "case {i} attached something"
        );
    }
    let good_path = dir.join("good.yaml");
    std::fs::write(&good_path, &good).expect("write config");
    let out = topo
        .node
        .command(kanari_bin().to_str().unwrap())
        .arg("check-config")
        .arg(&good_path)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A SIGHUP with a broken file is rejected and the running configuration
/// keeps steering; a good file afterwards applies.
#[test]
fn a_rejected_reload_keeps_the_running_configuration() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(0.0, "", "tc")).expect("kanari starts");
    let line = agent
        .reload_rejected(&topo.config(150.0, "", "tc"))
        .expect("rejected");
    assert!(line.contains("services[0].canary_weight"), "{line}");
    for r in one_request_each(&topo, (0..50).map(client_addr).collect()) {
        assert_eq!(
            topo.group_of(r.backend),
            Some(Group::Stable),
            "the 0 % configuration still applies"
        );
    }
    agent
        .reload(&topo.config(100.0, "", "tc"))
        .expect("good reload");
    for r in one_request_each(&topo, (100..150).map(client_addr).collect()) {
        assert_eq!(topo.group_of(r.backend), Some(Group::Canary));
    }
    stop(agent, &topo);
}
