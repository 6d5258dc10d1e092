//! The contenders: each set up on a fresh network (client, node, the same
//! three test backends) and torn down after its measurements.

use std::{
    net::SocketAddrV4,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kanari_common::maps::Group;
use serde_json::{Value, json};

use super::sys::{Daemon, TempDir, run_bounded, tail};
use crate::{
    agent::Agent,
    client::{http_get, runtime},
    netns::Netns,
    topology::{NODE_IFACE, Topology, TopologyOptions, VIP},
};

/// The canary's share of new connections (or requests, for the proxies).
pub const CANARY_PERCENT: f64 = 10.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    KanariXdp,
    KanariTc,
    Iptables,
    Nginx,
    Haproxy,
    Direct,
}

impl Contender {
    pub const ALL: [Contender; 6] = [
        Contender::KanariXdp,
        Contender::KanariTc,
        Contender::Iptables,
        Contender::Nginx,
        Contender::Haproxy,
        Contender::Direct,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Contender::KanariXdp => "kanari xdp",
            Contender::KanariTc => "kanari tc",
            Contender::Iptables => "iptables",
            Contender::Nginx => "NGINX",
            Contender::Haproxy => "HAProxy",
            Contender::Direct => "direct",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Contender::KanariXdp => "kanari_xdp",
            Contender::KanariTc => "kanari_tc",
            Contender::Iptables => "iptables",
            Contender::Nginx => "nginx",
            Contender::Haproxy => "haproxy",
            Contender::Direct => "direct",
        }
    }

    /// Splits per connection (kernel NAT) rather than per request (proxies);
    /// `None` for direct, which does not split.
    pub fn splits_per_connection(self) -> Option<bool> {
        match self {
            Contender::KanariXdp | Contender::KanariTc | Contender::Iptables => Some(true),
            Contender::Nginx | Contender::Haproxy => Some(false),
            Contender::Direct => None,
        }
    }
}

/// Each backend's weight in basis points: the stable group shares
/// 100 % − canary, the canary group shares the canary's percentage.
pub fn weights(groups: &[Group], canary_percent: f64) -> Vec<u32> {
    let canary_bp = (canary_percent * 100.0).round() as u32;
    let n_canary = groups.iter().filter(|g| **g == Group::Canary).count() as u32;
    let n_stable = groups.len() as u32 - n_canary;
    groups
        .iter()
        .map(|g| match g {
            Group::Canary => canary_bp / n_canary.max(1),
            Group::Stable => (10_000 - canary_bp) / n_stable.max(1),
        })
        .collect()
}

/// kube-proxy's cascade: rule i jumps with probability w_i / (w_i + … + w_n);
/// the last rule always jumps (`None`).
pub fn cascade_probabilities(weights: &[u32]) -> Vec<Option<f64>> {
    let n = weights.len();
    (0..n)
        .map(|i| {
            if i + 1 == n {
                None
            } else {
                let rest: u32 = weights[i..].iter().sum();
                Some(weights[i] as f64 / rest as f64)
            }
        })
        .collect()
}

/// The iptables commands (arguments after `iptables -w 5 -t nat`) that split
/// `vip` over `backends` the way kube-proxy does.
pub fn iptables_rules(
    vip: SocketAddrV4,
    backends: &[SocketAddrV4],
    weights: &[u32],
) -> Vec<Vec<String>> {
    let s = |x: &str| x.to_string();
    let mut rules = vec![
        vec![s("-N"), s("KUBE-SERVICES")],
        vec![s("-N"), s("KUBE-SVC-WEB")],
    ];
    for j in 0..backends.len() {
        rules.push(vec![s("-N"), format!("KUBE-SEP-WEB{j}")]);
    }
    for (j, (b, p)) in backends
        .iter()
        .zip(cascade_probabilities(weights))
        .enumerate()
    {
        let mut rule = vec![s("-A"), s("KUBE-SVC-WEB")];
        if let Some(p) = p {
            rule.extend([
                s("-m"),
                s("statistic"),
                s("--mode"),
                s("random"),
                s("--probability"),
                format!("{p:.11}"),
            ]);
        }
        rule.extend([s("-j"), format!("KUBE-SEP-WEB{j}")]);
        rules.push(rule);
        rules.push(vec![
            s("-A"),
            format!("KUBE-SEP-WEB{j}"),
            s("-p"),
            s("tcp"),
            s("-m"),
            s("tcp"),
            s("-j"),
            s("DNAT"),
            s("--to-destination"),
            b.to_string(),
        ]);
    }
    rules.push(vec![
        s("-A"),
        s("KUBE-SERVICES"),
        s("-d"),
        format!("{}/32", vip.ip()),
        s("-p"),
        s("tcp"),
        s("-m"),
        s("tcp"),
        s("--dport"),
        vip.port().to_string(),
        s("-j"),
        s("KUBE-SVC-WEB"),
    ]);
    rules.push(vec![s("-A"), s("PREROUTING"), s("-j"), s("KUBE-SERVICES")]);
    rules
}

pub fn nginx_conf(
    dir: &str,
    vip: SocketAddrV4,
    backends: &[SocketAddrV4],
    weights: &[u32],
) -> String {
    let servers: String = backends
        .iter()
        .zip(weights)
        .map(|(b, w)| format!("        server {b} weight={};\n", w / 100))
        .collect();
    format!(
        "worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
master_process on;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    upstream web {{
{servers}        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {vip} backlog=4096;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

pub fn haproxy_cfg(vip: SocketAddrV4, backends: &[SocketAddrV4], weights: &[u32]) -> String {
    let servers: String = backends
        .iter()
        .zip(weights)
        .enumerate()
        .map(|(j, (b, w))| format!("    server b{j} {b} weight {}\n", w / 100))
        .collect();
    format!(
        "global
    maxconn 8000

defaults
    mode http
    maxconn 8000
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive

frontend web
    bind {vip}
    default_backend web

backend web
    balance roundrobin
    http-reuse always
{servers}"
    )
}

fn kanari_yaml(topo: &Topology, mode: &str) -> String {
    let list = |g| {
        topo.backends_of(g)
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "interfaces:\n  - name: {NODE_IFACE}\n    mode: {mode}\nconntrack:\n  connections: 262144\n  new_per_second: 0\nbpf:\n  pin_dir: {}\nmetrics:\n  listen: 127.0.0.1:9477\nservices:\n  - name: web\n    vip: {VIP}\n    affinity: connection\n    protocol: http\n    canary_weight: {CANARY_PERCENT}\n    salt: 42\n    stable:\n      backends: [{}]\n    canary:\n      backends: [{}]\n",
        topo.pin_dir().display(),
        list(Group::Stable),
        list(Group::Canary),
    )
}

/// Whether a child of ours has exited (gone, or a zombie not yet waited for).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 1..]
                .split_whitespace()
                .next()?
                .to_string();
            Some(state == "Z" || state == "X")
        })
        .unwrap_or(true)
}

/// iptables rules in the node namespace, deleted when dropped.
pub(crate) struct IptablesRules {
    ns: String,
    removed: bool,
}

impl IptablesRules {
    fn iptables(ns: &str, args: &[&str]) -> Result<()> {
        run_bounded(
            Command::new("ip")
                .args(["netns", "exec", ns, "iptables", "-w", "5", "-t", "nat"])
                .args(args),
            Duration::from_secs(15),
        )
        .map(|_| ())
    }

    pub(crate) fn install(ns: &Netns, rules: &[Vec<String>]) -> Result<Self> {
        let guard = IptablesRules {
            ns: ns.name().to_string(),
            removed: false,
        };
        for r in rules {
            let r: Vec<&str> = r.iter().map(String::as_str).collect();
            Self::iptables(&guard.ns, &r)?;
        }
        Ok(guard)
    }

    fn remove(&mut self) -> Result<()> {
        if !self.removed {
            Self::iptables(&self.ns, &["-F"])?;
            Self::iptables(&self.ns, &["-X"])?;
            self.removed = true;
        }
        Ok(())
    }
}

impl Drop for IptablesRules {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!(
                "warning: removing the benchmark's iptables rules in {}: {e:#}",
                self.ns
            );
        }
    }
}

enum Guard {
    Agent(Agent),
    Iptables(IptablesRules),
    Proxy(Daemon),
    None,
}

/// One contender, set up and serving. Field order is drop order: the
/// contender first, then the network, then the files.
pub struct Running {
    pub contender: Contender,
    guard: Guard,
    pub topo: Topology,
    pub dir: TempDir,
    /// How long the setup took, network included.
    pub setup_s: f64,
}

impl Running {
    pub fn start(contender: Contender) -> Result<Running> {
        let t = Instant::now();
        let topo = Topology::new(&TopologyOptions {
            stable: 2,
            canary: 1,
            complete_client_checksums: true,
            ..Default::default()
        })
        .context("building the network")?;
        let dir = TempDir::new(&topo.tag)?;
        for ns in [&topo.client, &topo.node] {
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        }
        let groups: Vec<Group> = topo.backends.iter().map(|b| b.group).collect();
        let addrs: Vec<SocketAddrV4> = topo.backends.iter().map(|b| b.addr).collect();
        let w = weights(&groups, CANARY_PERCENT);
        let dir_s = dir
            .path()
            .to_str()
            .context("a UTF-8 temp path")?
            .to_string();
        let guard = match contender {
            Contender::KanariXdp | Contender::KanariTc => {
                let mode = if contender == Contender::KanariXdp {
                    "xdp"
                } else {
                    "tc"
                };
                Guard::Agent(Agent::start(&topo.node, &kanari_yaml(&topo, mode))?)
            }
            Contender::Iptables => Guard::Iptables(IptablesRules::install(
                &topo.node,
                &iptables_rules(VIP, &addrs, &w),
            )?),
            Contender::Nginx => {
                let conf = dir.path().join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&dir_s, VIP, &addrs, &w))?;
                let mut cmd = topo.node.command("nginx");
                cmd.arg("-p")
                    .arg(dir.path())
                    .arg("-e")
                    .arg(dir.path().join("error.log"))
                    .arg("-c")
                    .arg(&conf);
                Guard::Proxy(Daemon::spawn(
                    "nginx",
                    &mut cmd,
                    dir.path().join("nginx.out"),
                )?)
            }
            Contender::Haproxy => {
                let conf = dir.path().join("haproxy.cfg");
                std::fs::write(&conf, haproxy_cfg(VIP, &addrs, &w))?;
                let mut cmd = topo.node.command("haproxy");
                cmd.arg("-db").arg("-f").arg(&conf);
                Guard::Proxy(Daemon::spawn(
                    "haproxy",
                    &mut cmd,
                    dir.path().join("haproxy.out"),
                )?)
            }
            Contender::Direct => Guard::None,
        };
        let mut running = Running {
            contender,
            guard,
            topo,
            dir,
            setup_s: 0.0,
        };
        running.wait_ready()?;
        running.setup_s = t.elapsed().as_secs_f64();
        Ok(running)
    }

    /// Where the client sends its requests: the VIP, or the first backend for direct.
    pub fn target(&self) -> SocketAddrV4 {
        match self.contender {
            Contender::Direct => self.topo.backends[0].addr,
            _ => VIP,
        }
    }

    /// Requests and connections each backend has served so far, with its
    /// group and address.
    pub fn backend_counts(&self) -> Vec<(Group, SocketAddrV4, u64, u64)> {
        self.topo
            .backends
            .iter()
            .map(|b| {
                let (r, c) = b
                    .server
                    .as_ref()
                    .map_or((0, 0), |s| (s.stats.requests(), s.stats.connections()));
                (b.group, b.addr, r, c)
            })
            .collect()
    }

    /// The proxy's CPU time (all its processes) so far, in seconds.
    pub fn proxy_cpu_s(&self) -> Option<f64> {
        match &self.guard {
            Guard::Proxy(d) => Some(d.cpu_seconds()),
            _ => None,
        }
    }

    /// Fails when the contender died (a proxy that exited).
    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.guard {
            Guard::Proxy(d) => d.check_alive(),
            Guard::Agent(a) => {
                if a.pid().is_some_and(exited) {
                    bail!("kanari exited; logs:\n{}", a.logs().join("\n"));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Until one request through the contender answers 200 (10 s at most).
    fn wait_ready(&mut self) -> Result<()> {
        let target = self.target();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.check_alive()?;
            let r = self
                .topo
                .client
                .run_in(|| runtime().block_on(http_get(std::net::SocketAddr::V4(target), "/")))?;
            match r {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) if Instant::now() > deadline => {
                    bail!(
                        "{} answered {status} {body:?} through {target}",
                        self.contender.label()
                    )
                }
                Err(e) if Instant::now() > deadline => {
                    let log = match &self.guard {
                        Guard::Proxy(d) => tail(&d.log(), 2000).to_string(),
                        _ => String::new(),
                    };
                    return Err(e).with_context(|| {
                        format!(
                            "{} not serving at {target} within 10 s {log}",
                            self.contender.label()
                        )
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Stops the contender; fails when it did not stop cleanly. Returns what
    /// it leaves to report (kanari's data-path counters).
    pub fn stop(mut self) -> Result<Value> {
        self.check_alive()?;
        let guard = std::mem::replace(&mut self.guard, Guard::None);
        match guard {
            Guard::Agent(a) => {
                let stopped = a.stop()?;
                if !stopped.status.success() {
                    bail!(
                        "kanari exited with {}; logs:\n{}",
                        stopped.status,
                        stopped.logs.join("\n")
                    );
                }
                Ok(json!(stopped.counters))
            }
            Guard::Iptables(mut rules) => {
                rules.remove()?;
                Ok(Value::Null)
            }
            Guard::Proxy(mut d) => {
                d.stop(Duration::from_secs(3));
                Ok(Value::Null)
            }
            Guard::None => Ok(Value::Null),
        }
    }
}
