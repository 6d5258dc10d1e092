//! `kanari-demo`: a split you can watch. Builds a client, a node running
//! kanari and three HTTP backends (two stable, one canary) in network
//! namespaces, drives HTTP traffic from many client addresses, and prints
//! what each version served — first at the starting weight, then after a
//! live weight change by SIGHUP, with keep-alive connections that stay on
//! their backend. Everything is removed on exit, Ctrl-C included.
//!
//! Run through `cargo xtask demo` (builds, checks the machine, runs as root).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use kanari_common::maps::Group;
use kanari_tests::{
    agent::Agent,
    client::{Conn, get_once, runtime},
    topology::{Topology, TopologyOptions, VIP, client_addr},
};

#[derive(Parser)]
#[command(about = "kanari's demo: a weighted, sticky canary split in network namespaces, live.")]
struct Args {
    /// The kanari binary to run.
    #[arg(long)]
    kanari: Option<PathBuf>,
    /// Canary weight at the start, in percent.
    #[arg(long, default_value_t = 10.0)]
    weight: f64,
    /// Canary weight after the live change, in percent.
    #[arg(long, default_value_t = 50.0)]
    then: f64,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Ingress mode: auto, xdp or tc.
    #[arg(long, default_value = "auto")]
    mode: String,
}

/// Requests served in one second, by version.
#[derive(Default)]
struct Tally {
    by_group: BTreeMap<Group, u64>,
    errors: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(k) = &args.kanari {
        // SAFETY: single-threaded at this point; the harness reads it later.
        unsafe { std::env::set_var("KANARI_BIN", k) };
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo creates network namespaces and loads eBPF programs: run it as root (`sudo cargo xtask demo`)"
        );
    }
    for w in [args.weight, args.then] {
        if !(0.0..=100.0).contains(&w) {
            bail!("weights are percentages from 0 to 100, not {w}");
        }
    }

    println!("kanari demo: building namespaces (client, node, 2 stable + 1 canary backends)...");
    // The client sends complete checksums, as traffic arriving through a NIC
    // does, so XDP steers it (partial checksums from a local veth go to TC).
    let topo = Topology::new(&TopologyOptions {
        complete_client_checksums: true,
        ..Default::default()
    })
    .context("building the demo network")?;
    let agent = Agent::start(&topo.node, &topo.config(args.weight, "", &args.mode))
        .context("starting kanari")?;
    for l in agent.logs().iter().filter(|l| l.contains("attached")) {
        println!("  kanari: {}", l.split("kanari: ").last().unwrap_or(l));
    }
    println!(
        "service web at {VIP}: stable {:?}, canary {:?}",
        topo.backends_of(Group::Stable),
        topo.backends_of(Group::Canary)
    );

    let interrupted = topo.client.run_in(|| {
        runtime().block_on(async {
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            let mut next_client = 0u32;
            // Keep-alive connections opened in phase 1, to show they stay put.
            let mut sticky: Vec<(Conn, SocketAddrV4)> = Vec::new();
            for (phase, weight) in [(1, args.weight), (2, args.then)] {
                if phase == 2 {
                    println!("\nchanging the canary weight to {weight}% (config rewritten, SIGHUP)...");
                    agent.reload(&topo.config(weight, "", &args.mode)).context("reloading")?;
                } else {
                    for i in 0..20 {
                        let mut c = Conn::open(client_addr(60_000 + i), VIP).await?;
                        let r = c.get().await?;
                        sticky.push((c, r.backend));
                    }
                }
                println!("\nphase {phase}: canary weight {weight}% — new connections, each from a new client address");
                println!("  {:>4}  {:>9}  {:>7}  {:>7}  {:>13}  {:>6}", "sec", "requests", "stable", "canary", "canary share", "errors");
                let start = Instant::now();
                for sec in 1..=args.seconds {
                    let mut tally = Tally::default();
                    let until = start + Duration::from_secs(sec);
                    while Instant::now() < until {
                        let batch: Vec<Ipv4Addr> = (0..32).map(|i| client_addr(next_client + i)).collect();
                        next_client += 32;
                        let work = futures_join(batch);
                        tokio::select! {
                            replies = work => for r in replies {
                                match r.ok().and_then(|r| topo.group_of(r.backend)) {
                                    Some(g) => *tally.by_group.entry(g).or_default() += 1,
                                    None => tally.errors += 1,
                                }
                            },
                            _ = &mut ctrl_c => return Ok::<bool, anyhow::Error>(true),
                        }
                    }
                    let s = tally.by_group.get(&Group::Stable).copied().unwrap_or(0);
                    let c = tally.by_group.get(&Group::Canary).copied().unwrap_or(0);
                    let total = s + c;
                    println!(
                        "  {sec:>4}  {total:>9}  {s:>7}  {c:>7}  {:>12.1}%  {:>6}",
                        if total > 0 { c as f64 * 100.0 / total as f64 } else { 0.0 },
                        tally.errors
                    );
                }
                if phase == 2 {
                    let mut kept = 0;
                    for (c, backend) in &mut sticky {
                        if c.get().await.is_ok_and(|r| r.backend == *backend) {
                            kept += 1;
                        }
                    }
                    println!("\n{kept} of {} keep-alive connections opened at {}% still answered by their first backend", sticky.len(), args.weight);
                }
            }
            Ok(false)
        })
    })??;

    // What the kernel measured, as `kanari status` shows it.
    if let Some(k) = std::env::var_os("KANARI_BIN") {
        let out = std::process::Command::new(k)
            .args(["status", "--socket"])
            .arg(&agent.socket)
            .output();
        if let Ok(out) = out
            .as_ref()
            .map_err(|_| ())
            .and_then(|o| if o.status.success() { Ok(o) } else { Err(()) })
        {
            println!(
                "\n$ kanari status   (measured in the kernel, last 10 s)\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    println!("\nrequests served, as counted by each backend:");
    for b in &topo.backends {
        let n = b.server.as_ref().map_or(0, |s| s.stats.requests());
        println!("  {:<6} {}  {n}", b.group.name(), b.addr);
    }
    match agent.stop() {
        Ok(s) => {
            let counters: Vec<String> = s
                .counters
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("kernel data path counters: {}", counters.join(" "));
        }
        Err(e) if interrupted => println!("kanari stopped with the interrupt ({e:#})"),
        Err(e) => return Err(e),
    }
    println!("removing namespaces; done.");
    Ok(())
}

/// One request from each client address, all at once.
async fn futures_join(clients: Vec<Ipv4Addr>) -> Vec<Result<kanari_tests::client::Reply>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        set.spawn(async move { (i, get_once(c, VIP).await) });
    }
    let mut out: Vec<(usize, Result<_>)> = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap_or_else(|e| (usize::MAX, Err(anyhow::anyhow!("task: {e}")))));
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}
