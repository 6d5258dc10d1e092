//! Processes with deadlines and Drop guards, temporary directories, and CPU
//! accounting from /proc.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A directory removed (with its contents) when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("kanari-bench-datapath-{tag}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a bounded command printed.
#[derive(Debug)]
pub struct Finished {
    pub stdout: String,
}

/// Runs `cmd` to completion within `limit`, killing it (by its PID) if it
/// overruns; fails when it fails or overruns.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Finished> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    match status {
        None => bail!("{what} did not finish within {limit:?} and was killed"),
        Some(s) if !s.success() => bail!(
            "{what} failed ({s}): {} {}",
            tail(&stderr, 2000),
            tail(&stdout, 1000)
        ),
        Some(_) => Ok(Finished { stdout }),
    }
}

/// The last `n` bytes of `s` (on a character boundary).
pub fn tail(s: &str, n: usize) -> &str {
    let s = s.trim();
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A long-running process (a proxy) started in a namespace, its output in a
/// log file. Dropping it stops it: SIGTERM, then SIGKILL after a grace
/// period, to it and to the children it had (NGINX's workers), by PID.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Daemon> {
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails (with its log) when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let name = self.name.clone();
        let child = self.child.as_mut().context("not started")?;
        if let Some(s) = child.try_wait()? {
            bail!("{name} exited ({s}); its log:\n{}", tail(&self.log(), 3000));
        }
        Ok(())
    }

    /// The process and its descendants.
    pub fn pids(&self) -> Vec<u32> {
        let mut all = vec![self.pid()];
        let mut i = 0;
        while i < all.len() && all.len() < 256 {
            all.extend(children(all[i]));
            i += 1;
        }
        all.retain(|&p| p != 0);
        all
    }

    /// CPU time (user + system) of the process and its live descendants, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids()
            .into_iter()
            .filter_map(process_cpu_ticks)
            .sum::<u64>() as f64
            / clk_tck()
    }

    /// SIGTERM, waits up to `grace`, then SIGKILL to whatever is left.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let family: Vec<(u32, String)> = self
            .pids()
            .into_iter()
            .filter(|&p| p != pid)
            .filter_map(|p| Some((p, comm(p)?)))
            .collect();
        if child.try_wait().ok().flatten().is_none() {
            // SAFETY: signalling our own child by its PID.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Children the process had (reparented if it died first): only those
        // still carrying the name they had, so a reused PID is never hit.
        for (p, name) in family {
            if comm(p).as_deref() == Some(name.as_str()) {
                // SAFETY: a process we started (a child of our child), by PID.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of one process, in clock ticks.
fn process_cpu_ticks(pid: u32) -> Option<u64> {
    parse_proc_pid_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime (fields 14 and 15) from a /proc/PID/stat line.
pub fn parse_proc_pid_stat(line: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces: fields count from its ')'.
    let rest = &line[line.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, index 11.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Whole-machine CPU time from /proc/stat: (busy, total), in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    pub busy: f64,
    pub total: f64,
}

impl MachineCpu {
    pub fn now() -> Self {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_proc_stat(&s))
            .map(|(busy, total)| Self {
                busy: busy as f64 / clk_tck(),
                total: total as f64 / clk_tck(),
            })
            .unwrap_or_default()
    }
}

/// (busy, total) ticks from /proc/stat's `cpu` line: busy is user, nice,
/// system, irq, softirq and steal; idle and iowait are not busy.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    let idle = v[3] + v[4];
    let total: u64 = v.iter().sum();
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_excludes_idle_and_iowait() {
        let text = "cpu  100 5 50 1000 20 3 7 2 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_proc_stat(text), Some((167, 1187)));
        assert_eq!(parse_proc_stat("intr 1 2 3"), None);
    }

    #[test]
    fn proc_pid_stat_reads_utime_and_stime_after_the_name() {
        let line = "1234 (nginx: worker (x)) S 1 1234 1234 0 -1 4194624 100 0 0 0 \
                    250 31 0 0 20 0 1 0 12345 1000000 200 18446744073709551615";
        assert_eq!(parse_proc_pid_stat(line), Some(281));
        assert_eq!(parse_proc_pid_stat("garbage"), None);
    }

    #[test]
    fn bounded_commands_are_killed_when_they_overrun() {
        let t = Instant::now();
        let e =
            run_bounded(Command::new("sleep").arg("5"), Duration::from_millis(200)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(format!("{e:#}").contains("killed"), "{e:#}");
        let ok = run_bounded(Command::new("echo").arg("hi"), Duration::from_secs(5)).unwrap();
        assert_eq!(ok.stdout.trim(), "hi");
    }
}
