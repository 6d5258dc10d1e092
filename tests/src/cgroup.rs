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

/// The unified (v2) hierarchy's mount point, from /proc/self/mountinfo (first cgroup2 entry).
pub fn unified_root() -> Result<PathBuf> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    text.lines().find_map(cgroup2_mount_point).context(
        "no cgroup2 file system in /proc/self/mountinfo (is the unified hierarchy mounted?)",
    )
}

/// The mount point of a mountinfo line if its file system is cgroup2:
/// `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn cgroup2_mount_point(line: &str) -> Option<PathBuf> {
    let (head, tail) = line.split_once(" - ")?;
    if tail.split(' ').next()? != "cgroup2" {
        return None;
    }
    head.split(' ').nth(4).map(|p| PathBuf::from(unescape(p)))
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let hybrid =
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1 = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_mount_point(v1), None);
        let spaced = r"50 1 0:40 / /mnt/my\040cgroups rw - cgroup2 none rw";
        assert_eq!(
            cgroup2_mount_point(spaced),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }
}
