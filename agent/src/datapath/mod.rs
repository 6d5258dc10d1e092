//! The kernel side, seen from the agent: loads the eBPF object, attaches its
//! programs to interfaces, applies [`MapOp`]s to the maps and reads them.
//!
//! With a pin root ([`crate::pins`]) every map and link is pinned: the data
//! path outlives the agent, and a starting agent adopts it — the maps are
//! reused as they are, and each pinned link is switched to the newly loaded
//! program in one atomic update, so no packet meets a detached interface.
//! Without one (tests of the object alone), dropping the [`Datapath`]
//! detaches and frees everything.

use std::{collections::BTreeMap, mem::size_of, net::SocketAddrV4};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use kanari_common::{
    maps::{
        BACKEND_SET_SLOTS, BackendSet, BackendStats, Bucket, Counter, CounterKey, CtEntry, FlowKey,
        Group, Segment, SegmentKey, Service, ServiceKey, Settings, names, programs,
    },
    wire,
};
use tracing::{info, warn};

pub mod socket;

use crate::{
    config::{AttachMode, Cidr, Config, ConntrackTimeouts, Interface},
    pins::{Hook, Pins},
    plan::{Applied, AppliedService, MapOp},
};

/// The eBPF object, built by `build.rs` from `bpf/ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kanari"));

/// Every map, with the key and value sizes this build expects of it.
const MAPS: [(&str, usize, usize); 11] = [
    (
        names::SERVICES,
        size_of::<ServiceKey>(),
        size_of::<Service>(),
    ),
    (names::BACKENDS, size_of::<u32>(), size_of::<BackendSet>()),
    (names::CONNTRACK, size_of::<FlowKey>(), size_of::<CtEntry>()),
    // An LPM trie's key has its 4-byte prefix length in front.
    (
        names::SEGMENTS,
        4 + size_of::<SegmentKey>(),
        size_of::<Segment>(),
    ),
    (names::COUNTERS, size_of::<CounterKey>(), size_of::<u64>()),
    (
        names::IF_COUNTERS,
        size_of::<u32>(),
        size_of::<kanari_common::maps::IfCounters>(),
    ),
    (names::STATS, size_of::<u32>(), size_of::<BackendStats>()),
    (
        names::SOCK_STATS,
        size_of::<u32>(),
        size_of::<BackendStats>(),
    ),
    (names::SETTINGS, size_of::<u32>(), size_of::<Settings>()),
    (names::GUARD, size_of::<u32>(), size_of::<Bucket>()),
    (
        names::SOCKETS,
        size_of::<u64>(),
        size_of::<kanari_common::maps::SockEntry>(),
    ),
];

/// How the ingress path ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// XDP in the driver, with TC ingress beside it for packets whose
    /// checksum state only the skb knows.
    Xdp,
    /// TC ingress only.
    Tc,
}

impl Attached {
    pub fn name(self) -> &'static str {
        match self {
            Attached::Xdp => "xdp",
            Attached::Tc => "tc",
        }
    }
}

/// A link this agent holds. Dropping an unpinned one detaches it; dropping
/// a pinned one only closes this process's handle.
enum Held {
    Xdp(XdpLink),
    Tc(SchedClassifierLink),
    Pinned(FdLink),
}

struct Links {
    mode: AttachMode,
    attached: Attached,
    held: Vec<(Hook, Held)>,
}

/// Where the maps come from and how big the new ones are.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub conntrack_connections: u32,
    pub max_backends: u32,
    /// Pin everything here and adopt what is pinned; `None`: nothing outlives the process.
    pub pins: Option<Pins>,
    /// Load the socket path's programs too (`socket_lb:`).
    pub socket_lb: bool,
}

pub struct Datapath {
    ebpf: Ebpf,
    links: BTreeMap<String, Links>,
    /// The socket path's attachment (`socket_lb:`).
    socket: Option<socket::SocketLinks>,
    /// The socket path's programs are loaded (its statistics are read).
    socket_lb: bool,
    pins: Option<Pins>,
    /// The maps were pinned by an earlier agent and are reused.
    pub adopted: bool,
    /// The sizes the maps have: those asked for (a pinned map of another
    /// size is made anew, its contents carried over).
    pub sizes: Sizes,
}

/// The resource sizes of the loaded maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Connections the conntrack table holds (two entries each).
    pub conntrack_connections: u32,
    /// Backends with statistics.
    pub max_backends: u32,
}

/// The contents of a pinned map whose size the configuration changed: read
/// before its pin goes (the loader then makes the map anew, at the size
/// configured) and written into the new map after. A pinned map cannot be
/// resized in place.
enum Carried {
    Conntrack(Vec<(FlowKey, CtEntry)>),
    Stats(
        &'static str,
        Vec<(u32, aya::maps::PerCpuValues<BackendStats>)>,
    ),
}

impl Carried {
    /// Reads the pinned map `name` at `path` and removes its pin.
    fn take(name: &'static str, path: &std::path::Path) -> Result<Carried> {
        let data = MapData::from_pin(path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let carried = if name == names::CONNTRACK {
            let m: HashMap<MapData, FlowKey, CtEntry> =
                HashMap::try_from(aya::maps::Map::LruHashMap(data))
                    .with_context(|| format!("{} is not a hash map", path.display()))?;
            Carried::Conntrack(m.iter().filter_map(Result::ok).collect())
        } else {
            let m: PerCpuArray<MapData, BackendStats> =
                PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
                    .with_context(|| format!("{} is not a per-CPU array", path.display()))?;
            let values = (0..m.len())
                .filter_map(|i| Some((i, m.get(&i, 0).ok()?)))
                .collect();
            Carried::Stats(name, values)
        };
        std::fs::remove_file(path)
            .with_context(|| format!("removing the pin {} to make it anew", path.display()))?;
        Ok(carried)
    }

    /// Writes what was carried into the new map; how many entries went in.
    fn put(self, ebpf: &mut Ebpf) -> Result<usize> {
        match self {
            Carried::Conntrack(entries) => {
                let mut m: HashMap<&mut MapData, FlowKey, CtEntry> =
                    map_mut(ebpf, names::CONNTRACK)?;
                Ok(entries
                    .into_iter()
                    .filter(|(k, v)| m.insert(k, v, 0).is_ok())
                    .count())
            }
            Carried::Stats(name, values) => {
                let mut m: PerCpuArray<&mut MapData, BackendStats> = map_mut(ebpf, name)?;
                let len = m.len();
                let mut n = 0;
                for (i, v) in values.into_iter().filter(|(i, _)| *i < len) {
                    if m.set(i, v, 0).is_ok() {
                        n += 1;
                    }
                }
                Ok(n)
            }
        }
    }
}

impl Datapath {
    /// Loads the maps (reusing pinned ones) and programs into the kernel;
    /// nothing is attached yet.
    pub fn load(opts: LoadOptions) -> Result<Self> {
        // Another build of the data path, for staged upgrades and their tests.
        let external = match std::env::var_os("KANARI_EBPF_OBJECT") {
            Some(path) => {
                let bytes = std::fs::read(&path).with_context(|| {
                    format!("reading KANARI_EBPF_OBJECT={}", path.to_string_lossy())
                })?;
                info!(object = %path.to_string_lossy(), "loading the eBPF object named by KANARI_EBPF_OBJECT");
                Some(bytes)
            }
            None => None,
        };
        let object: &[u8] = external.as_deref().unwrap_or(OBJECT);
        if object.is_empty() {
            bail!(
                "this kanari binary carries no eBPF object (it was built with AYA_BUILD_SKIP=1); \
                 rebuild it with `cargo xtask build`"
            );
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(
                names::CONNTRACK,
                opts.conntrack_connections.saturating_mul(2),
            )
            .map_max_entries(names::STATS, opts.max_backends);
        let mut adopted = false;
        let sizes = Sizes {
            conntrack_connections: opts.conntrack_connections,
            max_backends: opts.max_backends,
        };
        let mut carried = Vec::new();
        let paths: Vec<(&str, std::path::PathBuf)> = match &opts.pins {
            Some(p) => {
                if let Some(w) = p.prepare()? {
                    warn!("{w}");
                }
                adopted = p.has_maps();
                let mut entries = BTreeMap::new();
                for (name, key, value) in MAPS {
                    if let Some(n) = check_layout(&p.map(name), name, key, value)? {
                        entries.insert(name, n);
                    }
                }
                // A pinned map of another size than configured is made anew
                // at the configured size, its contents carried over.
                for (name, want, field) in [
                    (
                        names::CONNTRACK,
                        opts.conntrack_connections.saturating_mul(2),
                        "conntrack.connections",
                    ),
                    (names::STATS, opts.max_backends, "limits.backends"),
                    (names::SOCK_STATS, opts.max_backends, "limits.backends"),
                ] {
                    let Some(&pinned) = entries.get(name).filter(|n| **n != want) else {
                        continue;
                    };
                    carried.push(Carried::take(name, &p.map(name))?);
                    info!(
                        map = name,
                        field,
                        from = pinned,
                        to = want,
                        "resizing a pinned map to the configured size: its contents are carried over"
                    );
                }
                MAPS.iter().map(|(n, _, _)| (*n, p.map(n))).collect()
            }
            None => Vec::new(),
        };
        // The socket path's statistics take the ids the adopted ones do.
        loader.map_max_entries(names::SOCK_STATS, sizes.max_backends);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(object)
            .context("loading the eBPF maps and programs into the kernel")?;
        program::<Xdp>(&mut ebpf, programs::XDP_INGRESS)?
            .load()
            .with_context(|| format!("the kernel refused program {}", programs::XDP_INGRESS))?;
        for name in [programs::TC_INGRESS, programs::TC_EGRESS] {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        if opts.socket_lb {
            socket::load(&mut ebpf)?;
        }
        if adopted {
            info!(
                "adopting the pinned maps of a previous agent: conntrack, weights and counters carry on"
            );
        }
        for c in carried {
            let n = c.put(&mut ebpf)?;
            info!(entries = n, "carried over into the resized map");
        }
        if let Some(p) = &opts.pins {
            match carry_over_conntrack(&mut ebpf, p) {
                Ok(0) => {}
                Ok(n) => info!(
                    entries = n,
                    "carried the conntrack entries of the previous version's table over: its connections stay on their backends"
                ),
                Err(e) => warn!(
                    "the previous version's conntrack entries were not carried over ({e:#}): its connections find their backends by hash"
                ),
            }
            let current: Vec<&str> = MAPS.iter().map(|(n, _, _)| *n).collect();
            for path in p.remove_other_maps(&current)? {
                info!(pin = %path.display(), "removed the pin of a map layout this version no longer uses");
            }
        }
        Ok(Self {
            ebpf,
            links: BTreeMap::new(),
            socket: None,
            socket_lb: opts.socket_lb,
            pins: opts.pins,
            adopted,
            sizes,
        })
    }

    /// The loaded object, for tests that run its programs with `BPF_PROG_TEST_RUN`.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Interfaces with programs attached, and how.
    pub fn attached(&self) -> impl Iterator<Item = (&str, Attached)> {
        self.links.iter().map(|(n, l)| (n.as_str(), l.attached))
    }

    /// Makes the attached interfaces exactly `wanted`: attaches (or adopts)
    /// new ones, re-attaches those whose mode changed, detaches the rest.
    /// Returns how each new attachment was made.
    pub fn attach_all(&mut self, wanted: &[Interface]) -> Result<Vec<(String, Attached)>> {
        let stale: Vec<String> = self
            .links
            .iter()
            .filter(|(name, l)| !wanted.iter().any(|w| &w.name == *name && w.mode == l.mode))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.detach(&name)?;
        }
        let mut made = Vec::new();
        for it in wanted {
            if !self.links.contains_key(&it.name) {
                let attached = self.attach(it)?;
                made.push((it.name.clone(), attached));
            }
        }
        Ok(made)
    }

    /// Switches a pinned link to this agent's program, atomically.
    fn adopt(&mut self, path: &std::path::Path, hook: Hook) -> Result<Held> {
        let fd: FdLink = PinnedLink::from_pin(path)
            .with_context(|| format!("opening {}", path.display()))?
            .into();
        let fd = match hook {
            Hook::Xdp => {
                let p: &mut Xdp = program(&mut self.ebpf, programs::XDP_INGRESS)?;
                let id = p.attach_to_link(XdpLink::try_from(fd)?)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            Hook::TcIngress | Hook::TcEgress => {
                let name = if hook == Hook::TcIngress {
                    programs::TC_INGRESS
                } else {
                    programs::TC_EGRESS
                };
                let p: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                let id = p.attach_to_link(SchedClassifierLink::try_from(fd)?)?;
                FdLink::try_from(p.take_link(id)?)?
            }
        };
        Ok(Held::Pinned(fd))
    }

    /// Pins a fresh link when there is a pin root.
    fn keep(&self, interface: &str, hook: Hook, held: Held) -> Result<Held> {
        let Some(pins) = &self.pins else {
            return Ok(held);
        };
        let path = pins.link(interface, hook);
        let fd = match held {
            Held::Xdp(l) => FdLink::try_from(l).map_err(|e| {
                anyhow!("XDP on {interface} is not a bpf_link, it cannot be pinned: {e}")
            })?,
            Held::Tc(l) => FdLink::try_from(l).map_err(|e| {
                anyhow!("TC on {interface} is not a bpf_link, it cannot be pinned: {e}")
            })?,
            Held::Pinned(l) => l,
        };
        let pinned = fd
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok(Held::Pinned(pinned.into()))
    }

    fn attach(&mut self, it: &Interface) -> Result<Attached> {
        let name = it.name.as_str();
        // Adopt what a previous agent pinned for this interface, if it is
        // complete and in the mode asked for; otherwise start clean.
        if let Some(pins) = self.pins.clone() {
            let exists = |h| pins.link(name, h).exists();
            let has_xdp = exists(Hook::Xdp);
            let complete = exists(Hook::TcIngress) && exists(Hook::TcEgress);
            let mode_fits = match it.mode {
                AttachMode::Tc => !has_xdp,
                AttachMode::Xdp => has_xdp,
                AttachMode::Auto => true,
            };
            if complete && mode_fits {
                let mut held = Vec::new();
                for hook in [Hook::TcIngress, Hook::TcEgress, Hook::Xdp] {
                    if hook == Hook::Xdp && !has_xdp {
                        continue;
                    }
                    held.push((hook, self.adopt(&pins.link(name, hook), hook)?));
                }
                let attached = if has_xdp { Attached::Xdp } else { Attached::Tc };
                info!(
                    interface = name,
                    mode = attached.name(),
                    "adopted the pinned attachment; programs replaced in place"
                );
                self.links.insert(
                    it.name.clone(),
                    Links {
                        mode: it.mode,
                        attached,
                        held,
                    },
                );
                return Ok(attached);
            }
            for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
                let _ = std::fs::remove_file(pins.link(name, hook));
            }
        }
        if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            // Before tcx, TC programs hang off a clsact qdisc.
            if let Err(e) = tc::qdisc_add_clsact(name)
                && !matches!(&e, tc::TcError::IoError(io) if io.kind() == std::io::ErrorKind::AlreadyExists)
            {
                return Err(e).with_context(|| format!("adding the clsact qdisc to {name}"));
            }
        }
        let mut held = Vec::new();
        for (hook, prog, t) in [
            (Hook::TcIngress, programs::TC_INGRESS, TcAttachType::Ingress),
            (Hook::TcEgress, programs::TC_EGRESS, TcAttachType::Egress),
        ] {
            let p: &mut SchedClassifier = program(&mut self.ebpf, prog)?;
            let id = p
                .attach(name, t)
                .with_context(|| format!("attaching {prog} to {name}"))?;
            let link = Held::Tc(p.take_link(id)?);
            held.push((hook, self.keep(name, hook, link)?));
        }
        if it.mode != AttachMode::Tc {
            let p: &mut Xdp = program(&mut self.ebpf, programs::XDP_INGRESS)?;
            match p.attach(name, XdpMode::Driver) {
                Ok(id) => {
                    let link = Held::Xdp(p.take_link(id)?);
                    held.push((Hook::Xdp, self.keep(name, Hook::Xdp, link)?));
                }
                Err(e) if it.mode == AttachMode::Auto => {
                    info!(interface = name, error = %e, "no native XDP here; steering in TC");
                }
                Err(e) => {
                    self.links.insert(
                        it.name.clone(),
                        Links {
                            mode: it.mode,
                            attached: Attached::Tc,
                            held,
                        },
                    );
                    let _ = self.detach(name);
                    return Err(anyhow!(e)).with_context(|| {
                        format!("attaching XDP in driver mode to {name} (mode: xdp); use `mode: tc` or `mode: auto` where the driver has no XDP")
                    });
                }
            }
        }
        let attached = if held.iter().any(|(h, _)| *h == Hook::Xdp) {
            Attached::Xdp
        } else {
            Attached::Tc
        };
        self.links.insert(
            it.name.clone(),
            Links {
                mode: it.mode,
                attached,
                held,
            },
        );
        Ok(attached)
    }

    /// Detaches kanari's programs from one interface (and unpins them).
    pub fn detach(&mut self, name: &str) -> Result<()> {
        let Some(l) = self.links.remove(name) else {
            return Ok(());
        };
        for (hook, held) in l.held {
            if let Some(pins) = &self.pins {
                let path = pins.link(name, hook);
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(e).with_context(|| format!("unpinning {}", path.display()));
                }
            }
            // The last reference goes: the link detaches.
            drop(held);
        }
        Ok(())
    }

    /// Attaches the socket path to `cgroup` (adopting a pinned one there),
    /// or detaches it (`None`).
    pub fn attach_socket(&mut self, cgroup: Option<&std::path::Path>) -> Result<()> {
        if self.socket.as_ref().map(|s| s.cgroup.as_path()) == cgroup {
            return Ok(());
        }
        if let Some(old) = self.socket.take() {
            socket::detach(old, self.pins.as_ref())?;
        }
        if let Some(c) = cgroup {
            self.socket = Some(socket::attach(&mut self.ebpf, self.pins.as_ref(), c)?);
        }
        Ok(())
    }

    /// The cgroup the socket path is attached to.
    pub fn socket_cgroup(&self) -> Option<&std::path::Path> {
        self.socket.as_ref().map(|s| s.cgroup.as_path())
    }

    /// Detaches every interface and removes every pin: nothing of kanari is
    /// left in the kernel once this agent's handles close.
    pub fn uninstall(&mut self) -> Result<()> {
        let names: Vec<String> = self.links.keys().cloned().collect();
        for n in names {
            self.detach(&n)?;
        }
        self.attach_socket(None)?;
        if let Some(pins) = &self.pins {
            pins.remove_all()?;
        }
        Ok(())
    }

    /// What the maps hold, as a plan would have left it: how an agent adopting
    /// a pinned data path learns the ids, slots and segments in force. Names
    /// come from `config` (by VIP); a service no longer configured keeps its
    /// VIP as name until the plan removes it.
    pub fn read_applied(&self, config: &Config) -> Result<Applied> {
        let services: HashMap<&MapData, ServiceKey, Service> = map(&self.ebpf, names::SERVICES)?;
        let sets: Array<&MapData, BackendSet> = map(&self.ebpf, names::BACKENDS)?;
        let segments: LpmTrie<&MapData, SegmentKey, Segment> = map(&self.ebpf, names::SEGMENTS)?;
        let mut by_id: BTreeMap<u32, BTreeMap<Cidr, Group>> = BTreeMap::new();
        for r in segments.iter() {
            let (k, v) = r.context("reading segments")?;
            let data = k.data();
            let prefix_len = k.prefix_len().saturating_sub(SegmentKey::SERVICE_BITS) as u8;
            let cidr = Cidr {
                addr: wire::ipv4(data.addr),
                prefix_len,
            };
            let group = if v.group == Group::Canary as u32 {
                Group::Canary
            } else {
                Group::Stable
            };
            by_id
                .entry(u32::from_be(data.service_id_be))
                .or_default()
                .insert(cidr, group);
        }
        let mut applied = Applied::default();
        for r in services.iter() {
            let (key, value) = r.context("reading services")?;
            let vip = SocketAddrV4::new(wire::ipv4(key.addr), wire::host_port(key.port));
            let name = config
                .services
                .iter()
                .find(|s| s.vip == vip)
                .map_or_else(|| vip.to_string(), |s| s.name.clone());
            let mut backends: [Vec<(SocketAddrV4, u32)>; 2] = [Vec::new(), Vec::new()];
            let mut generation = [0u32; 2];
            for g in [Group::Stable, Group::Canary] {
                let slot = value.backend_sets[g as usize];
                if slot >= BACKEND_SET_SLOTS {
                    bail!("service {vip} points at backend slot {slot}, beyond the table");
                }
                generation[g as usize] = slot & 1;
                let set = sets
                    .get(&slot, 0)
                    .with_context(|| format!("reading backend slot {slot}"))?;
                for b in set.backends.iter().take(set.len as usize) {
                    backends[g as usize].push((
                        SocketAddrV4::new(wire::ipv4(b.addr), wire::host_port(b.port)),
                        b.id,
                    ));
                }
            }
            let segments = by_id.remove(&value.id).unwrap_or_default();
            applied.services.insert(
                vip,
                AppliedService {
                    name,
                    key,
                    value,
                    backends,
                    generation,
                    segments,
                    // Not configured: draining until none of its entries is left.
                    draining: !config.services.iter().any(|s| s.vip == vip),
                },
            );
        }
        Ok(applied)
    }

    /// Sets the new-connection rate guard: `per_second` over the node (0: no
    /// limit), split evenly over the CPUs online, each allowed a second's
    /// burst. (Not over the possible CPUs, which size the per-CPU maps: a
    /// host may count 64 possible with 8 online, and would admit an eighth.)
    pub fn set_guard(&mut self, per_second: u32) -> Result<()> {
        let cpus = online_cpus()?;
        let per_cpu = (per_second as u64).div_ceil(cpus);
        let mut m: Array<&mut MapData, Settings> = map_mut(&mut self.ebpf, names::SETTINGS)?;
        m.set(
            0,
            Settings {
                new_per_sec_per_cpu: per_cpu,
                burst: per_cpu,
            },
            0,
        )
        .context("writing the guard settings")?;
        Ok(())
    }

    /// Applies map writes in order; stops at the first that fails.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<()> {
        #[cfg(feature = "fault-injection")]
        if !ops.is_empty() {
            crate::faults::map_write()?;
        }
        for op in ops {
            match op {
                MapOp::WriteBackendSet { slot, set } => {
                    let mut m: Array<&mut MapData, BackendSet> =
                        map_mut(&mut self.ebpf, names::BACKENDS)?;
                    m.set(*slot, set.as_ref(), 0)
                        .with_context(|| format!("writing backend set slot {slot}"))?;
                }
                MapOp::WriteService { key, value } => {
                    let mut m: HashMap<&mut MapData, ServiceKey, Service> =
                        map_mut(&mut self.ebpf, names::SERVICES)?;
                    m.insert(key, value, 0).context("writing a service")?;
                }
                MapOp::DeleteService { key } => {
                    let mut m: HashMap<&mut MapData, ServiceKey, Service> =
                        map_mut(&mut self.ebpf, names::SERVICES)?;
                    m.remove(key).context("removing a service")?;
                }
                MapOp::WriteSegment {
                    key,
                    prefix_len,
                    group,
                } => {
                    let mut m: LpmTrie<&mut MapData, SegmentKey, Segment> =
                        map_mut(&mut self.ebpf, names::SEGMENTS)?;
                    m.insert(
                        &Key::new(*prefix_len, *key),
                        Segment {
                            group: *group as u32,
                        },
                        0,
                    )
                    .context("writing a segment")?;
                }
                MapOp::DeleteSegment { key, prefix_len } => {
                    let mut m: LpmTrie<&mut MapData, SegmentKey, Segment> =
                        map_mut(&mut self.ebpf, names::SEGMENTS)?;
                    m.remove(&Key::new(*prefix_len, *key))
                        .context("removing a segment")?;
                }
            }
        }
        Ok(())
    }

    /// The value the services map holds for `key`, if any.
    pub fn service(&self, key: &ServiceKey) -> Result<Option<Service>> {
        let m: HashMap<&MapData, ServiceKey, Service> = map(&self.ebpf, names::SERVICES)?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading a service"),
        }
    }

    /// The data-path counters by interface index, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(u32, Counter, u64)>> {
        use kanari_common::maps::{IF_COUNTER_SLOTS, IfCounters};
        let mut totals: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        let m: PerCpuHashMap<&MapData, CounterKey, u64> = map(&self.ebpf, names::COUNTERS)?;
        for r in m.iter() {
            let (k, per_cpu) = r.context("reading the data path counters")?;
            *totals.entry((k.ifindex, k.counter)).or_default() += per_cpu.iter().sum::<u64>();
        }
        let slots: PerCpuArray<&MapData, IfCounters> = map(&self.ebpf, names::IF_COUNTERS)?;
        for ifindex in 0..IF_COUNTER_SLOTS {
            let per_cpu = slots
                .get(&ifindex, 0)
                .context("reading the data path counters")?;
            for c in 0..Counter::COUNT as usize {
                let n: u64 = per_cpu.iter().map(|s| s.by_counter[c]).sum();
                if n != 0 {
                    *totals.entry((ifindex, c as u32)).or_default() += n;
                }
            }
        }
        Ok(totals
            .into_iter()
            .filter_map(|((i, c), n)| Some((i, Counter::from_u32(c)?, n)))
            .collect())
    }

    /// The data-path counters summed over interfaces.
    pub fn counter_totals(&self) -> Result<Vec<(Counter, u64)>> {
        let by_iface = self.counters()?;
        Ok(Counter::ALL
            .iter()
            .map(|c| {
                (
                    *c,
                    by_iface
                        .iter()
                        .filter(|(_, k, _)| k == c)
                        .map(|(_, _, n)| n)
                        .sum(),
                )
            })
            .collect())
    }

    /// One backend's statistics, per CPU: the packet path's, then (with
    /// the socket path loaded) the socket path's — [`Self::socket_slots_from`]
    /// says where those start. Summed, they are the backend's.
    pub fn backend_stats(&self, id: u32) -> Result<Vec<BackendStats>> {
        let read = |name| -> Result<Vec<BackendStats>> {
            let m: PerCpuArray<&MapData, BackendStats> = map(&self.ebpf, name)?;
            Ok(m.get(&id, 0)
                .with_context(|| format!("reading the statistics of backend {id} ({name})"))?
                .iter()
                .copied()
                .collect())
        };
        let mut all = read(names::STATS)?;
        if self.socket_lb {
            all.extend(read(names::SOCK_STATS)?);
        }
        Ok(all)
    }

    /// Where the socket path's slots start in [`Self::backend_stats`]'s
    /// reads (None without the socket path).
    pub fn socket_slots_from(&self) -> Result<Option<usize>> {
        if !self.socket_lb {
            return Ok(None);
        }
        let m: PerCpuArray<&MapData, BackendStats> = map(&self.ebpf, names::STATS)?;
        Ok(Some(m.get(&0, 0).context("reading the statistics")?.len()))
    }

    /// Reads the conntrack table in batches (see [`scan_lru`]).
    fn scan_conntrack(&self, each: impl FnMut(&[FlowKey], &[CtEntry])) -> Result<()> {
        use std::os::fd::AsFd as _;
        scan_lru(self.conntrack_map()?.fd().as_fd(), each)
    }

    fn conntrack_map(&self) -> Result<&MapData> {
        match self.ebpf.map(names::CONNTRACK) {
            Some(aya::maps::Map::LruHashMap(d)) => Ok(d),
            _ => bail!("the eBPF object has no LRU map {}", names::CONNTRACK),
        }
    }

    /// A reader of the conntrack table with a descriptor of its own, for a
    /// thread that counts entries away from the tick (a full table takes a
    /// while to walk).
    pub fn conntrack_reader(&self) -> Result<ConntrackReader> {
        use std::os::fd::AsFd as _;
        let fd = self
            .conntrack_map()?
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the conntrack map's descriptor")?;
        Ok(ConntrackReader { fd })
    }

    /// How many entries the conntrack table holds (both directions).
    pub fn conntrack_entries(&self) -> Result<u64> {
        use std::os::fd::AsFd as _;
        count_lru(self.conntrack_map()?.fd().as_fd())
    }

    /// Drops every conntrack entry of `service_id`'s connections to `group`
    /// (`on_rollback: cut`): their next packets find no entry, follow the
    /// current weight, and reach a backend that resets them. Returns how
    /// many connections were cut.
    pub fn cut(&mut self, service_id: u32, group: Group) -> Result<u64> {
        let mut doomed = Vec::new();
        self.scan_conntrack(|keys, values| {
            for (k, v) in keys.iter().zip(values) {
                if v.service_id == service_id && v.group == group as u8 {
                    doomed.push((*k, v.kind));
                }
            }
        })?;
        let mut m: HashMap<&mut MapData, FlowKey, CtEntry> =
            map_mut(&mut self.ebpf, names::CONNTRACK)?;
        let mut cut = 0;
        for (k, kind) in doomed {
            // Gone already (evicted, or the connection ended) is fine.
            if m.remove(&k).is_ok() && kind == kanari_common::maps::CT_FORWARD {
                cut += 1;
            }
        }
        Ok(cut)
    }

    /// Every conntrack entry (for tests and diagnostics; walks the whole map).
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, CtEntry)>> {
        let m: HashMap<&MapData, FlowKey, CtEntry> = map(&self.ebpf, names::CONNTRACK)?;
        m.iter().map(|r| r.context("reading conntrack")).collect()
    }
}

const ONLINE_CPUS: &str = "/sys/devices/system/cpu/online";

/// How many CPUs are online now.
fn online_cpus() -> Result<u64> {
    let list =
        std::fs::read_to_string(ONLINE_CPUS).with_context(|| format!("reading {ONLINE_CPUS}"))?;
    count_cpu_list(&list)
        .with_context(|| format!("{ONLINE_CPUS}: `{}` is not a CPU list", list.trim()))
}

/// The CPUs in a kernel CPU list (`0-3,6,8-9`), at least one.
fn count_cpu_list(list: &str) -> Option<u64> {
    let mut n = 0;
    for part in list.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => part.parse::<u64>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

/// `union bpf_attr`'s member for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Reads the conntrack table behind `fd` in batches of 8,192
/// (`BPF_MAP_LOOKUP_BATCH`; a full default table of 524,288 entries takes 64
/// system calls, about 0.3 µs per entry), handing each batch of keys and
/// values to `each`.
fn scan_lru(
    fd: std::os::fd::BorrowedFd<'_>,
    mut each: impl FnMut(&[FlowKey], &[CtEntry]),
) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = fd.as_raw_fd();
    const BATCH: usize = 8192;
    let mut keys = vec![FlowKey::new(0, 0, 0, 0); BATCH];
    let mut values = vec![CtEntry::new(0, 0, 0, 0, 0, 0); BATCH];
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: attr points at buffers of `count` keys and values (plain
        // integers, any bit pattern valid) and at the two tokens, all alive
        // for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let err = std::io::Error::last_os_error();
        let n = (attr.count as usize).min(BATCH);
        each(&keys[..n], &values[..n]);
        if r != 0 {
            if err.raw_os_error() == Some(libc::ENOENT) {
                return Ok(());
            }
            return Err(err).context("reading conntrack (BPF_MAP_LOOKUP_BATCH)");
        }
        token_in = token_out;
        first = false;
    }
}

/// The conntrack table through a descriptor of its own (see
/// [`Datapath::conntrack_reader`]); the map lives as long as it does.
pub struct ConntrackReader {
    fd: std::os::fd::OwnedFd,
}

/// What one walk of the conntrack table found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConntrackScan {
    /// Entries (two per connection).
    pub entries: u64,
    /// The backend ids the entries carry.
    pub backend_ids: std::collections::BTreeSet<u32>,
    /// The service ids the entries carry.
    pub service_ids: std::collections::BTreeSet<u32>,
    /// When the walk began, on the kernel's monotonic clock (the one the
    /// entries' times are on).
    pub at_ns: u64,
    /// Requests and connection attempts still unanswered, older than the
    /// walk was asked about.
    pub pending: Vec<Pending>,
    /// Connections whose entries the walk removed, idle past their state's
    /// timeout, by `kanari_common::maps::CtState` (its discriminant).
    pub expired: [u64; 4],
    /// Reverse entries removed on their own (their forward entry gone,
    /// idle past the established timeout).
    pub expired_reverse: u64,
}

/// A request, or a connection attempt, a backend has not answered yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pending {
    pub backend_id: u32,
    /// The connection (its forward entry's key).
    pub flow: FlowKey,
    /// When it began (kernel monotonic ns): the request's first payload, or the SYN.
    pub since_ns: u64,
    /// A connection attempt (no SYN-ACK yet), not a request.
    pub connect: bool,
}

/// The kernel's monotonic clock (`bpf_ktime_get_ns`), in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl ConntrackReader {
    /// Walks the whole table: how many entries it holds, which backend ids
    /// they carry, and what has waited for an answer at least `pending_ns`;
    /// removes the connections idle past their state's timeout in
    /// `timeouts` (both entries), and reverse entries idle past the
    /// established timeout.
    pub fn scan(&self, pending_ns: u64, timeouts: &ConntrackTimeouts) -> Result<ConntrackScan> {
        use std::os::fd::AsFd as _;
        let at_ns = monotonic_ns();
        let mut out = ConntrackScan {
            at_ns,
            ..ConntrackScan::default()
        };
        let now = kanari_common::maps::seen_at(at_ns);
        let old = |since: u64| since != 0 && at_ns.saturating_sub(since) >= pending_ns;
        let mut doomed: Vec<(FlowKey, CtEntry)> = Vec::new();
        scan_lru(self.fd.as_fd(), |keys, values| {
            out.entries += keys.len() as u64;
            for (k, v) in keys.iter().zip(values) {
                let timeout = if v.kind == kanari_common::maps::CT_FORWARD {
                    timeouts.of(v.state())
                } else {
                    timeouts.established
                };
                if expired(v.seen, now, timeout) {
                    doomed.push((*k, *v));
                    continue;
                }
                out.backend_ids.insert(v.backend_id);
                out.service_ids.insert(v.service_id);
                if v.kind != kanari_common::maps::CT_FORWARD {
                    continue;
                }
                for (since, connect) in [(v.syn_ns, true), (v.req_ns, false)] {
                    if old(since) {
                        out.pending.push(Pending {
                            backend_id: v.backend_id,
                            flow: *k,
                            since_ns: since,
                            connect,
                        });
                    }
                }
            }
        })?;
        let fd = self.fd.as_fd();
        // Forward entries first: each takes its reverse entry with it, so a
        // reverse entry removed on its own is one whose forward entry was gone.
        doomed.sort_by_key(|(_, v)| v.kind != kanari_common::maps::CT_FORWARD);
        for (k, v) in doomed {
            // Looked at again: a packet since the walk read it keeps it.
            match lookup_ct(fd, &k) {
                Some(now) if now.seen == v.seen && now.flags == v.flags => {}
                _ => continue,
            }
            if !delete_ct(fd, &k) {
                continue;
            }
            if v.kind == kanari_common::maps::CT_FORWARD {
                // The reply direction: backend -> client.
                let _ = delete_ct(fd, &FlowKey::new(v.addr, k.saddr, v.port, k.sport));
                out.expired[v.state() as usize] += 1;
            } else {
                out.expired_reverse += 1;
            }
        }
        Ok(out)
    }
}

/// Whether an entry last seen at `seen` is idle past `timeout` at `now`
/// (both in `CtEntry::seen` units; an entry seen "later" than now — a clock
/// read before the packet's — is not).
fn expired(seen: u32, now: u32, timeout: std::time::Duration) -> bool {
    let idle_ns = (now.saturating_sub(seen) as u64) << kanari_common::maps::SEEN_SHIFT;
    idle_ns > timeout.as_nanos() as u64
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// `union bpf_attr`'s member for the `BPF_MAP_*_ELEM` commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_call(
    cmd: libc::c_long,
    fd: std::os::fd::BorrowedFd<'_>,
    key: &FlowKey,
    value: Option<&mut CtEntry>,
) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const FlowKey as u64,
        value: value.map_or(0, |v| v as *mut CtEntry as u64),
        flags: 0,
    };
    // SAFETY: attr points at a key (and a value buffer) of the map's sizes,
    // alive for the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>() as u32,
        ) == 0
    }
}

/// The entry of `key` now, if there is one.
fn lookup_ct(fd: std::os::fd::BorrowedFd<'_>, key: &FlowKey) -> Option<CtEntry> {
    let mut v = CtEntry::new(0, 0, 0, 0, 0, 0);
    elem_call(BPF_MAP_LOOKUP_ELEM, fd, key, Some(&mut v)).then_some(v)
}

/// Removes `key`'s entry; false when there was none.
fn delete_ct(fd: std::os::fd::BorrowedFd<'_>, key: &FlowKey) -> bool {
    elem_call(BPF_MAP_DELETE_ELEM, fd, key, None)
}

/// How many entries the LRU map behind `fd` holds: a walk of all of them.
fn count_lru(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
    let mut total = 0u64;
    scan_lru(fd, |k, _| total += k.len() as u64)?;
    Ok(total)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
    p.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .map_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    T::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
}

fn map<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    T::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
}

/// Copies the entries of a pinned `KN_CT_V1` (the conntrack layout before
/// entries kept the time they were last seen) into this build's table,
/// seen now, so an upgrade keeps every tracked connection on its backend
/// (and its replies translated). The old pin is removed afterwards with the
/// other maps this build does not use. Returns how many were carried over.
fn carry_over_conntrack(ebpf: &mut Ebpf, pins: &Pins) -> Result<u64> {
    use kanari_common::maps::CtEntryV1;
    let path = pins.map(names::CONNTRACK_V1);
    if check_layout(
        &path,
        names::CONNTRACK_V1,
        size_of::<FlowKey>(),
        size_of::<CtEntryV1>(),
    )?
    .is_none()
    {
        return Ok(0);
    }
    let old = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let old: HashMap<MapData, FlowKey, CtEntryV1> =
        HashMap::try_from(aya::maps::Map::LruHashMap(old))
            .with_context(|| format!("{} is not a hash map", path.display()))?;
    let entries: Vec<(FlowKey, CtEntryV1)> = old.iter().filter_map(Result::ok).collect();
    let seen = kanari_common::maps::seen_at(monotonic_ns());
    let mut m: HashMap<&mut MapData, FlowKey, CtEntry> = map_mut(ebpf, names::CONNTRACK)?;
    let mut carried = 0;
    for (k, v) in entries {
        if m.insert(k, v.upgrade(seen), 0).is_ok() {
            carried += 1;
        }
    }
    Ok(carried)
}

/// Refuses a pinned map whose layout is not this build's (a build that
/// changes a layout must also change the map's versioned name); returns
/// the pinned map's entries, if there is one.
fn check_layout(
    path: &std::path::Path,
    name: &str,
    key: usize,
    value: usize,
) -> Result<Option<u32>> {
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path)
        .with_context(|| format!("reading the pinned map {}", path.display()))?;
    if info.key_size() as usize != key || info.value_size() as usize != value {
        bail!(
            "the pinned map {} ({name}) has keys of {} and values of {} bytes, this build expects {key} and {value}; \
             remove the old data path first with `kanari uninstall`",
            path.display(),
            info.key_size(),
            info.value_size()
        );
    }
    Ok(Some(info.max_entries()))
}

#[cfg(test)]
mod tests {
    use super::count_cpu_list;

    #[test]
    fn cpu_lists_count_ranges_and_single_cpus() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3,6,8-9\n"), Some(7));
        for bad in ["", "\n", "3-1", "a-b", "0,,1", "0-"] {
            assert_eq!(count_cpu_list(bad), None, "{bad:?}");
        }
        // The list this machine's kernel gives.
        assert!(super::online_cpus().expect("online CPUs") >= 1);
    }
}
