//! kanari's data path: three programs sharing one set of maps.
//!
//! - `kanari_xdp_ingress` (XDP) and `kanari_tc_ingress` (TC ingress) steer a
//!   service's connections: the first packet of a connection picks a group
//!   (segment, then weight) and a backend, records the choice in conntrack
//!   (both directions), and every packet of the connection is DNATed to that
//!   backend. A weight change therefore never moves an established connection.
//! - `kanari_tc_egress` reverse-NATs the backend's replies back to the VIP.
//!
//! XDP cannot see an skb's checksum state. A packet whose TCP checksum is an
//! offload seed (`CHECKSUM_PARTIAL`, handed over by a veth peer) would be
//! corrupted by the full-checksum update, so XDP leaves such packets to the
//! TC ingress program, which is attached beside it and whose checksum helpers
//! know the state. Packets from a NIC carry complete checksums and stay in XDP.
//!
//! Everything else — other addresses and ports, ARP, IPv6, UDP, ICMP,
//! fragments, truncated or malformed frames — passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use kanari_common::{
    csum, hash,
    maps::{
        BACKEND_SET_SLOTS, BackendSet, CT_FORWARD, CT_REVERSE, Counter, CtEntry,
        DEFAULT_CONNTRACK_CONNECTIONS, FlowKey, Group, MAX_BACKENDS_PER_GROUP, MAX_SEGMENTS,
        MAX_SERVICES, SERVICE_F_CONNECTION_AFFINITY, SERVICE_F_SEGMENTS, Segment, SegmentKey,
        Service, ServiceKey,
    },
    select,
    wire::{
        self, ETH_HLEN, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Ipv4Header, MAX_PARSE_LEN, Skip,
        TCP_CHECK_OFF, TCP_DPORT_OFF, TCP_SPORT_OFF, Tcp4, TcpHeader,
    },
};

// Map names must match `kanari_common::maps::names` (the agent's tests check it).
#[map(name = "KN_SERVICES_V1")]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "KN_BACKENDS_V1")]
static BACKENDS: Array<BackendSet> = Array::with_max_entries(BACKEND_SET_SLOTS, 0);

/// Sized by the agent from the configuration (two entries per connection).
#[map(name = "KN_CT_V1")]
static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(2 * DEFAULT_CONNTRACK_CONNECTIONS, 0);

#[map(name = "KN_SEGMENTS_V1")]
static SEGMENTS: LpmTrie<SegmentKey, Segment> =
    LpmTrie::with_max_entries(MAX_SEGMENTS, BPF_F_NO_PREALLOC);

#[map(name = "KN_COUNTERS_V1")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *v += 1 };
    }
}

/// Where a service packet goes.
struct Target {
    addr: u32,
    port: u16,
    /// The packet created the connection's conntrack entries.
    created: bool,
}

#[inline(always)]
fn backend_set(svc: &Service, group: Group) -> Option<&'static BackendSet> {
    let slot = match group {
        Group::Stable => svc.backend_sets[0],
        Group::Canary => svc.backend_sets[1],
    };
    let set = BACKENDS.get(slot)?;
    if set.len == 0 { None } else { Some(set) }
}

#[inline(always)]
fn segment_of(svc: &Service, client: u32) -> Option<Group> {
    if svc.flags & SERVICE_F_SEGMENTS == 0 {
        return None;
    }
    let key = Key::new(
        SegmentKey::SERVICE_BITS + 32,
        SegmentKey::new(svc.id, client),
    );
    SEGMENTS
        .get(&key)
        .and_then(|s| Group::from_u8(s.group as u8))
}

/// The backend of a service packet: from conntrack, or chosen now.
#[inline(always)]
fn steer(p: &Tcp4, svc: &Service) -> Result<Target, Counter> {
    let key = FlowKey::new(p.saddr, p.daddr, p.sport, p.dport);
    if let Some(e) = CONNTRACK.get_ptr(key) {
        // SAFETY: a value pointer from a successful lookup; copied at once.
        let e = unsafe { *e };
        if e.kind == CT_FORWARD {
            return Ok(Target {
                addr: e.addr,
                port: e.port,
                created: false,
            });
        }
    }

    let flow = hash::flow_hash(&key, svc.salt);
    let group_hash = if svc.flags & SERVICE_F_CONNECTION_AFFINITY != 0 {
        flow
    } else {
        hash::client_hash(p.saddr, svc.salt)
    };
    let wanted = select::wanted_group(
        svc.canary_weight,
        select::bucket(group_hash),
        segment_of(svc, p.saddr),
    );
    let (group, set) = match backend_set(svc, wanted) {
        Some(set) => (wanted, set),
        None => match backend_set(svc, wanted.other()) {
            Some(set) => (wanted.other(), set),
            None => return Err(Counter::NoBackend),
        },
    };
    let len = if set.len as usize > MAX_BACKENDS_PER_GROUP {
        MAX_BACKENDS_PER_GROUP as u32
    } else {
        set.len
    };
    let idx = select::backend_index(hash::backend_hash(flow), len) as usize;
    let Some(b) = set.backends.get(idx) else {
        return Err(Counter::NoBackend);
    };
    let (addr, port, backend_id) = (b.addr, b.port, b.id);

    // A RST without entry is sent where the hash says, but opens nothing.
    if p.is_rst() {
        count(Counter::Fallback);
        return Ok(Target {
            addr,
            port,
            created: false,
        });
    }
    let reverse_key = FlowKey::new(addr, p.saddr, port, p.sport);
    let reverse = CtEntry {
        addr: p.daddr,
        port: p.dport,
        group: group as u8,
        kind: CT_REVERSE,
        backend_id,
        service_id: svc.id,
    };
    let forward = CtEntry {
        addr,
        port,
        kind: CT_FORWARD,
        ..reverse
    };
    if CONNTRACK.insert(reverse_key, reverse, 0).is_err()
        || CONNTRACK.insert(key, forward, 0).is_err()
    {
        count(Counter::ConntrackFull);
    }
    if !p.is_new_connection() {
        count(Counter::Fallback);
    }
    Ok(Target {
        addr,
        port,
        created: true,
    })
}

#[inline(always)]
fn service_of(p: &Tcp4) -> Option<Service> {
    // SAFETY: a value pointer from a successful lookup; copied at once.
    SERVICES
        .get_ptr(ServiceKey::tcp(p.daddr, p.dport))
        .map(|s| unsafe { *s })
}

#[inline(always)]
fn count_skip(s: Skip) {
    if matches!(s, Skip::Malformed | Skip::Truncated) {
        count(Counter::Malformed);
    }
}

#[xdp]
pub fn kanari_xdp_ingress(ctx: XdpContext) -> u32 {
    xdp_ingress(&ctx);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn xdp_ingress(ctx: &XdpContext) {
    let (start, end) = (ctx.data(), ctx.data_end());
    // SAFETY: data..data_end is the packet.
    let p = match unsafe { wire::parse_tcp4(start, end, end - start) } {
        Ok(p) => p,
        Err(s) => return count_skip(s),
    };
    let Some(svc) = service_of(&p) else { return };
    if csum::looks_partial(p.check, p.saddr, p.daddr, p.l4_len) {
        return count(Counter::XdpDeferred);
    }
    let t = match steer(&p, &svc) {
        Ok(t) => t,
        Err(c) => return count(c),
    };
    let (Ok(ip), Ok(tcp)) = (
        wire::ptr_at_mut::<Ipv4Header>(start, end, ETH_HLEN),
        wire::ptr_at_mut::<TcpHeader>(start, end, p.l4_off),
    ) else {
        return;
    };
    // SAFETY: both headers were bounds-checked just above.
    unsafe {
        (*ip).daddr = t.addr.to_ne_bytes();
        let ip_check = u16::from_ne_bytes((*ip).check);
        (*ip).check = csum::replace4(ip_check, p.daddr, t.addr).to_ne_bytes();
        (*tcp).dport = t.port.to_ne_bytes();
        let check = csum::replace2(p.check, p.dport, t.port);
        (*tcp).check = csum::replace4(check, p.daddr, t.addr).to_ne_bytes();
    }
    count(if t.created {
        Counter::XdpSteeredNew
    } else {
        Counter::XdpSteered
    });
}

/// Parses a TC packet, pulling the headers into the linear area when they
/// are not there yet.
#[inline(always)]
fn parse_tc(ctx: &TcContext) -> Result<Tcp4, Skip> {
    let len = ctx.len() as usize;
    // SAFETY: data..data_end is the packet's linear area.
    match unsafe { wire::parse_tcp4(ctx.data(), ctx.data_end(), len) } {
        Err(Skip::Truncated) if len > ctx.data_end() - ctx.data() => {
            let want = if len > MAX_PARSE_LEN {
                MAX_PARSE_LEN
            } else {
                len
            };
            ctx.pull_data(want as u32).map_err(|_| Skip::Truncated)?;
            // SAFETY: as above, after the pull.
            unsafe { wire::parse_tcp4(ctx.data(), ctx.data_end(), len) }
        }
        r => r,
    }
}

/// Rewrites an address and a port with the kernel's checksum helpers, which
/// update a complete checksum or an offload seed as the skb requires.
#[inline(always)]
fn tc_rewrite(
    ctx: &TcContext,
    addr_off: usize,
    port_off: usize,
    l4_check_off: usize,
    (old_addr, new_addr): (u32, u32),
    (old_port, new_port): (u16, u16),
) -> Result<(), i64> {
    ctx.store(addr_off, &new_addr, 0)?;
    ctx.l3_csum_replace(IP_CHECK_OFF, old_addr as u64, new_addr as u64, 4)?;
    ctx.l4_csum_replace(
        l4_check_off,
        old_addr as u64,
        new_addr as u64,
        BPF_F_PSEUDO_HDR as u64 | 4,
    )?;
    ctx.store(port_off, &new_port, 0)?;
    ctx.l4_csum_replace(l4_check_off, old_port as u64, new_port as u64, 2)?;
    Ok(())
}

#[classifier]
pub fn kanari_tc_ingress(ctx: TcContext) -> i32 {
    tc_ingress(&ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn tc_ingress(ctx: &TcContext) {
    let p = match parse_tc(ctx) {
        Ok(p) => p,
        Err(s) => return count_skip(s),
    };
    let Some(svc) = service_of(&p) else { return };
    let t = match steer(&p, &svc) {
        Ok(t) => t,
        Err(c) => return count(c),
    };
    let rewritten = tc_rewrite(
        ctx,
        IP_DADDR_OFF,
        p.l4_off + TCP_DPORT_OFF,
        p.l4_off + TCP_CHECK_OFF,
        (p.daddr, t.addr),
        (p.dport, t.port),
    );
    if rewritten.is_ok() {
        count(if t.created {
            Counter::TcSteeredNew
        } else {
            Counter::TcSteered
        });
    }
}

#[classifier]
pub fn kanari_tc_egress(ctx: TcContext) -> i32 {
    tc_egress(&ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn tc_egress(ctx: &TcContext) {
    let Ok(p) = parse_tc(ctx) else { return };
    let key = FlowKey::new(p.saddr, p.daddr, p.sport, p.dport);
    let Some(e) = CONNTRACK.get_ptr(key) else {
        return;
    };
    // SAFETY: a value pointer from a successful lookup; copied at once.
    let e = unsafe { *e };
    if e.kind != CT_REVERSE {
        return;
    }
    let rewritten = tc_rewrite(
        ctx,
        IP_SADDR_OFF,
        p.l4_off + TCP_SPORT_OFF,
        p.l4_off + TCP_CHECK_OFF,
        (p.saddr, e.addr),
        (p.sport, e.port),
    );
    if rewritten.is_ok() {
        count(Counter::TcReversed);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
