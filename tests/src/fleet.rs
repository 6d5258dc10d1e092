//! A fleet: several nodes running kanari in front of the same backends,
//! each with clients of its own, and an API server they all reach.
//!
//! ```text
//!  client K ns              node K ns (kanari on n0)            fabric ns             backend J ns
//!  c0 192.168.0.2 ──────── n0 192.168.0.1                        (routes)             eth0 10.2.J.1:8080
//!  clients 10.1.64K.0/18   fK 172.16.K.1 ───────────────── fK 172.16.K.254   bJ 10.2.J.254 ─┘
//!                          VIP 10.0.0.100 on lo                 API server 10.3.0.1 on lo
//! ```
//!
//! Kanari only translates destinations, so a backend's reply goes to the
//! client's own address: each node's clients have a range of their own
//! (node K: `client_addr(K × CLIENTS_PER_NODE + i)`, 10.1.64K.0/18) and the
//! fabric routes each range back through its node. Nodes reach each other
//! (their agents' telemetry) and the API server through the fabric.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use kanari_common::maps::Group;

use crate::{
    backend::BackendHandle,
    netns::{BpfFs, Netns, unique_tag},
    topology::{Backend, NODE_IFACE, VIP, backend, ethtool_tx, veth},
};

/// Client addresses per node: `client_addr(node × CLIENTS_PER_NODE + i)`
/// for `i` below it is node `node`'s (64 /24s).
pub const CLIENTS_PER_NODE: u32 = 64 * 250;
/// Where the fabric serves the API server.
pub const API_ADDR: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 1);

pub struct FleetNode {
    pub client: Netns,
    pub node: Netns,
    /// Its own bpf filesystem, as a host of its own would have.
    pub bpffs: BpfFs,
    /// Its address on the fabric, where other nodes reach it.
    pub addr: Ipv4Addr,
}

impl FleetNode {
    pub fn pin_dir(&self) -> std::path::PathBuf {
        self.bpffs.dir.join("kanari")
    }
}

pub struct Fleet {
    pub tag: String,
    pub backends: Vec<Backend>,
    pub nodes: Vec<FleetNode>,
    pub fabric: Netns,
}

impl Fleet {
    /// `nodes` nodes, `stable` + `canary` backends, each with a healthy test backend.
    pub fn new(nodes: usize, stable: usize, canary: usize) -> Result<Fleet> {
        let tag = unique_tag();
        let fabric = Netns::new(&tag, "fab")?;
        fabric.sysctl("net.ipv4.ip_forward", "1")?;
        fabric.ip(&["link", "set", "lo", "up"])?;
        fabric.ip(&["addr", "add", &format!("{API_ADDR}/32"), "dev", "lo"])?;
        let mut fleet = Fleet {
            tag: tag.clone(),
            backends: Vec::new(),
            nodes: Vec::new(),
            fabric,
        };
        for k in 0..nodes {
            let client = Netns::new(&tag, &format!("c{k}"))?;
            let node = Netns::new(&tag, &format!("n{k}"))?;
            veth((&node, NODE_IFACE), (&client, "c0"))?;
            client.ip(&["addr", "add", "192.168.0.2/24", "dev", "c0"])?;
            client.ip(&["link", "set", "c0", "up"])?;
            client.ip(&["route", "add", "default", "via", "192.168.0.1"])?;
            client.ip(&["route", "add", "local", "10.1.0.0/16", "dev", "lo"])?;
            ethtool_tx(&client, "c0", true)?;
            node.ip(&["addr", "add", "192.168.0.1/24", "dev", NODE_IFACE])?;
            node.ip(&["link", "set", NODE_IFACE, "up"])?;
            node.ip(&["addr", "add", &format!("{}/32", VIP.ip()), "dev", "lo"])?;
            node.ip(&["link", "set", "lo", "up"])?;
            node.ip(&["route", "add", "10.1.0.0/16", "via", "192.168.0.2"])?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
            ethtool_tx(&node, NODE_IFACE, false)?;
            // To the fabric: the backends, the API server, the other nodes.
            let link = format!("f{k}");
            veth((&node, &link), (&fleet.fabric, &link))?;
            let addr = Ipv4Addr::new(172, 16, k as u8, 1);
            node.ip(&["addr", "add", &format!("{addr}/24"), "dev", &link])?;
            node.ip(&["link", "set", &link, "up"])?;
            let hop = format!("172.16.{k}.254");
            for net in ["10.2.0.0/16", "10.3.0.0/24", "172.16.0.0/16"] {
                node.ip(&["route", "add", net, "via", &hop])?;
            }
            ethtool_tx(&node, &link, false)?;
            let f = &fleet.fabric;
            f.ip(&["addr", "add", &format!("{hop}/24"), "dev", &link])?;
            f.ip(&["link", "set", &link, "up"])?;
            let clients = format!("10.1.{}.0/18", 64 * k);
            f.ip(&["route", "add", &clients, "via", &addr.to_string()])?;
            ethtool_tx(f, &link, false)?;
            fleet.nodes.push(FleetNode {
                client,
                node,
                bpffs: BpfFs::mount(&format!("{tag}-{k}"))?,
                addr,
            });
        }
        let groups = std::iter::repeat_n(Group::Stable, stable)
            .chain(std::iter::repeat_n(Group::Canary, canary));
        for (j, group) in groups.enumerate() {
            let b = backend(&tag, j + 1, group, &fleet.fabric, false)?;
            fleet.backends.push(b);
        }
        Ok(fleet)
    }

    pub fn backends_of(&self, group: Group) -> Vec<SocketAddrV4> {
        self.backends
            .iter()
            .filter(|b| b.group == group)
            .map(|b| b.addr)
            .collect()
    }

    /// The server of the backend at `addr`.
    pub fn server(&self, addr: SocketAddrV4) -> &BackendHandle {
        self.backends
            .iter()
            .find(|b| b.addr == addr)
            .and_then(|b| b.server.as_ref())
            .expect("a running backend at that address")
    }
}

impl Fleet {
    /// Open-loop load at `rate` requests a second from every node's clients
    /// to the VIP (node K's from its own address range).
    pub fn loads(&self, rate: f64) -> Vec<crate::load::Load> {
        (0..self.nodes.len())
            .map(|k| {
                crate::load::Load::start(
                    &self.nodes[k].client,
                    VIP,
                    rate,
                    8,
                    k as u32 * CLIENTS_PER_NODE,
                )
                .expect("load")
            })
            .collect()
    }
}

/// The kernel's canary weight (percent) of `service` on each node, `None`
/// where no agent runs or it does not steer the service.
pub fn weights(agents: &[Option<crate::agent::Agent>], service: &str) -> Vec<Option<f64>> {
    agents
        .iter()
        .map(|a| {
            let a = a.as_ref()?;
            crate::control::report(&a.socket)
                .services
                .into_iter()
                .find(|s| s.name == service)
                .map(|s| s.canary_weight_percent)
        })
        .collect()
}

/// Every running agent's kernel at `percent` for `service`, within `secs`.
pub fn all_at(agents: &[Option<crate::agent::Agent>], service: &str, percent: f64, secs: u64) {
    crate::control::until(secs, &format!("every node at {percent} %"), || {
        let w = weights(agents, service);
        let running = agents.iter().zip(&w).filter(|(a, _)| a.is_some());
        if running.clone().all(|(_, w)| *w == Some(percent)) {
            Ok(())
        } else {
            Err(format!("{w:?}"))
        }
    });
}

/// Stops the loads and checks each node's requests sent before `until_ms`:
/// none failed, and `canary` served a share of them within the 99.9 %
/// bound of `share` (3.29 standard deviations of a binomial share).
pub fn check_split(loads: Vec<crate::load::Load>, until_ms: u64, canary: SocketAddrV4, share: f64) {
    for (k, load) in loads.into_iter().enumerate() {
        let outcomes = load.stop();
        let before: Vec<_> = outcomes.iter().filter(|o| o.sent_ms < until_ms).collect();
        let n = before.len() as f64;
        let on_canary = before
            .iter()
            .filter(|o| o.result.as_ref().is_ok_and(|(b, _)| *b == canary))
            .count() as f64;
        let failed = before
            .iter()
            .filter(|o| !matches!(o.result, Ok((_, 200))))
            .count();
        assert_eq!(failed, 0, "node {k}: requests failed before the fault");
        let bound = 3.29 * (share * (1.0 - share) / n).sqrt();
        let seen = on_canary / n;
        eprintln!(
            "node {k}: canary share {:.2} % of {n} requests (bound ±{:.2} points)",
            seen * 100.0,
            bound * 100.0
        );
        assert!((seen - share).abs() <= bound, "node {k}: {seen} of {n}");
    }
}

/// Stops the loads; fails if a connection failed or, with `ok_only`, if
/// a request was answered other than 200.
pub fn check_no_failures(loads: Vec<crate::load::Load>, ok_only: bool, when: &str) {
    for (k, load) in loads.into_iter().enumerate() {
        let outcomes = load.stop();
        let failed = outcomes
            .iter()
            .filter(|o| match &o.result {
                Ok((_, code)) => ok_only && *code != 200,
                Err(_) => true,
            })
            .count();
        assert_eq!(failed, 0, "node {k}: requests failed {when}");
    }
}
