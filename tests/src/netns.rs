//! Network namespaces a test creates and always removes.
//!
//! A [`Netns`] is deleted when dropped (with every interface inside it, veth
//! peers included). Names are unique per process and per call, so tests run
//! in parallel and never meet another run's namespaces.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for one test's objects: `k<pid><n>`.
pub fn unique_tag() -> String {
    format!(
        "k{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and fails with its command line and stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip ARGS...`, failing on error.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `<tag>-<role>` with its loopback up.
    pub fn new(tag: &str, role: &str) -> Result<Self> {
        let name = format!("{tag}-{role}");
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(|_| ())
    }

    /// A command that runs inside the namespace (`ip netns exec`, which execs
    /// the program: the child's PID is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside the namespace and fails when it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.command(program).args(args))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a thread that has entered the namespace and waits for it:
    /// sockets `f` opens live in the namespace; the calling thread stays where
    /// it is. `f` may borrow from the caller.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(s, move || -> Result<T> {
                    enter_netns(&path)?;
                    Ok(f())
                })
                .context("spawning a thread")?;
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `f` on a new thread inside the namespace and returns at once.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || -> Result<T> {
                enter_netns(&path)?;
                Ok(f())
            })
            .context("spawning a thread")
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &str) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid fd; setns only affects the calling thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns({path})"));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: removing network namespace {}: {e:#}", self.name);
        }
    }
}

/// A bpf filesystem mounted for one test (the agent pins its data path in
/// it); unmounted when dropped, which frees whatever is still pinned.
#[derive(Debug)]
pub struct BpfFs {
    pub dir: std::path::PathBuf,
}

impl BpfFs {
    pub fn mount(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("kanari-test-{tag}-bpffs"));
        std::fs::create_dir_all(&dir)?;
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid C strings; a bpf filesystem on a directory of ours.
        if unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mounting a bpffs at {}", dir.display()));
        }
        Ok(Self { dir })
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: unmounting our own mount point.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Fails (never skips) when the process cannot create namespaces and load
/// eBPF programs. Outside CI, `KANARI_SKIP_PRIVILEGED=1` skips explicitly.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if !ci && std::env::var("KANARI_SKIP_PRIVILEGED").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED (KANARI_SKIP_PRIVILEGED=1): this test needs root");
        // `cargo xtask test` counts the skipped tests from this log.
        if let Some(log) = std::env::var_os("KANARI_SKIPPED_LOG") {
            use std::io::Write as _;
            let name = std::thread::current().name().unwrap_or("?").to_string();
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = writeln!(f, "{name}");
            }
        }
        return false;
    }
    panic!(
        "this test needs root (network namespaces, eBPF); run `sudo cargo xtask test`, \
         or set KANARI_SKIP_PRIVILEGED=1 outside CI to skip it explicitly"
    );
}
