//! The eBPF object on its own: loaded (not attached) with a configuration
//! applied, its programs run with `BPF_PROG_TEST_RUN`, the frames they are
//! run with, and where the host predicts a new connection lands. Shared by
//! the golden-packet tests, the fuzzer and the `perpacket` and `scale`
//! benchmarks.
//!
//! Frames are built with `etherparse`, so both checksums are computed by it
//! and never by our own `csum` module.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context as _, Result, anyhow};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use etherparse::{
    IpFragOffset, IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv4Options, PacketBuilder,
    VlanId,
};
use kanari::{
    config::{self, Affinity, Config},
    datapath::{Datapath, LoadOptions},
    plan::{Applied, plan},
};
use kanari_common::{
    hash::{backend_hash, client_hash, flow_hash},
    maps::{Backend, BackendSet, Counter, FlowKey, Group, programs},
    select::{bucket, choose_group},
    wire::{self, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

// ---- The object, loaded ---------------------------------------------------------------------

/// A loaded (not attached) data path with a configuration applied the way
/// the agent applies one: a plan from what the maps hold, then its writes.
/// Nothing else is written (the new-connection guard keeps its default: off).
pub struct Loaded {
    pub dp: Datapath,
    pub config: Config,
    pub applied: Applied,
}

impl Loaded {
    /// Loads the object (sized by `config`) and applies `config`.
    pub fn load(config: Config) -> Result<Self> {
        let mut dp = Datapath::load(LoadOptions {
            socket_lb: false,
            conntrack_connections: config.conntrack_connections,
            max_backends: config.max_backends,
            pins: None,
        })
        .context("loading the eBPF object into the kernel (as root: CAP_BPF, CAP_NET_ADMIN)")?;
        let p = plan(
            &Applied::default(),
            &config,
            &BTreeMap::new(),
            &[],
            &Default::default(),
        )
        .map_err(|e| anyhow!(e))?;
        dp.apply(&p.ops).context("writing the maps")?;
        let applied = p.next;
        Ok(Self {
            dp,
            config,
            applied,
        })
    }

    /// Switches to `config` the way the agent does: a plan from what the maps hold.
    pub fn reconfigure(&mut self, config: Config) -> Result<()> {
        let p = plan(
            &self.applied,
            &config,
            &BTreeMap::new(),
            &[],
            &Default::default(),
        )
        .map_err(|e| anyhow!(e))?;
        self.dp.apply(&p.ops).context("writing the maps")?;
        self.applied = p.next;
        self.config = config;
        Ok(())
    }
}

// ---- Running the programs -------------------------------------------------------------------

pub const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC` (-1) as the test run reports it.
pub const TC_ACT_UNSPEC: u32 = -1i32 as u32;

/// One of the object's three programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::Xdp, Hook::TcIngress, Hook::TcEgress];

    pub fn program(self) -> &'static str {
        match self {
            Hook::Xdp => programs::XDP_INGRESS,
            Hook::TcIngress => programs::TC_INGRESS,
            Hook::TcEgress => programs::TC_EGRESS,
        }
    }

    /// The verdict of "let the packet go on" (the programs drop only shed
    /// and invalid SYNs).
    pub fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::TcIngress | Hook::TcEgress => TC_ACT_UNSPEC,
        }
    }

    /// What the hook counts for the first packet of a new connection.
    /// The verdict of a dropped packet (XDP_DROP, TC_ACT_SHOT).
    pub fn drop(self) -> u32 {
        match self {
            Hook::Xdp => 1,
            Hook::TcIngress | Hook::TcEgress => 2,
        }
    }

    pub fn new_counter(self) -> Counter {
        match self {
            Hook::Xdp => Counter::XdpSteeredNew,
            Hook::TcIngress => Counter::TcSteeredNew,
            Hook::TcEgress => unreachable!("egress creates no connections"),
        }
    }

    /// What the hook counts for a packet of a connection it knows.
    pub fn known_counter(self) -> Counter {
        match self {
            Hook::Xdp => Counter::XdpSteered,
            Hook::TcIngress => Counter::TcSteered,
            Hook::TcEgress => Counter::TcReversed,
        }
    }

    /// What the hook counts for a well-formed packet it passes untouched.
    pub fn passed_counter(self) -> Counter {
        match self {
            Hook::Xdp => Counter::XdpPassed,
            Hook::TcIngress => Counter::TcPassed,
            Hook::TcEgress => Counter::EgressPassed,
        }
    }

    /// The kernel refuses the test run itself (`EINVAL`) before the program
    /// runs: XDP data under 14 bytes (`ETH_HLEN`); skb data under 14, or
    /// with an IPv4 EtherType under 14 + 20 (IPv6: 14 + 40).
    pub fn kernel_refuses(self, f: &[u8]) -> bool {
        if f.len() < 14 {
            return true;
        }
        let skb = self != Hook::Xdp;
        skb && ((f[12..14] == [0x08, 0x00] && f.len() < 34)
            || (f[12..14] == [0x86, 0xdd] && f.len() < 54))
    }
}

/// One `BPF_PROG_TEST_RUN` of `hook` with `frame`, `repeat` times in the
/// kernel; the result (its `duration` is the kernel's average per run) and
/// the frame as the program left it.
pub fn test_run(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
    repeat: u32,
) -> std::io::Result<(TestRunResult, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let prog = dp
        .ebpf_mut()
        .program_mut(hook.program())
        .ok_or_else(|| std::io::Error::other(format!("no program {}", hook.program())))?;
    let result = match hook {
        Hook::Xdp => <&mut Xdp>::try_from(prog)
            .map_err(std::io::Error::other)?
            .test_run(opts),
        Hook::TcIngress | Hook::TcEgress => <&mut SchedClassifier>::try_from(prog)
            .map_err(std::io::Error::other)?
            .test_run(opts),
    };
    let result = result.map_err(|e| match e {
        aya::programs::ProgramError::SyscallError(s) => s.io_error,
        e => std::io::Error::other(e),
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result, out))
}

// ---- Where a new connection lands -----------------------------------------------------------

/// The group and backend of a new connection of `client` to `svc`, computed
/// on the host exactly as `steer()` in the eBPF program does.
pub fn predict(svc: &config::Service, client: SocketAddrV4) -> (Group, SocketAddrV4) {
    let vip = svc.vip;
    let key = FlowKey::new(
        wire::addr(*client.ip()),
        wire::addr(*vip.ip()),
        wire::port(client.port()),
        wire::port(vip.port()),
    );
    let flow = flow_hash(&key, svc.salt);
    let group_hash = match svc.affinity {
        Affinity::Client => client_hash(key.saddr, svc.salt),
        Affinity::Connection => flow,
    };
    // The longest matching prefix, as the LPM trie answers.
    let segment = svc
        .segments
        .iter()
        .filter(|s| s.cidr.contains(*client.ip()))
        .max_by_key(|s| s.cidr.prefix_len)
        .map(|s| s.group);
    let group = choose_group(
        svc.canary_weight,
        bucket(group_hash),
        segment,
        svc.stable.len() as u32,
        svc.canary.len() as u32,
    )
    .expect("the service has backends");
    let list = match group {
        Group::Stable => &svc.stable,
        Group::Canary => &svc.canary,
    };
    (group, pick(list, flow))
}

/// The backend of `flow` (its flow hash) among `list`, by the set's Maglev
/// table, as the kernel looks it up (the table is built as the agent builds it).
pub fn pick(list: &[SocketAddrV4], flow: u32) -> SocketAddrV4 {
    let backends: Vec<Backend> = list
        .iter()
        .zip(0..)
        .map(|(b, i)| Backend {
            addr: wire::addr(*b.ip()),
            port: wire::port(b.port()),
            _pad: 0,
            id: i,
        })
        .collect();
    let id = BackendSet::of(&backends)
        .pick(backend_hash(flow))
        .expect("a set with backends names one in every slot")
        .id;
    list[id as usize]
}

// ---- Frames ---------------------------------------------------------------------------------

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const TCP_PSH: u8 = 0x08;
/// The options of a Linux SYN: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
pub const SYN_OPTIONS: [u8; 20] = [
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x03, 0x03, 0x07,
];
pub const HTTP_GET: &[u8] =
    b"GET /index.html HTTP/1.1\r\nHost: web.example\r\nUser-Agent: golden\r\n\r\n";

/// An Ethernet / IPv4 / TCP frame, built with etherparse (so both checksums
/// are computed by it).
#[derive(Clone, Debug)]
pub struct Tcp4 {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
    pub tcp_options: Vec<u8>,
    pub ip_options: Vec<u8>,
    pub payload: Vec<u8>,
    pub more_fragments: bool,
    pub fragment_offset: u16,
    pub vlan: Option<u16>,
    /// The sequence number (a SYN's: the connection's initial one).
    pub seq: u32,
}

impl Tcp4 {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            src,
            dst,
            flags,
            tcp_options: Vec::new(),
            ip_options: Vec::new(),
            payload: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            vlan: None,
            seq: SEQ,
        }
    }

    /// A SYN as Linux sends it (with TCP options).
    pub fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self::new(src, dst, TCP_SYN).tcp_options(&SYN_OPTIONS)
    }

    pub fn tcp_options(mut self, o: &[u8]) -> Self {
        self.tcp_options = o.to_vec();
        self
    }

    pub fn ip_options(mut self, o: &[u8]) -> Self {
        self.ip_options = o.to_vec();
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn fragment(mut self, more_fragments: bool, offset_in_8_bytes: u16) -> Self {
        self.more_fragments = more_fragments;
        self.fragment_offset = offset_in_8_bytes;
        self
    }

    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut ip = Ipv4Header::new(
            0,
            64,
            IpNumber::TCP,
            self.src.ip().octets(),
            self.dst.ip().octets(),
        )
        .expect("an IPv4 header");
        ip.identification = 0x1c46;
        ip.options = Ipv4Options::try_from(&self.ip_options[..]).expect("IPv4 options fit");
        let fragment = self.more_fragments || self.fragment_offset != 0;
        ip.dont_fragment = !fragment;
        ip.more_fragments = self.more_fragments;
        ip.fragment_offset =
            IpFragOffset::try_new(self.fragment_offset).expect("a 13-bit fragment offset");
        let ip = IpHeaders::Ipv4(ip, Ipv4Extensions::default());
        let eth = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_MAC);
        let l3 = match self.vlan {
            Some(id) => eth
                .single_vlan(VlanId::try_new(id).expect("a 12-bit VLAN id"))
                .ip(ip),
            None => eth.ip(ip),
        };
        let mut b = l3.tcp(self.src.port(), self.dst.port(), self.seq, 64240);
        if self.flags & TCP_SYN != 0 {
            b = b.syn();
        }
        if self.flags & TCP_ACK != 0 {
            b = b.ack(0x0bad_cafe);
        }
        if self.flags & TCP_PSH != 0 {
            b = b.psh();
        }
        if self.flags & TCP_RST != 0 {
            b = b.rst();
        }
        if self.flags & TCP_FIN != 0 {
            b = b.fin();
        }
        let b = b.options_raw(&self.tcp_options).expect("TCP options fit");
        let mut frame = Vec::new();
        b.write(&mut frame, &self.payload)
            .expect("building the frame");
        frame
    }
}

/// The sequence number of a frame that sets none.
pub const SEQ: u32 = 0x1234_5678;

/// The reply of `backend` to `client` (what the backend sends before reverse NAT).
pub fn reply(backend: SocketAddrV4, client: SocketAddrV4, flags: u8) -> Tcp4 {
    Tcp4::new(backend, client, flags)
}

/// A SYN-ACK with Linux's options, from `backend` to `client` (before reverse NAT).
pub fn syn_ack(backend: SocketAddrV4, client: SocketAddrV4) -> Vec<u8> {
    reply(backend, client, TCP_SYN | TCP_ACK)
        .tcp_options(&SYN_OPTIONS)
        .build()
}

/// A data segment (ACK|PSH) of `client` to `vip`.
pub fn request(client: SocketAddrV4, vip: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    Tcp4::new(client, vip, TCP_ACK | TCP_PSH)
        .payload(payload)
        .build()
}

/// A data segment (ACK|PSH) of `backend` to `client` (before reverse NAT).
pub fn response(backend: SocketAddrV4, client: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    reply(backend, client, TCP_ACK | TCP_PSH)
        .payload(payload)
        .build()
}

/// The `i`-th of many distinct client endpoints in 10.64.0.0/10 (address
/// and port both vary, so every one is a distinct connection).
pub fn many_clients(i: u32) -> SocketAddrV4 {
    let host = 0x0a40_0000 + (i % 0x0040_0000);
    SocketAddrV4::new(
        Ipv4Addr::from(host),
        1024 + (i / 0x0040_0000 % 60000) as u16,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_is_valid_and_carries_its_options() {
        let c = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 7), 40000);
        let v = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
        let f = Tcp4::syn(c, v).build();
        let (ip, rest) = Ipv4Header::from_slice(&f[14..]).unwrap();
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let (tcp, payload) = etherparse::TcpHeader::from_slice(rest).unwrap();
        assert!(tcp.syn && !tcp.ack);
        assert_eq!(tcp.options.as_slice(), &SYN_OPTIONS[..]);
        assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, payload).unwrap());
        assert_eq!(f.len(), 14 + 20 + 20 + 20);
    }

    #[test]
    fn many_clients_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..2_000_000).step_by(7) {
            assert!(seen.insert(many_clients(i)), "{i}");
        }
        assert!(seen.insert(many_clients(0x0040_0000)));
    }

    #[test]
    fn the_kernel_refuses_short_data() {
        let mut f = vec![0u8; 33];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(Hook::TcIngress.kernel_refuses(&f));
        assert!(!Hook::Xdp.kernel_refuses(&f));
        assert!(Hook::Xdp.kernel_refuses(&f[..13]));
    }
}
