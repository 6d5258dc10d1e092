//! `kanari-test-client` as a child process, in a namespace and (optionally)
//! a [`TestCgroup`]: the client whose sockets socket-level load balancing
//! steers.
//!
//! The client joins the cgroup and the namespace itself (`--cgroup`,
//! `--netns`) before it opens a socket, then prints one JSON line per request
//! (see its `--help`). Lines are collected as they come, so a test can wait
//! for the first answers of a long `hold` before it changes anything. A
//! [`ClientRun`] dropped while the client runs kills it (by its PID).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{cgroup::TestCgroup, netns::Netns};

/// How long a client may run before [`ClientRun::wait`] gives up on it.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

/// The client binary: `$KANARI_TEST_CLIENT_BIN`, else the one cargo built
/// beside the running test (tests run from `<target>/debug/deps`, and cargo
/// builds a package's binaries for its integration tests), else the
/// workspace's debug build.
pub fn client_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KANARI_TEST_CLIENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    const NAME: &str = "kanari-test-client";
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).take(2).map(|d| d.join(NAME)));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/debug")
            .join(NAME),
    );
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "no {NAME} binary at {candidates:?}; build it (`cargo build -p kanari-tests --bins`, \
             `cargo xtask test` does) or set KANARI_TEST_CLIENT_BIN"
        ),
    }
}

/// Runs kanari-test-client in `ns` inside `cgroup` (or outside when None) with `args`; parsed lines.
pub fn run_client(ns: &Netns, cgroup: Option<&TestCgroup>, args: &[&str]) -> Result<Vec<Value>> {
    spawn_client(ns, cgroup, args)?.wait()
}

/// `kanari-test-client tcp`: `count` HTTP requests to `to`, each on a new
/// connection, `concurrency` at a time, from `ns` (inside `cgroup` unless
/// None); a parsed line per request.
pub fn tcp_requests(
    ns: &Netns,
    cgroup: Option<&TestCgroup>,
    to: SocketAddrV4,
    count: usize,
    concurrency: usize,
) -> Result<Vec<Value>> {
    let (to, count, concurrency) = (to.to_string(), count.to_string(), concurrency.to_string());
    run_client(
        ns,
        cgroup,
        &[
            "tcp",
            "--to",
            &to,
            "--count",
            &count,
            "--concurrency",
            &concurrency,
        ],
    )
}

/// Same as [`run_client`], started in the background; `wait()` returns the lines. Drop kills it by PID.
pub fn spawn_client(ns: &Netns, cgroup: Option<&TestCgroup>, args: &[&str]) -> Result<ClientRun> {
    let bin = client_bin()?;
    let mut cmd = Command::new(&bin);
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(cg.path());
    }
    cmd.args(["--netns", ns.name()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command_line = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {command_line}"))?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().expect("piped stdout");
    let sink = lines.clone();
    let stdout_reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().expect("lines lock").push(line);
        }
    });
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    Ok(ClientRun {
        pid: child.id(),
        child: Some(child),
        command_line,
        lines,
        stdout_reader: Some(stdout_reader),
        stderr_reader: Some(stderr_reader),
    })
}

/// A client running in the background.
pub struct ClientRun {
    pid: u32,
    child: Option<Child>,
    command_line: String,
    lines: Arc<Mutex<Vec<String>>>,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
    stderr_reader: Option<std::thread::JoinHandle<String>>,
}

fn parse(lines: &[String]) -> Result<Vec<Value>> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("a client line: {l:?}")))
        .collect()
}

impl ClientRun {
    /// The client's PID (what its cgroup's `cgroup.procs` lists).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Result<Vec<Value>> {
        parse(&self.lines.lock().expect("lines lock"))
    }

    /// Waits until at least `n` lines are printed; fails when the client
    /// exits first or `within` passes.
    pub fn wait_for_lines(&mut self, n: usize, within: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.lines()?;
            if lines.len() >= n {
                return Ok(lines);
            }
            let child = self.child.as_mut().context("the client was waited for")?;
            if let Some(status) = child.try_wait()? {
                // Its last lines may still be in the pipe: read them.
                std::thread::sleep(Duration::from_millis(50));
                let lines = self.lines()?;
                if lines.len() >= n {
                    return Ok(lines);
                }
                bail!(
                    "{} exited ({status}) after {} of {n} lines",
                    self.command_line,
                    lines.len()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} printed {} of {n} lines within {within:?}",
                    self.command_line,
                    lines.len()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the client to exit (killing it after [`CLIENT_DEADLINE`])
    /// and returns every line; fails when it exited non-zero, with its stderr.
    pub fn wait(mut self) -> Result<Vec<Value>> {
        let mut child = self.child.take().context("the client was waited for")?;
        let deadline = Instant::now() + CLIENT_DEADLINE;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {CLIENT_DEADLINE:?}",
                    self.command_line
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The readers end with the pipes: every line is in once they are joined.
        if let Some(r) = self.stdout_reader.take() {
            let _ = r.join();
        }
        let stderr = self
            .stderr_reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        if !status.success() {
            bail!("{} failed ({status}): {}", self.command_line, stderr.trim());
        }
        self.lines()
    }
}

impl Drop for ClientRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Child::kill is SIGKILL to this child's PID, and nothing else.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
