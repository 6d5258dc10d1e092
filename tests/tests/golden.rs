//! Golden-packet tests of the eBPF programs, Katran style: each case is an
//! input frame, the verdict and the output frame expected, run through
//! `BPF_PROG_TEST_RUN` on the real kernel with the real object and maps.
//!
//! - Where a packet is steered is *predicted* on the host with
//!   `kanari_common::{hash, select}` (what the kernel runs), never read back
//!   from the kernel.
//! - Frames are built with `etherparse`, and the IPv4 header and TCP
//!   checksums of every output are recomputed with `etherparse` (not with our
//!   own `csum` module).
//! - Every test loads its own [`Datapath`], so tests run in parallel and see
//!   only their own conntrack entries, counters and backend statistics.
//! - Counters are checked as exact deltas: a frame that passes untouched
//!   moves its hook's `*Passed` counter (or `Malformed`) by one and nothing else.
//! - The observer's per-backend statistics (summed over CPUs) are checked
//!   packet by packet as exact deltas of every count ([`Seen`]); no other
//!   backend's may move. A duration sample is checked for being positive, no
//!   longer than the host saw pass, and in the histogram bucket of its value.
//!
//! These tests need root (`CAP_BPF`, `CAP_NET_ADMIN`): without it they fail,
//! they do not skip.
//!
//! Each scenario taking a [`Hook`] runs as `xdp::<scenario>` and as
//! `tc_ingress::<scenario>`; `tc_egress::*` and `ns_per_packet` are on their own.
//!
//! What the kernel (6.18) accepts as test-run data: XDP at least 14 bytes
//! (`ETH_HLEN`); skb (TC) programs at least 14, and when the EtherType says
//! IPv4 at least 14 + 20 (a whole fixed IPv4 header; IPv6: 14 + 40). Shorter
//! data is refused with `EINVAL` before the program runs. The truncation
//! tests check exactly that and cover every length from there up.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use etherparse::{Ipv4Header, PacketBuilder, TcpHeader};
use kanari::{
    config::{self, Affinity, Config},
    datapath::Datapath,
};
use kanari_common::{
    csum, hash, hist,
    http::{CLASS_2XX, CLASS_3XX, CLASS_4XX, CLASS_5XX, CLASS_NONE, CLASS_OTHER, CLASSES},
    maps::{
        BackendStats, CT_F_HTTP, CT_F_UNCONFIRMED, CT_FORWARD, CT_REVERSE, Counter, CtEntry,
        CtState, FROM_BACKEND, FlowKey, Group, TO_BACKEND, programs,
    },
    select,
    wire::{self, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use kanari_tests::frames::{
    self, CLIENT_MAC, HTTP_GET, Hook, Loaded, ROUTER_MAC, SYN_OPTIONS, TC_ACT_UNSPEC, TCP_PSH,
    Tcp4, XDP_PASS, predict, reply, response, syn_ack, test_run,
};

// ---- The service under test -----------------------------------------------------------------

const SALT: u32 = 42;
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
const STABLE: [SocketAddrV4; 2] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 2, 1, 1), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 2, 2, 1), 8080),
];
const CANARY: [SocketAddrV4; 1] = [SocketAddrV4::new(Ipv4Addr::new(10, 3, 1, 1), 8080)];
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 7), 40000);

/// `web` at `weight` percent, with `extra` YAML lines appended to the service.
fn web(weight: u32, extra: &str) -> Config {
    let text = format!(
        "interfaces: [{{name: golden0}}]
conntrack: {{connections: 16384}}
services:
  - name: web
    vip: {VIP}
    salt: {SALT}
    canary_weight: {weight}
    stable: {{backends: [{}, {}]}}
    canary: {{backends: [{}]}}
{extra}",
        STABLE[0], STABLE[1], CANARY[0]
    );
    config::parse("golden.yaml", &text, &|_| true).expect("the test configuration is valid")
}

/// A loaded (not attached) data path with `config` applied (see
/// [`kanari_tests::frames::Loaded`]), with the checks of these tests.
struct Kanari(Loaded);

impl std::ops::Deref for Kanari {
    type Target = Loaded;
    fn deref(&self) -> &Loaded {
        &self.0
    }
}

impl std::ops::DerefMut for Kanari {
    fn deref_mut(&mut self) -> &mut Loaded {
        &mut self.0
    }
}

impl Kanari {
    fn load(config: Config) -> Self {
        Self(Loaded::load(config).expect("loading the data path with the test configuration"))
    }

    /// Switches to `config` the way the agent does: a plan from what the maps hold.
    fn reconfigure(&mut self, config: Config) {
        self.0
            .reconfigure(config)
            .expect("applying the new configuration");
    }

    fn service(&self) -> &config::Service {
        &self.config.services[0]
    }

    /// Where the kernel must send the first packet of `client`'s connection to the VIP.
    fn predict(&self, client: SocketAddrV4) -> (Group, SocketAddrV4) {
        predict(self.service(), client)
    }

    /// Counter `c`, summed over CPUs and interfaces.
    fn counter(&self, c: Counter) -> u64 {
        self.counters()
            .into_iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v)
            .expect("every counter is read")
    }

    /// Every counter, summed over CPUs and interfaces, in `Counter::ALL` order.
    fn counters(&self) -> Vec<(Counter, u64)> {
        self.dp.counter_totals().expect("reading the counters")
    }

    /// The id the plan gave `backend` of the service.
    fn backend_id(&self, backend: SocketAddrV4) -> u32 {
        let svc = self.applied.service(VIP).expect("web is applied");
        svc.backends[group_of(backend) as usize]
            .iter()
            .find(|(b, _)| *b == backend)
            .map(|(_, id)| *id)
            .unwrap_or_else(|| panic!("{backend} has no id in {:?}", svc.backends))
    }

    /// The statistics of `backend`, summed over CPUs.
    fn stats(&self, backend: SocketAddrV4) -> BackendStats {
        let id = self.backend_id(backend);
        sum_stats(
            &self
                .dp
                .backend_stats(id)
                .expect("reading backend statistics"),
        )
    }

    /// The statistics of every backend of the service.
    fn all_stats(&self) -> Vec<(SocketAddrV4, BackendStats)> {
        STABLE
            .into_iter()
            .chain(CANARY)
            .map(|b| (b, self.stats(b)))
            .collect()
    }

    fn conntrack(&self) -> Vec<(FlowKey, CtEntry)> {
        self.dp.conntrack().expect("reading conntrack")
    }

    fn run(&mut self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
        run(&mut self.dp, hook, frame)
    }

    /// Runs `frame` through `hook` and asserts it comes out DNATed to `to`.
    fn expect_translated(&mut self, hook: Hook, frame: &[u8], to: SocketAddrV4) {
        let (verdict, out) = self.run(hook, frame);
        assert_eq!(verdict, hook.pass(), "{hook:?} verdict");
        assert_translated(frame, &out, to);
    }

    /// Runs `frame` through `hook` and asserts it comes out byte-identical,
    /// that exactly one counter moved, `counted`, by one, and that no
    /// backend's statistics moved.
    fn expect_untouched(&mut self, hook: Hook, frame: &[u8], what: &str, counted: Counter) {
        let (counters, stats) = (self.counters(), self.all_stats());
        let (verdict, out) = self.run(hook, frame);
        assert_eq!(verdict, hook.pass(), "{hook:?} verdict for {what}");
        assert_eq!(hex(&out), hex(frame), "{hook:?} changed {what}");
        assert_eq!(
            counter_delta(&counters, &self.counters()),
            vec![(counted, 1)],
            "{hook:?} counters for {what}"
        );
        assert_eq!(self.all_stats(), stats, "{hook:?} observed {what}");
    }

    /// Runs a client's `frame` through `hook`, asserts it is DNATed to
    /// `backend`, and returns what `backend`'s statistics gained (no other
    /// backend's may move).
    fn send(&mut self, hook: Hook, frame: &[u8], backend: SocketAddrV4) -> Step {
        let before = self.all_stats();
        self.expect_translated(hook, frame, backend);
        self.step(&before, backend, &format!("{hook:?} ingress"))
    }

    /// Runs `backend`'s `frame` through TC egress, asserts it is
    /// reverse-NATed to the VIP, and returns what `backend`'s statistics
    /// gained (no other backend's may move).
    fn answer(&mut self, frame: &[u8], backend: SocketAddrV4) -> Step {
        let before = self.all_stats();
        let (verdict, out) = self.run(Hook::TcEgress, frame);
        assert_eq!(verdict, TC_ACT_UNSPEC, "egress verdict");
        assert_reverse_translated(frame, &out, VIP);
        self.step(&before, backend, "egress")
    }

    fn step(
        &self,
        before: &[(SocketAddrV4, BackendStats)],
        backend: SocketAddrV4,
        what: &str,
    ) -> Step {
        let after = self.all_stats();
        let mut step = None;
        for ((b, x), (_, y)) in before.iter().zip(&after) {
            if *b == backend {
                step = Some(Step::between(x, y));
            } else {
                assert_eq!(x, y, "{what}: the statistics of {b} moved (not {backend})");
            }
        }
        step.expect("the backend is one of the service's")
    }

    /// The forward conntrack entry (client -> VIP) of `client`, with the
    /// observer's state.
    fn forward(&self, client: SocketAddrV4) -> CtEntry {
        let key = FlowKey::new(
            wire::addr(*client.ip()),
            wire::addr(*VIP.ip()),
            wire::port(client.port()),
            wire::port(VIP.port()),
        );
        let ct = self.conntrack();
        ct.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, e)| *e)
            .unwrap_or_else(|| panic!("no forward entry of {client}; table: {ct:#?}"))
    }
}

/// Nonzero counter changes, in `Counter::ALL` order.
fn counter_delta(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> Vec<(Counter, u64)> {
    assert_eq!(before.len(), after.len());
    before
        .iter()
        .zip(after)
        .filter(|((_, b), (_, a))| a != b)
        .map(|((c, b), (k, a))| {
            assert_eq!(c, k);
            (*c, a - b)
        })
        .collect()
}

// ---- Backend statistics ---------------------------------------------------------------------

fn sum_stats(per_cpu: &[BackendStats]) -> BackendStats {
    let mut t = BackendStats::ZERO;
    for s in per_cpu {
        t.connections += s.connections;
        t.connects += s.connects;
        t.connect_sum_ns += s.connect_sum_ns;
        t.resets += s.resets;
        t.refused += s.refused;
        t.unanswered += s.unanswered;
        t.ttfb_sum_ns += s.ttfb_sum_ns;
        for c in 0..CLASSES {
            t.requests[c] += s.requests[c];
        }
        for d in [TO_BACKEND, FROM_BACKEND] {
            t.bytes[d] += s.bytes[d];
            t.packets[d] += s.packets[d];
        }
        for (t, s) in t.ttfb_hist.iter_mut().zip(&s.ttfb_hist) {
            *t = t.wrapping_add(*s);
        }
        for (t, s) in t.connect_hist.iter_mut().zip(&s.connect_hist) {
            *t = t.wrapping_add(*s);
        }
    }
    t
}

/// The counts of [`BackendStats`] one step (one packet) added, compared as a
/// whole: a test states every count it expects, and every other is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    connections: u64,
    connects: u64,
    refused: u64,
    resets: u64,
    unanswered: u64,
    requests: [u64; CLASSES],
    /// Indexed by `TO_BACKEND`, `FROM_BACKEND`.
    packets: [u64; 2],
    bytes: [u64; 2],
    /// Samples added to `connect_hist` and `ttfb_hist`.
    connect_samples: u64,
    ttfb_samples: u64,
}

/// What one packet added to a backend's statistics.
#[derive(Debug)]
struct Step {
    seen: Seen,
    /// Added to `connect_sum_ns` and `ttfb_sum_ns`.
    connect_ns: u64,
    ttfb_ns: u64,
    /// The bucket of every sample added, once per sample.
    connect_buckets: Vec<u32>,
    ttfb_buckets: Vec<u32>,
}

impl Step {
    fn between(a: &BackendStats, b: &BackendStats) -> Self {
        fn buckets<const N: usize>(x: &[u32; N], y: &[u32; N]) -> Vec<u32> {
            (0..N as u32)
                .flat_map(|i| {
                    let n = y[i as usize].wrapping_sub(x[i as usize]);
                    std::iter::repeat_n(i, n as usize)
                })
                .collect()
        }
        let connect_buckets = buckets(&a.connect_hist, &b.connect_hist);
        let ttfb_buckets = buckets(&a.ttfb_hist, &b.ttfb_hist);
        let d = |x: u64, y: u64| y.checked_sub(x).expect("statistics only grow");
        let requests: [u64; CLASSES] = std::array::from_fn(|c| d(a.requests[c], b.requests[c]));
        Self {
            seen: Seen {
                connections: d(a.connections, b.connections),
                connects: d(a.connects, b.connects),
                refused: d(a.refused, b.refused),
                resets: d(a.resets, b.resets),
                unanswered: d(a.unanswered, b.unanswered),
                requests,
                packets: [0, 1].map(|i| d(a.packets[i], b.packets[i])),
                bytes: [0, 1].map(|i| d(a.bytes[i], b.bytes[i])),
                connect_samples: connect_buckets.len() as u64,
                ttfb_samples: ttfb_buckets.len() as u64,
            },
            connect_ns: d(a.connect_sum_ns, b.connect_sum_ns),
            ttfb_ns: d(a.ttfb_sum_ns, b.ttfb_sum_ns),
            connect_buckets,
            ttfb_buckets,
        }
    }

    /// Asserts the step counted exactly `seen` and, where it added no
    /// sample, added no time either.
    fn expect(&self, seen: Seen, what: &str) -> &Self {
        assert_eq!(self.seen, seen, "{what}: {self:#?}");
        if seen.connect_samples == 0 {
            assert_eq!(self.connect_ns, 0, "{what}: connect time without a sample");
        }
        if seen.ttfb_samples == 0 {
            assert_eq!(self.ttfb_ns, 0, "{what}: TTFB without a sample");
        }
        self
    }

    /// The step added one connect-time sample, of a connection whose SYN was
    /// sent after `since`: its bucket is the bucket of its duration, which is
    /// positive and no longer than the host saw pass.
    fn one_connect_sample(&self, since: Instant) -> &Self {
        one_sample(
            "connect",
            hist::CONNECT,
            self.connect_ns,
            &self.connect_buckets,
            since,
        );
        self
    }

    /// As [`Step::one_connect_sample`], for the time to first byte of a
    /// request sent after `since`.
    fn one_ttfb_sample(&self, since: Instant) -> &Self {
        one_sample("TTFB", hist::TTFB, self.ttfb_ns, &self.ttfb_buckets, since);
        self
    }
}

fn one_sample(what: &str, layout: hist::Layout, ns: u64, buckets: &[u32], since: Instant) {
    let elapsed = since.elapsed().as_nanos() as u64;
    assert!(
        ns > 0 && ns <= elapsed,
        "{what} sample of {ns} ns, but {elapsed} ns passed on the host"
    );
    assert_eq!(
        buckets,
        [layout.index(ns)],
        "one {what} sample of {ns} ns, in its bucket"
    );
}

/// `requests` with class `class` counted once.
fn one_request(class: usize) -> [u64; CLASSES] {
    let mut r = [0; CLASSES];
    r[class] = 1;
    r
}

/// The IPv4 total length of an Ethernet / IPv4 frame, read with etherparse.
fn ip_len(frame: &[u8]) -> u64 {
    Ipv4Header::from_slice(&frame[14..])
        .expect("an IPv4 header")
        .0
        .total_len as u64
}

/// What one packet to the backend counts when it only counts itself.
fn sent(frame: &[u8]) -> Seen {
    Seen {
        packets: [1, 0],
        bytes: [ip_len(frame), 0],
        ..Seen::default()
    }
}

/// What one packet from the backend counts when it only counts itself.
fn answered(frame: &[u8]) -> Seen {
    Seen {
        packets: [0, 1],
        bytes: [0, ip_len(frame)],
        ..Seen::default()
    }
}

fn group_of(backend: SocketAddrV4) -> Group {
    if CANARY.contains(&backend) {
        Group::Canary
    } else {
        assert!(STABLE.contains(&backend), "{backend} is no backend");
        Group::Stable
    }
}

/// The `i`-th of many distinct clients (none in 10.1.5.0/24, the segment of
/// the segment test).
fn nth_client(i: u32) -> SocketAddrV4 {
    let host = 0x0a01_1000 + i; // from 10.1.16.0 on
    SocketAddrV4::new(Ipv4Addr::from(host), 30000 + (i % 20000) as u16)
}

// ---- Running the programs -------------------------------------------------------------------

fn run(dp: &mut Datapath, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
    let (r, out) = test_run(dp, hook, frame, 1)
        .unwrap_or_else(|e| panic!("test run of {hook:?} with {} bytes: {e}", frame.len()));
    (r.return_value, out)
}

fn run_xdp(dp: &mut Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
    run(dp, Hook::Xdp, frame)
}

/// Runs the TC program `name` (`kanari_tc_ingress` or `kanari_tc_egress`).
fn run_tc(dp: &mut Datapath, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let hook = match name {
        programs::TC_INGRESS => Hook::TcIngress,
        programs::TC_EGRESS => Hook::TcEgress,
        _ => panic!("no TC program {name}"),
    };
    run(dp, hook, frame)
}

// ---- Frames ---------------------------------------------------------------------------------

/// 8 bytes of IPv4 options (IHL 7): NOP, NOP, Router Alert (RFC 2113), NOP, End of list.
const IP_OPTIONS: [u8; 8] = [0x01, 0x01, 0x94, 0x04, 0x00, 0x00, 0x01, 0x00];

fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut f, b"ping ping ping")
        .unwrap();
    f
}

fn udp4(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut f, b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    f
}

fn tcp6_syn(dport: u16) -> Vec<u8> {
    let client: [u8; 16] = "fd00:1::7".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let vip: [u8; 16] = "fd00::100".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_MAC)
        .ipv6(client, vip, 64)
        .tcp(40000, dport, 1, 64240)
        .syn()
        .write(&mut f, &[])
        .unwrap();
    f
}

// ---- Checks ---------------------------------------------------------------------------------

fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|l| {
            l.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Recomputes the IPv4 header checksum and the TCP checksum (over pseudo
/// header, header and payload) of an Ethernet / IPv4 / TCP frame with
/// etherparse and compares them with the fields.
fn assert_checksums_valid(frame: &[u8]) {
    let (ip, rest) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 header");
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum of\n{}",
        hex(frame)
    );
    let l4_len = ip.total_len as usize - ip.header_len();
    let (tcp, payload) = TcpHeader::from_slice(&rest[..l4_len]).expect("a TCP header");
    assert_eq!(
        tcp.checksum,
        tcp.calc_checksum_ipv4(&ip, payload).unwrap(),
        "TCP checksum of\n{}",
        hex(frame)
    );
}

/// Which end of the connection a rewrite changes.
#[derive(Clone, Copy, Debug)]
enum End {
    /// DNAT on ingress: destination address and port.
    Destination,
    /// Reverse NAT on egress: source address and port.
    Source,
}

/// `out` is `input` with one end rewritten to `to` and both checksums
/// updated (and valid); every other byte (MACs, IP options, TCP options,
/// payload, ...) identical.
fn assert_rewritten(input: &[u8], out: &[u8], end: End, to: SocketAddrV4) {
    assert_checksums_valid(input);
    assert_eq!(out.len(), input.len(), "the frame changed length");
    let l4 = 14 + (input[14] & 0x0f) as usize * 4;
    let (addr_off, port_off) = match end {
        End::Destination => (14 + 16, l4 + 2),
        End::Source => (14 + 12, l4),
    };
    let mut expected = input.to_vec();
    expected[addr_off..addr_off + 4].copy_from_slice(&to.ip().octets());
    expected[port_off..port_off + 2].copy_from_slice(&to.port().to_be_bytes());
    // The checksums are checked by recomputation below, not by their bytes.
    expected[24..26].copy_from_slice(&out[24..26]);
    expected[l4 + 16..l4 + 18].copy_from_slice(&out[l4 + 16..l4 + 18]);
    assert_eq!(
        hex(out),
        hex(&expected),
        "{end:?} not rewritten to {to} (or other bytes changed); input was\n{}",
        hex(input)
    );
    assert_checksums_valid(out);
    // And once more through an independent parser.
    let (ip, rest) = Ipv4Header::from_slice(&out[14..]).unwrap();
    let (tcp, _) = TcpHeader::from_slice(rest).unwrap();
    let got = match end {
        End::Destination => SocketAddrV4::new(ip.destination.into(), tcp.destination_port),
        End::Source => SocketAddrV4::new(ip.source.into(), tcp.source_port),
    };
    assert_eq!(got, to);
}

/// `out` is `input` DNATed to `expected_dst`.
fn assert_translated(input: &[u8], out: &[u8], expected_dst: SocketAddrV4) {
    assert_rewritten(input, out, End::Destination, expected_dst);
}

/// `out` is `input` with its source rewritten to `expected_src` (reverse NAT).
fn assert_reverse_translated(input: &[u8], out: &[u8], expected_src: SocketAddrV4) {
    assert_rewritten(input, out, End::Source, expected_src);
}

/// The two conntrack entries of `client`'s connection to the VIP via
/// `backend`: the reverse entry exactly, the forward entry but for the
/// observer's state (its timestamps and status-line progress), which it returns.
fn assert_conntrack_has(k: &Kanari, client: SocketAddrV4, backend: SocketAddrV4) -> CtEntry {
    let ct = k.conntrack();
    let group = group_of(backend);
    let svc = k.applied.service(VIP).expect("web is applied");
    let backend_id = svc.backends[group as usize]
        .iter()
        .find(|(b, _)| *b == backend)
        .map(|(_, id)| *id)
        .expect("the backend has an id");
    let (c, v, b) = (
        (wire::addr(*client.ip()), wire::port(client.port())),
        (wire::addr(*VIP.ip()), wire::port(VIP.port())),
        (wire::addr(*backend.ip()), wire::port(backend.port())),
    );
    let forward = FlowKey::new(c.0, v.0, c.1, v.1);
    let reverse = FlowKey::new(b.0, c.0, b.1, c.1);
    let entry = |key: FlowKey| {
        ct.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, e)| *e)
            .unwrap_or_else(|| {
                panic!("no conntrack entry {key:?} for {client} via {backend}; table: {ct:#?}")
            })
    };
    let expected =
        |(addr, port), kind| CtEntry::new(kind, addr, port, group as u8, backend_id, svc.value.id);
    // Both entries carry the (monotonic) second a packet last touched them.
    let now = monotonic_s();
    let recent = |e: &CtEntry| {
        assert!(
            e.seen <= now && now - e.seen <= 5,
            "{e:?} not seen lately (now {now})"
        );
        e.seen
    };
    let r = entry(reverse);
    assert_eq!(
        r,
        CtEntry {
            seen: recent(&r),
            ..expected(v, CT_REVERSE)
        }
    );
    let f = entry(forward);
    recent(&f);
    let http = k.service().protocol == config::Protocol::Http;
    assert_eq!(
        f,
        CtEntry {
            // (An entry made from a later packet is unconfirmed until the
            // backend speaks: see every_insert_is_guarded_….)
            flags: if http { CT_F_HTTP } else { 0 } | f.flags & CT_F_UNCONFIRMED,
            syn_ns: f.syn_ns,
            req_ns: f.req_ns,
            status_pos: f.status_pos,
            status_code: f.status_code,
            isn: f.isn,
            seen: f.seen,
            ..expected(b, CT_FORWARD)
        }
    );
    f
}

// ---- 1, 2: new connections land on the predicted backend ------------------------------------

/// The SYN of `CLIENT` at weights 0 and 100, then 500 clients at weight 10.
fn syn_lands_on_the_predicted_backend(hook: Hook) {
    for (weight, must_be) in [(0, Group::Stable), (100, Group::Canary)] {
        let mut k = Kanari::load(web(weight, ""));
        let (group, backend) = k.predict(CLIENT);
        assert_eq!(group, must_be, "weight {weight}");
        let syn = Tcp4::syn(CLIENT, VIP).build();
        k.expect_translated(hook, &syn, backend);
        assert_eq!(k.counter(hook.new_counter()), 1);
        let f = assert_conntrack_has(&k, CLIENT, backend);
        assert!(f.syn_ns != 0 && f.req_ns == 0 && f.status_pos == 0, "{f:?}");
    }

    let mut k = Kanari::load(web(10, ""));
    let mut landed = [0usize; 2];
    for i in 0..500 {
        let client = nth_client(i);
        let (group, backend) = k.predict(client);
        let syn = Tcp4::syn(client, VIP).build();
        let (verdict, out) = k.run(hook, &syn);
        assert_eq!(verdict, hook.pass());
        assert_translated(&syn, &out, backend);
        landed[group as usize] += 1;
    }
    eprintln!(
        "{hook:?} at 10 %: {} stable, {} canary of 500",
        landed[0], landed[1]
    );
    assert!(
        landed[0] > 0 && landed[1] > 0,
        "both groups get clients: {landed:?}"
    );
    assert_eq!(k.counter(hook.new_counter()), 500);
    assert_eq!(k.conntrack().len(), 1000, "two entries per connection");
}

// ---- 3: reverse NAT -------------------------------------------------------------------------

fn the_reply_is_reverse_nated_to_the_vip(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let (_, backend) = k.predict(CLIENT);
    k.expect_translated(hook, &Tcp4::syn(CLIENT, VIP).build(), backend);

    let syn_ack = reply(backend, CLIENT, TCP_SYN | TCP_ACK)
        .tcp_options(&SYN_OPTIONS)
        .build();
    let (verdict, out) = run_tc(&mut k.dp, programs::TC_EGRESS, &syn_ack);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_reverse_translated(&syn_ack, &out, VIP);
    assert_eq!(k.counter(Counter::TcReversed), 1);

    // Replies of other connections, and client-side packets, pass untouched.
    let other_port = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    let other_backend = STABLE
        .into_iter()
        .chain(CANARY)
        .find(|b| *b != backend)
        .unwrap();
    for (what, frame) in [
        (
            "a reply to another client port",
            reply(backend, other_port, TCP_SYN | TCP_ACK),
        ),
        (
            "a reply from another backend",
            reply(other_backend, CLIENT, TCP_SYN | TCP_ACK),
        ),
        ("the client's own SYN", Tcp4::syn(CLIENT, VIP)),
        ("the DNATed SYN", Tcp4::syn(CLIENT, backend)),
    ] {
        k.expect_untouched(Hook::TcEgress, &frame.build(), what, Counter::EgressPassed);
    }
    assert_eq!(k.counter(Counter::TcReversed), 1);
}

// ---- 4: payload -----------------------------------------------------------------------------

fn data_segments_of_an_established_flow_are_translated_with_payload_checksum(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let (_, backend) = k.predict(CLIENT);
    k.expect_translated(hook, &Tcp4::syn(CLIENT, VIP).build(), backend);
    k.expect_translated(hook, &Tcp4::new(CLIENT, VIP, TCP_ACK).build(), backend);
    // An odd-length payload: the checksum's last word is half padding.
    assert_eq!(HTTP_GET.len() % 2, 1);
    let get = Tcp4::new(CLIENT, VIP, TCP_ACK | TCP_PSH)
        .payload(HTTP_GET)
        .build();
    k.expect_translated(hook, &get, backend);
    // A bare ACK padded to the 60-byte Ethernet minimum: the padding lies
    // outside the IPv4 total length and comes out as it went in.
    let mut padded = Tcp4::new(CLIENT, VIP, TCP_ACK).build();
    assert_eq!(padded.len(), 54);
    padded.extend_from_slice(&[0xa5; 6]);
    k.expect_translated(hook, &padded, backend);
    assert_eq!(k.counter(hook.new_counter()), 1);
    assert_eq!(k.counter(hook.known_counter()), 3);
    assert_eq!(k.conntrack().len(), 2, "established packets add no entries");

    let response = reply(backend, CLIENT, TCP_ACK | TCP_PSH)
        .payload(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .build();
    let (verdict, out) = run_tc(&mut k.dp, programs::TC_EGRESS, &response);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_reverse_translated(&response, &out, VIP);
}

// ---- 5: IPv4 options ------------------------------------------------------------------------

fn ip_options_are_preserved_and_the_tcp_header_found_after_them(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let (_, backend) = k.predict(CLIENT);
    let syn = Tcp4::syn(CLIENT, VIP).ip_options(&IP_OPTIONS).build();
    assert_eq!(syn[14], 0x47, "IHL 7");
    k.expect_translated(hook, &syn, backend);
    let (_, out) = k.run(hook, &syn);
    assert_eq!(&out[34..42], &IP_OPTIONS, "options byte-identical");

    let get = Tcp4::new(CLIENT, VIP, TCP_ACK | TCP_PSH)
        .ip_options(&IP_OPTIONS)
        .payload(HTTP_GET)
        .build();
    k.expect_translated(hook, &get, backend);

    // The longest header, IHL 15: 39 NOPs and End of list.
    let mut longest = [0x01u8; 40];
    longest[39] = 0x00;
    let get = Tcp4::new(CLIENT, VIP, TCP_ACK | TCP_PSH)
        .ip_options(&longest)
        .payload(HTTP_GET)
        .build();
    assert_eq!(get[14], 0x4f, "IHL 15");
    k.expect_translated(hook, &get, backend);

    let syn_ack = reply(backend, CLIENT, TCP_SYN | TCP_ACK)
        .ip_options(&IP_OPTIONS)
        .build();
    let (verdict, out) = run_tc(&mut k.dp, programs::TC_EGRESS, &syn_ack);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_reverse_translated(&syn_ack, &out, VIP);
}

// ---- 6: what is not a service packet passes byte-identical ----------------------------------

/// A SYN to the VIP with `f` applied to its bytes (the checksums are not
/// fixed: the parser rejects these frames before it would look at them).
fn broken_syn(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut syn = Tcp4::syn(CLIENT, VIP).build();
    f(&mut syn);
    syn
}

/// Frames whose headers contradict themselves or are cut short inside what
/// they announce: every hook counts them as `Malformed` and passes them.
fn malformed_frames() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "IPv4 version 6 under the IPv4 EtherType",
            broken_syn(|f| f[14] = 0x65),
        ),
        ("IPv4 IHL 4", broken_syn(|f| f[14] = 0x44)),
        (
            "IPv4 total length shorter than the headers",
            broken_syn(|f| f[16..18].copy_from_slice(&39u16.to_be_bytes())),
        ),
        (
            "IPv4 total length past the frame",
            broken_syn(|f| f[16..18].copy_from_slice(&61u16.to_be_bytes())),
        ),
        (
            "TCP data offset 4",
            broken_syn(|f| f[34 + 12] = 0x40 | (f[34 + 12] & 0x0f)),
        ),
        (
            // A 40-byte TCP header (SYN options) announcing 60.
            "TCP data offset past the segment",
            broken_syn(|f| f[34 + 12] = 0xf0 | (f[34 + 12] & 0x0f)),
        ),
    ]
}

fn unrelated_frames() -> Vec<(&'static str, Vec<u8>)> {
    let vip = *VIP.ip();
    vec![
        ("ARP request for the VIP", arp_request(*CLIENT.ip(), vip)),
        ("ICMP echo to the VIP", icmp_echo(*CLIENT.ip(), vip)),
        ("IPv6 TCP SYN to port 80", tcp6_syn(80)),
        ("UDP to VIP:80", udp4(CLIENT, VIP)),
        (
            "TCP SYN to VIP:81",
            Tcp4::syn(CLIENT, SocketAddrV4::new(vip, 81)).build(),
        ),
        (
            "TCP SYN to 10.0.0.99:80",
            Tcp4::syn(CLIENT, SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 99), 80)).build(),
        ),
        // A first fragment to VIP:80 is dropped and counted (see
        // a_first_fragment_to_a_service_is_dropped_and_counted).
        (
            // Bytes that look like a TCP header where a first fragment has it.
            "non-first fragment (offset 1480) to VIP:80",
            Tcp4::syn(CLIENT, VIP).fragment(false, 185).build(),
        ),
        (
            "non-first fragment (offset 1480, MF) to VIP:80",
            Tcp4::syn(CLIENT, VIP).fragment(true, 185).build(),
        ),
        (
            "VLAN-tagged TCP SYN to VIP:80",
            Tcp4::syn(CLIENT, VIP).vlan(100).build(),
        ),
    ]
}

/// Each unrelated frame counts one `*Passed` of its hook, each malformed one
/// one `Malformed`; nothing else moves, and nothing is recorded.
fn unrelated_frames_pass_byte_identical(hook: Hook) {
    let mut k = Kanari::load(web(50, ""));
    let unrelated = unrelated_frames();
    let malformed = malformed_frames();
    for (what, frame) in &unrelated {
        k.expect_untouched(hook, frame, what, hook.passed_counter());
    }
    for (what, frame) in &malformed {
        k.expect_untouched(hook, frame, what, Counter::Malformed);
    }
    assert!(k.conntrack().is_empty(), "{hook:?}: {:#?}", k.conntrack());
    let counted: Vec<_> = k.counters().into_iter().filter(|(_, v)| *v != 0).collect();
    assert_eq!(
        counted,
        vec![
            (Counter::Malformed, malformed.len() as u64),
            (hook.passed_counter(), unrelated.len() as u64),
        ],
        "{hook:?}"
    );
    for (b, s) in k.all_stats() {
        assert_eq!(s, BackendStats::ZERO, "{hook:?}: statistics of {b}");
    }
}

// ---- 7: truncation --------------------------------------------------------------------------

/// The shortest IPv4 frame the kernel accepts for a test run of `hook`: XDP
/// takes anything from the Ethernet header on; the skb (TC) test run also
/// wants a whole fixed IPv4 header when the EtherType says IPv4 (and 40 bytes
/// after the Ethernet header for IPv6). Shorter data gets `EINVAL`.
fn min_test_run_len(hook: Hook) -> usize {
    match hook {
        Hook::Xdp => 14,
        Hook::TcIngress | Hook::TcEgress => 14 + 20,
    }
}

/// Runs every truncation of `frame` the kernel accepts through `hook`, checks
/// that the kernel refuses the shorter ones, and returns the lengths whose
/// output was not byte-identical to the input.
fn rewritten_truncations(k: &mut Kanari, hook: Hook, frame: &[u8]) -> Vec<usize> {
    let min = min_test_run_len(hook);
    for len in 0..min {
        let e = test_run(&mut k.dp, hook, &frame[..len], 1)
            .expect_err("the kernel ran a shorter frame than expected");
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EINVAL),
            "{hook:?} with {len} bytes"
        );
    }
    let (counters, stats) = (k.counters(), k.all_stats());
    let rewritten = (min..frame.len())
        .filter(|&len| {
            let cut = &frame[..len];
            let (verdict, out) = k.run(hook, cut);
            assert_eq!(verdict, hook.pass(), "{hook:?} cut to {len}");
            out != cut
        })
        .collect();
    // Every cut the kernel ran is a frame cut short: one `Malformed` each, nothing else.
    assert_eq!(
        counter_delta(&counters, &k.counters()),
        vec![(Counter::Malformed, (frame.len() - min) as u64)],
        "{hook:?}: counters of {} cuts",
        frame.len() - min
    );
    assert_eq!(k.all_stats(), stats, "{hook:?}: a cut frame was observed");
    rewritten
}

fn truncated_syns_pass_byte_identical_and_record_nothing(hook: Hook) {
    // A SYN with IP options and TCP options, so cuts fall in every header part:
    // Ethernet 0..14, IPv4 14..34, IPv4 options 34..42, TCP 42..62, TCP options 62..82.
    let syn = Tcp4::syn(CLIENT, VIP).ip_options(&IP_OPTIONS).build();
    assert_eq!(syn.len(), 14 + 28 + 40);
    let mut k = Kanari::load(web(10, ""));
    let rewritten = rewritten_truncations(&mut k, hook, &syn);
    let ct = k.conntrack();
    assert!(
        rewritten.is_empty() && ct.is_empty(),
        "{hook:?}: a SYN of {} bytes (IPv4 total length {}) cut short was rewritten at \
         lengths {rewritten:?} and left {} conntrack entries",
        syn.len(),
        syn.len() - 14,
        ct.len()
    );
    // The whole frame still is steered.
    let (_, backend) = k.predict(CLIENT);
    k.expect_translated(hook, &syn, backend);
}

// ---- 8: partial checksums are left to TC ----------------------------------------------------

fn xdp_defers_a_syn_with_a_partial_checksum() {
    let mut k = Kanari::load(web(10, ""));
    let mut syn = Tcp4::syn(CLIENT, VIP).build();
    let l4_len = (syn.len() - 34) as u16;
    let seed = csum::pseudo_seed(wire::addr(*CLIENT.ip()), wire::addr(*VIP.ip()), 6, l4_len);
    syn[34 + 16..34 + 18].copy_from_slice(&seed.to_ne_bytes());

    k.expect_untouched(
        Hook::Xdp,
        &syn,
        "a SYN with a partial checksum",
        Counter::XdpDeferred,
    );
    assert!(k.conntrack().is_empty(), "{:#?}", k.conntrack());
}

// ---- 9: weight changes never move established connections -----------------------------------

fn a_weight_change_keeps_established_connections_on_their_backend(hook: Hook) {
    let mut k = Kanari::load(web(0, ""));
    let (group, backend) = k.predict(CLIENT);
    assert_eq!(group, Group::Stable);
    k.expect_translated(hook, &Tcp4::syn(CLIENT, VIP).build(), backend);

    k.reconfigure(web(100, ""));
    assert_eq!(
        k.predict(CLIENT).0,
        Group::Canary,
        "a new connection of CLIENT would move"
    );
    // The handshake's ACK, data, and a retransmitted SYN stay on the stable backend.
    k.expect_translated(hook, &Tcp4::new(CLIENT, VIP, TCP_ACK).build(), backend);
    let get = Tcp4::new(CLIENT, VIP, TCP_ACK | TCP_PSH)
        .payload(HTTP_GET)
        .build();
    k.expect_translated(hook, &get, backend);
    k.expect_translated(hook, &Tcp4::syn(CLIENT, VIP).build(), backend);

    let newcomer = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 8), 40000);
    k.expect_translated(hook, &Tcp4::syn(newcomer, VIP).build(), CANARY[0]);
    // So does a new connection of the same client (another source port).
    let next_conn = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    k.expect_translated(hook, &Tcp4::syn(next_conn, VIP).build(), CANARY[0]);
    assert_eq!(k.conntrack().len(), 6);
}

// ---- 10: packets of unknown connections -----------------------------------------------------

fn an_ack_of_an_unknown_flow_recreates_entries_and_a_rst_creates_none(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));

    // An ACK (e.g. after the entry was evicted or the agent restarted).
    let (_, backend) = k.predict(CLIENT);
    k.expect_translated(hook, &Tcp4::new(CLIENT, VIP, TCP_ACK).build(), backend);
    assert_eq!(k.conntrack().len(), 2);
    let f = assert_conntrack_has(&k, CLIENT, backend);
    assert!(f.syn_ns == 0 && f.req_ns == 0, "no SYN, no payload: {f:?}");
    assert_eq!(k.counter(Counter::Fallback), 1);
    assert_eq!(k.counter(hook.new_counter()), 1);

    // A RST of an unknown flow: sent where the hash says, no entry.
    let other = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 9), 41000);
    let (_, other_backend) = k.predict(other);
    k.expect_translated(hook, &Tcp4::new(other, VIP, TCP_RST).build(), other_backend);
    k.expect_translated(
        hook,
        &Tcp4::new(other, VIP, TCP_RST | TCP_ACK).build(),
        other_backend,
    );
    assert_eq!(k.conntrack().len(), 2, "a RST opens nothing");
    assert_eq!(k.counter(Counter::Fallback), 3);
    assert_eq!(k.counter(hook.new_counter()), 1);
}

// ---- 11: segments ---------------------------------------------------------------------------

fn a_client_segment_wins_over_the_weight(hook: Hook) {
    let segments = "    segments: [{cidr: 10.1.5.0/24, group: canary}]\n";
    let mut k = Kanari::load(web(0, segments));
    let inside = SocketAddrV4::new(Ipv4Addr::new(10, 1, 5, 9), 40000);
    let outside = SocketAddrV4::new(Ipv4Addr::new(10, 1, 6, 9), 40000);
    assert_eq!(k.predict(inside), (Group::Canary, CANARY[0]));
    let (group, backend) = k.predict(outside);
    assert_eq!(group, Group::Stable);
    k.expect_translated(hook, &Tcp4::syn(inside, VIP).build(), CANARY[0]);
    k.expect_translated(hook, &Tcp4::syn(outside, VIP).build(), backend);
    // The whole /24, its edges included, and nothing next to it.
    for last in [0, 1, 254, 255] {
        let c = SocketAddrV4::new(Ipv4Addr::new(10, 1, 5, last), 40001);
        k.expect_translated(hook, &Tcp4::syn(c, VIP).build(), CANARY[0]);
    }
    for c in [Ipv4Addr::new(10, 1, 4, 255), Ipv4Addr::new(10, 1, 6, 0)] {
        let c = SocketAddrV4::new(c, 40001);
        let (group, backend) = k.predict(c);
        assert_eq!(group, Group::Stable);
        k.expect_translated(hook, &Tcp4::syn(c, VIP).build(), backend);
    }
}

// ---- 12: connection affinity ----------------------------------------------------------------

fn connection_affinity_splits_by_flow_hash(hook: Hook) {
    let mut k = Kanari::load(web(30, "    affinity: connection\n"));
    assert_eq!(k.service().affinity, Affinity::Connection);
    let mut landed = [0usize; 2];
    // Few clients, many connections each: the group varies within a client.
    let mut mixed_clients = 0;
    for c in 0..10u8 {
        let mut groups = [false; 2];
        for p in 0..30u16 {
            let client = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 10 + c), 40000 + p * 7);
            let (group, backend) = k.predict(client);
            k.expect_translated(hook, &Tcp4::syn(client, VIP).build(), backend);
            landed[group as usize] += 1;
            groups[group as usize] = true;
        }
        mixed_clients += usize::from(groups[0] && groups[1]);
    }
    eprintln!("{hook:?} connection affinity at 30 %: {landed:?} (stable, canary) of 300");
    assert!(landed[0] > 0 && landed[1] > 0, "{landed:?}");
    assert!(
        mixed_clients > 0,
        "connection affinity splits a client's connections"
    );
    assert_eq!(k.conntrack().len(), 600);
}

// ---- 12b: a consistent backend choice ------------------------------------------------------

/// `web` with one group of `backends`, all stable.
fn web_with(backends: &[SocketAddrV4]) -> Config {
    let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    let text = format!(
        "interfaces: [{{name: golden0}}]
services:
  - name: web
    vip: {VIP}
    salt: {SALT}
    canary_weight: 0
    stable: {{backends: [{}]}}
",
        list.join(", ")
    );
    config::parse("golden.yaml", &text, &|_| true).expect("the test configuration is valid")
}

/// A packet without conntrack entry (an evicted entry, an agent restarted
/// without pins, another node of the fleet) finds its backend by the set's
/// Maglev table: adding one backend to eight moves about a ninth of such
/// flows, not half of them as a plain range reduction would.
fn one_backend_added_to_eight_moves_about_a_ninth_of_the_flows(hook: Hook) {
    let nine: Vec<SocketAddrV4> = (1..=9)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 2, 1, i), 8080))
        .collect();
    let newcomer = nine[8];
    const FLOWS: u32 = 4000;
    let mut k = Kanari::load(web_with(&nine[..8]));
    // A RST opens nothing, so each one shows where the table sends its flow now.
    let land = |k: &mut Kanari| -> Vec<SocketAddrV4> {
        (0..FLOWS)
            .map(|i| {
                let client = nth_client(i);
                let (_, backend) = k.predict(client);
                k.expect_translated(hook, &Tcp4::new(client, VIP, TCP_RST).build(), backend);
                backend
            })
            .collect()
    };
    let before = land(&mut k);
    k.reconfigure(web_with(&nine));
    let after = land(&mut k);
    assert_eq!(k.conntrack().len(), 0);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let to_newcomer = after.iter().filter(|a| **a == newcomer).count();
    // What multiply-and-shift over the list (the choice before the table)
    // would have moved, for the same flows.
    let range_moved = (0..FLOWS)
        .filter(|&i| {
            let c = nth_client(i);
            let key = FlowKey::new(
                wire::addr(*c.ip()),
                wire::addr(*VIP.ip()),
                wire::port(c.port()),
                wire::port(VIP.port()),
            );
            let h = hash::backend_hash(hash::flow_hash(&key, SALT));
            select::backend_index(h, 8) != select::backend_index(h, 9)
        })
        .count();
    let share = |n: usize| n as f64 / FLOWS as f64;
    eprintln!(
        "{hook:?}: one backend added to 8 moved {:.2} % of {FLOWS} flows ({:.2} % to the newcomer); \
         range reduction would move {:.2} %",
        100.0 * share(moved),
        100.0 * share(to_newcomer),
        100.0 * share(range_moved)
    );
    // The newcomer's share is 1/9 of the table (±1 slot); the flows' share of
    // it is binomial: 4000 flows at 1/9 have sd 0.50 %, 99.9 % bound ±1.64 %.
    assert!(
        (share(to_newcomer) - 1.0 / 9.0).abs() <= 0.0164,
        "the newcomer took {to_newcomer} of {FLOWS}"
    );
    // Maglev moves a little more than the newcomer's share (its table moves
    // 12.1 %, see kanari_common::maglev): at most 15 % of the flows.
    assert!(share(moved) <= 0.15, "{moved} of {FLOWS} flows moved");
    assert!(
        range_moved > 2 * moved,
        "range reduction moves {range_moved}"
    );
}

// ---- 12c: ICMP errors about a connection ----------------------------------------------------

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

/// An ICMP "fragmentation needed" (next-hop MTU 1280) from `router` to
/// `to`, quoting the first `quote` bytes of the IPv4 packet in `segment`
/// (a frame), as a router on the path sends it.
fn frag_needed(router: Ipv4Addr, to: Ipv4Addr, segment: &[u8], quote: usize) -> Vec<u8> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let quoted = &segment[14..][..quote];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, CLIENT_MAC)
        .ipv4(router.octets(), to.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 },
        ))
        .write(&mut out, quoted)
        .expect("an ICMP frame");
    out
}

/// `out` is the ICMP error `input` sent to `outer_dst`, its quoted
/// segment's `end` rewritten to `to`; the outer IPv4, ICMP and quoted IPv4
/// checksums valid (and the quoted TCP one, when the whole segment is
/// quoted), recomputed by etherparse; every other quoted byte unchanged.
fn assert_icmp_translated(
    input: &[u8],
    out: &[u8],
    outer_dst: Ipv4Addr,
    end: End,
    to: SocketAddrV4,
) {
    use etherparse::Icmpv4Header;
    assert_eq!(out.len(), input.len(), "the frame changed length");
    assert_eq!(out[..14], input[..14], "the Ethernet header changed");
    let (ip, rest) = Ipv4Header::from_slice(&out[14..]).expect("an IPv4 header");
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "outer IPv4 checksum"
    );
    assert_eq!(
        Ipv4Addr::from(ip.destination),
        outer_dst,
        "outer destination"
    );
    let (icmp, quoted) = Icmpv4Header::from_slice(rest).expect("an ICMP header");
    assert_eq!(
        icmp.checksum,
        icmp.icmp_type.calc_checksum(quoted),
        "ICMP checksum"
    );
    let (qip, qtcp) = Ipv4Header::from_slice(quoted).expect("a quoted IPv4 header");
    assert_eq!(
        qip.header_checksum,
        qip.calc_header_checksum(),
        "quoted IPv4 checksum"
    );
    let port = |o: usize| u16::from_be_bytes([qtcp[o], qtcp[o + 1]]);
    let got = match end {
        End::Source => SocketAddrV4::new(qip.source.into(), port(0)),
        End::Destination => SocketAddrV4::new(qip.destination.into(), port(2)),
    };
    assert_eq!(got, to, "the quoted segment's {end:?}");
    let in_quoted = &input[input.len() - quoted.len()..];
    let in_tcp = &in_quoted[in_quoted.len() - qtcp.len()..];
    assert_eq!(qtcp[4..qtcp.len().min(16)], in_tcp[4..in_tcp.len().min(16)]);
    if qtcp.len() as u16 + qip.header_len() as u16 == qip.total_len {
        let (tcp, payload) = TcpHeader::from_slice(qtcp).expect("a quoted TCP header");
        assert_eq!(
            tcp.checksum,
            tcp.calc_checksum_ipv4(&qip, payload).unwrap(),
            "quoted TCP checksum"
        );
        assert_eq!(qtcp[18..], in_tcp[18..], "the quoted options and payload");
    }
}

/// A router between the node and the client cannot forward a reply of the
/// VIP (its next hop's MTU is smaller) and tells the VIP: the error must
/// reach the connection's backend, which alone can send smaller segments
/// (path MTU discovery), as if it had been sent to it.
fn an_icmp_error_about_a_reply_reaches_its_backend(hook: Hook) {
    let mut k = Kanari::load(web(0, ""));
    let backend = handshake(&mut k, hook, CLIENT);
    // The reply as it left the node (reverse-translated): from the VIP.
    let segment = Tcp4::new(VIP, CLIENT, TCP_ACK | TCP_PSH)
        .payload(RESPONSE_200)
        .build();
    // The whole segment quoted (Linux), and only its first 8 TCP bytes (RFC 792).
    for quote in [segment.len() - 14, 28] {
        let icmp = frag_needed(ROUTER, *VIP.ip(), &segment, quote);
        let (counters, stats) = (k.counters(), k.all_stats());
        let (verdict, out) = k.run(hook, &icmp);
        assert_eq!(verdict, hook.pass(), "{hook:?} verdict");
        assert_icmp_translated(&icmp, &out, *backend.ip(), End::Source, backend);
        assert_eq!(
            counter_delta(&counters, &k.counters()),
            vec![(Counter::IcmpTranslated, 1)]
        );
        assert_eq!(k.all_stats(), stats, "an ICMP error is no request");
    }
    // About no connection, or sent elsewhere than the VIP it quotes: untouched.
    let stranger = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 99), 40000);
    let other = Tcp4::new(VIP, stranger, TCP_ACK).build();
    k.expect_untouched(
        hook,
        &frag_needed(ROUTER, *VIP.ip(), &other, 40),
        "an ICMP error about no connection",
        hook.passed_counter(),
    );
    k.expect_untouched(
        hook,
        &frag_needed(ROUTER, Ipv4Addr::new(10, 0, 0, 101), &segment, 40),
        "an ICMP error to another address",
        hook.passed_counter(),
    );
}

// ---- 13: the observer: connect time ---------------------------------------------------------

/// A data segment (ACK|PSH) of `client` to the VIP.
fn request(client: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    frames::request(client, VIP, payload)
}

/// SYN, SYN-ACK, ACK of `client` through `hook`: returns its backend, with
/// the connection established and no request pending.
fn handshake(k: &mut Kanari, hook: Hook, client: SocketAddrV4) -> SocketAddrV4 {
    let (_, backend) = k.predict(client);
    let syn = Tcp4::syn(client, VIP).build();
    let since = Instant::now();
    k.send(hook, &syn, backend).expect(
        Seen {
            connections: 1,
            ..sent(&syn)
        },
        "SYN",
    );
    let sa = syn_ack(backend, client);
    k.answer(&sa, backend)
        .expect(
            Seen {
                connects: 1,
                connect_samples: 1,
                ..answered(&sa)
            },
            "SYN-ACK",
        )
        .one_connect_sample(since);
    let ack = Tcp4::new(client, VIP, TCP_ACK).build();
    k.send(hook, &ack, backend).expect(sent(&ack), "ACK");
    let f = k.forward(client);
    assert!(f.syn_ns == 0 && f.req_ns == 0 && f.status_pos == 0, "{f:?}");
    backend
}

/// One request and its response on an established connection: the response
/// counts `class` and one TTFB sample.
fn exchange(
    k: &mut Kanari,
    hook: Hook,
    client: SocketAddrV4,
    backend: SocketAddrV4,
    (req, resp): (&[u8], &[u8]),
    class: usize,
) {
    let since = Instant::now();
    let get = request(client, req);
    k.send(hook, &get, backend).expect(sent(&get), "request");
    let f = k.forward(client);
    assert!(
        f.req_ns != 0 && f.status_pos == 0,
        "a request is pending: {f:?}"
    );
    let resp = response(backend, client, resp);
    k.answer(&resp, backend)
        .expect(
            Seen {
                requests: one_request(class),
                ttfb_samples: 1,
                ..answered(&resp)
            },
            "response",
        )
        .one_ttfb_sample(since);
    let f = k.forward(client);
    assert!(f.req_ns == 0 && f.status_pos == 0, "answered: {f:?}");
}

/// A SYN counts a connection of its backend; the SYN-ACK through egress
/// counts a connect with one connect-time sample and clears the SYN time in
/// the forward entry; a SYN-ACK sent again times nothing.
fn a_syn_ack_times_the_connect(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let (_, backend) = k.predict(CLIENT);
    let syn = Tcp4::syn(CLIENT, VIP).build();
    let since = Instant::now();
    k.send(hook, &syn, backend).expect(
        Seen {
            connections: 1,
            ..sent(&syn)
        },
        "SYN",
    );
    let f = assert_conntrack_has(&k, CLIENT, backend);
    assert!(f.syn_ns != 0 && f.req_ns == 0, "{f:?}");

    let sa = syn_ack(backend, CLIENT);
    let step = k.answer(&sa, backend);
    step.expect(
        Seen {
            connects: 1,
            connect_samples: 1,
            ..answered(&sa)
        },
        "SYN-ACK",
    )
    .one_connect_sample(since);
    assert!(step.connect_ns > 0);
    let f = assert_conntrack_has(&k, CLIENT, backend);
    assert_eq!((f.syn_ns, f.req_ns), (0, 0), "{f:?}");

    k.answer(&sa, backend)
        .expect(answered(&sa), "a retransmitted SYN-ACK");
    let ack = Tcp4::new(CLIENT, VIP, TCP_ACK).build();
    k.send(hook, &ack, backend).expect(sent(&ack), "ACK");
    let s = k.stats(backend);
    assert_eq!((s.connections, s.connects), (1, 1));
    assert_eq!(s.connect_hist.iter().sum::<u32>(), 1);
    assert_eq!(s.ttfb_hist.iter().sum::<u32>(), 0);
}

/// SYN with FIN, which no TCP stack sends, is dropped and counted
/// `invalid`: it opens no connection, takes no conntrack entry, reaches no
/// backend and counts in no backend's statistics.
fn a_syn_with_fin_is_dropped(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let (counters, stats) = (k.counters(), k.all_stats());
    let frame = Tcp4::new(CLIENT, VIP, TCP_SYN | TCP_FIN)
        .tcp_options(&SYN_OPTIONS)
        .build();
    let (verdict, _) = k.run(hook, &frame);
    let dropped = match hook {
        Hook::Xdp => 1, // XDP_DROP
        _ => 2,         // TC_ACT_SHOT
    };
    assert_eq!(verdict, dropped, "{hook:?} verdict for SYN+FIN");
    assert_eq!(
        counter_delta(&counters, &k.counters()),
        vec![(Counter::Invalid, 1)]
    );
    assert_eq!(k.all_stats(), stats, "no backend saw it");
    assert_eq!(k.conntrack().len(), 0, "no conntrack entry");
    // A plain SYN from the same client still opens its connection.
    let (_, backend) = k.predict(CLIENT);
    k.expect_translated(hook, &Tcp4::syn(CLIENT, VIP).build(), backend);
}

/// Fragments cannot be translated (only the first carries the ports); a
/// first fragment of a datagram to a service is dropped and counted, so the
/// loss shows (`fragment_dropped`) instead of the datagram vanishing on the
/// node. Later fragments and fragments to other ports pass untouched.
fn a_first_fragment_to_a_service_is_dropped_and_counted(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let (counters, stats) = (k.counters(), k.all_stats());
    let request = Tcp4::new(CLIENT, VIP, TCP_ACK | TCP_PSH).payload(HTTP_GET);
    let first = request.clone().fragment(true, 0).build();
    let (verdict, _) = k.run(hook, &first);
    assert_eq!(
        verdict,
        hook.drop(),
        "{hook:?} verdict for a first fragment"
    );
    assert_eq!(
        counter_delta(&counters, &k.counters()),
        vec![(Counter::FragmentDropped, 1)]
    );
    assert_eq!(k.all_stats(), stats, "no backend saw it");
    assert_eq!(k.conntrack().len(), 0, "no conntrack entry");
    k.expect_untouched(
        hook,
        &request.clone().fragment(true, 185).build(),
        "a later fragment",
        hook.passed_counter(),
    );
    let other_port = Tcp4::new(CLIENT, SocketAddrV4::new(*VIP.ip(), 81), TCP_ACK);
    k.expect_untouched(
        hook,
        &other_port.fragment(true, 0).build(),
        "a first fragment to another port",
        hook.passed_counter(),
    );
}

/// Ends `client`'s connection through `backend`: a FIN each way (and their ACKs).
fn close(k: &mut Kanari, hook: Hook, client: SocketAddrV4, backend: SocketAddrV4) {
    k.send(
        hook,
        &Tcp4::new(client, VIP, TCP_FIN | TCP_ACK).build(),
        backend,
    );
    let _ = k.answer(&reply(backend, client, TCP_FIN | TCP_ACK).build(), backend);
    k.send(hook, &Tcp4::new(client, VIP, TCP_ACK).build(), backend);
    assert_eq!(k.forward(client).state(), CtState::Closed);
}

/// The monotonic clock in `CtEntry::seen` units, as the kernel stamps entries.
fn monotonic_s() -> u32 {
    kanari_common::maps::seen_at(kanari::datapath::monotonic_ns())
}

/// The forward entry follows the connection through its states (what the
/// agent ages it by), and both entries carry the time they were last seen.
/// Only an ended connection's ports are chosen anew; one FIN is not an end.
fn a_connection_goes_through_its_states_and_only_an_ended_one_is_reused(hook: Hook) {
    let mut k = Kanari::load(web(0, ""));
    let (_, backend) = k.predict(CLIENT);
    let t0 = monotonic_s();
    k.send(hook, &Tcp4::syn(CLIENT, VIP).build(), backend);
    assert_eq!(k.forward(CLIENT).state(), CtState::SynSent);
    for (key, e) in k.conntrack() {
        assert!(
            (t0..=monotonic_s()).contains(&e.seen),
            "{key:?} seen at {} (now {t0})",
            e.seen
        );
    }
    k.answer(&syn_ack(backend, CLIENT), backend);
    assert_eq!(k.forward(CLIENT).state(), CtState::Established);
    k.send(
        hook,
        &Tcp4::new(CLIENT, VIP, TCP_FIN | TCP_ACK).build(),
        backend,
    );
    assert_eq!(k.forward(CLIENT).state(), CtState::Closing);
    // Half closed: a SYN on the tuple is still the connection's.
    k.reconfigure(web(100, ""));
    let reuse = Tcp4::syn(CLIENT, VIP).seq(0x5eed_0001).build();
    k.send(hook, &reuse, backend)
        .expect(sent(&reuse), "a SYN on a half-closed connection");
    let _ = k.answer(&reply(backend, CLIENT, TCP_FIN | TCP_ACK).build(), backend);
    assert_eq!(k.forward(CLIENT).state(), CtState::Closed);
    k.send(hook, &reuse, CANARY[0]).expect(
        Seen {
            connections: 1,
            ..sent(&reuse)
        },
        "a SYN on an ended connection's tuple: a new connection",
    );
    assert_eq!(k.forward(CLIENT).state(), CtState::SynSent);
    assert_eq!(k.conntrack().len(), 2, "the old reverse entry is gone");
}

/// A SYN with a new sequence number on a live connection (a client port
/// reused while the old connection lives on at the backend, or a sender
/// sweeping ports) goes to the connection's backend and opens nothing,
/// even after a weight change: the backend's challenge ACK makes the
/// client reset, and only a RST ends the entry for a new choice.
fn a_syn_on_a_live_connection_stays_on_its_backend_until_a_rst(hook: Hook) {
    let mut k = Kanari::load(web(0, ""));
    let backend = handshake(&mut k, hook, CLIENT);
    k.reconfigure(web(100, ""));
    let new_counter = k.counter(hook.new_counter());
    let reuse = Tcp4::syn(CLIENT, VIP).seq(0x5eed_0001).build();
    k.send(hook, &reuse, backend)
        .expect(sent(&reuse), "a SYN on a live connection's tuple");
    assert_eq!(k.counter(hook.new_counter()), new_counter, "nothing opened");
    assert_eq!(k.forward(CLIENT).state(), CtState::Established);
    // The client answers the backend's challenge ACK with a RST.
    k.send(hook, &Tcp4::new(CLIENT, VIP, TCP_RST).build(), backend);
    assert_eq!(k.forward(CLIENT).state(), CtState::Closed);
    k.send(hook, &reuse, CANARY[0]).expect(
        Seen {
            connections: 1,
            ..sent(&reuse)
        },
        "the SYN again after the RST: a new connection",
    );
    // A RST from the backend ends a connection as well.
    let other = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    let canary = handshake(&mut k, hook, other);
    let _ = k.answer(&reply(canary, other, TCP_RST).build(), canary);
    assert_eq!(k.forward(other).state(), CtState::Closed);
}

/// A SYN sent again before any SYN-ACK counts as unanswered once per
/// connection attempt, however often it is sent again; it keeps the backend
/// (even across a weight change) and the first SYN's time; once answered, a
/// SYN with another sequence number on the same tuple is a new connection,
/// chosen again.
fn a_retransmitted_syn_is_unanswered_and_keeps_its_backend(hook: Hook) {
    let mut k = Kanari::load(web(0, ""));
    let (group, backend) = k.predict(CLIENT);
    assert_eq!(group, Group::Stable);
    let syn = Tcp4::syn(CLIENT, VIP).build();
    let since = Instant::now();
    k.send(hook, &syn, backend).expect(
        Seen {
            connections: 1,
            ..sent(&syn)
        },
        "SYN",
    );
    let first = k.forward(CLIENT);
    assert_ne!(first.syn_ns, 0);
    let again = Seen {
        unanswered: 1,
        ..sent(&syn)
    };
    k.send(hook, &syn, backend).expect(again, "SYN again");
    // Now new clients would go to the canary; this one is still connecting.
    k.reconfigure(web(100, ""));
    assert_eq!(k.predict(CLIENT), (Group::Canary, CANARY[0]));
    k.send(hook, &syn, backend).expect(
        sent(&syn),
        "SYN again after a weight change: the same attempt",
    );
    let retried = k.forward(CLIENT);
    assert_eq!(
        CtEntry {
            flags: first.flags,
            ..retried
        },
        first,
        "retransmits change nothing in the entry but its flag"
    );
    assert_eq!(k.conntrack().len(), 2);
    assert_eq!(k.counter(hook.new_counter()), 1);
    assert_eq!(k.counter(hook.known_counter()), 2);

    // The SYN-ACK times the connect from the first SYN.
    let sa = syn_ack(backend, CLIENT);
    k.answer(&sa, backend)
        .expect(
            Seen {
                connects: 1,
                connect_samples: 1,
                ..answered(&sa)
            },
            "SYN-ACK",
        )
        .one_connect_sample(since);

    // The connection ends (a FIN each way), and its tuple is used again (a
    // new sequence number): a new connection, steered at today's weight.
    close(&mut k, hook, CLIENT, backend);
    let since = Instant::now();
    let reuse = Tcp4::syn(CLIENT, VIP).seq(0x5eed_0001).build();
    k.send(hook, &reuse, CANARY[0]).expect(
        Seen {
            connections: 1,
            ..sent(&reuse)
        },
        "a SYN reusing an ended connection's tuple",
    );
    let f = assert_conntrack_has(&k, CLIENT, CANARY[0]);
    assert!(f.syn_ns > first.syn_ns, "{f:?}");
    assert_eq!(k.counter(hook.new_counter()), 2);
    let sa = syn_ack(CANARY[0], CLIENT);
    k.answer(&sa, CANARY[0])
        .expect(
            Seen {
                connects: 1,
                connect_samples: 1,
                ..answered(&sa)
            },
            "the new connection's SYN-ACK",
        )
        .one_connect_sample(since);
    let s = k.stats(backend);
    assert_eq!(
        (s.connections, s.unanswered, s.connects),
        (1, 1, 1),
        "one attempt, sent three times, is one unanswered"
    );
}

/// The SYN-ACK lost on its way to the client: the client sends its SYN
/// again, with the same sequence number. It is the same connection: on its
/// backend even after a weight change, no new connection and no unanswered
/// attempt counted, and the SYN-ACK sent again is still the VIP's.
fn a_syn_sent_again_after_its_syn_ack_is_the_same_connection(hook: Hook) {
    let mut k = Kanari::load(web(0, ""));
    let (_, backend) = k.predict(CLIENT);
    let syn = Tcp4::syn(CLIENT, VIP).build();
    k.send(hook, &syn, backend);
    k.answer(&syn_ack(backend, CLIENT), backend);
    k.reconfigure(web(100, ""));
    assert_eq!(
        k.forward(CLIENT).isn,
        u32::from_ne_bytes(frames::SEQ.to_be_bytes()),
        "the entry keeps the SYN's sequence number"
    );
    k.send(hook, &syn, backend)
        .expect(sent(&syn), "the same SYN after its SYN-ACK");
    assert_eq!(k.conntrack().len(), 2, "the same two entries");
    let s = k.stats(backend);
    assert_eq!((s.connections, s.unanswered), (1, 0), "one connection");
    let sa = syn_ack(backend, CLIENT);
    let (verdict, out) = run_tc(&mut k.dp, programs::TC_EGRESS, &sa);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_reverse_translated(&sa, &out, VIP);
}

/// Runs the calling thread on one CPU: the guard's tokens are per CPU, and
/// a test run uses the caller's.
fn on_one_cpu() {
    // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Every insert is guarded, not only a SYN's (an ACK flood with random
/// tuples would fill the table unguarded): past the guard's rate a packet
/// of an unknown connection is sent where the hash says without an entry
/// (`unrecorded`). An entry made from such a packet counts as not answered
/// yet (aged as a SYN is) until the backend speaks on it.
fn every_insert_is_guarded_and_an_unknown_connection_is_unconfirmed_until_answered(hook: Hook) {
    on_one_cpu();
    let mut k = Kanari::load(web(10, ""));
    // One new connection a second (per CPU), a burst of one.
    k.dp.set_guard(1).expect("the guard");
    let (_, backend) = k.predict(CLIENT);
    let ack = Tcp4::new(CLIENT, VIP, TCP_ACK).build();
    k.expect_translated(hook, &ack, backend);
    assert_eq!(
        k.forward(CLIENT).state(),
        CtState::SynSent,
        "not confirmed yet"
    );
    let other = nth_client(1);
    let (_, other_backend) = k.predict(other);
    let before = k.counters();
    k.expect_translated(hook, &Tcp4::new(other, VIP, TCP_ACK).build(), other_backend);
    assert_eq!(
        counter_delta(&before, &k.counters()),
        vec![(hook.known_counter(), 1), (Counter::Unrecorded, 1)],
        "past the guard: translated, not recorded"
    );
    assert_eq!(
        k.conntrack().len(),
        2,
        "only the first connection's entries"
    );
    // The backend answers on the first: established.
    let data = reply(backend, CLIENT, TCP_ACK | TCP_PSH)
        .payload(b"HTTP/1.1 200 OK\r\n")
        .build();
    let _ = k.answer(&data, backend);
    assert_eq!(k.forward(CLIENT).state(), CtState::Established);
}

/// A client reusing the ports of an answered connection (a SYN with another
/// sequence number) while the guard sheds new connections: the SYN is
/// dropped and the connection there keeps both entries — its backend's
/// replies are still the VIP's. (The reverse entry used to go before the
/// guard decided: an off-path sender could unhook live connections.)
fn a_shed_syn_on_a_live_tuple_leaves_its_connection(hook: Hook) {
    on_one_cpu();
    let mut k = Kanari::load(web(10, ""));
    // One new connection a second (per CPU), a burst of one.
    k.dp.set_guard(1).expect("the guard");
    let (_, backend) = k.predict(CLIENT);
    let syn = Tcp4::syn(CLIENT, VIP).build();
    k.send(hook, &syn, backend);
    k.answer(&syn_ack(backend, CLIENT), backend);
    close(&mut k, hook, CLIENT, backend);
    let before = k.counters();
    let reuse = Tcp4::syn(CLIENT, VIP).seq(0x5eed_0001).build();
    let (verdict, _) = k.run(hook, &reuse);
    assert_eq!(
        counter_delta(&before, &k.counters()),
        vec![(Counter::Shed, 1)],
        "the guard sheds the new SYN"
    );
    assert_eq!(verdict, hook.drop(), "{hook:?} verdict for a shed SYN");
    assert_eq!(k.conntrack().len(), 2, "both entries stay");
    let data = reply(backend, CLIENT, TCP_ACK | TCP_PSH)
        .payload(b"HTTP/1.1 200 OK\r\n")
        .build();
    let (verdict, out) = run_tc(&mut k.dp, programs::TC_EGRESS, &data);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_reverse_translated(&data, &out, VIP);
}

// ---- 14: the observer: refusals and resets --------------------------------------------------

/// A RST from the backend answering a SYN counts as refused; a RST on an
/// established connection as a reset; a client's RST as neither.
fn backend_rsts_count_as_refused_or_reset(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));

    // Refused: SYN, then RST|ACK from the backend.
    let (_, backend) = k.predict(CLIENT);
    let syn = Tcp4::syn(CLIENT, VIP).build();
    k.send(hook, &syn, backend).expect(
        Seen {
            connections: 1,
            ..sent(&syn)
        },
        "SYN",
    );
    let rst = reply(backend, CLIENT, TCP_RST | TCP_ACK).build();
    k.answer(&rst, backend).expect(
        Seen {
            refused: 1,
            ..answered(&rst)
        },
        "RST answering the SYN",
    );
    let f = k.forward(CLIENT);
    assert_eq!((f.syn_ns, f.req_ns, f.status_pos), (0, 0, 0), "{f:?}");
    // A second RST of that connection is a reset of an answered one.
    k.answer(&rst, backend).expect(
        Seen {
            resets: 1,
            ..answered(&rst)
        },
        "RST again",
    );

    // Reset: an established connection with a request pending.
    let client = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    let backend = handshake(&mut k, hook, client);
    let get = request(client, HTTP_GET);
    k.send(hook, &get, backend).expect(sent(&get), "request");
    let rst = reply(backend, client, TCP_RST).build();
    k.answer(&rst, backend).expect(
        Seen {
            resets: 1,
            ..answered(&rst)
        },
        "RST of an established connection",
    );
    let f = k.forward(client);
    assert_eq!((f.syn_ns, f.req_ns, f.status_pos), (0, 0, 0), "{f:?}");
    // The reset dropped the pending request: a late response segment counts nothing.
    let late = response(backend, client, b"HTTP/1.1 200 OK\r\n\r\n");
    k.answer(&late, backend)
        .expect(answered(&late), "a response after the RST");

    // A client's RST is the client's business.
    let client = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 2);
    let backend = handshake(&mut k, hook, client);
    let rst = Tcp4::new(client, VIP, TCP_RST | TCP_ACK).build();
    k.send(hook, &rst, backend)
        .expect(sent(&rst), "the client's RST");
}

// ---- 15: the observer: requests -------------------------------------------------------------

const RESPONSE_503: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n";
const RESPONSE_200: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

/// Requests on one keep-alive connection are timed and classed one by one;
/// segments without a pending request (ACKs, more body, a request's second
/// segment) count nothing beyond their packet.
fn http_exchanges_on_keep_alive_are_counted_one_by_one(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let backend = handshake(&mut k, hook, CLIENT);

    exchange(
        &mut k,
        hook,
        CLIENT,
        backend,
        (b"GET / HTTP/1.1\r\n\r\n", RESPONSE_503),
        CLASS_5XX,
    );
    // The backend's bare ACK, and the client's (padded to 60 bytes), count packets only.
    let ack = reply(backend, CLIENT, TCP_ACK).build();
    k.answer(&ack, backend)
        .expect(answered(&ack), "backend ACK");
    let mut ack = Tcp4::new(CLIENT, VIP, TCP_ACK).build();
    ack.extend_from_slice(&[0; 6]);
    k.send(hook, &ack, backend)
        .expect(sent(&ack), "padded client ACK");
    assert_eq!(
        k.forward(CLIENT).req_ns,
        0,
        "Ethernet padding is no payload"
    );

    exchange(
        &mut k,
        hook,
        CLIENT,
        backend,
        (b"GET / HTTP/1.1\r\n\r\n", RESPONSE_200),
        CLASS_2XX,
    );
    // More body of the answered response: no request pending, nothing counted.
    let body = response(backend, CLIENT, b"more body, and HTTP/1.1 500 in it");
    k.answer(&body, backend)
        .expect(answered(&body), "a body segment");

    // A request in two segments is one request, timed from its first.
    let since = Instant::now();
    let first = request(CLIENT, b"GET /two HTTP/1.1\r\n");
    k.send(hook, &first, backend)
        .expect(sent(&first), "request, first segment");
    let began = k.forward(CLIENT).req_ns;
    assert_ne!(began, 0);
    let second = request(CLIENT, b"Host: web.example\r\n\r\n");
    k.send(hook, &second, backend)
        .expect(sent(&second), "request, second segment");
    assert_eq!(
        k.forward(CLIENT).req_ns,
        began,
        "the request began with its first segment"
    );
    let resp = response(backend, CLIENT, b"HTTP/1.0 404 Not Found\r\n\r\n");
    k.answer(&resp, backend)
        .expect(
            Seen {
                requests: one_request(CLASS_4XX),
                ttfb_samples: 1,
                ..answered(&resp)
            },
            "404",
        )
        .one_ttfb_sample(since);

    let s = k.stats(backend);
    assert_eq!(
        s.requests,
        [0, 1, 0, 1, 1, 0],
        "other, 2xx, 3xx, 4xx, 5xx, none"
    );
    assert_eq!(s.ttfb_hist.iter().sum::<u32>(), 3);
    assert_eq!(s.connect_hist.iter().sum::<u32>(), 1);
}

/// A status line split across two response segments is counted once, after
/// the second; the parse state waits in the forward entry in between.
fn a_status_line_split_across_segments_is_counted_once(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let backend = handshake(&mut k, hook, CLIENT);
    let since = Instant::now();
    let get = request(CLIENT, HTTP_GET);
    k.send(hook, &get, backend).expect(sent(&get), "request");

    let head = response(backend, CLIENT, b"HTTP/1.1 2");
    k.answer(&head, backend)
        .expect(
            Seen {
                ttfb_samples: 1,
                ..answered(&head)
            },
            "the status line's first 10 bytes",
        )
        .one_ttfb_sample(since);
    let f = k.forward(CLIENT);
    assert_eq!((f.req_ns, f.status_pos, f.status_code), (0, 10, 2), "{f:?}");
    // A client ACK in between neither starts a request nor disturbs the parse.
    let ack = Tcp4::new(CLIENT, VIP, TCP_ACK).build();
    k.send(hook, &ack, backend).expect(sent(&ack), "client ACK");

    let tail = response(backend, CLIENT, b"04 No Content\r\n\r\n");
    k.answer(&tail, backend).expect(
        Seen {
            requests: one_request(CLASS_2XX),
            ..answered(&tail)
        },
        "the rest of the status line",
    );
    let f = k.forward(CLIENT);
    assert_eq!((f.req_ns, f.status_pos), (0, 0), "{f:?}");
    let more = response(backend, CLIENT, b"04 No Content\r\n\r\n");
    k.answer(&more, backend)
        .expect(answered(&more), "the same segment again");

    // Split at every byte of the status line, on one keep-alive connection.
    let line = b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n";
    for cut in 1..12 {
        let since = Instant::now();
        let get = request(CLIENT, HTTP_GET);
        k.send(hook, &get, backend).expect(sent(&get), "request");
        let head = response(backend, CLIENT, &line[..cut]);
        k.answer(&head, backend)
            .expect(
                Seen {
                    ttfb_samples: 1,
                    ..answered(&head)
                },
                &format!("status line cut at {cut}"),
            )
            .one_ttfb_sample(since);
        assert_eq!(k.forward(CLIENT).status_pos as usize, cut);
        let tail = response(backend, CLIENT, &line[cut..]);
        k.answer(&tail, backend).expect(
            Seen {
                requests: one_request(CLASS_3XX),
                ..answered(&tail)
            },
            &format!("rest of the status line from {cut}"),
        );
    }
    let s = k.stats(backend);
    assert_eq!(s.requests, [0, 1, 11, 0, 0, 0]);
    assert_eq!(s.ttfb_hist.iter().sum::<u32>(), 12);
}

/// An answer that is no HTTP/1.x status line counts as `other`, whole or
/// found invalid in its second segment.
fn a_response_that_is_not_http_counts_as_other(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let backend = handshake(&mut k, hook, CLIENT);
    exchange(
        &mut k,
        hook,
        CLIENT,
        backend,
        (b"SSH-2.0-golden\r\n", b"SSH-2.0-OpenSSH\r\n"),
        CLASS_OTHER,
    );
    exchange(
        &mut k,
        hook,
        CLIENT,
        backend,
        (HTTP_GET, b"HTTP/2 200 OK\r\n\r\n"),
        CLASS_OTHER,
    );
    // A short answer: fewer than 12 bytes, invalid from its first byte.
    exchange(
        &mut k,
        hook,
        CLIENT,
        backend,
        (HTTP_GET, b"OK"),
        CLASS_OTHER,
    );

    let get = request(CLIENT, HTTP_GET);
    k.send(hook, &get, backend).expect(sent(&get), "request");
    let head = response(backend, CLIENT, b"HTTP/1.1 2");
    k.answer(&head, backend).expect(
        Seen {
            ttfb_samples: 1,
            ..answered(&head)
        },
        "a valid start",
    );
    let tail = response(backend, CLIENT, b"x0 OK\r\n\r\n");
    k.answer(&tail, backend).expect(
        Seen {
            requests: one_request(CLASS_OTHER),
            ..answered(&tail)
        },
        "an invalid end",
    );
    assert_eq!(k.forward(CLIENT).status_pos, 0);
    assert_eq!(k.stats(backend).requests, [4, 0, 0, 0, 0, 0]);
}

/// A `protocol: tcp` service times each exchange and classes none, whatever
/// the response looks like.
fn a_tcp_service_counts_exchanges_without_a_class(hook: Hook) {
    let mut k = Kanari::load(web(10, "    protocol: tcp\n"));
    assert_eq!(k.service().protocol, config::Protocol::Tcp);
    let backend = handshake(&mut k, hook, CLIENT);
    assert_eq!(assert_conntrack_has(&k, CLIENT, backend).flags, 0);
    for resp in [
        &b"SSH-2.0-OpenSSH\r\n"[..],
        RESPONSE_503,
        b"HTTP/1.1 2",
        b"04 is no status here",
    ] {
        exchange(
            &mut k,
            hook,
            CLIENT,
            backend,
            (b"ping\r\n", resp),
            CLASS_NONE,
        );
    }
    // A response segment without a request: nothing.
    let more = response(backend, CLIENT, b"more");
    k.answer(&more, backend).expect(answered(&more), "more");
    let s = k.stats(backend);
    assert_eq!(s.requests, [0, 0, 0, 0, 0, 4]);
    assert_eq!(s.ttfb_hist.iter().sum::<u32>(), 4);
}

/// A request on a connection whose entry was lost (recreated by its data
/// segment) is still timed and classed.
fn a_request_on_a_recreated_entry_is_counted(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let (_, backend) = k.predict(CLIENT);
    let since = Instant::now();
    let get = request(CLIENT, HTTP_GET);
    k.send(hook, &get, backend)
        .expect(sent(&get), "a request without entry");
    assert_eq!(k.counter(Counter::Fallback), 1);
    let f = assert_conntrack_has(&k, CLIENT, backend);
    assert!(f.syn_ns == 0 && f.req_ns != 0, "{f:?}");
    let resp = response(backend, CLIENT, RESPONSE_200);
    k.answer(&resp, backend)
        .expect(
            Seen {
                requests: one_request(CLASS_2XX),
                ttfb_samples: 1,
                ..answered(&resp)
            },
            "its response",
        )
        .one_ttfb_sample(since);
}

// ---- 16: the observer: bytes and packets ----------------------------------------------------

/// Each direction counts its packets and their IPv4 total length: options
/// in, Ethernet header and padding out. Passed packets count nothing.
fn bytes_and_packets_count_the_ip_total_length(hook: Hook) {
    let mut k = Kanari::load(web(10, ""));
    let (_, backend) = k.predict(CLIENT);
    let other = STABLE
        .into_iter()
        .chain(CANARY)
        .find(|b| *b != backend)
        .unwrap();
    let syn = Tcp4::syn(CLIENT, VIP).ip_options(&IP_OPTIONS).build();
    let ack = {
        let mut f = Tcp4::new(CLIENT, VIP, TCP_ACK).build();
        f.extend_from_slice(&[0; 6]);
        f
    };
    let get = request(CLIENT, HTTP_GET);
    let get_options = Tcp4::new(CLIENT, VIP, TCP_ACK | TCP_PSH)
        .ip_options(&IP_OPTIONS)
        .payload(HTTP_GET)
        .build();
    let fin = Tcp4::new(CLIENT, VIP, TCP_FIN | TCP_ACK).build();
    let sa = syn_ack(backend, CLIENT);
    let resp = response(backend, CLIENT, RESPONSE_200);
    let resp_ack = {
        let mut f = reply(backend, CLIENT, TCP_ACK).build();
        f.extend_from_slice(&[0xa5; 6]);
        f
    };
    // The IPv4 total lengths, spelled out.
    let get_len = 20 + 20 + HTTP_GET.len() as u64;
    for (frame, frame_len, ip) in [
        (&syn, 14 + 68, 28 + 40),
        (&ack, 60, 40),
        (&get, 14 + get_len, get_len),
        (&get_options, 14 + 8 + get_len, 8 + get_len),
        (&fin, 54, 40),
        (&sa, 14 + 60, 60),
        (
            &resp,
            54 + RESPONSE_200.len() as u64,
            40 + RESPONSE_200.len() as u64,
        ),
        (&resp_ack, 60, 40),
    ] {
        assert_eq!((frame.len() as u64, ip_len(frame)), (frame_len, ip));
    }

    for f in [&syn, &ack, &get, &get_options, &fin] {
        k.expect_translated(hook, f, backend);
    }
    for f in [&sa, &resp, &resp_ack] {
        let (_, out) = k.run(Hook::TcEgress, f);
        assert_reverse_translated(f, &out, VIP);
    }
    // Not the service's: counted nowhere.
    k.expect_untouched(
        hook,
        &Tcp4::new(CLIENT, SocketAddrV4::new(*VIP.ip(), 81), TCP_ACK).build(),
        "TCP to VIP:81",
        hook.passed_counter(),
    );
    k.expect_untouched(
        Hook::TcEgress,
        &reply(other, CLIENT, TCP_ACK).build(),
        "a reply of another backend",
        Counter::EgressPassed,
    );

    let s = k.stats(backend);
    assert_eq!(s.packets, [5, 3]);
    assert_eq!(
        s.bytes,
        [
            68 + 40 + get_len + (8 + get_len) + 40,
            60 + (40 + RESPONSE_200.len() as u64) + 40
        ]
    );
    assert_eq!(k.stats(other), BackendStats::ZERO);
}

// ---- The tests ------------------------------------------------------------------------------

/// Every scenario above that takes a `Hook` runs once through XDP (`xdp::…`)
/// and once through TC ingress (`tc_ingress::…`), each on its own data path.
macro_rules! through_each_ingress {
    ($($case:ident),* $(,)?) => {
        mod xdp {
            $(#[test] fn $case() { super::$case(super::Hook::Xdp) })*

            #[test]
            fn defers_a_syn_with_a_partial_checksum() {
                super::xdp_defers_a_syn_with_a_partial_checksum()
            }
        }
        mod tc_ingress {
            $(#[test] fn $case() { super::$case(super::Hook::TcIngress) })*
        }
    };
}

through_each_ingress!(
    syn_lands_on_the_predicted_backend,
    the_reply_is_reverse_nated_to_the_vip,
    data_segments_of_an_established_flow_are_translated_with_payload_checksum,
    ip_options_are_preserved_and_the_tcp_header_found_after_them,
    unrelated_frames_pass_byte_identical,
    truncated_syns_pass_byte_identical_and_record_nothing,
    a_weight_change_keeps_established_connections_on_their_backend,
    an_ack_of_an_unknown_flow_recreates_entries_and_a_rst_creates_none,
    a_client_segment_wins_over_the_weight,
    connection_affinity_splits_by_flow_hash,
    one_backend_added_to_eight_moves_about_a_ninth_of_the_flows,
    an_icmp_error_about_a_reply_reaches_its_backend,
    a_syn_ack_times_the_connect,
    a_retransmitted_syn_is_unanswered_and_keeps_its_backend,
    a_syn_sent_again_after_its_syn_ack_is_the_same_connection,
    a_connection_goes_through_its_states_and_only_an_ended_one_is_reused,
    a_syn_on_a_live_connection_stays_on_its_backend_until_a_rst,
    a_shed_syn_on_a_live_tuple_leaves_its_connection,
    every_insert_is_guarded_and_an_unknown_connection_is_unconfirmed_until_answered,
    a_syn_with_fin_is_dropped,
    a_first_fragment_to_a_service_is_dropped_and_counted,
    backend_rsts_count_as_refused_or_reset,
    http_exchanges_on_keep_alive_are_counted_one_by_one,
    a_status_line_split_across_segments_is_counted_once,
    a_response_that_is_not_http_counts_as_other,
    a_tcp_service_counts_exchanges_without_a_class,
    a_request_on_a_recreated_entry_is_counted,
    bytes_and_packets_count_the_ip_total_length,
);

mod tc_egress {
    use super::*;

    #[test]
    fn unrelated_frames_pass_byte_identical() {
        super::unrelated_frames_pass_byte_identical(Hook::TcEgress);
    }

    /// A router between the node and the backend cannot forward a client's
    /// segment (DNATed to the backend) and tells the client: the client must
    /// hear it about the VIP it dialled, or its stack matches no socket.
    #[test]
    fn an_icmp_error_about_a_clients_segment_reaches_it_about_the_vip() {
        let hook = Hook::TcIngress;
        let mut k = Kanari::load(web(0, ""));
        let backend = handshake(&mut k, hook, CLIENT);
        // The client's segment as it left the node: to the backend.
        let segment = Tcp4::new(CLIENT, backend, TCP_ACK | TCP_PSH)
            .payload(HTTP_GET)
            .build();
        for quote in [segment.len() - 14, 28] {
            let icmp = frag_needed(Ipv4Addr::new(10, 8, 0, 1), *CLIENT.ip(), &segment, quote);
            let counters = k.counters();
            let (verdict, out) = k.run(Hook::TcEgress, &icmp);
            assert_eq!(verdict, TC_ACT_UNSPEC, "egress verdict");
            assert_icmp_translated(&icmp, &out, *CLIENT.ip(), End::Destination, VIP);
            assert_eq!(
                counter_delta(&counters, &k.counters()),
                vec![(Counter::IcmpTranslated, 1)]
            );
        }
        let stranger = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 99), 40000);
        k.expect_untouched(
            Hook::TcEgress,
            &frag_needed(
                Ipv4Addr::new(10, 8, 0, 1),
                *stranger.ip(),
                &Tcp4::new(stranger, backend, TCP_ACK).build(),
                40,
            ),
            "an ICMP error about no connection",
            Counter::EgressPassed,
        );
    }

    /// A client reuses an ended connection's tuple and the new one lands on
    /// another backend: the old backend's reverse entry goes, so its late RST
    /// is neither translated onto the new connection nor counted, and the new
    /// connection's SYN time survives for its own backend's SYN-ACK (a
    /// forward entry also only listens to the backend it points at).
    #[test]
    fn a_stale_backends_rst_leaves_the_new_connection_alone() {
        let hook = Hook::TcIngress;
        let mut k = Kanari::load(web(0, ""));
        let (_, old) = k.predict(CLIENT);
        let syn = Tcp4::syn(CLIENT, VIP).build();
        k.send(hook, &syn, old);
        k.answer(&syn_ack(old, CLIENT), old);
        close(&mut k, hook, CLIENT, old);
        k.reconfigure(web(100, ""));
        let reuse = Tcp4::syn(CLIENT, VIP).seq(0x5eed_0001).build();
        k.send(hook, &reuse, CANARY[0]).expect(
            Seen {
                connections: 1,
                ..sent(&reuse)
            },
            "a SYN reusing the ended connection's tuple",
        );
        assert_eq!(k.conntrack().len(), 2, "the old reverse entry is gone");

        let before = k.all_stats();
        let rst = reply(old, CLIENT, TCP_RST | TCP_ACK).build();
        let (verdict, out) = k.run(Hook::TcEgress, &rst);
        assert_eq!(verdict, Hook::TcEgress.pass());
        assert_eq!(
            out, rst,
            "the old backend's RST is not translated onto the new connection"
        );
        let stale = k.step(&before, old, "the old backend's late RST");
        assert_eq!(stale.seen.refused, 0, "{:?}", stale.seen);
        assert_ne!(
            k.forward(CLIENT).syn_ns,
            0,
            "the new connection still waits"
        );
        let sa = syn_ack(CANARY[0], CLIENT);
        k.answer(&sa, CANARY[0]).expect(
            Seen {
                connects: 1,
                connect_samples: 1,
                ..answered(&sa)
            },
            "the new backend's SYN-ACK",
        );
    }

    /// An existing connection's SYN-ACK, cut short, passes untouched.
    #[test]
    fn truncated_replies_pass_byte_identical() {
        let mut k = Kanari::load(web(10, ""));
        let (_, backend) = k.predict(CLIENT);
        k.expect_translated(Hook::TcIngress, &Tcp4::syn(CLIENT, VIP).build(), backend);
        let syn_ack = reply(backend, CLIENT, TCP_SYN | TCP_ACK)
            .tcp_options(&SYN_OPTIONS)
            .build();
        let rewritten = rewritten_truncations(&mut k, Hook::TcEgress, &syn_ack);
        assert!(
            rewritten.is_empty(),
            "egress rewrote a SYN-ACK of {} bytes (IPv4 total length {}) cut to {rewritten:?} bytes",
            syn_ack.len(),
            syn_ack.len() - 14
        );
        assert_eq!(k.counter(Counter::TcReversed), 0);
        assert_eq!(k.counter(Counter::EgressPassed), 0);
    }
}

// ---- Cost per packet ------------------------------------------------------------------------

/// Counter changes between two snapshots, for saying what a measurement ran.
fn delta(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> String {
    let d: Vec<String> = after
        .iter()
        .zip(before)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((c, a), (_, b))| format!("{} +{}", c.name(), a - b))
        .collect();
    if d.is_empty() {
        "none".into()
    } else {
        d.join(", ")
    }
}

/// Kernel-measured nanoseconds per packet. Not a benchmark: it prints a
/// table (`cargo test -- --nocapture ns_per_packet`) and checks only sanity.
///
/// Two measurements per path, because `repeat` does not measure what it seems to:
/// - **repeat**: one test run with `repeat = 100000`; `duration` is the
///   kernel's average per run. The kernel runs the program again and again
///   on the *same* buffer, so every run after the first sees the frame as the
///   first one left it: a translated packet comes back addressed to the backend
///   (no service) or, on egress, from the VIP (no conntrack entry). The counter
///   deltas printed beside it show what really ran.
/// - **1/call**: 10000 test runs with `repeat = 1`, each on a fresh copy of
///   the frame (new connections: a new client each time), averaged. This is
///   the path named, plus the kernel timer's own cost of one run (compare the
///   unrelated packet in both columns).
///
/// The observer's state decides the path of an established packet: a client
/// segment with payload starts a request only when none is pending, a
/// backend segment with payload is timed and classed only when one is. The
/// plain rows repeat one packet, so after the first call they take the
/// cheaper branch (request already pending / none pending); the rows marked
/// "(after …)" run an untimed packet of the other direction before each
/// timed call, so every timed call takes the observing branch.
#[test]
fn ns_per_packet() {
    const REPEAT: u32 = 100_000;
    const CALLS: u32 = 10_000;
    let mut k = Kanari::load(web(10, ""));
    let client = |i: u32| SocketAddrV4::new(Ipv4Addr::from(0x0a09_0000 + i), 50000);
    let (c_xdp, c_tc) = (client(1), client(2));
    let ((_, b_xdp), (_, b_tc)) = (k.predict(c_xdp), k.predict(c_tc));
    // Open the connections the established cases use (correctness is the other tests' job).
    assert_eq!(
        run_xdp(&mut k.dp, &Tcp4::syn(c_xdp, VIP).build()).0,
        XDP_PASS
    );
    let tc_syn = Tcp4::syn(c_tc, VIP).build();
    assert_eq!(
        run_tc(&mut k.dp, programs::TC_INGRESS, &tc_syn).0,
        TC_ACT_UNSPEC
    );
    for (b, c) in [(b_xdp, c_xdp), (b_tc, c_tc)] {
        assert_eq!(
            run_tc(&mut k.dp, programs::TC_EGRESS, &syn_ack(b, c)).0,
            TC_ACT_UNSPEC
        );
    }
    assert_eq!(k.conntrack().len(), 4);

    let get = |c| request(c, HTTP_GET);
    let ok = |b, c| response(b, c, b"HTTP/1.1 200 OK\r\n\r\n");
    let unrelated = Tcp4::syn(c_xdp, SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 99), 80)).build();
    let new_syns: Vec<Vec<u8>> = (0..=CALLS)
        .map(|i| Tcp4::syn(client(1000 + i), VIP).build())
        .collect();
    // (name, hook, frames, untimed packet before each timed call)
    type Case = (&'static str, Hook, Vec<Vec<u8>>, Option<(Hook, Vec<u8>)>);
    let cases: Vec<Case> = vec![
        ("XDP SYN, new connection", Hook::Xdp, new_syns, None),
        (
            "XDP established ACK+data",
            Hook::Xdp,
            vec![get(c_xdp)],
            None,
        ),
        (
            "TC ingress established ACK+data",
            Hook::TcIngress,
            vec![get(c_tc)],
            None,
        ),
        (
            "TC egress reply",
            Hook::TcEgress,
            vec![ok(b_tc, c_tc)],
            None,
        ),
        (
            "XDP request (after a response)",
            Hook::Xdp,
            vec![get(c_xdp)],
            Some((Hook::TcEgress, ok(b_xdp, c_xdp))),
        ),
        (
            "TC ingress request (after a response)",
            Hook::TcIngress,
            vec![get(c_tc)],
            Some((Hook::TcEgress, ok(b_tc, c_tc))),
        ),
        (
            "TC egress response (after a request)",
            Hook::TcEgress,
            vec![ok(b_tc, c_tc)],
            Some((Hook::TcIngress, get(c_tc))),
        ),
        (
            "XDP unrelated (TCP to 10.0.0.99:80)",
            Hook::Xdp,
            vec![unrelated],
            None,
        ),
    ];

    eprintln!();
    eprintln!(
        "{:<40} {:>10} {:>10}  what ran: repeat | 1/call (counter deltas, untimed packets included)",
        "path (ns per packet)", "repeat", "1/call"
    );
    for (name, hook, frames, prep) in cases {
        let before = k.counters();
        let (r, _) = test_run(&mut k.dp, hook, &frames[0], REPEAT).expect("test run");
        let after = k.counters();
        let repeated = r.duration.as_nanos() as f64;

        let mut total = 0u128;
        for i in 0..CALLS as usize {
            if let Some((h, f)) = &prep {
                test_run(&mut k.dp, *h, f, 1).expect("test run");
            }
            let frame = &frames[(1 + i) % frames.len()];
            let (r, _) = test_run(&mut k.dp, hook, frame, 1).expect("test run");
            total += r.duration.as_nanos();
        }
        let per_call = total as f64 / CALLS as f64;
        eprintln!(
            "{name:<40} {repeated:>10.1} {per_call:>10.1}  {} | {}",
            delta(&before, &after),
            delta(&after, &k.counters())
        );
        for ns in [repeated, per_call] {
            assert!(ns > 0.0 && ns < 100_000.0, "{name}: {ns} ns per packet");
        }
    }
    // Every request of the "(after …)" rows was answered and classed.
    let s = k.stats(b_tc);
    assert!(
        s.requests[CLASS_2XX] >= 2 * CALLS as u64,
        "{:?}",
        s.requests
    );
}
