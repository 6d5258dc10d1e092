//! The kernel side, seen from the agent: loads the eBPF object, attaches its
//! programs to interfaces, and applies [`MapOp`]s to the maps.
//!
//! Everything this module attaches is owned by [`Datapath`]: dropping it
//! detaches every program and frees every map (pinning for restart survival
//! lives in [`crate::pins`] and comes later).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId},
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use kanari_common::maps::{
    BackendSet, BackendStats, Counter, CounterKey, CtEntry, FlowKey, Group, Segment, SegmentKey,
    Service, ServiceKey, names, programs,
};

use crate::{
    config::{AttachMode, Interface},
    plan::MapOp,
};

/// The eBPF object, built by `build.rs` from `bpf/ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kanari"));

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

struct Links {
    mode: AttachMode,
    attached: Attached,
    xdp: Option<XdpLinkId>,
    tc_ingress: SchedClassifierLinkId,
    tc_egress: SchedClassifierLinkId,
}

pub struct Datapath {
    ebpf: Ebpf,
    links: BTreeMap<String, Links>,
}

impl Datapath {
    /// Loads the maps and programs into the kernel (nothing attached yet),
    /// with room for `conntrack_connections` connections and statistics for
    /// `max_backends` backends.
    pub fn load(conntrack_connections: u32, max_backends: u32) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this kanari binary carries no eBPF object (it was built with AYA_BUILD_SKIP=1); \
                 rebuild it with `cargo xtask build`"
            );
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::CONNTRACK, conntrack_connections.saturating_mul(2))
            .map_max_entries(names::STATS, max_backends)
            .load(OBJECT)
            .context("loading the eBPF maps and programs into the kernel")?;
        program::<Xdp>(&mut ebpf, programs::XDP_INGRESS)?
            .load()
            .with_context(|| format!("the kernel refused program {}", programs::XDP_INGRESS))?;
        for name in [programs::TC_INGRESS, programs::TC_EGRESS] {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        Ok(Self {
            ebpf,
            links: BTreeMap::new(),
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

    /// Makes the attached interfaces exactly `wanted`: attaches new ones,
    /// re-attaches those whose mode changed, detaches the rest. Returns how each
    /// new attachment was made.
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

    fn attach(&mut self, it: &Interface) -> Result<Attached> {
        let name = it.name.as_str();
        if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            // Before tcx, TC programs hang off a clsact qdisc.
            if let Err(e) = tc::qdisc_add_clsact(name)
                && !matches!(&e, tc::TcError::IoError(io) if io.kind() == std::io::ErrorKind::AlreadyExists)
            {
                return Err(e).with_context(|| format!("adding the clsact qdisc to {name}"));
            }
        }
        let tc_ingress = program::<SchedClassifier>(&mut self.ebpf, programs::TC_INGRESS)?
            .attach(name, TcAttachType::Ingress)
            .with_context(|| format!("attaching TC ingress to {name}"))?;
        let tc_egress = match program::<SchedClassifier>(&mut self.ebpf, programs::TC_EGRESS)?
            .attach(name, TcAttachType::Egress)
            .with_context(|| format!("attaching TC egress to {name}"))
        {
            Ok(l) => l,
            Err(e) => {
                let _ = program::<SchedClassifier>(&mut self.ebpf, programs::TC_INGRESS)?
                    .detach(tc_ingress);
                return Err(e);
            }
        };
        let xdp = match it.mode {
            AttachMode::Tc => None,
            AttachMode::Xdp | AttachMode::Auto => {
                match program::<Xdp>(&mut self.ebpf, programs::XDP_INGRESS)?
                    .attach(name, XdpMode::Driver)
                {
                    Ok(l) => Some(l),
                    Err(e) if it.mode == AttachMode::Auto => {
                        tracing::info!(interface = name, error = %e, "no native XDP here; steering in TC");
                        None
                    }
                    Err(e) => {
                        let _ = program::<SchedClassifier>(&mut self.ebpf, programs::TC_INGRESS)?
                            .detach(tc_ingress);
                        let _ = program::<SchedClassifier>(&mut self.ebpf, programs::TC_EGRESS)?
                            .detach(tc_egress);
                        return Err(anyhow!(e)).with_context(|| {
                            format!("attaching XDP in driver mode to {name} (mode: xdp); use `mode: tc` or `mode: auto` where the driver has no XDP")
                        });
                    }
                }
            }
        };
        let attached = if xdp.is_some() {
            Attached::Xdp
        } else {
            Attached::Tc
        };
        self.links.insert(
            it.name.clone(),
            Links {
                mode: it.mode,
                attached,
                xdp,
                tc_ingress,
                tc_egress,
            },
        );
        Ok(attached)
    }

    /// Detaches kanari's programs from one interface.
    pub fn detach(&mut self, name: &str) -> Result<()> {
        let Some(l) = self.links.remove(name) else {
            return Ok(());
        };
        if let Some(x) = l.xdp {
            program::<Xdp>(&mut self.ebpf, programs::XDP_INGRESS)?
                .detach(x)
                .with_context(|| format!("detaching XDP from {name}"))?;
        }
        program::<SchedClassifier>(&mut self.ebpf, programs::TC_INGRESS)?
            .detach(l.tc_ingress)
            .with_context(|| format!("detaching TC ingress from {name}"))?;
        program::<SchedClassifier>(&mut self.ebpf, programs::TC_EGRESS)?
            .detach(l.tc_egress)
            .with_context(|| format!("detaching TC egress from {name}"))?;
        Ok(())
    }

    /// Applies map writes in order.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<()> {
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

    /// The data-path counters by interface index, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(u32, Counter, u64)>> {
        let m: PerCpuHashMap<&MapData, CounterKey, u64> = map(&self.ebpf, names::COUNTERS)?;
        let mut out = Vec::new();
        for r in m.iter() {
            let (k, per_cpu) = r.context("reading the data path counters")?;
            if let Some(c) = Counter::from_u32(k.counter) {
                out.push((k.ifindex, c, per_cpu.iter().sum()));
            }
        }
        out.sort_by_key(|(i, c, _)| (*i, *c as u32));
        Ok(out)
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

    /// One backend's statistics, per CPU.
    pub fn backend_stats(&self, id: u32) -> Result<Vec<BackendStats>> {
        let m: PerCpuArray<&MapData, BackendStats> = map(&self.ebpf, names::STATS)?;
        Ok(m.get(&id, 0)
            .with_context(|| format!("reading the statistics of backend {id}"))?
            .iter()
            .copied()
            .collect())
    }

    /// Reads the conntrack table in batches of 8,192 (`BPF_MAP_LOOKUP_BATCH`;
    /// a full default table of 524,288 entries takes 64 system calls), handing
    /// each batch of keys and values to `each`.
    fn scan_conntrack(&self, mut each: impl FnMut(&[FlowKey], &[CtEntry])) -> Result<()> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let data = match self.ebpf.map(names::CONNTRACK) {
            Some(aya::maps::Map::LruHashMap(d)) => d,
            _ => bail!("the eBPF object has no LRU map {}", names::CONNTRACK),
        };
        let fd = data.fd().as_fd().as_raw_fd();
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

    /// How many entries the conntrack table holds (both directions).
    pub fn conntrack_entries(&self) -> Result<u64> {
        let mut total = 0u64;
        self.scan_conntrack(|k, _| total += k.len() as u64)?;
        Ok(total)
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
