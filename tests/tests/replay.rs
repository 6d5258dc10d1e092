//! End to end: `telemetry.record` and `kanari replay`.
//!
//! An agent records a rollout whose canary starts failing half its
//! requests and is rolled back by the critical path; `kanari replay` of the
//! recording under the recorded configuration shows the same rollback, and
//! under a configuration whose critical path tolerates the failure rate,
//! none — the way to tune a limit on yesterday's traffic.
//!
//! It needs root (without it it fails; `KANARI_SKIP_PRIVILEGED=1` skips it
//! explicitly outside CI).

use std::{path::PathBuf, process::Command, time::Duration};

use kanari_tests::{
    agent::{Agent, kanari_bin},
    control::wait_rollout,
    load::Load,
    netns::require_root,
    topology::{Topology, TopologyOptions, VIP},
};

/// A directory removed on every exit path.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn replay(file: &std::path::Path, config: Option<&std::path::Path>) -> String {
    let mut cmd = Command::new(kanari_bin());
    cmd.arg("replay").arg(file);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().expect("kanari replay runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "kanari replay failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn a_recorded_rollback_replays_and_a_looser_critical_path_would_have_kept_the_canary() {
    if !require_root() {
        return;
    }
    let dir = Dir(std::env::temp_dir().join(format!("kanari-replay-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("a directory");
    let file = dir.0.join("telemetry.jsonl");
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let rollout = "    rollout: {steps: [10, 100], interval: 1h, progress_deadline: 2h}\n";
    let yaml = topo.config(0.0, rollout, "tc").replacen(
        "services:\n",
        &format!("telemetry:\n  record: {}\nservices:\n", file.display()),
        1,
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let load = Load::start(&topo.client, VIP, 600.0, 8, 0).expect("load");
    std::thread::sleep(Duration::from_secs(2));
    topo.canary_server().behavior.set_error_rate(0.5);
    wait_rollout(&agent.socket, 15, "rollback", |_, r| {
        r.phase == "rolled_back"
    });
    std::thread::sleep(Duration::from_secs(1));
    load.stop();
    agent.stop().expect("kanari stops");

    let recorded = std::fs::read_to_string(&file).expect("the recording");
    let lines = recorded.lines().count();
    assert!(lines > 10, "{lines} lines recorded");
    eprintln!(
        "recorded {lines} lines, {} bytes ({:.0} bytes a tick)",
        recorded.len(),
        recorded.len() as f64 / lines as f64
    );

    // The recorded configuration decides as the agent did.
    let same = replay(&file, None);
    eprintln!("{same}");
    assert!(same.contains("the recorded"), "{same}");
    assert!(
        same.contains("(recorded) the agent set the canary to 0%"),
        "{same}"
    );
    assert!(same.contains("web: rolled back:"), "{same}");
    assert!(same.contains("end: web: rolled back at 0%"), "{same}");

    // A critical path that only acts on a canary failing everything would
    // have kept it at its step.
    let looser = dir.0.join("looser.yaml");
    std::fs::write(
        &looser,
        topo.config(
            0.0,
            &format!("{rollout}    analysis: {{critical: {{error_rate: 100}}}}\n"),
            "tc",
        ),
    )
    .expect("writing the looser configuration");
    let kept = replay(&file, Some(&looser));
    eprintln!("{kept}");
    assert!(!kept.contains("web: rolled back:"), "{kept}");
    assert!(kept.contains("end: web: progressing at 10%"), "{kept}");
}
