//! The harness socket-level load balancing needs, tested on its own: a
//! cgroup of the test's own, the client that joins it, and the backend's UDP
//! echo. No agent runs: the client dials the backend directly, so what it
//! reports (`peer`, `from`) is what the kernel does without kanari.

use std::{path::Path, process::Command, time::Duration};

use kanari_common::maps::Group;
use kanari_tests::{
    cgroup::{TestCgroup, unified_root},
    netns::{Netns, require_root, run, unique_tag},
    socket_client::{run_client, spawn_client},
    topology::{Topology, TopologyOptions},
};
use serde_json::Value;

/// Namespaces whose names start with `<tag>-` (every one a test with `tag` made).
fn namespaces_of(tag: &str) -> Vec<String> {
    let out = run(Command::new("ip").args(["netns", "list"])).expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{tag}-")))
        .map(str::to_string)
        .collect()
}

/// One backend in a namespace of its own behind the node, answering UDP too.
fn one_backend() -> Topology {
    Topology::new(&TopologyOptions {
        stable: 1,
        canary: 0,
        udp_echo: true,
        ..TopologyOptions::default()
    })
    .expect("the test network")
}

fn str_of<'a>(line: &'a Value, key: &str) -> &'a str {
    line[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key:?} in {line}"))
}

#[test]
fn a_test_cgroup_is_created_and_removed() {
    if !require_root() {
        return;
    }
    let root = unified_root().expect("the unified hierarchy");
    assert!(
        root.join("cgroup.procs").is_file(),
        "{} is not a cgroup2 root",
        root.display()
    );
    let tag = unique_tag();
    let cg = TestCgroup::new(&tag).expect("a cgroup");
    let path = cg.path().to_path_buf();
    assert_eq!(path, root.join(format!("kanari-test-{tag}")));
    assert!(path.join("cgroup.procs").is_file());
    assert_eq!(cg.procs().expect("its procs"), Vec::<u32>::new());
    assert!(
        TestCgroup::new(&tag).is_err(),
        "a second cgroup of the same tag"
    );
    drop(cg);
    assert!(!path.exists(), "{} is left", path.display());
}

#[test]
fn a_client_in_a_cgroup_is_listed_and_killed_when_the_cgroup_goes() {
    if !require_root() {
        return;
    }
    let topo = one_backend();
    let backend = topo.backends[0].addr.to_string();
    let cg = TestCgroup::new(&topo.tag).expect("a cgroup");
    let path = cg.path().to_path_buf();
    let mut client = spawn_client(
        &topo.client,
        Some(&cg),
        &[
            "hold",
            "--to",
            &backend,
            "--requests-every-ms",
            "50",
            "--for-ms",
            "60000",
        ],
    )
    .expect("the client");
    cg.wait_for_proc(client.pid(), Duration::from_secs(5))
        .expect("the client in the cgroup");
    // Its sockets are the cgroup's: it answers from inside.
    let lines = client
        .wait_for_lines(2, Duration::from_secs(10))
        .expect("two answers");
    for l in &lines {
        assert_eq!(l["ok"], true, "{l}");
        assert_eq!(str_of(l, "backend"), backend);
    }
    assert_eq!(
        str_of(&lines[0], "local"),
        str_of(&lines[1], "local"),
        "one connection"
    );
    drop(cg);
    assert!(!path.exists(), "{} is left", path.display());
    let err = client.wait().expect_err("the client outlived its cgroup");
    assert!(format!("{err:#}").contains("SIGKILL"), "{err:#}");
    let tag = topo.tag.clone();
    drop(topo);
    assert_eq!(namespaces_of(&tag), Vec::<String>::new());
}

#[test]
fn tcp_answers_name_the_backend_and_getpeername_the_address_dialled() {
    if !require_root() {
        return;
    }
    let topo = one_backend();
    let backend = topo.backends[0].addr.to_string();
    let cg = TestCgroup::new(&topo.tag).expect("a cgroup");
    for cgroup in [Some(&cg), None] {
        let lines = run_client(
            &topo.client,
            cgroup,
            &[
                "tcp",
                "--to",
                &backend,
                "--count",
                "20",
                "--concurrency",
                "4",
            ],
        )
        .expect("the client");
        assert_eq!(lines.len(), 20);
        for l in &lines {
            assert_eq!(l["ok"], true, "{l}");
            assert_eq!(l["status"], 200, "{l}");
            assert_eq!(str_of(l, "version"), Group::Stable.name());
            assert_eq!(str_of(l, "backend"), backend);
            assert_eq!(str_of(l, "peer"), backend);
            assert!(str_of(l, "local").starts_with("192.168.0.2:"), "{l}");
        }
    }
    // Exited clients leave nothing behind in it.
    assert_eq!(cg.procs().expect("its procs"), Vec::<u32>::new());
    // A source address of the client's /16.
    let lines = run_client(
        &topo.client,
        Some(&cg),
        &["tcp", "--to", &backend, "--bind", "10.1.0.7"],
    )
    .expect("the client");
    assert!(
        str_of(&lines[0], "local").starts_with("10.1.0.7:"),
        "{}",
        lines[0]
    );
    // Nothing listens there: one failed line, still exit 0.
    let lines =
        run_client(&topo.client, Some(&cg), &["tcp", "--to", "10.2.1.1:9"]).expect("the client");
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["ok"], false, "{}", lines[0]);
    let tag = topo.tag.clone();
    let path = cg.path().to_path_buf();
    drop((cg, topo));
    assert!(!path.exists());
    assert_eq!(namespaces_of(&tag), Vec::<String>::new());
}

#[test]
fn udp_datagrams_get_the_backends_echo() {
    if !require_root() {
        return;
    }
    let topo = one_backend();
    let backend = topo.backends[0].addr;
    let cg = TestCgroup::new(&topo.tag).expect("a cgroup");
    let lines = run_client(
        &topo.client,
        Some(&cg),
        &["udp", "--to", &backend.to_string(), "--count", "5"],
    )
    .expect("the client");
    assert_eq!(lines.len(), 5);
    for l in &lines {
        assert_eq!(l["ok"], true, "{l}");
        assert_eq!(str_of(l, "from"), backend.to_string());
        assert_eq!(
            str_of(l, "reply"),
            format!("{} {backend}", Group::Stable.name())
        );
        assert_eq!(str_of(l, "backend"), backend.to_string());
    }
    assert_eq!(topo.server(backend).stats.datagrams(), 5);
    // No echo on a port nobody serves: each datagram times out, still exit 0.
    let lines = run_client(
        &topo.client,
        Some(&cg),
        &["udp", "--to", "10.2.1.1:9", "--count", "1"],
    )
    .expect("the client");
    assert_eq!(lines[0]["ok"], false, "{}", lines[0]);
}

#[test]
fn the_client_fails_when_it_cannot_join_its_cgroup() {
    if !require_root() {
        return;
    }
    let tag = unique_tag();
    let ns = Netns::new(&tag, "cl").expect("a namespace");
    let bin = kanari_tests::socket_client::client_bin().expect("the client binary");
    let missing = Path::new("/nonexistent-kanari-cgroup");
    let out = Command::new(bin)
        .arg("--cgroup")
        .arg(missing)
        .args(["--netns", ns.name(), "udp", "--to", "127.0.0.1:9"])
        .output()
        .expect("running the client");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("joining the cgroup"), "{stderr}");
    drop(ns);
    assert_eq!(namespaces_of(&tag), Vec::<String>::new());
}
