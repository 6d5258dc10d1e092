//! The socket path's cost (`--suite socketlb`), for a process on the node
//! calling a VIP: the time of a `connect()` call and the requests a second
//! of a same-node client (a new connection per request), through kanari's
//! socket path beside iptables DNAT (kube-proxy's rules, on the OUTPUT
//! chain as kube-proxy installs them for local clients) and beside dialling
//! a backend directly. The three alternate in rounds in one run, in the
//! same namespaces, against the same backends (90/10 split).

use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use kanari_common::maps::Group;
use serde_json::{Value, json};

use super::{Ctx, SuiteReport, Target, datapath::contenders, report::median};
use crate::{
    agent::Agent,
    cgroup::SocketLbCgroup,
    socket_client::run_client,
    topology::{Topology, TopologyOptions, VIP},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Direct,
    SocketLb,
    Iptables,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::SocketLb => "kanari socket path",
            Way::Iptables => "iptables DNAT",
        }
    }
}

struct Bench {
    topo: Topology,
    sock: SocketLbCgroup,
}

impl Bench {
    /// Runs `args` of kanari-test-client the `way` asks: in the cgroup for
    /// the socket path, outside it otherwise; the address to dial follows.
    fn client(&self, way: Way, args: &[&str]) -> Result<Vec<Value>> {
        let to = match way {
            Way::Direct => self.topo.backends_of(Group::Stable)[0].to_string(),
            _ => VIP.to_string(),
        };
        let mut all = vec![args[0], "--to", &to];
        all.extend_from_slice(&args[1..]);
        let cgroup = (way == Way::SocketLb).then_some(&self.sock.cgroup);
        run_client(&self.topo.node, cgroup, &all)
    }

    /// Median ns of a connect() call over `count`.
    fn connect_ns(&self, way: Way, count: usize) -> Result<f64> {
        let n = count.to_string();
        let lines = self.client(way, &["connect", "--count", &n])?;
        let l = lines.first().context("no line from the client")?;
        if l["failed"].as_u64() != Some(0) {
            bail!("{} connect() calls failed: {l}", way.name());
        }
        l["median_ns"].as_f64().context("median_ns")
    }

    /// Requests a second, each on a new connection, 8 at a time.
    fn requests_per_s(&self, way: Way, count: usize) -> Result<f64> {
        let n = count.to_string();
        let t = Instant::now();
        let lines = self.client(way, &["tcp", "--count", &n, "--concurrency", "8"])?;
        let secs = t.elapsed().as_secs_f64();
        let failed = lines.iter().filter(|l| l["ok"] != true).count();
        if failed > 0 || lines.len() != count {
            bail!(
                "{}: {failed} of {} requests failed",
                way.name(),
                lines.len()
            );
        }
        Ok(count as f64 / secs)
    }
}

pub fn run(ctx: &Ctx) -> Result<SuiteReport> {
    let rounds = ctx.pick(5, 2);
    let connects = ctx.pick(20_000, 2_000);
    let requests = ctx.pick(10_000, 1_000);
    let topo = Topology::new(&TopologyOptions::default())?;
    // Tens of thousands of connections from one namespace to three
    // backends: the client's closed ones wait in TIME_WAIT, and without
    // reuse the port search of each new connect() slows, then fails.
    topo.node.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    topo.node
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let sock = SocketLbCgroup::new(&topo.tag)?;
    let config = format!(
        "{}{}",
        topo.config(10.0, "    affinity: connection\n", "tc"),
        sock.config()?
    );
    let backends: Vec<_> = topo
        .backends_of(Group::Stable)
        .into_iter()
        .chain(topo.backends_of(Group::Canary))
        .collect();
    let weights: Vec<u32> = topo
        .backends
        .iter()
        .map(|b| match b.group {
            Group::Stable => 90 / topo.backends_of(Group::Stable).len() as u32,
            Group::Canary => 10 / topo.backends_of(Group::Canary).len() as u32,
        })
        .collect();
    let mut rules = contenders::iptables_rules(VIP, &backends, &weights);
    // kube-proxy sends local clients' connections through the same chain.
    rules.push(
        ["-A", "OUTPUT", "-j", "KUBE-SERVICES"]
            .map(String::from)
            .to_vec(),
    );
    let agent = Agent::start(&topo.node, &config)?;
    let b = Bench { topo, sock };
    let ways = [Way::Direct, Way::SocketLb, Way::Iptables];
    let mut connect: Vec<(Way, f64)> = Vec::new();
    // Each round's connect() cost over that round's direct one.
    let mut added: Vec<(Way, f64)> = Vec::new();
    let mut rps: Vec<(Way, f64)> = Vec::new();
    for round in 0..rounds {
        let mut this_round = Vec::new();
        // A/B: the order turns each round.
        for k in 0..ways.len() {
            let way = ways[(round + k) % ways.len()];
            // iptables' rules (and the conntrack they bring) only while it is measured.
            let _rules = match way {
                Way::Iptables => Some(contenders::IptablesRules::install(&b.topo.node, &rules)?),
                _ => None,
            };
            let ns = b.connect_ns(way, connects)?;
            let r = b.requests_per_s(way, requests)?;
            eprintln!(
                "bench: socketlb: round {} {}: connect() {ns:.0} ns, {r:.0} requests/s",
                round + 1,
                way.name()
            );
            connect.push((way, ns));
            this_round.push((way, ns));
            rps.push((way, r));
        }
        let direct = this_round
            .iter()
            .find(|(w, _)| *w == Way::Direct)
            .map(|(_, ns)| *ns)
            .unwrap_or_default();
        added.extend(this_round.iter().map(|(w, ns)| (*w, ns - direct)));
    }
    drop(agent);
    let med = |xs: &[(Way, f64)], w: Way| {
        median(
            &xs.iter()
                .filter(|(x, _)| *x == w)
                .map(|(_, v)| *v)
                .collect::<Vec<_>>(),
        )
    };
    let (cd, cs, ci) = (
        med(&connect, Way::Direct),
        med(&connect, Way::SocketLb),
        med(&connect, Way::Iptables),
    );
    let (as_, ai) = (med(&added, Way::SocketLb), med(&added, Way::Iptables));
    let (rd, rs, ri) = (
        med(&rps, Way::Direct),
        med(&rps, Way::SocketLb),
        med(&rps, Way::Iptables),
    );
    let mut md = String::new();
    md.push_str(&format!(
        "A process on the node (in the socket path's cgroup for kanari, outside it otherwise) calls the VIP; {rounds} rounds, the three ways alternated; medians. connect(): {connects} blocking calls to a backend in another namespace (a veth hop), each closed with a RST (the median call). Requests: {requests} HTTP requests, one connection each, 8 at a time.\n\n"
    ));
    md.push_str("| way | connect() | added to a direct connect() (median of the rounds' differences) | requests/s | vs iptables |\n|---|---:|---:|---:|---:|\n");
    for (way, c, a, r) in [
        (Way::Direct, cd, 0.0, rd),
        (Way::SocketLb, cs, as_, rs),
        (Way::Iptables, ci, ai, ri),
    ] {
        md.push_str(&format!(
            "| {} | {:.0} ns | {:+.0} ns | {:.0} | {:.2}× |\n",
            way.name(),
            c,
            a,
            r,
            r / ri
        ));
    }
    md.push_str("\nThe socket path chooses the backend once, at connect(); the connection is then a plain one to the backend (no NAT, no conntrack). Its observer (cgroup_skb) still sees every packet of the socket: that cost is in the requests/s column.\n");
    let targets = vec![
        Target {
            name: "connect() through the socket path".into(),
            goal: "≤ iptables DNAT's".into(),
            measured: format!(
                "{cs:.0} ns vs {ci:.0} ns ({as_:+.0} ns over direct; iptables {ai:+.0} ns)"
            ),
            met: cs <= ci,
        },
        Target {
            name: "same-node requests/s through the socket path".into(),
            goal: "≥ iptables DNAT's".into(),
            measured: format!("{:.2}× iptables ({rs:.0} vs {ri:.0})", rs / ri),
            met: rs >= ri,
        },
    ];
    let json = json!({
        "rounds": rounds,
        "connects": connects,
        "requests": requests,
        "connect_ns": connect.iter().map(|(w, v)| json!({"way": w.name(), "ns": v})).collect::<Vec<_>>(),
        "requests_per_s": rps.iter().map(|(w, v)| json!({"way": w.name(), "rps": v})).collect::<Vec<_>>(),
        "median": {"connect_ns": {"direct": cd, "socket": cs, "iptables": ci},
                   "connect_added_ns": {"socket": as_, "iptables": ai},
                   "requests_per_s": {"direct": rd, "socket": rs, "iptables": ri}},
    });
    Ok(SuiteReport {
        name: "socketlb".into(),
        title: "Socket path: connect() and same-node requests/s".into(),
        markdown: md,
        json,
        charts: Vec::new(),
        targets,
    })
}
