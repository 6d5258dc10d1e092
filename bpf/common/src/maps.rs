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
    pub const BACKENDS: &str = "KN_BACKENDS_V1";
    pub const CONNTRACK: &str = "KN_CT_V1";
    pub const SEGMENTS: &str = "KN_SEGMENTS_V1";
    pub const COUNTERS: &str = "KN_COUNTERS_V1";
}

/// Program names (the function names in the eBPF object).
pub mod programs {
    pub const XDP_INGRESS: &str = "kanari_xdp_ingress";
    pub const TC_INGRESS: &str = "kanari_tc_ingress";
    pub const TC_EGRESS: &str = "kanari_tc_egress";
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
    pub const fn tcp(addr: u32, port: u16) -> Self {
        Self {
            addr,
            port,
            proto: crate::wire::IPPROTO_TCP,
            _pad: 0,
        }
    }
}

/// `Service::flags`: pick the group by the 5-tuple hash instead of the client address.
pub const SERVICE_F_CONNECTION_AFFINITY: u32 = 1 << 0;
/// `Service::flags`: the service has client segments in `KN_SEGMENTS_V1`
/// (spares the trie lookup for services without).
pub const SERVICE_F_SEGMENTS: u32 = 1 << 1;

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

/// Value of `KN_BACKENDS_V1`: the backends of one group of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendSet {
    pub len: u32,
    pub backends: [Backend; MAX_BACKENDS_PER_GROUP],
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
    };
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

/// Value of `KN_CT_V1`.
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
}

impl Counter {
    pub const COUNT: u32 = 10;
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
    ];

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
        }
    }
}

const _: () = assert!(size_of::<ServiceKey>() == 8);
const _: () = assert!(size_of::<Service>() == 24);
const _: () = assert!(size_of::<Backend>() == 12);
const _: () = assert!(size_of::<BackendSet>() == 4 + 12 * MAX_BACKENDS_PER_GROUP);
const _: () = assert!(size_of::<FlowKey>() == 16);
const _: () = assert!(size_of::<CtEntry>() == 16);
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
    unsafe impl aya::Pod for SegmentKey {}
    unsafe impl aya::Pod for Segment {}
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
