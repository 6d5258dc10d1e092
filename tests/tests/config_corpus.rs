//! The configuration corpus under `tests/configs/`: broken files that must each
//! be rejected with one clear error, and valid ones that must pass.
//!
//! Every file in `configs/invalid/` starts with two comment lines,
//!
//! ```yaml
//! # field: services[0].canary_weight      <- the exact field path the error names
//! # expect: is outside 0 to 100           <- a substring of the message
//! ```
//!
//! and is otherwise a good configuration with one thing broken. The interface
//! they name is `n0`, the node's interface in the test topology
//! ([`NODE_IFACE`]): the end-to-end tests run `kanari` in the node namespace,
//! where it exists (the missing-interface case names another).
//!
//! - [`the_library_rejects_every_broken_file_naming_its_field`] checks them
//!   against `kanari::config` directly (no root needed, fast feedback).
//! - [`check_config_and_run_reject_every_broken_file_with_exit_2`] runs the
//!   real binary: `check-config` exits 2 with exactly one line on stderr naming
//!   the file, the field and the fix; `run` exits 2 and attaches nothing; the
//!   valid files exit 0.
//! - [`sighup_with_broken_files_keeps_the_running_configuration`]: a running
//!   agent rejects three broken files on SIGHUP, keeps steering, and counts
//!   `kanari_config_reload_failures_total 3`.
//!
//! The end-to-end tests need root (namespaces, eBPF): without it they fail
//! (`KANARI_SKIP_PRIVILEGED=1` skips them explicitly outside CI).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use kanari_tests::{
    agent::{Agent, kanari_bin},
    client::{get_once, http_get, runtime},
    netns::require_root,
    topology::{NODE_IFACE, Topology, TopologyOptions, VIP, client_addr},
};

/// At least this many broken files (issue 6: "at least 30").
const MIN_BROKEN: usize = 30;
/// The broken files a running agent is sent on SIGHUP.
const RELOADED: [&str; 3] = [
    "weight-above-100",
    "vip-equals-backend",
    "segment-pinned-to-both-groups",
];
const METRICS: &str = "127.0.0.1:9477";

fn configs_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(kind)
}

/// The `.yaml` files of `configs/<kind>/`, sorted.
fn files(kind: &str) -> Vec<PathBuf> {
    let dir = configs_dir(kind);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    out.sort();
    out
}

/// A broken configuration and what its error must say.
struct Broken {
    path: PathBuf,
    /// The file name without `NN-` and `.yaml`.
    name: String,
    field: String,
    expect: String,
    text: String,
}

fn broken() -> Vec<Broken> {
    files("invalid")
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let mut lines = text.lines();
            let mut header = |key: &str| {
                lines
                    .next()
                    .and_then(|l| l.strip_prefix(key))
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| {
                        panic!(
                            "{} must start with `{key}...` (line 1: `# field: `, line 2: `# expect: `)",
                            path.display()
                        )
                    })
            };
            let field = header("# field: ");
            let expect = header("# expect: ");
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("a UTF-8 file name");
            let name = match stem.split_once('-') {
                Some((nn, rest)) if nn.len() == 2 && nn.chars().all(|c| c.is_ascii_digit()) => {
                    rest.to_string()
                }
                _ => panic!("{} is not named NN-short-name.yaml", path.display()),
            };
            Broken {
                path,
                name,
                field,
                expect,
                text,
            }
        })
        .collect()
}

fn interface_exists(name: &str) -> bool {
    name == NODE_IFACE
}

/// Runs `cmd` to its end, killing it (by its PID, ours) after `deadline`.
fn output_within(cmd: &mut Command, deadline: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let end = Instant::now() + deadline;
    while child.try_wait().expect("waiting for the child").is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collecting the output");
            panic!(
                "{cmd:?} did not exit within {deadline:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("collecting the output")
}

// ---- Without root -----------------------------------------------------------------------------

#[test]
fn the_corpus_is_complete_and_well_formed() {
    let broken = broken();
    assert!(
        broken.len() >= MIN_BROKEN,
        "{} broken configurations, at least {MIN_BROKEN} wanted",
        broken.len()
    );
    let valid = files("valid");
    assert!(
        (2..=5).contains(&valid.len()),
        "{} valid configurations: {valid:?}",
        valid.len()
    );
    let mut names: Vec<&str> = broken.iter().map(|b| b.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), broken.len(), "two files share a name");
    for name in RELOADED {
        assert!(
            broken.iter().any(|b| b.name == name),
            "no broken file named *-{name}.yaml"
        );
    }
    // No two files are the same configuration.
    for (i, a) in broken.iter().enumerate() {
        for b in &broken[i + 1..] {
            let body = |t: &str| t.lines().skip(2).collect::<Vec<_>>().join("\n");
            assert_ne!(
                body(&a.text),
                body(&b.text),
                "{} and {} are the same configuration",
                a.path.display(),
                b.path.display()
            );
        }
    }
}

#[test]
fn the_library_rejects_every_broken_file_naming_its_field() {
    for b in broken() {
        let e = kanari::config::load(&b.path, &interface_exists)
            .err()
            .unwrap_or_else(|| panic!("{} was accepted", b.path.display()));
        assert_eq!(e.field, b.field, "{}: {e}", b.path.display());
        assert!(
            e.message.contains(&b.expect),
            "{}: expected `{}` in: {e}",
            b.path.display(),
            b.expect
        );
        let line = e.to_string();
        assert!(
            line.starts_with(&*b.path.to_string_lossy()) && !line.contains('\n'),
            "{line}"
        );
    }
    for path in files("valid") {
        if let Err(e) = kanari::config::load(&path, &interface_exists) {
            panic!("{} is rejected: {e}", path.display());
        }
    }
}

/// The README's error format is `FILE[:LINE:COL]: FIELD: what is wrong`. A
/// parse error of a field directly under a top-level section repeats the
/// section as a prefix of the message (`telemetry.tick: telemetry: `fast` is
/// not a duration`, `interfaces: interfaces: invalid type`): `yaml_message`
/// strips serde_yaml_ng's own path prefix only when it contains `.` or `[`.
#[test]
fn messages_do_not_repeat_the_field_path() {
    for b in broken() {
        let e = kanari::config::load(&b.path, &interface_exists).expect_err("rejected");
        let top = e
            .field
            .split(['.', '['])
            .next()
            .expect("a field path")
            .to_string();
        assert!(
            !e.message.starts_with(&format!("{top}: ")),
            "{}: the message repeats `{top}: `: {e}",
            b.path.display()
        );
    }
}

/// Syntax errors should name a field the user can find. Some name a path
/// ending in `?` (serde_path_to_error's unknown segment), or the key before
/// the broken line.
#[test]
fn syntax_errors_name_the_field_of_the_broken_line() {
    let good = "interfaces:\n  - name: n0\nconntrack:\n  connections: 65536\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    canary_weight: 10\n    salt: 42\n    stable:\n      backends: [10.2.1.1:8080]\n    canary:\n      backends: [10.2.2.1:8080]\n";
    assert!(kanari::config::parse("k.yaml", good, &interface_exists).is_ok());
    let cases = [
        // A missing colon: today `services[0].?: could not find expected ':'`.
        (
            good.replace("    vip: 10.0.0.100:80", "    vip 10.0.0.100:80"),
            "services[0].vip",
        ),
        // A key indented one space too little: today `?: did not find expected key`.
        (
            good.replace(
                "  connections: 65536",
                "  connections: 65536\n connections: 1",
            ),
            "conntrack.connections",
        ),
        // A tab on the `salt` line: today `services[0].canary_weight: found a tab character`.
        (
            good.replace("    salt: 42", "\tsalt: 42"),
            "services[0].salt",
        ),
    ];
    for (text, field) in cases {
        let e = kanari::config::parse("k.yaml", &text, &interface_exists).expect_err("rejected");
        assert!(!e.field.contains('?'), "a field path with `?`: {e}");
        assert_eq!(e.field, field, "{e}");
    }
}

// ---- End to end (root) --------------------------------------------------------------------------

#[test]
fn check_config_and_run_reject_every_broken_file_with_exit_2() {
    if !require_root() {
        return;
    }
    // 1 stable + 1 canary backend: the node namespace has `n0`.
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 1,
        ..Default::default()
    })
    .expect("topology");
    let kanari = kanari_bin();
    let kanari = kanari.to_str().expect("a UTF-8 path");
    let broken = broken();
    for b in &broken {
        let path = b.path.to_string_lossy();
        let out = output_within(
            topo.node.command(kanari).arg("check-config").arg(&b.path),
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "check-config {path}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "check-config {path}: one line on stderr, got:\n{stderr}"
        );
        assert!(
            stderr.contains(&*path)
                && stderr.contains(&format!(": {}: ", b.field))
                && stderr.contains(&b.expect),
            "check-config {path}: expected the file, `: {}: ` and `{}` in: {stderr}",
            b.field,
            b.expect
        );
        assert!(
            out.stdout.is_empty(),
            "check-config {path} printed to stdout"
        );

        let out = output_within(
            topo.node
                .command(kanari)
                .args(["run", "--config"])
                .arg(&b.path)
                .env("KANARI_LOG", "info"),
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "run {path}: {stderr}");
        assert!(
            stderr.contains(&format!(": {}: ", b.field)) && stderr.contains(&b.expect),
            "run {path}: expected `: {}: ` and `{}` in: {stderr}",
            b.field,
            b.expect
        );
        let attached = topo.attached_programs().expect("querying n0");
        assert!(
            attached.is_empty(),
            "run {path} left programs attached to {NODE_IFACE}: {attached:?}"
        );
    }
    let valid = files("valid");
    for path in &valid {
        let out = output_within(
            topo.node.command(kanari).arg("check-config").arg(path),
            Duration::from_secs(30),
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "check-config {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    }
    eprintln!(
        "{} broken configurations rejected by check-config and run (exit 2, one line, nothing \
         attached); {} valid ones accepted",
        broken.len(),
        valid.len()
    );
}

#[test]
fn sighup_with_broken_files_keeps_the_running_configuration() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 1,
        ..Default::default()
    })
    .expect("topology");
    let agent = Agent::start(&topo.node, &topo.config(10.0, "", "auto")).expect("kanari starts");
    let broken = broken();
    for name in RELOADED {
        let b = broken
            .iter()
            .find(|b| b.name == name)
            .expect("the file exists");
        let line = agent
            .reload_rejected(&b.text)
            .unwrap_or_else(|e| panic!("reloading {}: {e:#}", b.path.display()));
        assert!(
            line.contains(&format!(": {}: ", b.field)) && line.contains(&b.expect),
            "reloading {}: expected `: {}: ` and `{}` in: {line}",
            b.path.display(),
            b.field,
            b.expect
        );
    }

    // The running configuration still steers.
    let reply = topo
        .client
        .run_in(|| runtime().block_on(get_once(client_addr(0), VIP)))
        .expect("client thread")
        .expect("a request through the VIP after the rejected reloads");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        topo.group_of(reply.backend).is_some(),
        "answered by {}, no backend of the topology",
        reply.backend
    );

    let addr: SocketAddr = METRICS.parse().expect("an address");
    let (status, body) = topo
        .node
        .run_in(|| runtime().block_on(http_get(addr, "/metrics")))
        .expect("node thread")
        .expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(
        body.lines()
            .any(|l| l.trim() == "kanari_config_reload_failures_total 3"),
        "kanari_config_reload_failures_total is not 3:\n{}",
        body.lines()
            .filter(|l| l.contains("reload_failures"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let stopped = agent.stop().expect("kanari stops");
    assert!(stopped.status.success(), "{}", stopped.logs.join("\n"));
}

/// The programs parse Ethernet frames: an interface of another link type
/// (here the loopback, and a raw IP tunnel) is refused by check-config and
/// by run, naming the field, before anything is attached.
#[test]
fn a_non_ethernet_interface_is_refused_naming_it() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 0,
        ..Default::default()
    })
    .expect("topology");
    topo.node
        .ip(&[
            "link",
            "add",
            "ipip0",
            "type",
            "ipip",
            "local",
            "192.168.0.1",
            "remote",
            "192.168.0.2",
        ])
        .ok();
    let kanari = kanari_bin();
    let kanari = kanari.to_str().expect("a UTF-8 path");
    let dir = std::env::temp_dir().join(format!("kanari-corpus-lo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let mut cases = vec![("lo", "is the loopback")];
    if topo.node.exec("ip", &["link", "show", "ipip0"]).is_ok() {
        cases.push(("ipip0", "not Ethernet"));
    }
    eprintln!("refused link types: {cases:?}");
    for (iface, said) in cases {
        let path = dir.join(format!("{iface}.yaml"));
        std::fs::write(
            &path,
            format!(
                "interfaces:\n  - name: {iface}\nservices:\n  - name: web\n    vip: {VIP}\n    stable:\n      backends: [10.2.1.1:8080]\n"
            ),
        )
        .expect("written");
        for args in [vec!["check-config"], vec!["run", "--config"]] {
            let out = output_within(
                topo.node.command(kanari).args(&args).arg(&path),
                Duration::from_secs(30),
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {iface}: {stderr}");
            assert!(
                stderr.contains(": interfaces[0].name: ") && stderr.contains(said),
                "{args:?} {iface}: {stderr}"
            );
        }
    }
    assert!(
        topo.attached_programs().expect("queried").is_empty(),
        "nothing attached"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
