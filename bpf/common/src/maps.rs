//! Map names, sizes, keys and values shared by the eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with its padding spelled out (and zeroed by the
//! constructors) and its size asserted, so both sides agree byte for byte.
//! Names carry a version suffix: a layout change gets a new name, so an agent
//! never writes one layout into a map of another.

use core::mem::size_of;

/// Map names as the kernel shows them (at most 15 characters).
pub mod names {
    pub const SERVICES: &str = "KN_SERVICES_V1";
    pub const BACKENDS: &str = "KN_BACKENDS_V2";
    pub const CONNTRACK: &str = "KN_CT_V2";
    /// The conntrack table of earlier versions (40-byte entries, no time
    /// seen): its entries are carried over into `CONNTRACK` at start.
    pub const CONNTRACK_V1: &str = "KN_CT_V1";
    pub const SEGMENTS: &str = "KN_SEGMENTS_V1";
    pub const COUNTERS: &str = "KN_COUNTERS_V2";
    /// Packet counters of interfaces with a small index, per CPU, in an
    /// array (an index, not a hash lookup, on every packet).
    pub const IF_COUNTERS: &str = "KN_IFCOUNT_V1";
    pub const STATS: &str = "KN_STATS_V2";
    /// The socket path's per-backend statistics (same layout and ids as
    /// `STATS`): kept apart so they can be told apart (`path` label).
    pub const SOCK_STATS: &str = "KN_SOCKSTATS_V1";
    pub const SETTINGS: &str = "KN_SETTINGS_V1";
    pub const GUARD: &str = "KN_GUARD_V1";
    pub const SOCKETS: &str = "KN_SOCKETS_V1";
    /// The benchmarks' reference program's one map (VIP:port -> backend);
    /// never pinned, never written by the agent.
    pub const REFERENCE: &str = "KN_REFERENCE";
}

/// Program names (the function names in the eBPF object).
pub mod programs {
    pub const XDP_INGRESS: &str = "kanari_xdp_ingress";
    pub const TC_INGRESS: &str = "kanari_tc_ingress";
    pub const TC_EGRESS: &str = "kanari_tc_egress";
    /// The socket path (cgroup v2 `sock_addr` hooks, `socket_lb:`).
    pub const SOCK_CONNECT4: &str = "kanari_sock_connect4";
    pub const SOCK_SENDMSG4: &str = "kanari_sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "kanari_sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "kanari_sock_getpeername4";
    pub const SOCK_EGRESS: &str = "kanari_sock_egress";
    pub const SOCK_INGRESS: &str = "kanari_sock_ingress";
    /// The benchmarks' reference: parse, one lookup, DNAT (never attached).
    pub const REFERENCE_XDP: &str = "kanari_reference_xdp";
    pub const REFERENCE_TC: &str = "kanari_reference_tc";
}

/// Canary weights are in basis points: 10000 = 100 %.
pub const BASIS_POINTS: u32 = 10_000;
/// Services one agent can serve.
pub const MAX_SERVICES: u32 = 1024;
/// Backends per group of a service.
pub const MAX_BACKENDS_PER_GROUP: usize = 32;
/// Backend-set slots: per service, two groups, two generations each (the new
/// set is written to the idle generation, then the service is switched to it
/// in one write).
pub const BACKEND_SET_SLOTS: u32 = MAX_SERVICES * 4;
/// Client CIDR segments over all services.
pub const MAX_SEGMENTS: u32 = 16 * 1024;
/// Default number of backends whose statistics the kernel keeps (the size of
/// `KN_STATS_V2`, about 2 KiB per backend per CPU). Backend ids index it.
pub const DEFAULT_MAX_BACKENDS: u32 = 1024;
/// Interface x counter pairs in `KN_COUNTERS_V2`.
pub const MAX_COUNTER_KEYS: u32 = 64 * 32;
/// Interfaces with an index below this count in `KN_IFCOUNT_V1` (slot =
/// ifindex; the socket path's 0 among them); the others in `KN_COUNTERS_V2`.
pub const IF_COUNTER_SLOTS: u32 = 64;
/// Counters per interface slot (room for [`Counter::COUNT`] and more).
pub const COUNTERS_PER_SLOT: usize = 32;

/// Value of `KN_IFCOUNT_V1`, a per-CPU array indexed by ifindex: one
/// interface's packet counts by [`Counter`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfCounters {
    pub by_counter: [u64; COUNTERS_PER_SLOT],
}
/// Default number of connections the conntrack table holds. The map holds two
/// entries per connection (forward and reverse).
pub const DEFAULT_CONNTRACK_CONNECTIONS: u32 = 262_144;

/// The slot of a service's backend set for `group` and `generation` (0 or 1).
#[inline(always)]
pub const fn backend_set_slot(service_id: u32, group: Group, generation: u32) -> u32 {
    service_id * 4 + (group as u32) * 2 + (generation & 1)
}

/// The version a connection is steered to.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    Stable = 0,
    Canary = 1,
}

impl Group {
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Option<Group> {
        match v {
            0 => Some(Group::Stable),
            1 => Some(Group::Canary),
            _ => None,
        }
    }

    #[inline(always)]
    pub const fn other(self) -> Group {
        match self {
            Group::Stable => Group::Canary,
            Group::Canary => Group::Stable,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Group::Stable => "stable",
            Group::Canary => "canary",
        }
    }
}

/// Key of `KN_SERVICES_V1`: the virtual address a service listens on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// VIP, network order.
    pub addr: u32,
    /// Port, network order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    #[inline(always)]
    pub const fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }

    #[inline(always)]
    pub const fn tcp(addr: u32, port: u16) -> Self {
        Self::new(addr, port, crate::wire::IPPROTO_TCP)
    }

    /// A UDP service: steered by the socket path only (the packet path
    /// passes UDP untouched).
    #[inline(always)]
    pub const fn udp(addr: u32, port: u16) -> Self {
        Self::new(addr, port, crate::wire::IPPROTO_UDP)
    }
}

/// `Service::flags`: pick the group by the 5-tuple hash instead of the client address.
pub const SERVICE_F_CONNECTION_AFFINITY: u32 = 1 << 0;
/// `Service::flags`: the service has client segments in `KN_SEGMENTS_V1`
/// (spares the trie lookup for services without).
pub const SERVICE_F_SEGMENTS: u32 = 1 << 1;
/// `Service::flags`: `protocol: http`: responses carry a status line to classify.
pub const SERVICE_F_HTTP: u32 = 1 << 2;

/// Value of `KN_SERVICES_V1`. A weight change is one update of this value;
/// so is switching to a new backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    /// Index of the service: backend-set slots and per-service counters.
    pub id: u32,
    /// Share of new clients (or connections) for the canary, in basis points.
    pub canary_weight: u32,
    /// Salt of the hashes, so services split independently.
    pub salt: u32,
    pub flags: u32,
    /// Slot in `KN_BACKENDS_V1` of the stable set (index 0) and the canary set (index 1).
    pub backend_sets: [u32; 2],
}

/// One backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    pub _pad: u16,
    /// Index of the backend's counters, unique across services.
    pub id: u32,
}

/// Value of `KN_BACKENDS_V2`: the backends of one group of one service, and
/// the Maglev table a connection's backend is looked up in (see
/// [`crate::maglev`]), written together in one update.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendSet {
    pub len: u32,
    pub backends: [Backend; MAX_BACKENDS_PER_GROUP],
    /// Indexes into `backends`, by [`crate::maglev::slot`].
    pub table: [u8; crate::maglev::SIZE],
    pub _pad: [u8; 1],
}

impl BackendSet {
    pub const EMPTY: BackendSet = BackendSet {
        len: 0,
        backends: [Backend {
            addr: 0,
            port: 0,
            _pad: 0,
            id: 0,
        }; MAX_BACKENDS_PER_GROUP],
        table: [crate::maglev::NONE; crate::maglev::SIZE],
        _pad: [0; 1],
    };

    /// The set of `backends` (at most [`MAX_BACKENDS_PER_GROUP`]) with its table.
    pub fn of(backends: &[Backend]) -> BackendSet {
        let mut set = BackendSet::EMPTY;
        let n = backends.len().min(MAX_BACKENDS_PER_GROUP);
        set.len = n as u32;
        set.backends[..n].copy_from_slice(&backends[..n]);
        crate::maglev::fill(&set.backends[..n], &mut set.table);
        set
    }

    /// The backend a connection with `backend_hash` takes (the host's
    /// mirror of the kernel's lookup).
    pub fn pick(&self, backend_hash: u32) -> Option<&Backend> {
        let i = self.table[crate::maglev::slot(backend_hash)] as usize;
        if i < self.len as usize {
            self.backends.get(i)
        } else {
            None
        }
    }
}

/// Key of `KN_CT_V1`: a connection as seen in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    #[inline(always)]
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto: crate::wire::IPPROTO_TCP,
            _pad: [0; 3],
        }
    }
}

/// `CtEntry::kind` of the client -> VIP direction: `addr:port` is the backend.
pub const CT_FORWARD: u8 = 1;
/// `CtEntry::kind` of the backend -> client direction: `addr:port` is the VIP.
pub const CT_REVERSE: u8 = 2;

/// `CtEntry::flags`: the connection's service speaks HTTP/1.x.
pub const CT_F_HTTP: u8 = 1 << 0;
/// The pending SYN was sent again: `unanswered` counted for this attempt.
pub const CT_F_RETRIED: u8 = 1 << 1;
/// The client sent a FIN (forward entries).
pub const CT_F_FIN_CLIENT: u8 = 1 << 2;
/// The backend sent a FIN (forward entries).
pub const CT_F_FIN_BACKEND: u8 = 1 << 3;
/// Either side sent a RST (forward entries).
pub const CT_F_RST: u8 = 1 << 4;
/// Made from a packet of a connection without entry (not a SYN), and the
/// backend has not spoken on it since (forward entries): aged as a SYN
/// sent, so a spoofed packet's entry does not stay for hours.
pub const CT_F_UNCONFIRMED: u8 = 1 << 5;

/// `CtEntry::seen` is the monotonic clock's nanoseconds shifted right by
/// this: units of 2^30 ns (1.074 s), a shift rather than a division on the
/// packet path.
pub const SEEN_SHIFT: u32 = 30;

/// The `CtEntry::seen` of monotonic time `ns`.
#[inline(always)]
pub const fn seen_at(ns: u64) -> u32 {
    (ns >> SEEN_SHIFT) as u32
}

/// Where a connection is in its life, as its forward entry tells it; the
/// agent removes an entry idle for longer than its state's timeout. The
/// discriminants are the indexes of [`CtState::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtState {
    /// The backend has not answered yet: the SYN went to it and no SYN-ACK
    /// came back, or the entry was made from a later packet of a connection
    /// without one and the backend has not spoken on it since.
    SynSent = 0,
    Established = 1,
    /// One side sent a FIN.
    Closing = 2,
    /// Both sides sent a FIN, or either a RST: the ports may be reused.
    Closed = 3,
}

impl CtState {
    pub const ALL: [CtState; 4] = [
        CtState::SynSent,
        CtState::Established,
        CtState::Closing,
        CtState::Closed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            CtState::SynSent => "syn_sent",
            CtState::Established => "established",
            CtState::Closing => "closing",
            CtState::Closed => "closed",
        }
    }
}

/// Value of `KN_CT_V1`.
///
/// The observer's per-connection state lives in the forward entry only; the
/// egress program reaches it from the reverse entry (the forward key is the
/// reply's destination and the VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// The address to write: the backend (forward) or the VIP (reverse).
    pub addr: u32,
    pub port: u16,
    /// [`Group`] as u8.
    pub group: u8,
    /// [`CT_FORWARD`] or [`CT_REVERSE`].
    pub kind: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// When the SYN went to the backend (monotonic ns); 0 once it answered.
    pub syn_ns: u64,
    /// When the pending request began: the client's first payload after the
    /// last response; 0 when no request is pending.
    pub req_ns: u64,
    /// Progress of the response's status line across segments (0: none).
    pub status_pos: u8,
    /// `CT_F_*`.
    pub flags: u8,
    /// Status digits read so far.
    pub status_code: u16,
    /// Forward entries opened by a SYN: its sequence number (wire order),
    /// which a retransmission of it repeats and a new connection on the
    /// same ports does not.
    pub isn: u32,
    /// When a packet of this direction was last seen, in [`SEEN_SHIFT`]
    /// units of the monotonic clock (about a second; written at most once
    /// a unit): the agent ages entries by it.
    pub seen: u32,
    pub _pad: u32,
}

impl CtEntry {
    /// An entry with no observation in progress.
    #[inline(always)]
    pub const fn new(
        kind: u8,
        addr: u32,
        port: u16,
        group: u8,
        backend_id: u32,
        service_id: u32,
    ) -> Self {
        Self {
            addr,
            port,
            group,
            kind,
            backend_id,
            service_id,
            syn_ns: 0,
            req_ns: 0,
            status_pos: 0,
            flags: 0,
            status_code: 0,
            isn: 0,
            seen: 0,
            _pad: 0,
        }
    }

    /// Whether the connection has ended: its ports may open a new one.
    #[inline(always)]
    pub const fn closed(&self) -> bool {
        self.flags & CT_F_RST != 0
            || self.flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND)
                == CT_F_FIN_CLIENT | CT_F_FIN_BACKEND
    }

    /// The state of a forward entry's connection.
    pub const fn state(&self) -> CtState {
        if self.closed() {
            CtState::Closed
        } else if self.syn_ns != 0 || self.flags & CT_F_UNCONFIRMED != 0 {
            CtState::SynSent
        } else if self.flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND) != 0 {
            CtState::Closing
        } else {
            CtState::Established
        }
    }
}

/// The previous conntrack value (`KN_CT_V1`), read to carry its entries over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntryV1 {
    pub addr: u32,
    pub port: u16,
    pub group: u8,
    pub kind: u8,
    pub backend_id: u32,
    pub service_id: u32,
    pub syn_ns: u64,
    pub req_ns: u64,
    pub status_pos: u8,
    pub flags: u8,
    pub status_code: u16,
    pub isn: u32,
}

impl CtEntryV1 {
    /// The entry in today's layout, seen at `seen`.
    pub const fn upgrade(&self, seen: u32) -> CtEntry {
        CtEntry {
            addr: self.addr,
            port: self.port,
            group: self.group,
            kind: self.kind,
            backend_id: self.backend_id,
            service_id: self.service_id,
            syn_ns: self.syn_ns,
            req_ns: self.req_ns,
            status_pos: self.status_pos,
            flags: self.flags,
            status_code: self.status_code,
            isn: self.isn,
            seen,
            _pad: 0,
        }
    }
}

/// Request classes counted in [`BackendStats::requests`] (see [`crate::http`]).
pub const CLASSES: usize = crate::http::CLASSES;

/// Value of `KN_STATS_V2`, a per-CPU array indexed by backend id. Every field
/// only grows; the agent sums CPUs and takes differences. Histogram buckets
/// are u32 to halve the map (they wrap; the agent's differences wrap with them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendStats {
    /// Connections opened: SYNs forwarded to this backend.
    pub connections: u64,
    /// SYN-ACKs seen: connect-time samples.
    pub connects: u64,
    pub connect_sum_ns: u64,
    /// RSTs from the backend on established connections.
    pub resets: u64,
    /// RSTs from the backend answering a SYN.
    pub refused: u64,
    /// Connection attempts whose SYN the client sent again because the
    /// backend did not answer (once per attempt, however often it is sent).
    pub unanswered: u64,
    /// Exchanges by class (`http::CLASS_*`).
    pub requests: [u64; CLASSES],
    /// Sum of time-to-first-byte samples.
    pub ttfb_sum_ns: u64,
    /// To the backend, from the backend (IP bytes).
    pub bytes: [u64; 2],
    pub packets: [u64; 2],
    /// Time to first byte, in [`crate::hist::TTFB`]'s buckets.
    pub ttfb_hist: [u32; crate::hist::TTFB_BUCKETS],
    /// Connect time, in [`crate::hist::CONNECT`]'s buckets.
    pub connect_hist: [u32; crate::hist::CONNECT_BUCKETS],
}

impl BackendStats {
    pub const ZERO: BackendStats = BackendStats {
        connections: 0,
        connects: 0,
        connect_sum_ns: 0,
        resets: 0,
        refused: 0,
        unanswered: 0,
        requests: [0; CLASSES],
        ttfb_sum_ns: 0,
        bytes: [0; 2],
        packets: [0; 2],
        ttfb_hist: [0; crate::hist::TTFB_BUCKETS],
        connect_hist: [0; crate::hist::CONNECT_BUCKETS],
    };
}

/// Value of `KN_SETTINGS_V1` (one element): knobs the agent sets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// New connections each CPU may record per second; 0: no limit.
    pub new_per_sec_per_cpu: u64,
    /// How many may come at once (the token bucket's depth).
    pub burst: u64,
}

/// Value of `KN_GUARD_V1`, a per-CPU array of one token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens, in billionths (one new connection costs 1e9).
    pub tokens: u64,
    pub last_ns: u64,
}

/// One token, in the bucket's unit.
pub const TOKEN: u64 = 1_000_000_000;

/// Whether a new connection may be recorded now, refilling `b` at `rate`
/// per second up to `burst`; takes a token when it may. Pure, so the kernel's
/// guard is tested on the host.
#[inline(always)]
pub fn admit(b: &mut Bucket, now_ns: u64, rate: u64, burst: u64) -> bool {
    if rate == 0 {
        return true;
    }
    // Bounded so the products stay below 2^63 without 128-bit arithmetic
    // (which eBPF lacks): at most a second of refill, rate and burst of at
    // most a billion.
    let elapsed = now_ns.saturating_sub(b.last_ns);
    let elapsed = if elapsed > TOKEN { TOKEN } else { elapsed };
    let rate = if rate > TOKEN { TOKEN } else { rate };
    let burst = if burst > TOKEN {
        TOKEN
    } else if burst == 0 {
        1
    } else {
        burst
    };
    let cap = burst.wrapping_mul(TOKEN);
    let refilled = b.tokens.saturating_add(elapsed.wrapping_mul(rate));
    b.tokens = if refilled > cap { cap } else { refilled };
    b.last_ns = now_ns;
    if b.tokens >= TOKEN {
        b.tokens -= TOKEN;
        true
    } else {
        false
    }
}

/// Direction index of `BackendStats::bytes` and `packets`.
pub const TO_BACKEND: usize = 0;
pub const FROM_BACKEND: usize = 1;

/// Key of `KN_COUNTERS_V2`, a per-CPU hash of packet counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub ifindex: u32,
    /// [`Counter`] as u32.
    pub counter: u32,
}

/// Key data of `KN_SEGMENTS_V1` (an LPM trie): the prefix length covers the
/// 32 bits of the service id, then the client CIDR's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentKey {
    /// Service id, big endian so the trie compares it bit by bit from the top.
    pub service_id_be: u32,
    /// Client address, network order.
    pub addr: u32,
}

impl SegmentKey {
    /// Bits of the key the service id takes.
    pub const SERVICE_BITS: u32 = 32;

    #[inline(always)]
    pub const fn new(service_id: u32, addr: u32) -> Self {
        Self {
            service_id_be: service_id.to_be(),
            addr,
        }
    }
}

/// Value of `KN_SEGMENTS_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Segment {
    /// [`Group`] as u32.
    pub group: u32,
}

/// Indexes of `KN_COUNTERS_V1`, a per-CPU array of u64 packet counts.
/// Append only: the agent reads them by index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// XDP translated a packet of a known connection.
    XdpSteered = 0,
    /// XDP translated the first packet of a connection and recorded it.
    XdpSteeredNew = 1,
    /// XDP left a service packet to TC because its TCP checksum is a partial
    /// (offload) seed, whose state only the skb knows.
    XdpDeferred = 2,
    /// TC ingress translated a packet of a known connection.
    TcSteered = 3,
    /// TC ingress translated the first packet of a connection.
    TcSteeredNew = 4,
    /// TC egress reverse-translated a reply.
    TcReversed = 5,
    /// A packet for a service none of whose groups has a backend.
    NoBackend = 6,
    /// A service packet without conntrack entry translated without recording
    /// one (a RST), or a lost entry recreated from the hash.
    Fallback = 7,
    /// A frame whose headers contradict themselves or are cut short.
    Malformed = 8,
    /// The conntrack table refused an insert.
    ConntrackFull = 9,
    /// XDP passed a packet that is not for a service.
    XdpPassed = 10,
    /// TC ingress passed a packet that is not for a service (in `xdp` mode
    /// this includes what XDP already translated).
    TcPassed = 11,
    /// TC egress passed a packet that is not a service's reply.
    EgressPassed = 12,
    /// A new connection's SYN dropped by the new-connection rate guard (a
    /// SYN flood must not evict established connections from conntrack).
    Shed = 13,
    /// A service segment with flags no TCP stack sends (SYN with FIN),
    /// dropped: it neither opens a connection nor reaches a backend.
    Invalid = 14,
    /// The socket path sent a connect() to a service VIP to a backend
    /// (counted under interface index 0).
    SocketSteered = 15,
    /// A connect() to a service none of whose groups has a backend: left
    /// to the VIP (kube-proxy's rules, where there are some).
    SocketNoBackend = 16,
    /// An ICMP error about a connection's reply (fragmentation needed,
    /// unreachable, time exceeded), addressed to the VIP, sent on to the
    /// connection's backend with the quoted segment translated back.
    IcmpTranslated = 17,
    /// The first fragment of a TCP datagram to a service VIP:port, dropped:
    /// fragments cannot be translated (only the first carries the ports),
    /// and passed on they would never reach a backend.
    FragmentDropped = 18,
    /// A translation the kernel's helpers failed halfway (an address
    /// written, its port or checksum not): the packet is dropped rather
    /// than sent on half-translated.
    RewriteFailed = 19,
    /// A packet of a connection without entry (not a SYN) sent where the
    /// hash says without recording it: the new-connection guard's rate was
    /// spent (every insert is guarded, so an ACK flood cannot fill the table).
    Unrecorded = 20,
}

/// The `ifindex` of [`CounterKey`] under which the socket path counts.
pub const SOCKET_IFINDEX: u32 = 0;

impl Counter {
    pub const COUNT: u32 = 21;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::XdpSteered,
        Counter::XdpSteeredNew,
        Counter::XdpDeferred,
        Counter::TcSteered,
        Counter::TcSteeredNew,
        Counter::TcReversed,
        Counter::NoBackend,
        Counter::Fallback,
        Counter::Malformed,
        Counter::ConntrackFull,
        Counter::XdpPassed,
        Counter::TcPassed,
        Counter::EgressPassed,
        Counter::Shed,
        Counter::Invalid,
        Counter::SocketSteered,
        Counter::SocketNoBackend,
        Counter::IcmpTranslated,
        Counter::FragmentDropped,
        Counter::RewriteFailed,
        Counter::Unrecorded,
    ];

    #[inline(always)]
    pub const fn from_u32(v: u32) -> Option<Counter> {
        if v < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Counter::XdpSteered => "xdp_steered",
            Counter::XdpSteeredNew => "xdp_steered_new",
            Counter::XdpDeferred => "xdp_deferred",
            Counter::TcSteered => "tc_steered",
            Counter::TcSteeredNew => "tc_steered_new",
            Counter::TcReversed => "tc_reversed",
            Counter::NoBackend => "no_backend",
            Counter::Fallback => "fallback",
            Counter::Malformed => "malformed",
            Counter::ConntrackFull => "conntrack_full",
            Counter::XdpPassed => "xdp_passed",
            Counter::TcPassed => "tc_passed",
            Counter::EgressPassed => "egress_passed",
            Counter::Shed => "shed",
            Counter::Invalid => "invalid",
            Counter::SocketSteered => "socket_steered",
            Counter::SocketNoBackend => "socket_no_backend",
            Counter::IcmpTranslated => "icmp_translated",
            Counter::FragmentDropped => "fragment_dropped",
            Counter::RewriteFailed => "rewrite_failed",
            Counter::Unrecorded => "unrecorded",
        }
    }
}

/// Value of `KN_SOCKETS_V1`, keyed by the socket's cookie (u64): a
/// connection the socket path sent to a backend at connect(), so
/// getpeername() answers the VIP the application dialled, and the
/// observer's state of it (as a conntrack entry holds it on the packet
/// path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockEntry {
    /// The VIP and port dialled (network order).
    pub vip: u32,
    pub vport: u16,
    /// The backend chosen (network order).
    pub bport: u16,
    pub baddr: u32,
    pub backend_id: u32,
    pub service_id: u32,
    /// `CT_F_*` (HTTP, a SYN retried).
    pub flags: u8,
    pub status_pos: u8,
    /// A status line split across segments: its digits so far.
    pub status_code: u16,
    pub group: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// The backend-set slot the backend was chosen from: a UDP socket
    /// chooses again once its service's set for the group is another.
    pub slot: u16,
    pub _pad: [u8; 4],
    /// When the SYN left (0: not connecting).
    pub syn_ns: u64,
    /// When a pending request's first byte left (0: none).
    pub req_ns: u64,
}

/// Sockets the socket path remembers (LRU: a closed socket's entry is the
/// first to go; a socket's cookie is never reused while the host runs).
pub const DEFAULT_SOCKETS: u32 = 256 * 1024;

const _: () = assert!(size_of::<SockEntry>() == 48);
const _: () = assert!(size_of::<ServiceKey>() == 8);
const _: () = assert!(size_of::<Service>() == 24);
const _: () = assert!(size_of::<Backend>() == 12);
const _: () =
    assert!(size_of::<BackendSet>() == 4 + 12 * MAX_BACKENDS_PER_GROUP + crate::maglev::SIZE + 1);
const _: () = assert!(size_of::<BackendSet>().is_multiple_of(4));
const _: () = assert!(size_of::<FlowKey>() == 16);
const _: () = assert!(size_of::<CtEntry>() == 48);
const _: () = assert!(size_of::<CtEntryV1>() == 40);
const _: () = assert!(
    size_of::<BackendStats>()
        == 17 * 8 + 4 * (crate::hist::TTFB_BUCKETS + crate::hist::CONNECT_BUCKETS)
);
const _: () = assert!(size_of::<CounterKey>() == 8);
const _: () = assert!(size_of::<IfCounters>() == 8 * COUNTERS_PER_SLOT);
const _: () = assert!(Counter::COUNT as usize <= COUNTERS_PER_SLOT);
const _: () = assert!(size_of::<Settings>() == 16);
const _: () = assert!(size_of::<Bucket>() == 16);
const _: () = assert!(size_of::<SegmentKey>() == 8);
const _: () = assert!(size_of::<Segment>() == 4);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), made of integers, with explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendSet {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for CtEntryV1 {}
    unsafe impl aya::Pod for SegmentKey {}
    unsafe impl aya::Pod for Segment {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for IfCounters {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Bucket {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_of_different_services_groups_and_generations_never_collide() {
        let mut seen = [false; 64];
        for id in 0..8 {
            for g in [Group::Stable, Group::Canary] {
                for generation in 0..2 {
                    let s = backend_set_slot(id, g, generation) as usize;
                    assert!(!seen[s]);
                    seen[s] = true;
                }
            }
        }
        assert!(backend_set_slot(MAX_SERVICES - 1, Group::Canary, 1) < BACKEND_SET_SLOTS);
    }

    #[test]
    fn the_guard_admits_its_rate_and_burst() {
        let mut b = Bucket::default();
        // 100 per second, burst 10: starting full after a quiet second.
        let t0 = 5_000_000_000;
        let admitted = (0..50).filter(|_| admit(&mut b, t0, 100, 10)).count();
        assert_eq!(admitted, 10, "the burst");
        // Half a second later: 50 more.
        let admitted = (0..200)
            .filter(|_| admit(&mut b, t0 + 500_000_000, 100, 10))
            .count();
        assert_eq!(admitted, 10, "refill is capped at the burst");
        let mut b = Bucket::default();
        // A second of refill (100) is all a quiet bucket gets, whatever the burst.
        assert_eq!(
            (0..1000).filter(|_| admit(&mut b, t0, 100, 1000)).count(),
            100
        );
        let admitted = (0..1000)
            .filter(|_| admit(&mut b, t0 + 100_000_000, 100, 1000))
            .count();
        assert!((9..=11).contains(&admitted), "100/s over 0.1 s: {admitted}");
        assert!(
            (0..1000).all(|_| admit(&mut Bucket::default(), 0, 0, 0)),
            "0 means no limit"
        );
    }

    #[test]
    fn conntrack_states_are_indexed_in_order() {
        for (i, s) in CtState::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for n in [
            names::SERVICES,
            names::BACKENDS,
            names::CONNTRACK,
            names::SEGMENTS,
            names::COUNTERS,
        ] {
            assert!(n.len() <= 15, "{n}");
        }
    }
}
