//! The socket path's attachment (`socket_lb:`): kanari's cgroup v2
//! `sock_addr` programs on one cgroup, as bpf_links.
//!
//! With a pin root each link is pinned as `links/cgroup<ID>_<hook>` (ID:
//! the cgroup's id, its directory's inode), so programs keep steering with
//! the agent gone, and the next agent switches each pinned link to its own
//! program in place (`BPF_LINK_UPDATE`: no connect() in between goes
//! unsteered). Links of another cgroup are removed: the configured cgroup
//! changed.

use std::{
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, links::FdLink},
};
use kanari_common::maps::programs;
use tracing::info;

use crate::pins::Pins;

/// The hooks, with their programs: the steering (`sock_addr`), then the
/// observer (`cgroup_skb`, every packet of a steered socket).
pub const HOOKS: [(&str, &str); 6] = [
    ("connect4", programs::SOCK_CONNECT4),
    ("sendmsg4", programs::SOCK_SENDMSG4),
    ("recvmsg4", programs::SOCK_RECVMSG4),
    ("getpeername4", programs::SOCK_GETPEERNAME4),
    ("egress", programs::SOCK_EGRESS),
    ("ingress", programs::SOCK_INGRESS),
];

/// The cgroup_skb hooks' attach types.
fn skb_type(hook: &str) -> Option<CgroupSkbAttachType> {
    match hook {
        "egress" => Some(CgroupSkbAttachType::Egress),
        "ingress" => Some(CgroupSkbAttachType::Ingress),
        _ => None,
    }
}

/// The socket path's links this agent holds.
pub struct SocketLinks {
    pub cgroup: PathBuf,
    /// Dropping an unpinned link detaches it; a pinned one stays.
    held: Vec<FdLink>,
}

/// The cgroup's id: its directory's inode number on cgroupfs.
fn cgroup_id(cgroup: &Path) -> Result<u64> {
    Ok(std::fs::metadata(cgroup)
        .with_context(|| format!("socket_lb.cgroup: {}", cgroup.display()))?
        .ino())
}

fn pin_name(id: u64, hook: &str) -> String {
    format!("cgroup{id}_{hook}")
}

/// Loads the socket path's programs (the maps are already the packet path's).
pub fn load(ebpf: &mut Ebpf) -> Result<()> {
    for (hook, name) in HOOKS {
        let loaded = if skb_type(hook).is_some() {
            super::program::<CgroupSkb>(ebpf, name)?.load()
        } else {
            super::program::<CgroupSockAddr>(ebpf, name)?.load()
        };
        loaded.with_context(|| format!("the kernel refused program {name}"))?;
    }
    Ok(())
}

/// Attaches (or adopts) the programs on `cgroup`.
pub fn attach(ebpf: &mut Ebpf, pins: Option<&Pins>, cgroup: &Path) -> Result<SocketLinks> {
    let id = cgroup_id(cgroup)?;
    if let Some(p) = pins {
        remove_other_cgroups(p, id)?;
    }
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("socket_lb.cgroup: opening {}", cgroup.display()))?;
    let mut held = Vec::new();
    let mut adopted = false;
    for (hook, name) in HOOKS {
        let pin = pins.map(|p| p.links_dir().join(pin_name(id, hook)));
        if let Some(path) = pin.as_ref().filter(|p| p.exists()) {
            // The pin holds the link: switch it and let go of our handle.
            let link = obj_get(path)?;
            let prog = ebpf
                .program(name)
                .with_context(|| format!("the eBPF object has no program {name}"))?
                .fd()
                .context("the program is loaded")?;
            update_link(link.as_raw_fd(), prog.as_fd().as_raw_fd())
                .with_context(|| format!("switching {} to this agent's program", path.display()))?;
            adopted = true;
            continue;
        }
        // A cgroup bpf_link always runs beside the cgroup's other programs
        // (a CNI's, systemd's), in attach order: the kernel takes no flag
        // for it (`Single` passes none).
        let mode = CgroupAttachMode::Single;
        let attached = || format!("attaching {name} to {}", cgroup.display());
        let not_a_link = |e| anyhow!("{name} on {} is not a bpf_link: {e}", cgroup.display());
        let link: FdLink = match skb_type(hook) {
            Some(t) => {
                let p: &mut CgroupSkb = super::program(ebpf, name)?;
                let link_id = p.attach(&dir, t, mode).with_context(attached)?;
                p.take_link(link_id)?.try_into().map_err(not_a_link)?
            }
            None => {
                let p: &mut CgroupSockAddr = super::program(ebpf, name)?;
                let link_id = p.attach(&dir, mode).with_context(attached)?;
                p.take_link(link_id)?.try_into().map_err(not_a_link)?
            }
        };
        match pin {
            // The pin holds it from now on.
            Some(path) => drop(
                link.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?,
            ),
            None => held.push(link),
        }
    }
    if adopted {
        info!(cgroup = %cgroup.display(), "adopted the pinned socket path; programs replaced in place");
    } else {
        info!(cgroup = %cgroup.display(), "socket path attached: connect() to a VIP goes to a backend");
    }
    Ok(SocketLinks {
        cgroup: cgroup.to_path_buf(),
        held,
    })
}

/// Detaches the socket path (and unpins it).
pub fn detach(links: SocketLinks, pins: Option<&Pins>) -> Result<()> {
    if let Some(p) = pins {
        let id = cgroup_id(&links.cgroup).ok();
        for (hook, _) in HOOKS {
            if let Some(id) = id {
                let path = p.links_dir().join(pin_name(id, hook));
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(e).with_context(|| format!("unpinning {}", path.display()));
                }
            }
        }
    }
    drop(links.held);
    Ok(())
}

/// Removes the socket path's pins of cgroups other than `keep`.
fn remove_other_cgroups(p: &Pins, keep: u64) -> Result<()> {
    let Ok(dir) = std::fs::read_dir(p.links_dir()) else {
        return Ok(());
    };
    let ours = format!("cgroup{keep}_");
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("cgroup") && !name.starts_with(&ours) && name.contains('_') {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("unpinning {}", entry.path().display()))?;
            info!(pin = %entry.path().display(), "removed the socket path of another cgroup");
        }
    }
    Ok(())
}

/// `BPF_OBJ_GET`: a handle on the pinned object at `path`.
fn obj_get(path: &Path) -> Result<std::os::fd::OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        /// The kernel refuses non-zero bytes past the last field.
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))?;
    let attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: bpf(2) reads the attribute and the NUL-terminated path it
    // points to, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            size_of::<ObjGet>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening the pin {}", path.display()));
    }
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: the link runs `prog` from now on (aya keeps its own
/// wrapper crate-private).
fn update_link(fd: i32, prog: i32) -> Result<()> {
    /// `union bpf_attr`'s `link_update` member.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr = LinkUpdate {
        link_fd: fd as u32,
        new_prog_fd: prog as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of a properly laid out attribute.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdate,
            size_of::<LinkUpdate>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("bpf(BPF_LINK_UPDATE)");
    }
    Ok(())
}
