//! Cgroups (v2) a test creates and always removes.
//!
//! Socket-level load balancing attaches BPF programs (`connect4`,
//! `sendmsg4`, ...) to a cgroup: only sockets of processes inside it are
//! steered. A [`TestCgroup`] is a leaf of the unified hierarchy of the test's
//! own (`kanari-test-<tag>`); a test places its clients in it
//! (`kanari-test-client --cgroup`, see [`crate::socket_client`]). Dropping it
//! kills whatever is still inside (only that: the test put it there) and
//! removes the directory. No other cgroup is ever written to.
//!
//! The unified hierarchy is wherever `/proc/self/mountinfo` says the first
//! `cgroup2` file system is mounted: `/sys/fs/cgroup` on a pure v2 host,
//! `/sys/fs/cgroup/unified` on a hybrid one.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// How long a dropped cgroup's processes may take to die.
pub const KILL_DEADLINE: Duration = Duration::from_secs(2);

/// The unified (v2) hierarchy's mount point, from /proc/self/mountinfo
/// (first cgroup2 entry), as the agent finds it.
pub fn unified_root() -> Result<PathBuf> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    kanari::config::unified_root(&text).context(
        "no cgroup2 file system in /proc/self/mountinfo (is the unified hierarchy mounted?)",
    )
}

/// The unified hierarchy mounted again where `ip netns exec` keeps it in
/// sight (it remounts /sys, hiding /sys/fs/cgroup): at
/// `/run/kanari-test-cg-<tag>`, for an agent run in a namespace. Dropping
/// it unmounts it (lazily: a process inside may still hold it).
#[derive(Debug)]
pub struct CgroupMount {
    point: PathBuf,
}

impl CgroupMount {
    pub fn new(tag: &str) -> Result<CgroupMount> {
        let point = PathBuf::from(format!("/run/kanari-test-cg-{tag}"));
        std::fs::create_dir_all(&point).with_context(|| format!("creating {}", point.display()))?;
        let m = CgroupMount { point };
        crate::netns::run(
            std::process::Command::new("mount")
                .args(["-t", "cgroup2", "none"])
                .arg(&m.point),
        )?;
        Ok(m)
    }

    /// `cgroup` as seen through this mount.
    pub fn path_of(&self, cgroup: &TestCgroup) -> Result<PathBuf> {
        let rel = cgroup.path().strip_prefix(unified_root()?)?;
        Ok(self.point.join(rel))
    }
}

impl Drop for CgroupMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.point)
            .status();
        let _ = std::fs::remove_dir(&self.point);
    }
}

/// A cgroup of a test's own under the unified hierarchy (`kanari-test-<tag>`), removed on Drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<unified root>/kanari-test-<tag>`; fails if it exists already
    /// (it would be another test's).
    pub fn new(tag: &str) -> Result<TestCgroup> {
        anyhow::ensure!(
            !tag.is_empty() && !tag.contains('/') && tag != "." && tag != "..",
            "a cgroup tag must be one path component, not {tag:?}"
        );
        let path = unified_root()?.join(format!("kanari-test-{tag}"));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating the cgroup {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// PIDs in it (cgroup.procs).
    pub fn procs(&self) -> Result<Vec<u32>> {
        let file = self.path.join("cgroup.procs");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        text.lines()
            .map(|l| {
                l.trim()
                    .parse()
                    .with_context(|| format!("a PID in {}: {l:?}", file.display()))
            })
            .collect()
    }

    /// Waits until `pid` is in it (a client moves itself in as it starts).
    pub fn wait_for_proc(&self, pid: u32, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.procs()?.contains(&pid) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "process {pid} did not join the cgroup {} within {within:?}",
                    self.path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills what is inside, waits until it is empty, removes it.
    fn remove(&self) -> Result<()> {
        let kill_file = self.path.join("cgroup.kill");
        // Linux 5.14+: one write kills everything inside, with no PID reuse race.
        let kill_all = kill_file.exists();
        let deadline = Instant::now() + KILL_DEADLINE;
        loop {
            let procs = match self.procs() {
                Ok(p) => p,
                // Already gone (removed by hand): nothing to do.
                Err(_) if !self.path.exists() => return Ok(()),
                Err(e) => return Err(e),
            };
            if procs.is_empty() {
                match std::fs::remove_dir(&self.path) {
                    Ok(()) => return Ok(()),
                    // Dying processes may still hold it for a moment.
                    Err(e) if e.kind() == ErrorKind::ResourceBusy && Instant::now() < deadline => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("removing the cgroup {}", self.path.display())
                        });
                    }
                }
            } else if kill_all {
                std::fs::write(&kill_file, "1")
                    .with_context(|| format!("writing {}", kill_file.display()))?;
            } else {
                for pid in &procs {
                    // SAFETY: signalling a process this test placed in its own cgroup.
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the cgroup {} still holds {procs:?} {KILL_DEADLINE:?} after SIGKILL",
                    self.path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// A test cgroup for the socket path, and the hierarchy mounted where an
/// agent under `ip netns exec` sees it (the cgroup is removed first).
#[derive(Debug)]
pub struct SocketLbCgroup {
    pub cgroup: TestCgroup,
    pub mount: CgroupMount,
}

impl SocketLbCgroup {
    pub fn new(tag: &str) -> Result<SocketLbCgroup> {
        Ok(SocketLbCgroup {
            cgroup: TestCgroup::new(tag)?,
            mount: CgroupMount::new(tag)?,
        })
    }

    /// The `socket_lb:` section that puts the socket path on the cgroup.
    pub fn config(&self) -> Result<String> {
        Ok(format!(
            "socket_lb:\n  enabled: true\n  cgroup: {}\n",
            self.mount.path_of(&self.cgroup)?.display()
        ))
    }
}
