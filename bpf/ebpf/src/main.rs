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
//! The observer rides on the same packets, per backend, in per-CPU counters:
//! connections and connect time (SYN forwarded -> SYN-ACK back), refused
//! (RST answering a SYN), resets, unanswered attempts (the client sent its SYN
//! again; counted once per attempt), and
//! per request: time to first byte (the client's first payload after the last
//! response -> the backend's first payload) and, for HTTP, the status class
//! of that answer. Its per-connection state is in the forward conntrack entry.
//!
//! ICMP errors about a connection (destination unreachable, time exceeded)
//! are translated for the side they go to: toward the backend on ingress
//! (path MTU discovery for its replies), toward the client on egress.
//!
//! The first fragment of a TCP datagram to a service is dropped and counted
//! (fragments cannot be translated: only the first carries the ports).
//!
//! Everything else — other addresses and ports, ARP, IPv6, UDP, other ICMP,
//! other fragments, truncated or malformed frames — passes untouched.
//!
//! The socket path (`socket_lb:`): `kanari_sock_connect4` (cgroup v2
//! `connect4`) sends a connect() to a service VIP straight to a backend,
//! chosen by the same weights, so the connection is a plain one to the
//! backend and no packet of it is translated; `kanari_sock_sendmsg4` does
//! the same for the datagrams of unconnected UDP sockets;
//! `kanari_sock_getpeername4` and `kanari_sock_recvmsg4` answer the VIP to
//! the application that dialled it.
#![no_std]
#![no_main]
// Inline assembly for bounds the verifier must see (see `in_range`).
#![feature(asm_experimental_arch)]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns,
        bpf_skb_load_bytes,
    },
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, TcContext, XdpContext},
};
use kanari_common::{
    csum, hash, hist,
    http::{self, STATUS_LINE_LEN, StatusParse},
    maglev,
    maps::{
        BACKEND_SET_SLOTS, Backend, BackendSet, BackendStats, Bucket, CT_F_FIN_BACKEND,
        CT_F_FIN_CLIENT, CT_F_HTTP, CT_F_RETRIED, CT_F_RST, CT_F_UNCONFIRMED, CT_FORWARD,
        CT_REVERSE, Counter, CounterKey, CtEntry, DEFAULT_CONNTRACK_CONNECTIONS,
        DEFAULT_MAX_BACKENDS, DEFAULT_SOCKETS, FROM_BACKEND, FlowKey, Group, IF_COUNTER_SLOTS,
        IfCounters, MAX_BACKENDS_PER_GROUP, MAX_COUNTER_KEYS, MAX_SEGMENTS, MAX_SERVICES,
        SERVICE_F_CONNECTION_AFFINITY, SERVICE_F_HTTP, SERVICE_F_SEGMENTS, SOCKET_IFINDEX, Segment,
        SegmentKey, Service, ServiceKey, Settings, SockEntry, TO_BACKEND, admit, seen_at,
    },
    select,
    wire::{
        self, ETH_HLEN, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IcmpError4, Ipv4Header,
        MAX_PARSE_LEN, Skip, TCP_CHECK_OFF, TCP_DPORT_OFF, TCP_SPORT_OFF, Tcp4, TcpHeader,
    },
};

// Map names must match `kanari_common::maps::names` (the agent's tests check it).
#[map(name = "KN_SERVICES_V1")]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "KN_BACKENDS_V2")]
static BACKENDS: Array<BackendSet> = Array::with_max_entries(BACKEND_SET_SLOTS, 0);

/// Sized by the agent from the configuration (two entries per connection).
#[map(name = "KN_CT_V2")]
static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(2 * DEFAULT_CONNTRACK_CONNECTIONS, 0);

#[map(name = "KN_SEGMENTS_V1")]
static SEGMENTS: LpmTrie<SegmentKey, Segment> =
    LpmTrie::with_max_entries(MAX_SEGMENTS, BPF_F_NO_PREALLOC);

#[map(name = "KN_COUNTERS_V2")]
static COUNTERS: PerCpuHashMap<CounterKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_COUNTER_KEYS, 0);

/// Counters of interfaces with a small index (see `IF_COUNTER_SLOTS`).
#[map(name = "KN_IFCOUNT_V1")]
static IF_COUNTS: PerCpuArray<IfCounters> = PerCpuArray::with_max_entries(IF_COUNTER_SLOTS, 0);

/// Sized by the agent from the configuration (`limits.backends`).
#[map(name = "KN_STATS_V2")]
static STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The socket path's statistics, by the same backend ids (sized alike).
#[map(name = "KN_SOCKSTATS_V1")]
static SOCK_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "KN_SETTINGS_V1")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// The new-connection rate guard's token bucket, one per CPU.
#[map(name = "KN_GUARD_V1")]
static GUARD: PerCpuArray<Bucket> = PerCpuArray::with_max_entries(1, 0);

/// Connections the socket path steered, by socket cookie.
#[map(name = "KN_SOCKETS_V1")]
static SOCKETS: LruHashMap<u64, SockEntry> = LruHashMap::with_max_entries(DEFAULT_SOCKETS, 0);

/// Whether this CPU may record another new connection now.
#[inline(always)]
fn admit_new() -> bool {
    let Some(s) = SETTINGS.get(0) else {
        return true;
    };
    if s.new_per_sec_per_cpu == 0 {
        return true;
    }
    let Some(b) = GUARD.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot of a per-CPU array.
    admit(unsafe { &mut *b }, now_ns(), s.new_per_sec_per_cpu, s.burst)
}

/// The counter key the `upgrade-marker` build adds to every steered packet.
#[cfg(feature = "upgrade-marker")]
const UPGRADE_MARKER: u32 = 255;

/// Counts a steered packet (and, in the `upgrade-marker` build, marks it).
#[inline(always)]
fn count_steered(ifindex: u32, c: Counter) {
    count(ifindex, c);
    #[cfg(feature = "upgrade-marker")]
    {
        let key = CounterKey {
            ifindex,
            counter: UPGRADE_MARKER,
        };
        match COUNTERS.get_ptr_mut(key) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            Some(v) => unsafe { *v += 1 },
            None => {
                let _ = COUNTERS.insert(key, 1, BPF_NOEXIST as u64);
            }
        }
    }
}

#[inline(always)]
fn count(ifindex: u32, c: Counter) {
    if ifindex < IF_COUNTER_SLOTS {
        if let Some(v) = IF_COUNTS.get_ptr_mut(ifindex) {
            // SAFETY: this CPU's slot of a per-CPU array.
            let v = unsafe { &mut *v };
            if let Some(n) = v.by_counter.get_mut(c as usize) {
                *n += 1;
            }
        }
        return;
    }
    let key = CounterKey {
        ifindex,
        counter: c as u32,
    };
    match COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        Some(v) => unsafe { *v += 1 },
        None => {
            let _ = COUNTERS.insert(key, 1, BPF_NOEXIST as u64);
        }
    }
}

#[inline(always)]
fn stats(backend_id: u32) -> Option<&'static mut BackendStats> {
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it while we run.
    STATS.get_ptr_mut(backend_id).map(|s| unsafe { &mut *s })
}

#[inline(always)]
fn sock_stats(backend_id: u32) -> Option<&'static mut BackendStats> {
    // SAFETY: as in `stats`.
    SOCK_STATS
        .get_ptr_mut(backend_id)
        .map(|s| unsafe { &mut *s })
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Now in conntrack's `seen` units, from the coarse monotonic clock (a
/// tick's resolution is plenty for ageing, and it is cheaper to read).
#[inline(always)]
fn now_seen() -> u32 {
    // SAFETY: no preconditions.
    seen_at(unsafe { bpf_ktime_get_coarse_ns() })
}

/// Marks an entry seen now: written at most once a unit (about a second),
/// so a busy connection does not write its entry's cache line on every packet.
#[inline(always)]
fn touch(e: &mut CtEntry) {
    let now = now_seen();
    if e.seen != now {
        e.seen = now;
    }
}

/// `v` if it lies in `LO..=HI`, checked in assembly: the compiler cannot drop
/// the check (it may "know" the range from arithmetic the verifier cannot
/// follow) nor narrow the value again after it, so the verifier sees the
/// bounds on the very register that is used.
#[inline(always)]
fn in_range<const LO: u64, const HI: u64>(v: u64) -> Option<u64> {
    let mut v = v;
    let mut ok: u64 = 0;
    // SAFETY: compares and moves between registers only.
    unsafe {
        core::arch::asm!(
            "if {v} < {lo} goto +2",
            "if {v} > {hi} goto +1",
            "{ok} = 1",
            v = inout(reg) v,
            ok = inout(reg) ok,
            lo = const LO,
            hi = const HI,
        );
    }
    if ok == 1 { Some(v) } else { None }
}

#[inline(always)]
fn record<const N: usize>(hist: &mut [u32; N], ns: u64) {
    // The index is below N by construction; the verifier is shown it.
    let Some(i) =
        in_range::<0, { hist::TTFB_BUCKETS as u64 - 1 }>(hist::Layout::of(N).index(ns) as u64)
    else {
        return;
    };
    if let Some(b) = hist.get_mut(i as usize) {
        *b = b.wrapping_add(1);
    }
}

/// Where a service packet goes, and what it tells the observer.
struct Target {
    addr: u32,
    port: u16,
    backend_id: u32,
    /// The packet created the connection's conntrack entries.
    created: bool,
    /// A SYN that opened a connection to the backend.
    opened: bool,
    /// A SYN sent again: the backend did not answer the last one.
    retried: bool,
}

/// The backend-set slot of `group` (as u8) in `svc`.
#[inline(always)]
fn slot_of(svc: &Service, group: u8) -> u32 {
    if group == Group::Canary as u8 {
        svc.backend_sets[1]
    } else {
        svc.backend_sets[0]
    }
}

#[inline(always)]
fn backend_set(svc: &Service, group: Group) -> Option<&'static BackendSet> {
    let set = BACKENDS.get(slot_of(svc, group as u8))?;
    if set.len == 0 { None } else { Some(set) }
}

/// The backend of a new connection with `flow` hash in `set`: the set's
/// Maglev table names it (see `kanari_common::maglev`).
#[inline(always)]
fn pick(set: &BackendSet, flow: u32) -> Option<&Backend> {
    let slot =
        in_range::<0, { maglev::SIZE as u64 - 1 }>(maglev::slot(hash::backend_hash(flow)) as u64)?;
    let i = *set.table.get(slot as usize)? as u32;
    if i >= set.len {
        return None;
    }
    let i = in_range::<0, { MAX_BACKENDS_PER_GROUP as u64 - 1 }>(i as u64)?;
    set.backends.get(i as usize)
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
fn steer(ifindex: u32, p: &Tcp4, svc: &Service) -> Result<Target, Counter> {
    // SYN with FIN: no stack sends it; as a new connection it would take a
    // conntrack entry and a backend's connect statistics.
    if p.is_invalid() {
        return Err(Counter::Invalid);
    }
    let key = FlowKey::new(p.saddr, p.daddr, p.sport, p.dport);
    let syn = p.is_new_connection();
    // The reverse entry of a connection a new one on the same ports replaces.
    let mut replaced = None;
    if let Some(e) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a value pointer from a successful lookup; the fields are
        // plain integers another CPU may write at the same time (see CtEntry).
        let e = unsafe { &mut *e };
        // The connection's own SYN again (its sequence number): before the
        // SYN-ACK an unanswered attempt, after it a SYN-ACK lost on the way
        // to the client; either way the same connection on its backend.
        // Another SYN on a connection that has not ended (no RST, not both
        // FINs) goes to its backend too, as Linux conntrack does: the
        // backend answers a challenge ACK, and the client's RST then ends
        // the entry — so a sender sweeping client ports cannot re-split
        // live connections.
        let same = !syn || e.syn_ns != 0 || e.isn == p.seq || !e.closed();
        if e.kind == CT_FORWARD && !same {
            // Another SYN on an answered tuple: a new connection reusing the
            // ports, chosen again below once the guard admits it; the old
            // backend's replies must then no longer be translated onto it.
            replaced = Some(FlowKey::new(e.addr, p.saddr, e.port, p.sport));
        }
        if e.kind == CT_FORWARD && same {
            touch(e);
            if p.is_rst() {
                e.flags |= CT_F_RST;
            } else if p.is_fin() {
                e.flags |= CT_F_FIN_CLIENT;
            }
            // A SYN again before any SYN-ACK: one unanswered attempt, counted once.
            let retried = syn && e.syn_ns != 0 && e.flags & CT_F_RETRIED == 0;
            if retried {
                e.flags |= CT_F_RETRIED;
            }
            if !syn && p.payload_len() > 0 && e.req_ns == 0 && e.status_pos == 0 {
                e.req_ns = now_ns();
            }
            return Ok(Target {
                addr: e.addr,
                port: e.port,
                backend_id: e.backend_id,
                created: false,
                opened: false,
                retried,
            });
        }
    }

    // A SYN flood must not push established connections out of conntrack:
    // past the guard's rate, new connections are shed (dropped; clients retry).
    if syn && !admit_new() {
        return Err(Counter::Shed);
    }
    if let Some(old) = replaced {
        let _ = CONNTRACK.remove(old);
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
    let Some(b) = pick(set, flow) else {
        return Err(Counter::NoBackend);
    };
    let (addr, port, backend_id) = (b.addr, b.port, b.id);
    let mut t = Target {
        addr,
        port,
        backend_id,
        created: false,
        opened: false,
        retried: false,
    };

    // A RST without entry is sent where the hash says, but opens nothing.
    if p.is_rst() {
        count(ifindex, Counter::Fallback);
        return Ok(t);
    }
    // Every insert is guarded, not only a SYN's: a flood of ACKs with
    // random tuples must not push live connections out either. Past the
    // guard's rate such a packet is still sent where the hash says (a real
    // connection's next packet records it), without an entry.
    if !syn && !admit_new() {
        count(ifindex, Counter::Unrecorded);
        return Ok(t);
    }
    let reverse_key = FlowKey::new(addr, p.saddr, port, p.sport);
    let mut reverse = CtEntry::new(
        CT_REVERSE,
        p.daddr,
        p.dport,
        group as u8,
        backend_id,
        svc.id,
    );
    let mut forward = CtEntry::new(CT_FORWARD, addr, port, group as u8, backend_id, svc.id);
    if svc.flags & SERVICE_F_HTTP != 0 {
        forward.flags |= CT_F_HTTP;
    }
    if p.is_fin() {
        forward.flags |= CT_F_FIN_CLIENT;
    }
    let seen = now_seen();
    forward.seen = seen;
    reverse.seen = seen;
    if syn {
        forward.syn_ns = now_ns();
        forward.isn = p.seq;
    } else {
        // Not yet answered by the backend: aged as a SYN is (a spoofed
        // packet's entry goes soon), until the backend speaks on it.
        forward.flags |= CT_F_UNCONFIRMED;
        if p.payload_len() > 0 {
            forward.req_ns = now_ns();
        }
    }
    if CONNTRACK.insert(reverse_key, reverse, 0).is_err()
        || CONNTRACK.insert(key, forward, 0).is_err()
    {
        count(ifindex, Counter::ConntrackFull);
    }
    if !syn {
        count(ifindex, Counter::Fallback);
    }
    t.created = true;
    t.opened = syn;
    Ok(t)
}

/// Counts a steered packet for its backend.
#[inline(always)]
fn observe_ingress(p: &Tcp4, t: &Target) {
    if let Some(s) = stats(t.backend_id) {
        s.packets[TO_BACKEND] += 1;
        s.bytes[TO_BACKEND] += p.l4_len as u64 + (p.l4_off - ETH_HLEN) as u64;
        if t.opened {
            s.connections += 1;
        }
        if t.retried {
            s.unanswered += 1;
        }
    }
}

#[inline(always)]
fn service_of(p: &Tcp4) -> Option<Service> {
    // SAFETY: a value pointer from a successful lookup; copied at once.
    SERVICES
        .get_ptr(ServiceKey::tcp(p.daddr, p.dport))
        .map(|s| unsafe { *s })
}

/// The first fragment of a TCP datagram to a service (see
/// `wire::first_fragment_dest`).
#[inline(always)]
fn is_service_fragment(start: usize, end: usize) -> bool {
    // SAFETY: start..end is the packet (its linear area in TC).
    match unsafe { wire::first_fragment_dest(start, end) } {
        Some((addr, port)) => SERVICES.get_ptr(ServiceKey::tcp(addr, port)).is_some(),
        None => false,
    }
}

/// Counts a packet that is not TCP: an ICMP error translated, or passed.
#[inline(always)]
fn count_icmp(ifindex: u32, translated: bool, passed: Counter) {
    count(
        ifindex,
        if translated {
            Counter::IcmpTranslated
        } else {
            passed
        },
    );
}

#[inline(always)]
fn count_skip(ifindex: u32, s: Skip, passed: Counter) {
    count(
        ifindex,
        if matches!(s, Skip::Malformed | Skip::Truncated) {
            Counter::Malformed
        } else {
            passed
        },
    );
}

#[xdp]
pub fn kanari_xdp_ingress(ctx: XdpContext) -> u32 {
    if xdp_ingress(&ctx).is_some() {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// Steers in XDP; `Some(Shed | Invalid | FragmentDropped)` when the packet
/// must be dropped.
#[inline(always)]
fn xdp_ingress(ctx: &XdpContext) -> Option<Counter> {
    let ifindex = ctx.ingress_ifindex() as u32;
    let (start, end) = (ctx.data(), ctx.data_end());
    // SAFETY: data..data_end is the packet.
    let p = match unsafe { wire::parse_tcp4(start, end, end - start) } {
        Ok(p) => p,
        Err(Skip::NotTcp) => {
            // SAFETY: as above.
            let e = unsafe { wire::parse_icmp4_error(start, end, end - start) };
            let translated = e.is_ok_and(|e| icmp_translate(start, end, &e, Toward::Backend));
            count_icmp(ifindex, translated, Counter::XdpPassed);
            return None;
        }
        Err(Skip::Fragment) if is_service_fragment(start, end) => {
            count(ifindex, Counter::FragmentDropped);
            return Some(Counter::FragmentDropped);
        }
        Err(s) => {
            count_skip(ifindex, s, Counter::XdpPassed);
            return None;
        }
    };
    let Some(svc) = service_of(&p) else {
        {
            count(ifindex, Counter::XdpPassed);
            return None;
        }
    };
    if csum::looks_partial(p.check, p.saddr, p.daddr, p.l4_len) {
        {
            count(ifindex, Counter::XdpDeferred);
            return None;
        }
    }
    let t = match steer(ifindex, &p, &svc) {
        Ok(t) => t,
        Err(c) => {
            count(ifindex, c);
            return matches!(c, Counter::Shed | Counter::Invalid).then_some(c);
        }
    };
    if !xdp_dnat(start, end, &p, t.addr, t.port) {
        return None;
    }
    observe_ingress(&p, &t);
    count_steered(
        ifindex,
        if t.created {
            Counter::XdpSteeredNew
        } else {
            Counter::XdpSteered
        },
    );
    None
}

/// Rewrites the destination of an XDP frame to `addr:port`, updating the
/// IPv4 and TCP checksums incrementally (complete checksums only: see the
/// partial-checksum deferral).
#[inline(always)]
fn xdp_dnat(start: usize, end: usize, p: &Tcp4, addr: u32, port: u16) -> bool {
    let (Ok(ip), Ok(tcp)) = (
        wire::ptr_at_mut::<Ipv4Header>(start, end, ETH_HLEN),
        wire::ptr_at_mut::<TcpHeader>(start, end, p.l4_off),
    ) else {
        return false;
    };
    // SAFETY: both headers were bounds-checked just above.
    unsafe {
        (*ip).daddr = addr.to_ne_bytes();
        let ip_check = u16::from_ne_bytes((*ip).check);
        (*ip).check = csum::replace4(ip_check, p.daddr, addr).to_ne_bytes();
        (*tcp).dport = port.to_ne_bytes();
        let check = csum::replace2(p.check, p.dport, port);
        (*tcp).check = csum::replace4(check, p.daddr, addr).to_ne_bytes();
    }
    true
}

/// The benchmarks' reference (never attached by the agent): the floor any
/// splitter pays — the same parse, one hash lookup of the destination and
/// a DNAT rewrite with incremental checksums; no conntrack, no observer, no
/// counters. `cargo xtask bench -- --suite perpacket` sets its one entry.
#[map(name = "KN_REFERENCE")]
static REFERENCE: HashMap<ServiceKey, Backend> = HashMap::with_max_entries(16, 0);

#[inline(always)]
fn reference_target(p: &Tcp4) -> Option<(u32, u16)> {
    // SAFETY: a value pointer from a successful lookup; copied at once.
    let b = unsafe { *REFERENCE.get_ptr(ServiceKey::tcp(p.daddr, p.dport))? };
    Some((b.addr, b.port))
}

#[xdp]
pub fn kanari_reference_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    // SAFETY: data..data_end is the packet.
    if let Ok(p) = unsafe { wire::parse_tcp4(start, end, end - start) }
        && let Some((addr, port)) = reference_target(&p)
    {
        xdp_dnat(start, end, &p, addr, port);
    }
    xdp_action::XDP_PASS
}

#[classifier]
pub fn kanari_reference_tc(ctx: TcContext) -> i32 {
    if let Ok(p) = parse_tc(&ctx)
        && let Some((addr, port)) = reference_target(&p)
    {
        let _ = tc_rewrite(
            &ctx,
            IP_DADDR_OFF,
            p.l4_off + TCP_DPORT_OFF,
            p.l4_off + TCP_CHECK_OFF,
            (p.daddr, addr),
            (p.dport, port),
        );
    }
    TC_ACT_UNSPEC
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

/// Which way an ICMP error about a connection travels.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Toward {
    /// From the client's side to the VIP, about a reply the VIP sent (a
    /// router there needs a smaller MTU): it is the backend's to hear.
    Backend,
    /// From the backend's side to the client, about a segment the client
    /// sent (translated to the backend): it is the client's to hear, about
    /// the VIP it dialled.
    Client,
}

/// Translates an ICMP error about a connection for the side it goes to:
/// the quoted segment gets back the addresses its sender used (and, toward
/// the backend, the outer destination becomes the backend), with every
/// checksum it carries kept right (the outer IPv4 header's, the ICMP
/// message's, the quoted IPv4 header's and, when quoted, the TCP one).
/// `false` when it is not about a connection kanari translates.
///
/// Direct writes only, each change offset by its checksum's, so the packet's
/// ones'-complement sum is unchanged (a `CHECKSUM_COMPLETE` skb stays right).
#[inline(always)]
fn icmp_translate(start: usize, end: usize, e: &IcmpError4, toward: Toward) -> bool {
    // The quoted segment went one way; its connection's entry in the other
    // direction (keyed by the quote reversed) holds what to write back.
    let key = FlowKey::new(e.inner_daddr, e.inner_saddr, e.inner_dport, e.inner_sport);
    let Some(c) = CONNTRACK.get_ptr(key) else {
        return false;
    };
    // SAFETY: a value pointer from a successful lookup; copied at once.
    let c = unsafe { *c };
    let (kind, old_addr, old_port) = match toward {
        Toward::Backend => (CT_FORWARD, e.inner_saddr, e.inner_sport),
        Toward::Client => (CT_REVERSE, e.inner_daddr, e.inner_dport),
    };
    // Toward the backend, the error must be addressed to the VIP it quotes.
    if c.kind != kind || (toward == Toward::Backend && e.daddr != e.inner_saddr) {
        return false;
    }
    let (new_addr, new_port) = (c.addr, c.port);
    let (Ok(ip), Ok(inner), Ok(ports), Ok(icmp)) = (
        wire::ptr_at_mut::<Ipv4Header>(start, end, ETH_HLEN),
        wire::ptr_at_mut::<Ipv4Header>(start, end, e.inner_off),
        wire::ptr_at_mut::<[u8; 4]>(start, end, e.inner_l4_off),
        wire::ptr_at_mut::<[u8; 4]>(start, end, e.icmp_off),
    ) else {
        return false;
    };
    let tcp_check = match e.inner_tcp_check {
        Some(_) => match wire::ptr_at_mut::<[u8; 2]>(start, end, e.inner_l4_off + TCP_CHECK_OFF) {
            Ok(p) => Some(p),
            Err(_) => return false,
        },
        None => None,
    };
    let inner_ip_check = csum::replace4(e.inner_ip_check, old_addr, new_addr);
    let mut icmp_check = csum::replace4(e.icmp_check, old_addr, new_addr);
    icmp_check = csum::replace2(icmp_check, e.inner_ip_check, inner_ip_check);
    icmp_check = csum::replace2(icmp_check, old_port, new_port);
    // SAFETY: every pointer was bounds-checked above; alignment 1.
    unsafe {
        if toward == Toward::Backend {
            (*ip).daddr = new_addr.to_ne_bytes();
            let check = u16::from_ne_bytes((*ip).check);
            (*ip).check = csum::replace4(check, e.daddr, new_addr).to_ne_bytes();
            (*inner).saddr = new_addr.to_ne_bytes();
            let [a, b] = new_port.to_ne_bytes();
            (*ports)[0] = a;
            (*ports)[1] = b;
        } else {
            (*inner).daddr = new_addr.to_ne_bytes();
            let [a, b] = new_port.to_ne_bytes();
            (*ports)[2] = a;
            (*ports)[3] = b;
        }
        (*inner).check = inner_ip_check.to_ne_bytes();
        if let (Some(p), Some(old)) = (tcp_check, e.inner_tcp_check) {
            let new = csum::replace4(csum::replace2(old, old_port, new_port), old_addr, new_addr);
            *p = new.to_ne_bytes();
            icmp_check = csum::replace2(icmp_check, old, new);
        }
        let [a, b] = icmp_check.to_ne_bytes();
        (*icmp)[2] = a;
        (*icmp)[3] = b;
    }
    true
}

/// The most bytes an ICMP error's translation reads: Ethernet, IPv4 with
/// options, ICMP, the quoted IPv4 header with options, the quoted TCP
/// header up to its checksum.
const MAX_ICMP_PARSE_LEN: usize = ETH_HLEN + 60 + wire::ICMP_HLEN + 60 + TCP_CHECK_OFF + 2;

/// An ICMP error in TC: pulled into the linear area as far as it is read,
/// then translated by [`icmp_translate`].
#[inline(always)]
fn tc_icmp(ctx: &TcContext, toward: Toward) -> bool {
    let len = ctx.len() as usize;
    let want = if len > MAX_ICMP_PARSE_LEN {
        MAX_ICMP_PARSE_LEN
    } else {
        len
    };
    if ctx.data_end() - ctx.data() < want && ctx.pull_data(want as u32).is_err() {
        return false;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    // SAFETY: data..data_end is the packet's linear area.
    match unsafe { wire::parse_icmp4_error(start, end, len) } {
        Ok(e) => icmp_translate(start, end, &e, toward),
        Err(_) => false,
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
    if tc_ingress(&ctx).is_some() {
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn ifindex_of(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Steers in TC; `Some(Shed | Invalid | FragmentDropped)` when the packet
/// must be dropped.
#[inline(always)]
fn tc_ingress(ctx: &TcContext) -> Option<Counter> {
    let ifindex = ifindex_of(ctx);
    let p = match parse_tc(ctx) {
        Ok(p) => p,
        Err(Skip::NotTcp) => {
            count_icmp(ifindex, tc_icmp(ctx, Toward::Backend), Counter::TcPassed);
            return None;
        }
        Err(Skip::Fragment) if is_service_fragment(ctx.data(), ctx.data_end()) => {
            count(ifindex, Counter::FragmentDropped);
            return Some(Counter::FragmentDropped);
        }
        Err(s) => {
            count_skip(ifindex, s, Counter::TcPassed);
            return None;
        }
    };
    let Some(svc) = service_of(&p) else {
        {
            count(ifindex, Counter::TcPassed);
            return None;
        }
    };
    let t = match steer(ifindex, &p, &svc) {
        Ok(t) => t,
        Err(c) => {
            count(ifindex, c);
            return matches!(c, Counter::Shed | Counter::Invalid).then_some(c);
        }
    };
    let rewritten = tc_rewrite(
        ctx,
        IP_DADDR_OFF,
        p.l4_off + TCP_DPORT_OFF,
        p.l4_off + TCP_CHECK_OFF,
        (p.daddr, t.addr),
        (p.dport, t.port),
    );
    if rewritten.is_err() {
        count(ifindex, Counter::RewriteFailed);
        return Some(Counter::RewriteFailed);
    }
    observe_ingress(&p, &t);
    count_steered(
        ifindex,
        if t.created {
            Counter::TcSteeredNew
        } else {
            Counter::TcSteered
        },
    );
    None
}

#[classifier]
pub fn kanari_tc_egress(ctx: TcContext) -> i32 {
    if tc_egress(&ctx) {
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

/// Reverse-translates in TC; `true` when the packet must be dropped (a
/// translation failed halfway).
#[inline(always)]
fn tc_egress(ctx: &TcContext) -> bool {
    let ifindex = ifindex_of(ctx);
    let p = match parse_tc(ctx) {
        Ok(p) => p,
        Err(Skip::NotTcp) => {
            count_icmp(ifindex, tc_icmp(ctx, Toward::Client), Counter::EgressPassed);
            return false;
        }
        Err(s) => {
            count_skip(ifindex, s, Counter::EgressPassed);
            return false;
        }
    };
    let key = FlowKey::new(p.saddr, p.daddr, p.sport, p.dport);
    let Some(e) = CONNTRACK.get_ptr_mut(key) else {
        count(ifindex, Counter::EgressPassed);
        return false;
    };
    // SAFETY: a value pointer from a successful lookup (see CtEntry on sharing).
    let e = unsafe { &mut *e };
    if e.kind != CT_REVERSE {
        count(ifindex, Counter::EgressPassed);
        return false;
    }
    touch(e);
    let e = *e;
    let rewritten = tc_rewrite(
        ctx,
        IP_SADDR_OFF,
        p.l4_off + TCP_SPORT_OFF,
        p.l4_off + TCP_CHECK_OFF,
        (p.saddr, e.addr),
        (p.sport, e.port),
    );
    if rewritten.is_err() {
        count(ifindex, Counter::RewriteFailed);
        return true;
    }
    count(ifindex, Counter::TcReversed);
    observe_egress(ctx, &p, &e);
    false
}

/// The backend's side of the connection: connect time, refusals, resets,
/// and the answer to a pending request.
#[inline(always)]
fn observe_egress(ctx: &TcContext, p: &Tcp4, reverse: &CtEntry) {
    let Some(s) = stats(reverse.backend_id) else {
        return;
    };
    s.packets[FROM_BACKEND] += 1;
    s.bytes[FROM_BACKEND] += p.l4_len as u64 + (p.l4_off - ETH_HLEN) as u64;
    let payload = p.payload_len();
    if !p.is_syn_ack() && !p.is_rst() && !p.is_fin() && payload == 0 {
        return;
    }
    // The forward entry holds the connection's state: client -> VIP.
    let fkey = FlowKey::new(p.daddr, reverse.addr, p.dport, reverse.port);
    let Some(f) = CONNTRACK.get_ptr_mut(fkey) else {
        return;
    };
    // SAFETY: a value pointer from a successful lookup (see CtEntry on sharing).
    let f = unsafe { &mut *f };
    // Only the backend the connection is on speaks for it.
    if f.kind != CT_FORWARD || f.addr != p.saddr || f.port != p.sport {
        return;
    }
    touch(f);
    if p.is_rst() {
        f.flags |= CT_F_RST;
    } else {
        f.flags &= !CT_F_UNCONFIRMED;
        if p.is_fin() {
            f.flags |= CT_F_FIN_BACKEND;
        }
    }
    let w = Watch {
        syn_ns: &mut f.syn_ns,
        req_ns: &mut f.req_ns,
        status_pos: &mut f.status_pos,
        status_code: &mut f.status_code,
        http: f.flags & CT_F_HTTP != 0,
    };
    from_backend(s, w, p.is_rst(), p.is_syn_ack(), payload as usize, |buf| {
        read_payload(ctx, p, payload, buf)
    });
}

/// The observer's state of one connection, wherever it is kept (a
/// conntrack entry on the packet path, a socket's entry on the socket path).
struct Watch<'a> {
    syn_ns: &'a mut u64,
    req_ns: &'a mut u64,
    status_pos: &'a mut u8,
    status_code: &'a mut u16,
    http: bool,
}

/// A packet from the backend: connect time (SYN-ACK), refusals and resets
/// (RST), and the answer to a pending request — its time to first byte
/// and, for HTTP, its status class (`read` copies up to 12 payload bytes).
#[inline(always)]
fn from_backend(
    s: &mut BackendStats,
    w: Watch,
    rst: bool,
    syn_ack: bool,
    payload: usize,
    read: impl FnOnce(&mut [u8; STATUS_LINE_LEN]) -> usize,
) {
    let now = now_ns();
    if rst {
        if *w.syn_ns != 0 {
            s.refused += 1;
        } else {
            s.resets += 1;
        }
        *w.syn_ns = 0;
        *w.req_ns = 0;
        *w.status_pos = 0;
        return;
    }
    if syn_ack {
        if *w.syn_ns != 0 {
            let d = now.saturating_sub(*w.syn_ns);
            s.connects += 1;
            s.connect_sum_ns += d;
            record(&mut s.connect_hist, d);
            *w.syn_ns = 0;
        }
        return;
    }
    if payload == 0 {
        return;
    }
    let parse = if *w.req_ns != 0 {
        // The first byte of the answer to a pending request.
        let d = now.saturating_sub(*w.req_ns);
        s.ttfb_sum_ns += d;
        record(&mut s.ttfb_hist, d);
        *w.req_ns = 0;
        if !w.http {
            s.requests[http::CLASS_NONE] += 1;
            return;
        }
        StatusParse::default()
    } else if *w.status_pos != 0 {
        // The rest of a status line split across segments.
        StatusParse {
            pos: *w.status_pos,
            code: *w.status_code,
        }
    } else {
        return;
    };
    // Two word stores rather than a byte loop (memset) the verifier would walk.
    let mut words = [0u64; 2];
    // SAFETY: 16 initialized bytes, viewed as the first 12.
    let buf = unsafe { &mut *(words.as_mut_ptr() as *mut [u8; STATUS_LINE_LEN]) };
    let n = read(buf);
    let class = match http::feed(parse, buf, n) {
        http::Feed::Incomplete(next) => {
            *w.status_pos = next.pos;
            *w.status_code = next.code;
            return;
        }
        http::Feed::Done(code) => http::class_of(code),
        http::Feed::Invalid => http::CLASS_OTHER,
    };
    *w.status_pos = 0;
    if let Some(c) = s.requests.get_mut(class) {
        *c += 1;
    }
}

/// Copies up to 12 bytes of payload into `buf`; returns how many.
#[inline(always)]
fn read_payload(ctx: &TcContext, p: &Tcp4, payload: u16, buf: &mut [u8; STATUS_LINE_LEN]) -> usize {
    let want = if payload as usize >= STATUS_LINE_LEN {
        STATUS_LINE_LEN
    } else {
        payload as usize
    };
    // The helper wants a size the verifier can prove is 1 to 12.
    let Some(n) = in_range::<1, { STATUS_LINE_LEN as u64 }>(want as u64) else {
        return 0;
    };
    // SAFETY: buf has 12 bytes and n <= 12; the helper checks the skb's bounds.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            p.payload_off() as u32,
            buf.as_mut_ptr().cast(),
            n as u32,
        )
    };
    if r == 0 { n as usize } else { 0 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// ---- the socket path --------------------------------------------------------

/// Allow the call (a `sock_addr` program's verdict; 0 would refuse it).
const SOCK_ALLOW: i32 = 1;

/// A 64-bit cookie folded for the 32-bit hashes.
#[inline(always)]
const fn fold(c: u64) -> u32 {
    (c ^ (c >> 32)) as u32
}

/// connect() of a socket in the cgroup: a TCP or UDP service's VIP
/// becomes one of its backends, chosen as the packet path chooses
/// (weights; a group with no backend sends its share to the other). With
/// client affinity the group follows the caller's network namespace (a
/// pod, or the host): the source address is not chosen yet at connect(),
/// so client segments do not apply here. Never refuses the call.
#[cgroup_sock_addr(connect4)]
pub fn kanari_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock_steer(&ctx, false);
    SOCK_ALLOW
}

/// sendmsg() of an unconnected UDP socket to a UDP service's VIP: the
/// datagram goes to the backend the socket was given by its first datagram
/// to that VIP (a socket's datagrams stay on one backend, as conntrack
/// keeps a source port on one), else to one chosen as connect() chooses.
#[cgroup_sock_addr(sendmsg4)]
pub fn kanari_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_steer(&ctx, true);
    SOCK_ALLOW
}

#[inline(always)]
fn sock_steer(ctx: &SockAddrContext, sendmsg: bool) {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; these fields are readable by
    // connect4 and sendmsg4 programs.
    let (proto, vip, vport) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let proto = proto as u8;
    if proto != wire::IPPROTO_TCP && proto != wire::IPPROTO_UDP {
        return;
    }
    let vport = vport as u16;
    // SAFETY: a value pointer from a successful lookup; copied at once.
    let Some(svc) = SERVICES
        .get_ptr(ServiceKey::new(vip, vport, proto))
        .map(|s| unsafe { *s })
    else {
        return;
    };
    // SAFETY: helpers valid in sock_addr programs, given their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if sendmsg && let Some(e) = SOCKETS.get_ptr(cookie) {
        // SAFETY: a value pointer from a successful lookup; copied at once.
        let e = unsafe { *e };
        // The socket's backend, while its group's backend set is the one it
        // was chosen from (a removed backend gets no more datagrams).
        if e.vip == vip && e.vport == vport && slot_of(&svc, e.group) == e.slot as u32 {
            // SAFETY: sendmsg4 programs may write the destination.
            unsafe {
                (*sa).user_ip4 = e.baddr;
                (*sa).user_port = e.bport as u32;
            }
            return;
        }
    }
    let flow = hash::client_hash(fold(cookie), svc.salt);
    let group_hash = if svc.flags & SERVICE_F_CONNECTION_AFFINITY != 0 {
        flow
    } else {
        // SAFETY: as above.
        hash::client_hash(
            fold(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }),
            svc.salt,
        )
    };
    let wanted = select::wanted_group(svc.canary_weight, select::bucket(group_hash), None);
    let (group, set) = match backend_set(&svc, wanted) {
        Some(set) => (wanted, set),
        None => match backend_set(&svc, wanted.other()) {
            Some(set) => (wanted.other(), set),
            None => {
                count(SOCKET_IFINDEX, Counter::SocketNoBackend);
                return;
            }
        },
    };
    let Some(b) = pick(set, flow) else {
        count(SOCKET_IFINDEX, Counter::SocketNoBackend);
        return;
    };
    let entry = SockEntry {
        vip,
        vport,
        bport: b.port,
        baddr: b.addr,
        backend_id: b.id,
        service_id: svc.id,
        flags: if svc.flags & SERVICE_F_HTTP != 0 {
            CT_F_HTTP
        } else {
            0
        },
        group: group as u8,
        proto,
        slot: slot_of(&svc, group as u8) as u16,
        ..SockEntry::default()
    };
    // Remembered first: a socket that getpeername() or recvmsg() could not
    // answer with the VIP is not steered.
    if SOCKETS.insert(cookie, entry, 0).is_err() {
        return;
    }
    // SAFETY: connect4 and sendmsg4 programs may write the destination.
    unsafe {
        (*sa).user_ip4 = b.addr;
        (*sa).user_port = b.port as u32;
    }
    count(SOCKET_IFINDEX, Counter::SocketSteered);
}

/// getpeername() of a socket the socket path steered: the VIP it dialled.
#[cgroup_sock_addr(getpeername4)]
pub fn kanari_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_unsteer(&ctx);
    SOCK_ALLOW
}

/// recvmsg() of a UDP socket the socket path steered: a datagram from its
/// backend comes from the VIP it was sent to.
#[cgroup_sock_addr(recvmsg4)]
pub fn kanari_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_unsteer(&ctx);
    SOCK_ALLOW
}

#[inline(always)]
fn sock_unsteer(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(e) = SOCKETS.get_ptr(cookie) {
        // SAFETY: a value pointer from a successful lookup; the context's
        // address fields are readable and writable by getpeername4 and
        // recvmsg4.
        unsafe {
            let e = *e;
            if (*sa).user_ip4 == e.baddr && (*sa).user_port as u16 == e.bport {
                (*sa).user_ip4 = e.vip;
                (*sa).user_port = e.vport as u32;
            }
        }
    }
}

/// The observer of the socket path: every packet of a steered socket, as
/// the cgroup sees it (from the IPv4 header on), into its backend's
/// statistics — connections and connect time (SYN out, SYN-ACK in),
/// refusals, resets, unanswered SYNs, and per request the time to first
/// byte and the HTTP status class. Other sockets cost one lookup.
#[cgroup_skb(egress)]
pub fn kanari_sock_egress(ctx: SkBuffContext) -> i32 {
    sock_observe(&ctx, true);
    SOCK_ALLOW
}

#[cgroup_skb(ingress)]
pub fn kanari_sock_ingress(ctx: SkBuffContext) -> i32 {
    sock_observe(&ctx, false);
    SOCK_ALLOW
}

const TCP_SYN: u16 = 0x02;
const TCP_RST: u16 = 0x04;
const TCP_ACK: u16 = 0x10;

#[inline(always)]
fn sock_observe(ctx: &SkBuffContext, egress: bool) -> Option<()> {
    // SAFETY: a helper valid in cgroup_skb programs, given its context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let e = SOCKETS.get_ptr_mut(cookie)?;
    // SAFETY: a value pointer from a successful lookup; plain integers
    // another CPU may write at the same time (as conntrack's).
    let e = unsafe { &mut *e };
    let vihl: u8 = ctx.load(0).ok()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let total = u16::from_be(ctx.load::<u16>(2).ok()?) as usize;
    let proto: u8 = ctx.load(9).ok()?;
    if !(20..=60).contains(&ihl) || proto != e.proto {
        return None;
    }
    if proto == wire::IPPROTO_UDP {
        return udp_observe(ctx, e, egress, ihl, total);
    }
    let word = u16::from_be(ctx.load::<u16>(ihl + 12).ok()?);
    let doff = ((word >> 12) as usize) * 4;
    let flags = word & 0x3f;
    let payload = total.checked_sub(ihl + doff)?;
    let s = sock_stats(e.backend_id)?;
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    if egress {
        s.packets[TO_BACKEND] += 1;
        s.bytes[TO_BACKEND] += total as u64;
        if syn && !ack {
            if e.syn_ns == 0 {
                e.syn_ns = now_ns();
                s.connections += 1;
            } else if e.flags & CT_F_RETRIED == 0 {
                // The SYN again: one unanswered attempt, counted once.
                e.flags |= CT_F_RETRIED;
                s.unanswered += 1;
            }
        } else if payload > 0 && e.req_ns == 0 && e.status_pos == 0 {
            e.req_ns = now_ns();
        }
        return Some(());
    }
    s.packets[FROM_BACKEND] += 1;
    s.bytes[FROM_BACKEND] += total as u64;
    let http = e.flags & CT_F_HTTP != 0;
    let w = Watch {
        syn_ns: &mut e.syn_ns,
        req_ns: &mut e.req_ns,
        status_pos: &mut e.status_pos,
        status_code: &mut e.status_code,
        http,
    };
    let at = (ihl + doff) as u32;
    from_backend(s, w, flags & TCP_RST != 0, syn && ack, payload, |buf| {
        let want = if payload >= STATUS_LINE_LEN {
            STATUS_LINE_LEN
        } else {
            payload
        };
        // The helper wants a size the verifier can prove is 1 to 12.
        let Some(n) = in_range::<1, { STATUS_LINE_LEN as u64 }>(want as u64) else {
            return 0;
        };
        // SAFETY: buf has 12 bytes and n <= 12; the helper checks the skb's bounds.
        let r = unsafe {
            bpf_skb_load_bytes(ctx.skb.skb.cast(), at, buf.as_mut_ptr().cast(), n as u32)
        };
        if r == 0 { n as usize } else { 0 }
    });
    Some(())
}

/// A datagram of a UDP socket the socket path steered, to or from its
/// backend: one sent while none is pending starts an exchange, the first
/// one back answers it (time to first byte; no class). Datagrams to or
/// from other addresses are not the backend's.
#[inline(always)]
fn udp_observe(
    ctx: &SkBuffContext,
    e: &mut SockEntry,
    egress: bool,
    ihl: usize,
    total: usize,
) -> Option<()> {
    let (addr_at, port_at) = if egress { (16, ihl + 2) } else { (12, ihl) };
    let addr: u32 = ctx.load(addr_at).ok()?;
    let port: u16 = ctx.load(port_at).ok()?;
    if addr != e.baddr || port != e.bport {
        return None;
    }
    let payload = total.checked_sub(ihl + 8)?;
    let s = sock_stats(e.backend_id)?;
    if egress {
        s.packets[TO_BACKEND] += 1;
        s.bytes[TO_BACKEND] += total as u64;
        if payload > 0 && e.req_ns == 0 {
            e.req_ns = now_ns();
        }
        return Some(());
    }
    s.packets[FROM_BACKEND] += 1;
    s.bytes[FROM_BACKEND] += total as u64;
    let w = Watch {
        syn_ns: &mut e.syn_ns,
        req_ns: &mut e.req_ns,
        status_pos: &mut e.status_pos,
        status_code: &mut e.status_code,
        http: false,
    };
    from_backend(s, w, false, false, payload, |_| 0);
    Some(())
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
