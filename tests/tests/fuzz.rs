//! Fuzzing the three eBPF programs through `BPF_PROG_TEST_RUN`: at least
//! 100,000 random and mutated frames, each run through `kanari_xdp_ingress`,
//! `kanari_tc_ingress` and `kanari_tc_egress`, on the real kernel with the
//! real object and maps (one [`Datapath`], a small conntrack table so the LRU
//! evicts all the time).
//!
//! The generator is SplitMix64 from one seed: `KANARI_FUZZ_SEED` (decimal or
//! `0x` hex) overrides the default, `KANARI_FUZZ_CASES` the number of frames.
//! Every failure names the seed, the case index, what the case was and the
//! frame in hex; the frame sequence is a function of the seed, so running
//! again with the same seed replays the failing case after the same frames.
//!
//! What runs: sweeps first (every truncation of a few base frames, every IHL,
//! every TCP data offset, every TCP flag byte), then random cases until the
//! count is reached: valid frames to the two services and to other addresses
//! and ports, whole conversations (SYN, SYN-ACK, requests, HTTP responses whose
//! status line is split across segments), IP and TCP options of random length
//! and content, fragments, IPv6, VLAN tags, ARP, random flag bytes, empty and
//! tiny payloads, mutations (bit flips, byte changes, truncations, total length,
//! IHL, data offset, fragment bits) and random garbage of 14 to 1514 bytes.
//!
//! What is asserted, per frame and program:
//! - the verdict is the pass verdict (`XDP_PASS`, `TC_ACT_UNSPEC`): nothing is
//!   ever dropped or aborted but, on ingress, a consistent SYN+FIN to a
//!   service and the first fragment of a TCP datagram to a service, which
//!   are dropped (`XDP_DROP`, `TC_ACT_SHOT`). A test run the kernel itself refuses (`EINVAL`)
//!   is allowed only where golden.rs documents it (under 14 bytes; for skb
//!   programs an IPv4 EtherType under 34 bytes, IPv6 under 54).
//! - a frame that is not a consistent Ethernet/IPv4/TCP frame (the oracle
//!   below, written from the README's rules, independent of `wire.rs`) or not
//!   addressed to a configured service comes out **byte-identical**.
//! - ingress: a consistent frame to a service's VIP:port is translated by TC
//!   ingress always, and by XDP unless its TCP checksum field is the offload
//!   seed (then XDP leaves it to TC, byte-identical). Translated means: the
//!   same length, only the destination address and port and the two checksum
//!   fields changed, the destination is the backend the host predicts with
//!   `kanari_common::{hash, select}` for that client (the configuration never
//!   changes, so every packet of a tuple goes where its first one went).
//! - egress: a frame is either byte-identical or reverse-translated: only the
//!   source address and port and the checksums changed, to the VIP of the
//!   service whose predicted backend for that client is the frame's source,
//!   and only for a connection an ingress translation opened earlier (entries
//!   may have been evicted since, so untouched is always allowed).
//! - checksums (recomputed with etherparse; the TCP one over the whole segment
//!   the IP total length gives): an incremental update keeps the ones'-
//!   complement *difference* between the field and the correct checksum. So
//!   the assertion is that this difference is the same before and after, for
//!   the IPv4 header and for TCP: a valid checksum stays valid, and an invalid
//!   one stays invalid by exactly the same amount (the receiver then drops it,
//!   as it would have dropped the original).
//!
//! After the run: conntrack holds at most 2 × `conntrack.connections` entries
//! and only consistent ones (forward entries to the predicted backend, reverse
//! entries back to the VIP); every data-path counter matches what the oracle
//! says each run should have counted; the counter keys are bounded; the
//! backends' packet counts add up to the translations.
//!
//! Every frame goes through all three programs (egress included: a client's
//! frame must pass egress untouched as much as a reply must pass ingress).
//! The maps are written the way golden.rs does it (`plan` + `apply`) and
//! nothing else is set: a knob the agent writes on its own (a new-connection
//! rate guard, say) keeps its default, under which nothing may be dropped.
//! The frame sequence depends only on the seed; the kernel's LRU eviction can
//! differ a little between runs, which only moves the egress counts.
//!
//! Needs root (`CAP_BPF`, `CAP_NET_ADMIN`); without it loading fails, and so
//! does the test.

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use etherparse::{Ipv4Header, TcpHeader};
use kanari::{
    config::{self, Config},
    datapath::Datapath,
    plan::Applied,
};
use kanari_common::{
    maps::{CT_FORWARD, CT_REVERSE, Counter, FROM_BACKEND, TO_BACKEND},
    wire::{self, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use kanari_tests::frames::{self, Hook, Loaded, SYN_OPTIONS, TCP_PSH};

// ---- Configuration --------------------------------------------------------------------------

/// Small on purpose: 8,192 map entries, far fewer than the connections opened.
const CONNTRACK_CONNECTIONS: u32 = 4096;
const DEFAULT_SEED: u64 = 0x6b61_6e61_7269_f022;
const DEFAULT_CASES: usize = 100_000;

const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
const API: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 443);

/// Two services: `web` (HTTP, client affinity, a canary segment) and `api`
/// (TCP, connection affinity, a stable segment). They share backend
/// addresses on different ports, so only the ports tell their reverse
/// entries apart.
fn config() -> Config {
    let text = format!(
        "interfaces: [{{name: fuzz0}}]
conntrack: {{connections: {CONNTRACK_CONNECTIONS}}}
services:
  - name: web
    vip: {WEB}
    salt: 42
    canary_weight: 30
    stable: {{backends: [10.2.1.1:8080, 10.2.2.1:8080]}}
    canary: {{backends: [10.3.1.1:8080]}}
    segments: [{{cidr: 10.1.5.0/24, group: canary}}]
  - name: api
    vip: {API}
    affinity: connection
    protocol: tcp
    salt: 7
    canary_weight: 50
    stable: {{backends: [10.2.1.1:8443, 10.2.2.1:8443, 10.2.3.1:8443]}}
    canary: {{backends: [10.3.1.1:8443, 10.3.2.1:8443]}}
    segments: [{{cidr: 10.1.6.0/24, group: stable}}]
"
    );
    config::parse("fuzz.yaml", &text, &|_| true).expect("the fuzz configuration is valid")
}

/// The backend of a new connection of `client` to `svc`, computed on the host
/// as `steer()` does in the kernel (see [`frames::predict`]).
fn predict(svc: &config::Service, client: SocketAddrV4) -> SocketAddrV4 {
    frames::predict(svc, client).1
}

// ---- The generator --------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood 2014).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let out = kanari_tests::rng::splitmix64(self.0);
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        out
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        ((self.next() >> 11) % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// `lo..=hi` random bytes.
    fn some_bytes(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let n = self.range(lo, hi);
        self.bytes(n)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn seed_from_env() -> u64 {
    match std::env::var("KANARI_FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("KANARI_FUZZ_SEED={s:?} is not a u64: {e}"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

fn cases_from_env() -> usize {
    std::env::var("KANARI_FUZZ_CASES")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|e| panic!("KANARI_FUZZ_CASES={s:?}: {e}"))
        })
        .unwrap_or(DEFAULT_CASES)
}

// ---- Frames ---------------------------------------------------------------------------------

const ETH_IPV4: [u8; 2] = [0x08, 0x00];
const ETH_IPV6: [u8; 2] = [0x86, 0xdd];
const ETH_ARP: [u8; 2] = [0x08, 0x06];
const ETH_VLAN: [u8; 2] = [0x81, 0x00];
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const HTTP_GET: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: web.example\r\n\r\n";
const STATUS_LINES: [&[u8]; 8] = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
    b"HTTP/1.0 404 Not Found\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n",
    b"HTTP/1.1 099 Odd\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
    b"HTTX/1.1 200 OK\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
];

/// How a checksum field is written.
#[derive(Clone, Copy, Debug)]
enum Csum {
    Valid,
    /// The valid checksum XOR a nonzero value.
    Broken(u16),
    /// The offload seed (TCP only): what a veth peer hands over.
    Partial,
}

/// An Ethernet / IPv4 / TCP frame to build.
#[derive(Clone, Debug)]
struct Frame {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    ip_options: Vec<u8>,
    tcp_options: Vec<u8>,
    payload: Vec<u8>,
    /// The flags-and-offset field (DF is 0x4000, MF 0x2000).
    frag: u16,
    vlan: Option<u16>,
    ip_csum: Csum,
    tcp_csum: Csum,
    /// Bytes after the IP packet (Ethernet padding).
    trailer: Vec<u8>,
}

impl Frame {
    fn new(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            src,
            dst,
            flags,
            ip_options: Vec::new(),
            tcp_options: Vec::new(),
            payload: Vec::new(),
            frag: 0x4000,
            vlan: None,
            ip_csum: Csum::Valid,
            tcp_csum: Csum::Valid,
            trailer: Vec::new(),
        }
    }

    fn build(&self) -> Vec<u8> {
        assert!(self.ip_options.len().is_multiple_of(4) && self.ip_options.len() <= 40);
        assert!(self.tcp_options.len().is_multiple_of(4) && self.tcp_options.len() <= 40);
        let mut f = Vec::with_capacity(128 + self.payload.len());
        f.extend_from_slice(&MAC_B);
        f.extend_from_slice(&MAC_A);
        if let Some(tag) = self.vlan {
            f.extend_from_slice(&ETH_VLAN);
            f.extend_from_slice(&tag.to_be_bytes());
        }
        f.extend_from_slice(&ETH_IPV4);
        let ip = f.len();
        let ihl = 20 + self.ip_options.len();
        let doff = 20 + self.tcp_options.len();
        let tot = ihl + doff + self.payload.len();
        f.push(0x40 | (ihl / 4) as u8);
        f.push(0);
        f.extend_from_slice(&(tot as u16).to_be_bytes());
        f.extend_from_slice(&[0x1c, 0x46]);
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.extend_from_slice(&[64, 6, 0, 0]);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        f.extend_from_slice(&self.ip_options);
        let l4 = f.len();
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        f.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        f.extend_from_slice(&0x0bad_cafeu32.to_be_bytes());
        f.push(((doff / 4) as u8) << 4);
        f.push(self.flags);
        f.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
        f.extend_from_slice(&self.tcp_options);
        f.extend_from_slice(&self.payload);

        let ip_check = !fold(sum(&f[ip..l4], 0));
        f[ip + 10..ip + 12].copy_from_slice(&apply(self.ip_csum, ip_check, 0).to_be_bytes());
        let pseudo = pseudo_sum(
            &f[ip + 12..ip + 16],
            &f[ip + 16..ip + 20],
            (tot - ihl) as u16,
        );
        let seed = fold(pseudo);
        let tcp_check = !fold(sum(&f[l4..], pseudo));
        f[l4 + 16..l4 + 18].copy_from_slice(&apply(self.tcp_csum, tcp_check, seed).to_be_bytes());
        f.extend_from_slice(&self.trailer);
        f
    }
}

fn apply(c: Csum, valid: u16, seed: u16) -> u16 {
    match c {
        Csum::Valid => valid,
        Csum::Broken(x) => valid ^ x.max(1),
        Csum::Partial => seed,
    }
}

/// Ones'-complement sum of big-endian words (the frame builder's own
/// arithmetic; checks recompute with etherparse).
fn sum(data: &[u8], mut acc: u64) -> u64 {
    for c in data.chunks(2) {
        acc += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo_sum(saddr: &[u8], daddr: &[u8], l4_len: u16) -> u64 {
    sum(saddr, 0) + sum(daddr, 0) + 6 + l4_len as u64
}

fn ipv6_tcp(rng: &mut Rng, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&ETH_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[6, 64]);
    f.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    // Destination fd00::a00:64: the web VIP's IPv4 bytes in the low word.
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 100]);
    f.extend_from_slice(&(rng.range(1024, 65535) as u16).to_be_bytes());
    f.extend_from_slice(&80u16.to_be_bytes());
    f.extend_from_slice(&[
        0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f.extend(rng.bytes(payload_len));
    f
}

fn arp(rng: &mut Rng) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&ETH_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[10, 1, rng.byte(), rng.byte()]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&WEB.ip().octets());
    // Padded to the Ethernet minimum, sometimes.
    if rng.chance(50) {
        f.resize(60, 0);
    }
    f
}

// ---- The oracle -----------------------------------------------------------------------------

/// What the README says about a frame: why it is not handled, or its fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Cut short of what its headers announce.
    Truncated,
    /// Not IPv4 by its EtherType (ARP, IPv6, VLAN-tagged, ...).
    NotIpv4,
    /// Fields that contradict each other.
    Malformed,
    /// With the destination of a first fragment of TCP whose frame holds
    /// its ports (dropped when that is a service).
    Fragment(Option<SocketAddrV4>),
    NotTcp,
    Tcp(Parsed),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Parsed {
    l4: usize,
    tot_len: usize,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    check: u16,
}

impl Class {
    /// Whether the data path counts it as `malformed`.
    fn malformed(self) -> bool {
        matches!(self, Class::Truncated | Class::Malformed)
    }
}

/// An independent reading of a frame by the README's rules (Ethernet without
/// VLAN, IPv4 with options, not a fragment, TCP, total length and data offset
/// consistent and within the frame), in the order the header fields are met.
fn classify(f: &[u8]) -> Class {
    let be16 = |i: usize| u16::from_be_bytes([f[i], f[i + 1]]) as usize;
    if f.len() < 14 {
        return Class::Truncated;
    }
    if f[12..14] != ETH_IPV4 {
        return Class::NotIpv4;
    }
    if f.len() < 34 {
        return Class::Truncated;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    if f[14] >> 4 != 4 || ihl < 20 {
        return Class::Malformed;
    }
    if be16(20) & 0x3fff != 0 {
        let l4 = 14 + ihl;
        let first = be16(20) & 0x1fff == 0 && be16(20) & 0x2000 != 0;
        let to = (first && f[23] == 6 && f.len() >= l4 + 4).then(|| {
            SocketAddrV4::new(
                Ipv4Addr::new(f[30], f[31], f[32], f[33]),
                be16(l4 + 2) as u16,
            )
        });
        return Class::Fragment(to);
    }
    if f[23] != 6 {
        return Class::NotTcp;
    }
    let tot_len = be16(16);
    if tot_len < ihl + 20 {
        return Class::Malformed;
    }
    let l4 = 14 + ihl;
    if f.len() < l4 + 20 || f.len() < 14 + tot_len {
        return Class::Truncated;
    }
    let doff = (f[l4 + 12] >> 4) as usize * 4;
    if doff < 20 || ihl + doff > tot_len {
        return Class::Malformed;
    }
    let addr = |i: usize| Ipv4Addr::new(f[i], f[i + 1], f[i + 2], f[i + 3]);
    Class::Tcp(Parsed {
        l4,
        tot_len,
        src: SocketAddrV4::new(addr(26), be16(l4) as u16),
        dst: SocketAddrV4::new(addr(30), be16(l4 + 2) as u16),
        flags: f[l4 + 13],
        check: be16(l4 + 16) as u16,
    })
}

/// The TCP checksum field holds the offload seed (XDP leaves such packets to TC).
fn looks_partial(f: &[u8], p: &Parsed) -> bool {
    let seed = fold(pseudo_sum(
        &f[26..30],
        &f[30..34],
        (p.tot_len - (p.l4 - 14)) as u16,
    ));
    p.check == seed
}

/// Ones'-complement `field - correct`, with both zeros as 0xffff: 0xffff when
/// the field is right, and preserved by a correct incremental update.
fn csum_offset(field: u16, correct: u16) -> u16 {
    let s = field as u32 + (!correct) as u32;
    match ((s & 0xffff) + (s >> 16)) as u16 {
        0 => 0xffff,
        x => x,
    }
}

/// The (IPv4 header, TCP) checksum offsets of a consistent frame, recomputed
/// with etherparse; TCP over the segment the total length gives.
fn checksum_offsets(f: &[u8], p: &Parsed) -> Result<(u16, u16), String> {
    let (ip, _) = Ipv4Header::from_slice(&f[14..]).map_err(|e| format!("etherparse: {e}"))?;
    let (tcp, payload) =
        TcpHeader::from_slice(&f[p.l4..14 + p.tot_len]).map_err(|e| format!("etherparse: {e}"))?;
    let tcp_correct = tcp
        .calc_checksum_ipv4(&ip, payload)
        .map_err(|e| format!("etherparse: {e}"))?;
    Ok((
        csum_offset(ip.header_checksum, ip.calc_header_checksum()),
        csum_offset(tcp.checksum, tcp_correct),
    ))
}

// ---- Running the programs -------------------------------------------------------------------

/// One test run; `None` when the kernel refused the data.
fn test_run(dp: &mut Datapath, hook: Hook, frame: &[u8]) -> Result<Option<(u32, Vec<u8>)>, String> {
    match frames::test_run(dp, hook, frame, 1) {
        Ok((r, out)) => Ok(Some((r.return_value, out))),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && hook.kernel_refuses(frame) => Ok(None),
        Err(e) => Err(format!("the test run failed: {e:?}")),
    }
}

// ---- The fuzzer -----------------------------------------------------------------------------

/// One frame to run, with what it is (for failure messages and statistics).
struct Case {
    kind: &'static str,
    frame: Vec<u8>,
}

#[derive(Default, Clone, Copy)]
struct HookStats {
    runs: u64,
    refused: u64,
    translated: u64,
    untouched: u64,
    /// Runs the data path must count as `malformed`.
    malformed: u64,
    /// XDP runs of service frames with a partial checksum (left to TC).
    deferred: u64,
    /// SYN+FIN frames to a service, dropped and counted `invalid`.
    invalid: u64,
    /// First fragments to a service, dropped and counted `fragment_dropped`.
    fragments: u64,
    /// Translated frames whose IPv4 and TCP checksums were valid before (and after).
    valid_checksums: u64,
}

struct Fuzz {
    seed: u64,
    rng: Rng,
    config: Config,
    dp: Datapath,
    applied: Applied,
    stats: [HookStats; 3],
    /// (client, service index) of every connection an ingress translation opened.
    opened: HashSet<(SocketAddrV4, usize)>,
    /// The latest connections, for continuations and replies.
    recent: VecDeque<(SocketAddrV4, usize)>,
    /// Frames of a conversation still to come.
    pending: VecDeque<Case>,
    kinds: std::collections::BTreeMap<&'static str, u64>,
    index: usize,
}

fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, l) in b.chunks(16).enumerate() {
        let _ = write!(s, "\n  {:04x}:", i * 16);
        for x in l {
            let _ = write!(s, " {x:02x}");
        }
    }
    s
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("length {} became {}", a.len(), b.len());
    }
    let diffs: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    format!("bytes changed at offsets {diffs:?}")
}

impl Fuzz {
    fn new(seed: u64) -> Self {
        let config = config();
        let Loaded {
            dp,
            config,
            applied,
        } = Loaded::load(config).expect("loading the data path with the fuzz configuration");
        Self {
            seed,
            rng: Rng(seed),
            config,
            dp,
            applied,
            stats: [HookStats::default(); 3],
            opened: HashSet::new(),
            recent: VecDeque::new(),
            pending: VecDeque::new(),
            kinds: Default::default(),
            index: 0,
        }
    }

    fn service_at(&self, vip: SocketAddrV4) -> Option<usize> {
        self.config.services.iter().position(|s| s.vip == vip)
    }

    /// The service one of whose backends is `addr`.
    fn service_of_backend(&self, addr: SocketAddrV4) -> Option<usize> {
        self.config
            .services
            .iter()
            .position(|s| s.stable.contains(&addr) || s.canary.contains(&addr))
    }

    fn all_backends(&self) -> Vec<SocketAddrV4> {
        self.config
            .services
            .iter()
            .flat_map(|s| s.stable.iter().chain(&s.canary).copied())
            .collect()
    }

    // ---- Checking one run ----

    fn run_case(&mut self, case: &Case) {
        *self.kinds.entry(case.kind).or_default() += 1;
        let class = classify(&case.frame);
        for hook in Hook::ALL {
            if let Err(e) = self.run_hook(hook, &case.frame, class) {
                panic!(
                    "fuzz case {index} ({kind}) through {hook:?}: {e}\n\
                     reproduce with KANARI_FUZZ_SEED={seed:#x} (case index {index}; \
                     the sequence before it builds the map state)\n\
                     oracle: {class:?}\nframe ({len} bytes):{hex}",
                    index = self.index,
                    kind = case.kind,
                    seed = self.seed,
                    len = case.frame.len(),
                    hex = hex(&case.frame),
                );
            }
        }
        self.index += 1;
    }

    fn run_hook(&mut self, hook: Hook, frame: &[u8], class: Class) -> Result<(), String> {
        let Some((verdict, out)) = test_run(&mut self.dp, hook, frame)? else {
            self.stats[hook as usize].refused += 1;
            return Ok(());
        };
        let st = &mut self.stats[hook as usize];
        st.runs += 1;
        if class.malformed() {
            st.malformed += 1;
        }
        // A consistent SYN+FIN to a service is dropped on ingress (XDP leaves
        // one with the offload checksum seed to TC, which drops it).
        let invalid = match class {
            Class::Tcp(p) if hook != Hook::TcEgress && self.service_at(p.dst).is_some() => {
                p.flags & (TCP_SYN | TCP_FIN) == TCP_SYN | TCP_FIN
                    && !(hook == Hook::Xdp && looks_partial(frame, &p))
            }
            _ => false,
        };
        let fragment = match class {
            Class::Fragment(Some(to)) if hook != Hook::TcEgress => self.service_at(to).is_some(),
            _ => false,
        };
        if fragment {
            self.stats[hook as usize].fragments += 1;
            return if verdict == hook.drop() {
                Ok(())
            } else {
                Err(format!(
                    "verdict {verdict:#x} for a first fragment to a service, expected {:#x} (drop)",
                    hook.drop()
                ))
            };
        }
        if invalid {
            self.stats[hook as usize].invalid += 1;
            let dropped = if hook == Hook::Xdp { 1 } else { 2 };
            return if verdict == dropped {
                Ok(())
            } else {
                Err(format!(
                    "verdict {verdict:#x} for SYN+FIN to a service, expected {dropped:#x} (drop)"
                ))
            };
        }
        if verdict != hook.pass() {
            return Err(format!(
                "verdict {verdict:#x}, expected {:#x} (pass)",
                hook.pass()
            ));
        }
        let untouched = out == frame;
        let outcome = match hook {
            Hook::Xdp | Hook::TcIngress => self.check_ingress(hook, frame, &out, class),
            Hook::TcEgress => self.check_egress(frame, &out, class),
        };
        outcome.map_err(|e| format!("{e}\noutput:{}", hex(&out)))?;
        let st = &mut self.stats[hook as usize];
        if untouched {
            st.untouched += 1;
        } else {
            st.translated += 1;
        }
        Ok(())
    }

    fn check_ingress(
        &mut self,
        hook: Hook,
        input: &[u8],
        out: &[u8],
        class: Class,
    ) -> Result<(), String> {
        let service = match class {
            Class::Tcp(p) => self.service_at(p.dst).map(|s| (p, s)),
            _ => None,
        };
        let Some((p, svc)) = service else {
            return if out == input {
                Ok(())
            } else {
                Err(format!(
                    "a frame for no service was changed: {}",
                    first_difference(input, out)
                ))
            };
        };
        let partial = looks_partial(input, &p);
        if hook == Hook::Xdp && partial {
            self.stats[hook as usize].deferred += 1;
            return if out == input {
                Ok(())
            } else {
                Err(format!(
                    "XDP rewrote a packet whose TCP checksum is the offload seed (TC's job): {}",
                    first_difference(input, out)
                ))
            };
        }
        if out == input {
            return Err(format!(
                "a consistent frame to {} was not translated",
                p.dst
            ));
        }
        let backend = predict(&self.config.services[svc], p.src);
        self.check_rewrite(hook, input, out, &p, End::Destination, backend)?;
        if p.flags & TCP_RST == 0 && self.opened.insert((p.src, svc)) {
            self.recent.push_back((p.src, svc));
            if self.recent.len() > 64 {
                self.recent.pop_front();
            }
        }
        Ok(())
    }

    fn check_egress(&mut self, input: &[u8], out: &[u8], class: Class) -> Result<(), String> {
        if out == input {
            return Ok(());
        }
        let Class::Tcp(p) = class else {
            return Err(format!(
                "egress changed a frame that is not consistent IPv4/TCP: {}",
                first_difference(input, out)
            ));
        };
        let Some(svc) = self.service_of_backend(p.src) else {
            return Err(format!(
                "egress changed a frame from {}, which is no backend: {}",
                p.src,
                first_difference(input, out)
            ));
        };
        let s = &self.config.services[svc];
        if !self.opened.contains(&(p.dst, svc)) {
            return Err(format!(
                "egress translated a reply to {} of service {}, a connection never opened",
                p.dst, s.name
            ));
        }
        let predicted = predict(s, p.dst);
        if predicted != p.src {
            return Err(format!(
                "egress translated a reply from {} to {}, whose connection is on {predicted}",
                p.src, p.dst
            ));
        }
        let vip = s.vip;
        self.check_rewrite(Hook::TcEgress, input, out, &p, End::Source, vip)
    }

    /// `out` is `input` with one end rewritten to `to` and both checksums
    /// updated so that their offsets from the correct values are unchanged.
    fn check_rewrite(
        &mut self,
        hook: Hook,
        input: &[u8],
        out: &[u8],
        p: &Parsed,
        end: End,
        to: SocketAddrV4,
    ) -> Result<(), String> {
        if out.len() != input.len() {
            return Err(format!(
                "the frame changed length: {} -> {}",
                input.len(),
                out.len()
            ));
        }
        let (addr, port) = match end {
            End::Destination => (30, p.l4 + 2),
            End::Source => (26, p.l4),
        };
        let may_change = |i: usize| {
            (addr..addr + 4).contains(&i)
                || (port..port + 2).contains(&i)
                || (24..26).contains(&i)
                || (p.l4 + 16..p.l4 + 18).contains(&i)
        };
        let stray: Vec<usize> = (0..input.len())
            .filter(|&i| input[i] != out[i] && !may_change(i))
            .collect();
        if !stray.is_empty() {
            return Err(format!(
                "{end:?} rewrite changed other bytes too, at offsets {stray:?}"
            ));
        }
        let got = SocketAddrV4::new(
            Ipv4Addr::new(out[addr], out[addr + 1], out[addr + 2], out[addr + 3]),
            u16::from_be_bytes([out[port], out[port + 1]]),
        );
        if got != to {
            return Err(format!("{end:?} rewritten to {got}, expected {to}"));
        }
        let before = checksum_offsets(input, p)?;
        let after = checksum_offsets(out, p)?;
        if before != after {
            return Err(format!(
                "checksums not updated incrementally: ones'-complement offsets from the \
                 correct values (IPv4 header, TCP; 0xffff = valid) were {:04x?}, are {:04x?}",
                before, after
            ));
        }
        if before == (0xffff, 0xffff) {
            self.stats[hook as usize].valid_checksums += 1;
        }
        Ok(())
    }

    // ---- Generating cases ----

    fn client(&mut self) -> SocketAddrV4 {
        let r = &mut self.rng;
        let ip = match r.below(10) {
            0 => Ipv4Addr::new(10, 1, 5, r.byte()),
            1 => Ipv4Addr::new(10, 1, 6, r.byte()),
            2 => Ipv4Addr::from(r.next() as u32),
            _ => Ipv4Addr::new(10, 1, r.byte(), r.byte()),
        };
        SocketAddrV4::new(ip, r.range(1, 65535) as u16)
    }

    fn vip(&mut self) -> (SocketAddrV4, usize) {
        let i = self.rng.below(self.config.services.len());
        (self.config.services[i].vip, i)
    }

    /// An address that is no service: another port of a VIP, another
    /// address, a backend itself, the node.
    fn elsewhere(&mut self) -> SocketAddrV4 {
        let backends = self.all_backends();
        let r = &mut self.rng;
        match r.below(5) {
            0 => SocketAddrV4::new(*WEB.ip(), *r.pick(&[81u16, 443, 8080, 0, 65535])),
            1 => SocketAddrV4::new(*API.ip(), *r.pick(&[80u16, 444, 8443])),
            2 => *r.pick(&backends),
            3 => SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 102), 80),
            _ => SocketAddrV4::new(Ipv4Addr::from(r.next() as u32), r.u16()),
        }
    }

    fn checksum_mode(&mut self, tcp: bool) -> Csum {
        match self.rng.below(20) {
            0 => Csum::Broken(self.rng.u16()),
            1 if tcp => Csum::Partial,
            _ => Csum::Valid,
        }
    }

    fn options(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.below(max / 4 + 1) * 4;
        match self.rng.below(3) {
            0 => vec![1; n],
            1 => {
                // A NOP-padded option of a plausible kind.
                let mut o = self.rng.bytes(n);
                if n >= 4 {
                    o[0] = *self.rng.pick(&[0x07u8, 0x44, 0x94, 0x02, 0x08]);
                    o[1] = (2 + self.rng.below(n - 1)) as u8;
                }
                o
            }
            _ => self.rng.bytes(n),
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        match self.rng.below(8) {
            0..=2 => Vec::new(),
            3 => self.rng.some_bytes(1, 3),
            4 => HTTP_GET.to_vec(),
            5 => {
                let line = *self.rng.pick(&STATUS_LINES);
                line[..self.rng.range(0, line.len())].to_vec()
            }
            _ => self.rng.some_bytes(1, 1400),
        }
    }

    /// A client's frame to a service: a new connection or a known one.
    fn client_frame(&mut self) -> Frame {
        let (client, svc) = match self.recent.len() {
            n if n > 0 && self.rng.chance(40) => self.recent[self.rng.below(n)],
            _ => {
                let c = self.client();
                (c, self.vip().1)
            }
        };
        let vip = self.config.services[svc].vip;
        let flags = *self.rng.pick(&[
            TCP_SYN,
            TCP_SYN,
            TCP_ACK,
            TCP_ACK | TCP_PSH,
            TCP_ACK | TCP_FIN,
            TCP_RST,
            TCP_RST | TCP_ACK,
            TCP_SYN | TCP_ACK,
        ]);
        let mut f = Frame::new(client, vip, flags);
        if flags & TCP_SYN != 0 && self.rng.chance(70) {
            f.tcp_options = SYN_OPTIONS.to_vec();
        }
        if flags & (TCP_SYN | TCP_RST) == 0 {
            f.payload = self.payload();
        }
        f.tcp_csum = self.checksum_mode(true);
        f.ip_csum = self.checksum_mode(false);
        if self.rng.chance(5) {
            f.trailer = vec![0; self.rng.range(1, 16)];
        }
        f
    }

    /// A backend's reply to a client: to a known connection mostly.
    fn reply(&mut self) -> Frame {
        let (client, svc) = match self.recent.len() {
            n if n > 0 && self.rng.chance(85) => self.recent[self.rng.below(n)],
            _ => {
                let c = self.client();
                (c, self.vip().1)
            }
        };
        let backend = predict(&self.config.services[svc], client);
        let flags = *self.rng.pick(&[
            TCP_SYN | TCP_ACK,
            TCP_ACK,
            TCP_ACK | TCP_PSH,
            TCP_ACK | TCP_FIN,
            TCP_RST,
            TCP_RST | TCP_ACK,
        ]);
        let mut f = Frame::new(backend, client, flags);
        if flags & (TCP_SYN | TCP_RST) == 0 {
            f.payload = self.payload();
        }
        f.tcp_csum = self.checksum_mode(true);
        f.ip_csum = self.checksum_mode(false);
        f
    }

    /// A whole exchange, queued: handshake, a request, a response whose
    /// status line is split across two segments (at a random byte), the rest.
    fn conversation(&mut self) {
        let client = self.client();
        let (vip, svc) = self.vip();
        let backend = predict(&self.config.services[svc], client);
        let line = *self.rng.pick(&STATUS_LINES);
        let cut = self.rng.range(0, line.len().min(13));
        let mut frames = vec![
            ("conversation: SYN", Frame::new(client, vip, TCP_SYN)),
            (
                "conversation: SYN-ACK",
                Frame::new(backend, client, TCP_SYN | TCP_ACK),
            ),
            ("conversation: ACK", Frame::new(client, vip, TCP_ACK)),
        ];
        let mut get = Frame::new(client, vip, TCP_ACK | TCP_PSH);
        get.payload = HTTP_GET.to_vec();
        frames.push(("conversation: request", get));
        let mut first = Frame::new(backend, client, TCP_ACK | TCP_PSH);
        first.payload = line[..cut].to_vec();
        frames.push(("conversation: status line, first part", first));
        let mut rest = Frame::new(backend, client, TCP_ACK | TCP_PSH);
        rest.payload = line[cut..].to_vec();
        frames.push(("conversation: status line, rest", rest));
        if self.rng.chance(50) {
            let mut again = Frame::new(client, vip, TCP_ACK | TCP_PSH);
            again.payload = HTTP_GET.to_vec();
            frames.push(("conversation: keep-alive request", again));
            let mut tiny = Frame::new(backend, client, TCP_ACK | TCP_PSH);
            tiny.payload = line[..1].to_vec();
            frames.push(("conversation: one-byte response", tiny));
        }
        frames.push((
            "conversation: FIN",
            Frame::new(client, vip, TCP_ACK | TCP_FIN),
        ));
        frames.push((
            "conversation: backend RST",
            Frame::new(backend, client, TCP_RST | TCP_ACK),
        ));
        for (kind, mut f) in frames {
            f.tcp_csum = self.checksum_mode(true);
            self.pending.push_back(Case {
                kind,
                frame: f.build(),
            });
        }
    }

    /// Changes a few header bytes of a frame in one of many ways.
    fn mutate(&mut self, f: &mut Vec<u8>) -> &'static str {
        let r = &mut self.rng;
        let len = f.len();
        let l4 = 14 + (f[14] & 0x0f) as usize * 4;
        match r.below(10) {
            0 => {
                for _ in 0..r.range(1, 4) {
                    let i = r.below(len.min(14 + 60 + 60));
                    f[i] ^= 1 << r.below(8);
                }
                "mutated: header bit flips"
            }
            1 => {
                for _ in 0..r.range(1, 3) {
                    let i = r.below(len.min(14 + 60 + 60));
                    f[i] = r.byte();
                }
                "mutated: header bytes"
            }
            2 => {
                f.truncate(r.below(len));
                "mutated: truncated"
            }
            3 => {
                f[14] = 0x40 | r.below(16) as u8;
                "mutated: IHL"
            }
            4 => {
                let tot = u16::from_be_bytes([f[16], f[17]]) as i64;
                let t = match r.below(3) {
                    0 => r.u16() as i64,
                    1 => tot + r.range(0, 8) as i64 - 4,
                    _ => tot + 1,
                };
                f[16..18].copy_from_slice(&(t.clamp(0, 65535) as u16).to_be_bytes());
                "mutated: total length"
            }
            5 if l4 + 13 < len => {
                f[l4 + 12] = (r.below(16) as u8) << 4 | (f[l4 + 12] & 0x0f);
                "mutated: data offset"
            }
            6 => {
                let v = r.u16() & *r.pick(&[0x3fffu16, 0x2000, 0x1fff, 0xffff]);
                f[20..22].copy_from_slice(&v.to_be_bytes());
                "mutated: fragment bits"
            }
            7 => {
                f[23] = *r.pick(&[17u8, 1, 0, 255, 6]);
                "mutated: protocol"
            }
            8 => {
                let ethertype = *r.pick(&[ETH_IPV6, ETH_ARP, ETH_VLAN, [0x88, 0xa8]]);
                f[12..14].copy_from_slice(&ethertype);
                "mutated: EtherType"
            }
            _ => {
                let extra = r.range(1, 64);
                f.extend(r.bytes(extra));
                "mutated: trailing bytes"
            }
        }
    }

    fn next_case(&mut self) -> Case {
        if let Some(c) = self.pending.pop_front() {
            return c;
        }
        let pick = self.rng.below(100);
        match pick {
            0..=17 => Case {
                kind: "service frame",
                frame: self.client_frame().build(),
            },
            18..=23 => {
                let mut f = self.client_frame();
                f.ip_options = self.options(40);
                f.tcp_options = self.options(40);
                Case {
                    kind: "service frame with IP and TCP options",
                    frame: f.build(),
                }
            }
            24..=33 => Case {
                kind: "reply",
                frame: self.reply().build(),
            },
            34..=38 => {
                self.conversation();
                self.next_case()
            }
            39..=44 => {
                let mut f = if self.rng.chance(50) {
                    self.client_frame()
                } else {
                    self.reply()
                };
                if self.rng.chance(50) {
                    f.dst = self.elsewhere();
                } else {
                    f.src = self.elsewhere();
                }
                Case {
                    kind: "frame for no service",
                    frame: f.build(),
                }
            }
            45..=66 => {
                let mut f = if self.rng.chance(60) {
                    self.client_frame()
                } else {
                    self.reply()
                };
                if self.rng.chance(30) {
                    f.ip_options = self.options(40);
                }
                let mut frame = f.build();
                let kind = self.mutate(&mut frame);
                Case { kind, frame }
            }
            67..=69 => {
                let mut f = self.client_frame();
                f.frag = *self
                    .rng
                    .pick(&[0x2000u16, 0x0001, 0x2001, 0x1fff, 0x3fff, 0x6000]);
                Case {
                    kind: "fragment",
                    frame: f.build(),
                }
            }
            70..=72 => {
                let n = self.rng.range(0, 64);
                Case {
                    kind: "IPv6",
                    frame: ipv6_tcp(&mut self.rng, n),
                }
            }
            73..=75 => {
                let mut f = self.client_frame();
                f.vlan = Some(self.rng.u16() & 0x0fff);
                Case {
                    kind: "VLAN-tagged",
                    frame: f.build(),
                }
            }
            76..=77 => Case {
                kind: "ARP",
                frame: arp(&mut self.rng),
            },
            78..=83 => {
                let mut f = self.client_frame();
                f.flags = self.rng.byte();
                if self.rng.chance(50) {
                    f.payload = self.rng.some_bytes(0, 2);
                }
                Case {
                    kind: "random TCP flags",
                    frame: f.build(),
                }
            }
            84..=87 => {
                let frame = if self.rng.chance(50) {
                    self.client_frame().build()
                } else {
                    self.reply().build()
                };
                let cut = self.rng.below(frame.len());
                Case {
                    kind: "truncated",
                    frame: frame[..cut].to_vec(),
                }
            }
            _ => {
                let n = self.rng.range(14, 1514);
                let mut frame = self.rng.bytes(n);
                let kind = if self.rng.chance(50) {
                    // Looks like IPv4 at first glance, to get past the EtherType.
                    frame[12..14].copy_from_slice(&ETH_IPV4);
                    if n > 23 {
                        frame[14] = 0x40 | (frame[14] & 0x0f);
                        frame[23] = 6;
                    }
                    "garbage with an IPv4 EtherType"
                } else {
                    "garbage"
                };
                Case { kind, frame }
            }
        }
    }

    /// Sweeps over every truncation, IHL, data offset and flag byte of a few frames.
    fn sweeps(&mut self) -> Vec<Case> {
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 7), 40000);
        let mut syn = Frame::new(client, WEB, TCP_SYN);
        syn.ip_options = vec![0x01, 0x01, 0x94, 0x04, 0x00, 0x00, 0x01, 0x00];
        syn.tcp_options = SYN_OPTIONS.to_vec();
        let mut get = Frame::new(client, API, TCP_ACK | TCP_PSH);
        get.ip_options = vec![0x01; 40];
        get.payload = HTTP_GET.to_vec();
        let backend = predict(&self.config.services[0], client);
        let mut response = Frame::new(backend, client, TCP_ACK | TCP_PSH);
        response.payload = STATUS_LINES[0].to_vec();
        let mut vlan = Frame::new(client, WEB, TCP_SYN);
        vlan.vlan = Some(7);
        let plain = Frame::new(client, WEB, TCP_ACK);

        let mut cases = Vec::new();
        // The SYN first, so the response belongs to an open connection.
        cases.push(Case {
            kind: "sweep: the SYN whole",
            frame: syn.build(),
        });
        let ipv6 = ipv6_tcp(&mut self.rng, 8);
        for (kind, frame) in [
            ("sweep: truncated SYN with IP and TCP options", syn.build()),
            (
                "sweep: truncated request with 40 bytes of IP options",
                get.build(),
            ),
            ("sweep: truncated HTTP response", response.build()),
            ("sweep: truncated VLAN-tagged SYN", vlan.build()),
            ("sweep: truncated IPv6 SYN", ipv6),
        ] {
            for len in 0..=frame.len() {
                cases.push(Case {
                    kind,
                    frame: frame[..len].to_vec(),
                });
            }
        }
        for base in [&syn, &get, &plain] {
            let frame = base.build();
            for ihl in 0..16u8 {
                let mut f = frame.clone();
                f[14] = 0x40 | ihl;
                cases.push(Case {
                    kind: "sweep: every IHL",
                    frame: f,
                });
            }
            for version in 0..16u8 {
                let mut f = frame.clone();
                f[14] = version << 4 | (f[14] & 0x0f);
                cases.push(Case {
                    kind: "sweep: every IP version",
                    frame: f,
                });
            }
            let l4 = 14 + (frame[14] & 0x0f) as usize * 4;
            for doff in 0..16u8 {
                let mut f = frame.clone();
                f[l4 + 12] = doff << 4;
                cases.push(Case {
                    kind: "sweep: every TCP data offset",
                    frame: f,
                });
            }
        }
        for flags in 0..=255u8 {
            let mut f = plain.clone();
            f.src = SocketAddrV4::new(Ipv4Addr::new(10, 1, 200, flags), 40000 + flags as u16);
            f.flags = flags;
            cases.push(Case {
                kind: "sweep: every TCP flag byte",
                frame: f.build(),
            });
        }
        cases
    }

    // ---- After the run ----

    fn check_maps(&self) {
        let entries = self.dp.conntrack_entries().expect("counting conntrack");
        assert!(
            entries <= 2 * CONNTRACK_CONNECTIONS as u64,
            "conntrack holds {entries} entries, more than 2 x {CONNTRACK_CONNECTIONS}"
        );
    }

    fn check_conntrack(&self) -> usize {
        let ct = self.dp.conntrack().expect("reading conntrack");
        assert!(ct.len() <= 2 * CONNTRACK_CONNECTIONS as usize);
        let ip = |a: u32| wire::ipv4(a);
        let port = |p: u16| wire::host_port(p);
        for (k, e) in &ct {
            let from = SocketAddrV4::new(ip(k.saddr), port(k.sport));
            let to = SocketAddrV4::new(ip(k.daddr), port(k.dport));
            let target = SocketAddrV4::new(ip(e.addr), port(e.port));
            match e.kind {
                CT_FORWARD => {
                    let i = self
                        .service_at(to)
                        .unwrap_or_else(|| panic!("forward entry {from} -> {to}: no service"));
                    let s = &self.config.services[i];
                    assert_eq!(
                        target,
                        predict(s, from),
                        "forward entry {from} -> {to}: {e:?}"
                    );
                    let a = self.applied.service(s.vip).expect("applied");
                    assert_eq!(e.service_id, a.value.id, "{e:?}");
                    let id = a
                        .backends
                        .get(e.group as usize)
                        .and_then(|list| list.iter().find(|(b, _)| *b == target))
                        .map(|(_, id)| *id);
                    assert_eq!(Some(e.backend_id), id, "{from} -> {to}: {e:?}");
                }
                CT_REVERSE => {
                    let i = self
                        .service_of_backend(from)
                        .unwrap_or_else(|| panic!("reverse entry {from} -> {to}: no backend"));
                    let s = &self.config.services[i];
                    assert_eq!(target, s.vip, "reverse entry {from} -> {to}: {e:?}");
                    assert_eq!(predict(s, to), from, "reverse entry {from} -> {to}");
                }
                k => panic!("conntrack entry {from} -> {to} of kind {k}: {e:?}"),
            }
        }
        ct.len()
    }

    fn check_counters(&self) {
        let by_iface = self.dp.counters().expect("reading counters");
        let ifindexes: BTreeSet<u32> = by_iface.iter().map(|(i, _, _)| *i).collect();
        assert!(
            ifindexes.len() <= 2 && by_iface.len() <= ifindexes.len() * Counter::COUNT as usize,
            "counter keys: {by_iface:?}"
        );
        let total = self.dp.counter_totals().expect("reading counters");
        let get = |c: Counter| total.iter().find(|(k, _)| *k == c).map_or(0, |(_, n)| *n);
        let [x, t, e] = self.stats;
        let passed = |s: HookStats| {
            s.runs - s.translated - s.malformed - s.deferred - s.invalid - s.fragments
        };
        let expected = [
            (
                "xdp_steered + xdp_steered_new",
                get(Counter::XdpSteered) + get(Counter::XdpSteeredNew),
                x.translated,
            ),
            ("xdp_deferred", get(Counter::XdpDeferred), x.deferred),
            ("xdp_passed", get(Counter::XdpPassed), passed(x)),
            (
                "tc_steered + tc_steered_new",
                get(Counter::TcSteered) + get(Counter::TcSteeredNew),
                t.translated,
            ),
            ("tc_passed", get(Counter::TcPassed), passed(t)),
            ("tc_reversed", get(Counter::TcReversed), e.translated),
            ("egress_passed", get(Counter::EgressPassed), passed(e)),
            (
                "malformed",
                get(Counter::Malformed),
                x.malformed + t.malformed + e.malformed,
            ),
            ("no_backend", get(Counter::NoBackend), 0),
            ("invalid", get(Counter::Invalid), x.invalid + t.invalid),
            (
                "fragment_dropped",
                get(Counter::FragmentDropped),
                x.fragments + t.fragments,
            ),
            ("rewrite_failed", get(Counter::RewriteFailed), 0),
            ("unrecorded", get(Counter::Unrecorded), 0),
        ];
        for (name, got, want) in expected {
            assert_eq!(got, want, "counter {name}: all counters {total:?}");
        }
        eprintln!(
            "  counters: {}",
            total
                .iter()
                .map(|(c, n)| format!("{}={n}", c.name()))
                .collect::<Vec<_>>()
                .join(" ")
        );

        let mut packets = [0u64; 2];
        for a in self.applied.services.values() {
            for (_, id) in a.backends.iter().flatten() {
                for s in self.dp.backend_stats(*id).expect("backend statistics") {
                    packets[TO_BACKEND] += s.packets[TO_BACKEND];
                    packets[FROM_BACKEND] += s.packets[FROM_BACKEND];
                }
            }
        }
        assert_eq!(
            packets,
            [x.translated + t.translated, e.translated],
            "backend packet counts (to, from) against the translations"
        );
    }
}

#[derive(Clone, Copy, Debug)]
enum End {
    Destination,
    Source,
}

#[test]
fn random_and_mutated_frames_pass_untouched_or_translated_correctly() {
    let seed = seed_from_env();
    let cases = cases_from_env();
    eprintln!(
        "fuzz seed {seed:#x} ({cases} frames; KANARI_FUZZ_SEED / KANARI_FUZZ_CASES override)"
    );
    let started = Instant::now();
    let mut fuzz = Fuzz::new(seed);
    let sweeps = fuzz.sweeps();
    let swept = sweeps.len();
    for case in &sweeps {
        fuzz.run_case(case);
    }
    while fuzz.index < cases.max(swept) {
        let case = fuzz.next_case();
        fuzz.run_case(&case);
        if fuzz.index.is_multiple_of(10_000) {
            fuzz.check_maps();
        }
    }
    fuzz.check_maps();
    let entries = fuzz.check_conntrack();
    eprintln!(
        "{} frames ({swept} from sweeps) in {:.1?}; {} connections opened, {entries} conntrack \
         entries at the end (bound {})",
        fuzz.index,
        started.elapsed(),
        fuzz.opened.len(),
        2 * CONNTRACK_CONNECTIONS
    );
    for hook in Hook::ALL {
        let s = fuzz.stats[hook as usize];
        eprintln!(
            "  {:<18} ran {:>6}, translated {:>6} ({} with valid checksums), untouched {:>6} \
             (of which malformed {}, left to TC {}), refused by the kernel {}",
            hook.program(),
            s.runs,
            s.translated,
            s.valid_checksums,
            s.untouched,
            s.malformed,
            s.deferred,
            s.refused
        );
    }
    eprintln!("  cases by kind:");
    for (k, n) in &fuzz.kinds {
        eprintln!("    {n:>6} {k}");
    }
    fuzz.check_counters();

    let [x, t, e] = fuzz.stats;
    for s in fuzz.stats {
        assert_eq!(s.runs + s.refused, fuzz.index as u64);
    }
    // The mix did what it is for: every outcome happened many times, and the
    // LRU table had to evict (several times more connections than it holds).
    if cases >= DEFAULT_CASES {
        assert!(x.translated > 1000 && t.translated > 1000 && e.translated > 1000);
        assert!(x.deferred > 100 && x.untouched > 10_000 && e.untouched > 10_000);
        assert!(
            fuzz.opened.len() > 2 * CONNTRACK_CONNECTIONS as usize,
            "{} connections opened",
            fuzz.opened.len()
        );
    }
}
