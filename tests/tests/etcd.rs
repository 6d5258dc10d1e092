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
