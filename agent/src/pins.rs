//! Every path kanari pins under the bpffs, in one place, and the bpffs itself.
//!
//! ```text
//! <root>/maps/KN_SERVICES_V1 ...   every map, by its (versioned) name
//! <root>/links/<iface>_xdp         the XDP link of an interface
//! <root>/links/<iface>_tc_ingress  its TC ingress link (tcx)
//! <root>/links/<iface>_tc_egress   its TC egress link (tcx)
//! ```
//!
//! A bpffs refuses names with a dot (EPERM: dots are reserved for the
//! kernel's own files), so an interface name's `.` (e.g. `eth0.100`) and `%`
//! are percent-encoded.
//!
//! Pinned links keep the programs attached and pinned maps keep the
//! conntrack, weights and counters while no agent runs: an agent that exits
//! (SIGTERM, or SIGKILL) leaves the data path steering with the last
//! weights, and the next one adopts it. `kanari uninstall` (or `run
//! --detach-on-exit`) removes the pins, which detaches and frees everything.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// The default directory kanari's pinned links and maps live in.
pub const PIN_ROOT: &str = "/sys/fs/bpf/kanari";
/// Where the bpf filesystem is usually mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `statfs.f_type` of a bpf filesystem.
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

/// The pin paths under one root.
#[derive(Clone, Debug)]
pub struct Pins {
    pub root: PathBuf,
}

/// The hooks a link attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Hook {
    fn suffix(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcIngress => "tc_ingress",
            Hook::TcEgress => "tc_egress",
        }
    }
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link(&self, interface: &str, hook: Hook) -> PathBuf {
        let name = interface.replace('%', "%25").replace('.', "%2E");
        self.links_dir().join(format!("{name}_{}", hook.suffix()))
    }

    /// Makes sure the root lies on a bpf filesystem and its directories
    /// exist. Mounts one at `/sys/fs/bpf` when the root is under it and none
    /// is mounted there. Returns a warning to log when that mount will not
    /// outlive this process (a private mount namespace, as `ip netns exec`
    /// makes).
    pub fn prepare(&self) -> Result<Option<String>> {
        let mut warning = None;
        if !on_bpffs(&self.root) {
            let bpffs = Path::new(BPFFS);
            if !self.root.starts_with(bpffs) || on_bpffs(bpffs) {
                bail!(
                    "{} is not on a bpf filesystem; mount one (`mount -t bpf bpf {}`) or set bpf.pin_dir to a directory under one",
                    self.root.display(),
                    self.root.parent().unwrap_or(&self.root).display()
                );
            }
            mount_bpffs(bpffs)?;
            if private_mount_namespace() {
                warning = Some(format!(
                    "mounted a bpf filesystem at {BPFFS} in this process's own mount namespace: the pinned data path ends with this agent; \
                     to keep it across restarts, mount one in the host's namespace first: mount -t bpf bpf {BPFFS}"
                ));
            }
        }
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(warning)
    }

    /// Whether a previous agent left maps here.
    pub fn has_maps(&self) -> bool {
        std::fs::read_dir(self.maps_dir()).is_ok_and(|mut d| d.next().is_some())
    }

    /// Removes the pinned maps not named in `current`: maps of a layout this
    /// agent no longer uses (a name's version suffix changed). Programs still
    /// attached keep such a map alive until their links are switched to this
    /// agent's programs. Returns what was removed.
    pub fn remove_other_maps(&self, current: &[&str]) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.maps_dir()) else {
            return Ok(removed);
        };
        for e in entries {
            let path = e?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| !current.contains(&n.as_str())) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Removes every pin: links first (the programs detach), then maps (they
    /// are freed once no program uses them). Returns what was removed.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for dir in [self.links_dir(), self.maps_dir()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let path = e?.path();
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                removed.push(path);
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(&self.root);
        Ok(removed)
    }
}

fn statfs_type(path: &Path) -> Option<libc::c_long> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs buffer.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as libc::c_long)
}

/// Whether `path`, or the nearest existing directory above it, is on a bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    let mut p = Some(path);
    while let Some(dir) = p {
        if dir.exists() {
            return statfs_type(dir) == Some(BPF_FS_MAGIC);
        }
        p = dir.parent();
    }
    false
}

fn mount_bpffs(at: &Path) -> Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid C strings; a plain bpf filesystem mount.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!("mounting a bpf filesystem at {} (needs CAP_SYS_ADMIN; or mount it yourself: mount -t bpf bpf {})", at.display(), at.display())
        });
    }
    tracing::info!(at = %at.display(), "mounted a bpf filesystem");
    Ok(())
}

fn private_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upgrade that changed a map's layout (its name's version) leaves
    /// no pin of the old one behind; the current maps stay.
    #[test]
    fn pins_of_other_map_layouts_are_removed() {
        let root = std::env::temp_dir().join(format!("kanari-pins-{}", std::process::id()));
        let p = Pins::new(&root);
        std::fs::create_dir_all(p.maps_dir()).unwrap();
        for name in ["KN_STATS_V1", "KN_STATS_V2", "KN_CT_V1"] {
            std::fs::write(p.map(name), b"").unwrap();
        }
        let removed = p.remove_other_maps(&["KN_STATS_V2", "KN_CT_V1"]).unwrap();
        assert_eq!(removed, vec![p.map("KN_STATS_V1")]);
        assert!(p.map("KN_STATS_V2").exists() && p.map("KN_CT_V1").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn paths() {
        let p = Pins::new("/sys/fs/bpf/kanari");
        assert_eq!(
            p.map("KN_CT_V1"),
            PathBuf::from("/sys/fs/bpf/kanari/maps/KN_CT_V1")
        );
        assert_eq!(
            p.link("eth0", Hook::TcEgress),
            PathBuf::from("/sys/fs/bpf/kanari/links/eth0_tc_egress")
        );
        assert_eq!(
            p.link("eth0.100", Hook::Xdp),
            PathBuf::from("/sys/fs/bpf/kanari/links/eth0%2E100_xdp")
        );
        assert!(
            !p.link("a.b%c", Hook::Xdp)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .contains('.')
        );
    }

    #[test]
    fn tmp_is_not_a_bpffs() {
        assert!(!on_bpffs(&std::env::temp_dir().join("kanari-not-there/x")));
    }
}
