//! The real `kanari` binary, run in the node namespace as a child process.
//!
//! Its log lines are collected as they come, so a test can wait for "ready"
//! or "config reloaded" with a deadline instead of sleeping. Dropping an
//! [`Agent`] that is still running kills it (by its PID) and removes its
//! configuration directory.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// How long the agent may take to start, reload or stop.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(30);

/// The `kanari` binary under test: `$KANARI_BIN`, else the workspace's debug build.
pub fn kanari_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KANARI_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kanari");
    assert!(
        p.exists(),
        "no kanari binary at {}; build it first (`cargo xtask test` does) or set KANARI_BIN",
        p.display()
    );
    p
}

pub struct Agent {
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<()>>,
    logs: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
    pub config_path: PathBuf,
    /// The agent's control socket (in its own directory, so agents run in parallel).
    pub socket: PathBuf,
}

/// What a stopped agent left: its exit status, logs and last counters.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    pub logs: Vec<String>,
    pub counters: BTreeMap<String, u64>,
}

/// A configuration with `control.socket` and `state.dir` in the agent's own
/// directory (next to `socket`), unless it sets them.
fn with_control_socket(yaml: &str, socket: &Path) -> String {
    let mut out = yaml.to_string();
    if !yaml.lines().any(|l| l.starts_with("control:")) {
        out.push_str(&format!("\ncontrol:\n  socket: {}\n", socket.display()));
    }
    if !yaml.lines().any(|l| l.starts_with("state:")) {
        let dir = socket.parent().expect("a directory").join("state");
        out.push_str(&format!("\nstate:\n  dir: {}\n", dir.display()));
    }
    out
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

impl Agent {
    /// Starts `kanari run --detach-on-exit` in `ns` with `yaml` and waits
    /// until it is ready: when it stops, nothing of it stays attached.
    pub fn start(ns: &Netns, yaml: &str) -> Result<Agent> {
        let agent = Self::spawn(ns, yaml)?;
        agent.wait_for("ready", 1)?;
        Ok(agent)
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_env(ns: &Netns, yaml: &str, env: &[(&str, &Path)]) -> Result<Agent> {
        let agent = Self::spawn_with(ns, yaml, true, env)?;
        agent.wait_for("ready", 1)?;
        Ok(agent)
    }

    /// Starts `kanari run` as in production: when it exits, its pinned data
    /// path keeps steering until the next agent adopts it.
    pub fn start_keeping(ns: &Netns, yaml: &str) -> Result<Agent> {
        Self::start_keeping_env(ns, yaml, &[])
    }

    /// [`Agent::start_keeping`] with extra environment variables.
    pub fn start_keeping_env(ns: &Netns, yaml: &str, env: &[(&str, &Path)]) -> Result<Agent> {
        let agent = Self::spawn_with(ns, yaml, false, env)?;
        agent.wait_for("ready", 1)?;
        Ok(agent)
    }

    /// Starts `kanari run` without waiting.
    pub fn spawn(ns: &Netns, yaml: &str) -> Result<Agent> {
        Self::spawn_with(ns, yaml, true, &[])
    }

    fn spawn_with(
        ns: &Netns,
        yaml: &str,
        detach_on_exit: bool,
        env: &[(&str, &Path)],
    ) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!("kanari-test-{}", ns.name()));
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("kanari.yaml");
        let socket = dir.join("kanari.sock");
        let yaml = with_control_socket(yaml, &socket);
        write_atomically(&config_path, &yaml)?;
        let mut child = ns
            .command(kanari_bin().to_str().context("non-UTF-8 binary path")?)
            .args(["run", "--config"])
            .arg(&config_path)
            .args(detach_on_exit.then_some("--detach-on-exit"))
            .env(
                "KANARI_LOG",
                std::env::var("KANARI_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kanari")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("KANARI_TEST_VERBOSE").is_some() {
                    eprintln!("kanari| {line}");
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        Ok(Agent {
            child: Some(child),
            reader: Some(reader),
            logs,
            dir,
            config_path,
            socket,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    fn count(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until at least `n` log lines contain `needle`; fails early when
    /// the agent exits.
    pub fn wait_for(&self, needle: &str, n: usize) -> Result<()> {
        let deadline = Instant::now() + AGENT_DEADLINE;
        loop {
            if self.count(needle) >= n {
                return Ok(());
            }
            if self.reader.as_ref().is_none_or(|r| r.is_finished()) {
                bail!(
                    "kanari exited before logging {needle:?}; logs:\n{}",
                    self.logs().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kanari did not log {needle:?} {n} time(s) within {AGENT_DEADLINE:?}; logs:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) -> Result<()> {
        let pid = self.pid().context("the agent is not running")?;
        // SAFETY: signalling our own child by its PID.
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling kanari");
        }
        Ok(())
    }

    /// Writes a new configuration, sends SIGHUP, and waits for the reload.
    pub fn reload(&self, yaml: &str) -> Result<()> {
        let before = self.count("config reloaded");
        write_atomically(&self.config_path, &with_control_socket(yaml, &self.socket))?;
        self.signal(libc::SIGHUP)?;
        self.wait_for("config reloaded", before + 1)
    }

    /// Writes a configuration that must be rejected and waits for the rejection.
    pub fn reload_rejected(&self, yaml: &str) -> Result<String> {
        let before = self.count("config reload rejected");
        write_atomically(&self.config_path, &with_control_socket(yaml, &self.socket))?;
        self.signal(libc::SIGHUP)?;
        self.wait_for("config reload rejected", before + 1)?;
        Ok(self
            .logs()
            .into_iter()
            .rfind(|l| l.contains("config reload rejected"))
            .unwrap_or_default())
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(self) -> Result<Stopped> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit()
    }

    /// Waits for the agent to exit (after [`Agent::stop`]'s SIGTERM, or by
    /// itself, e.g. on a rejected configuration) and collects its logs.
    pub fn wait_exit(mut self) -> Result<Stopped> {
        let mut child = self.child.take().context("the agent is not running")?;
        let deadline = Instant::now() + AGENT_DEADLINE;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("kanari did not exit within {AGENT_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The reader thread ends with the pipe: wait for it to reach EOF.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let logs = self.logs();
        Ok(Stopped {
            status,
            counters: parse_counters(&logs),
            logs,
        })
    }
}

/// The counters of the agent's last "data path counters" line.
fn parse_counters(logs: &[String]) -> BTreeMap<String, u64> {
    let Some(line) = logs.iter().rev().find(|l| l.contains("data path counters")) else {
        return BTreeMap::new();
    };
    let Some(start) = line.find("counters=") else {
        return BTreeMap::new();
    };
    let rest = line[start + "counters=".len()..].trim_start_matches('"');
    rest.split(|c: char| c.is_whitespace() || c == '"')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
