//! The test network: a client, a node running kanari, and backends, each in
//! its own namespace, joined by veth pairs. Nothing touches the host's own
//! interfaces: every veth is created directly inside its namespaces.
//!
//! ```text
//!  client ns                 node ns (kanari on n0)              backend ns (one per backend)
//!  c0 192.168.0.2 ───────── n0 192.168.0.1                       eth0 10.2.J.1:8080
//!  10.1.0.0/16 local        VIP 10.0.0.100 on lo     bJ 10.2.J.254 ───┘
//!  (any client address)     routes 10.1.0.0/16 via 192.168.0.2
//! ```
//!
//! Checksums: the node's veths compute transmit checksums in software
//! (`tx off`), so every packet the node forwards arrives complete and the
//! receiving stack verifies it — a wrong checksum from kanari means a dropped
//! packet and a failing test. The client's veth keeps offload on by default,
//! so the node receives partial checksums (what a container on the same host
//! sends); `complete_client_checksums` turns it off to deliver complete ones,
//! as a physical NIC does.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, Result};
use kanari_common::maps::Group;

use crate::{
    backend::{BackendHandle, Behavior},
    netns::{Netns, run, unique_tag},
};

pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
pub const CLIENT_LINK_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
/// The node's client-facing interface, where kanari attaches.
pub const NODE_IFACE: &str = "n0";
pub const BACKEND_PORT: u16 = 8080;

/// The `i`-th client address (0-based) in 10.1.0.0/16, skipping .0 and .255.
pub fn client_addr(i: u32) -> Ipv4Addr {
    let i = i % (250 * 256);
    Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

#[derive(Clone, Debug)]
pub struct TopologyOptions {
    pub stable: usize,
    pub canary: usize,
    /// Client sends complete checksums (offload off), as from a physical NIC.
    pub complete_client_checksums: bool,
    /// Backends also answer UDP on their port (the backend's UDP echo).
    pub udp_echo: bool,
    /// A router between the client and the node whose link to the client
    /// has this MTU (the client's own link keeps 1500, so it announces an
    /// MSS the path cannot carry): replies need path MTU discovery.
    pub narrow_hop_mtu: Option<u32>,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            stable: 2,
            canary: 1,
            complete_client_checksums: false,
            udp_echo: false,
            narrow_hop_mtu: None,
        }
    }
}

pub struct Backend {
    pub group: Group,
    pub addr: SocketAddrV4,
    pub server: Option<BackendHandle>,
    // Dropped after the server: the namespace outlives the thread in it.
    pub ns: Netns,
}

pub struct Topology {
    pub tag: String,
    /// Where agents on the node pin their data path.
    pub bpffs: crate::netns::BpfFs,
    // Field order is drop order: backends (servers, then their namespaces) first.
    pub backends: Vec<Backend>,
    pub client: Netns,
    /// The router of [`TopologyOptions::narrow_hop_mtu`].
    pub router: Option<Netns>,
    pub node: Netns,
}

/// A veth pair created directly inside two namespaces (never in the host's).
pub(crate) fn veth((a, a_name): (&Netns, &str), (b, b_name): (&Netns, &str)) -> Result<()> {
    crate::netns::ip(&[
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])
}

pub(crate) fn ethtool_tx(ns: &Netns, iface: &str, on: bool) -> Result<()> {
    ns.exec(
        "ethtool",
        &["-K", iface, "tx", if on { "on" } else { "off" }],
    )
    .map(|_| ())
}

/// Backend `j` (1-based) of `group` in a namespace of its own, at
/// 10.2.J.1:8080 behind `router` (10.2.J.254 on its link `bJ`), running a
/// healthy test backend (answering UDP too with `udp_echo`).
pub(crate) fn backend(
    tag: &str,
    j: usize,
    group: Group,
    router: &Netns,
    udp_echo: bool,
) -> Result<Backend> {
    let ns = Netns::new(tag, &format!("b{j}"))?;
    let link = format!("b{j}");
    veth((router, &link), (&ns, "eth0"))?;
    ns.ip(&["addr", "add", &format!("10.2.{j}.1/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", "default", "via", &format!("10.2.{j}.254")])?;
    router.ip(&["addr", "add", &format!("10.2.{j}.254/24"), "dev", &link])?;
    router.ip(&["link", "set", &link, "up"])?;
    ethtool_tx(router, &link, false)?;
    let addr = SocketAddrV4::new(Ipv4Addr::new(10, 2, j as u8, 1), BACKEND_PORT);
    let server = BackendHandle::start_with(&ns, addr, Behavior::healthy(group.name()), udp_echo)
        .with_context(|| format!("starting backend {addr}"))?;
    Ok(Backend {
        group,
        addr,
        server: Some(server),
        ns,
    })
}

impl Topology {
    /// Builds the namespaces and links and starts a healthy test backend in
    /// each backend namespace.
    pub fn new(opts: &TopologyOptions) -> Result<Self> {
        let tag = unique_tag();
        let client = Netns::new(&tag, "cl")?;
        let node = Netns::new(&tag, "nd")?;
        let mut topo = Topology {
            bpffs: crate::netns::BpfFs::mount(&tag)?,
            tag: tag.clone(),
            backends: Vec::new(),
            client,
            router: None,
            node,
        };

        if let Some(mtu) = opts.narrow_hop_mtu {
            // client c0 192.168.1.2 ── r0 192.168.1.1 (MTU) router r1 192.168.0.2 ── n0
            let r = Netns::new(&tag, "rt")?;
            veth((&topo.node, NODE_IFACE), (&r, "r1"))?;
            veth((&r, "r0"), (&topo.client, "c0"))?;
            r.ip(&["addr", "add", "192.168.0.2/24", "dev", "r1"])?;
            r.ip(&["addr", "add", "192.168.1.1/24", "dev", "r0"])?;
            r.ip(&["link", "set", "r0", "mtu", &mtu.to_string()])?;
            for link in ["r0", "r1"] {
                r.ip(&["link", "set", link, "up"])?;
                ethtool_tx(&r, link, false)?;
            }
            r.ip(&["route", "add", "10.1.0.0/16", "via", "192.168.1.2"])?;
            r.ip(&["route", "add", "default", "via", "192.168.0.1"])?;
            r.sysctl("net.ipv4.ip_forward", "1")?;
            let c = &topo.client;
            c.ip(&["addr", "add", "192.168.1.2/24", "dev", "c0"])?;
            c.ip(&["link", "set", "c0", "up"])?;
            c.ip(&["route", "add", "default", "via", "192.168.1.1"])?;
            topo.router = Some(r);
        } else {
            veth((&topo.node, NODE_IFACE), (&topo.client, "c0"))?;
            let c = &topo.client;
            c.ip(&["addr", "add", "192.168.0.2/24", "dev", "c0"])?;
            c.ip(&["link", "set", "c0", "up"])?;
            c.ip(&["route", "add", "default", "via", "192.168.0.1"])?;
        }
        let (c, n) = (&topo.client, &topo.node);
        // Any address of 10.1.0.0/16 is the client's: one namespace, many clients.
        c.ip(&["route", "add", "local", "10.1.0.0/16", "dev", "lo"])?;
        ethtool_tx(c, "c0", !opts.complete_client_checksums)?;

        n.ip(&["addr", "add", "192.168.0.1/24", "dev", NODE_IFACE])?;
        n.ip(&["link", "set", NODE_IFACE, "up"])?;
        n.ip(&["addr", "add", &format!("{}/32", VIP.ip()), "dev", "lo"])?;
        n.ip(&["route", "add", "10.1.0.0/16", "via", "192.168.0.2"])?;
        n.sysctl("net.ipv4.ip_forward", "1")?;
        ethtool_tx(n, NODE_IFACE, false)?;

        let groups = std::iter::repeat_n(Group::Stable, opts.stable)
            .chain(std::iter::repeat_n(Group::Canary, opts.canary));
        for (j, group) in groups.enumerate() {
            let b = backend(&tag, j + 1, group, &topo.node, opts.udp_echo)?;
            topo.backends.push(b);
        }
        Ok(topo)
    }

    pub fn backends_of(&self, group: Group) -> Vec<SocketAddrV4> {
        self.backends
            .iter()
            .filter(|b| b.group == group)
            .map(|b| b.addr)
            .collect()
    }

    /// Where an agent on the node pins its data path.
    pub fn pin_dir(&self) -> std::path::PathBuf {
        self.bpffs.dir.join("kanari")
    }

    /// The first canary backend's server.
    pub fn canary_server(&self) -> &BackendHandle {
        self.backends
            .iter()
            .find(|b| b.group == Group::Canary)
            .and_then(|b| b.server.as_ref())
            .expect("a running canary backend")
    }

    /// The server of the backend at `addr`.
    pub fn server(&self, addr: SocketAddrV4) -> &BackendHandle {
        self.backends
            .iter()
            .find(|b| b.addr == addr)
            .and_then(|b| b.server.as_ref())
            .expect("a running backend at that address")
    }

    /// The group a backend address belongs to.
    pub fn group_of(&self, addr: SocketAddrV4) -> Option<Group> {
        self.backends
            .iter()
            .find(|b| b.addr == addr)
            .map(|b| b.group)
    }

    /// A kanari configuration for this network with one service at [`VIP`].
    pub fn config(&self, canary_percent: f64, extra_service_yaml: &str, mode: &str) -> String {
        let list = |g| {
            self.backends_of(g)
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "interfaces:\n  - name: {NODE_IFACE}\n    mode: {mode}\nconntrack:\n  connections: 65536\nbpf:\n  pin_dir: {}\nservices:\n  - name: web\n    vip: {VIP}\n    canary_weight: {canary_percent}\n    salt: 42\n    stable:\n      backends: [{}]\n    canary:\n      backends: [{}]\n{extra_service_yaml}",
            self.pin_dir().display(),
            list(Group::Stable),
            list(Group::Canary),
        )
    }

    /// Programs attached to the node's client-facing interface: XDP (from
    /// `ip link`) and tcx ingress/egress (queried from the kernel).
    pub fn attached_programs(&self) -> Result<Vec<String>> {
        let out = run(self
            .node
            .command("ip")
            .args(["-d", "link", "show", "dev", NODE_IFACE]))?;
        let mut found = Vec::new();
        if String::from_utf8_lossy(&out.stdout).contains("prog/xdp") {
            found.push("xdp".to_string());
        }
        let tcx = self.node.run_in(|| -> Result<Vec<String>> {
            use aya::programs::{SchedClassifier, TcAttachType};
            let mut names = Vec::new();
            for t in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, progs) =
                    SchedClassifier::query_tcx(NODE_IFACE, t).context("querying tcx")?;
                names.extend(
                    progs
                        .iter()
                        .map(|p| format!("tcx {t:?}: {}", p.name_as_str().unwrap_or("?"))),
                );
            }
            Ok(names)
        })??;
        found.extend(tcx);
        Ok(found)
    }
}
