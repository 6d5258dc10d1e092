//! `kanari-demo`: a canary rollout you can watch. Builds a client, a node
//! running kanari and three HTTP backends (two stable, one canary) in network
//! namespaces, drives steady traffic from many client addresses, and shows
//! the rollout live until it ends:
//!
//! - by default the canary is healthy and is promoted step by step to 100 %;
//! - `--faulty`: the canary starts answering 500 partway through and is
//!   rolled back at once by the critical path;
//! - `--slow`: the canary starts answering 50 ms later than stable, with no
//!   errors, and is rolled back by the comparison with stable.
//!
//! Everything is removed on exit, Ctrl-C included. Run through
//! `cargo xtask demo` (builds, checks the machine, runs as root).

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use kanari::status::{self, StatusReport};
use kanari_tests::{
    agent::Agent,
    client::runtime,
    load::Load,
    topology::{Topology, TopologyOptions, VIP},
};

#[derive(Parser)]
#[command(about = "kanari's demo: a canary rollout in network namespaces, live.")]
struct Args {
    /// The kanari binary to run.
    #[arg(long)]
    kanari: Option<PathBuf>,
    /// The canary starts answering 500 partway through.
    #[arg(long, conflicts_with = "slow")]
    faulty: bool,
    /// The canary starts answering 50 ms slower partway through (no errors).
    #[arg(long)]
    slow: bool,
    /// Seconds into the rollout when the canary turns bad.
    #[arg(long, default_value_t = 12)]
    fault_after: u64,
    /// Requests per second the clients send (each on a new connection).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Ingress mode: auto, xdp or tc.
    #[arg(long, default_value = "auto")]
    mode: String,
}

const ROLLOUT: &str = "    rollout:
      steps: [5, 10, 25, 50, 100]
      interval: 5s
      checks_per_step: 1
      min_requests: 20
      progress_deadline: 1m
    analysis:
      limits: {max_error_rate: 5, max_latency_p99: 500ms}
      compare_to_stable: {max_error_rate_increase: 1, max_latency_increase: 50, confidence: 0.99}
      critical: {error_rate: 50, min_requests: 20}
";

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(k) = &args.kanari {
        // SAFETY: single-threaded at this point; the harness reads it later.
        unsafe { std::env::set_var("KANARI_BIN", k) };
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo creates network namespaces and loads eBPF programs: run it as root (`cargo xtask demo`)"
        );
    }
    let story = if args.faulty {
        format!(
            "the canary starts failing (HTTP 500) after {} s",
            args.fault_after
        )
    } else if args.slow {
        format!("the canary turns 50 ms slower after {} s", args.fault_after)
    } else {
        "the canary is healthy".to_string()
    };
    println!(
        "kanari demo: {story}. Building namespaces (client, node, 2 stable + 1 canary backends)..."
    );
    // The client sends complete checksums, as traffic arriving through a NIC
    // does, so XDP steers it (partial checksums from a local veth go to TC).
    let topo = Topology::new(&TopologyOptions {
        complete_client_checksums: true,
        ..Default::default()
    })
    .context("building the demo network")?;
    let agent = Agent::start(&topo.node, &topo.config(0.0, ROLLOUT, &args.mode))
        .context("starting kanari")?;
    let load = Load::start(&topo.client, VIP, args.rate, 32, 0).context("starting the clients")?;
    let canary = topo.canary_server();

    let rt = runtime();
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut turned = false;
    let outcome = rt.block_on(async {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            if !turned
                && started.elapsed() >= Duration::from_secs(args.fault_after)
                && (args.faulty || args.slow)
            {
                turned = true;
                if args.faulty {
                    canary.behavior.set_error_rate(1.0);
                } else {
                    canary.behavior.set_delay(Duration::from_millis(50));
                }
            }
            let body = kanari::api::control_get(&agent.socket, "/v1/status").await?;
            let report: StatusReport = serde_json::from_slice(&body)?;
            let outcomes = load.outcomes();
            let failed = outcomes
                .iter()
                .filter(|o| !matches!(o.result, Ok((_, 200))))
                .count();
            if tty {
                print!("\x1b[2J\x1b[H");
            } else {
                println!();
            }
            println!(
                "kanari demo — {story} — {:.0} s",
                started.elapsed().as_secs_f64()
            );
            if turned {
                println!(
                    "the canary is now {}",
                    if args.faulty { "FAILING" } else { "SLOW" }
                );
            }
            print!("{}", status::render(&report));
            println!("clients: {} requests sent, {failed} failed", outcomes.len());
            let phase = report.services[0]
                .rollout
                .as_ref()
                .map(|r| r.phase.clone())
                .unwrap_or_default();
            if phase == "promoted" || phase == "rolled_back" {
                return Ok::<_, anyhow::Error>(Some((
                    phase,
                    report.services[0]
                        .rollout
                        .clone()
                        .expect("a rollout")
                        .reason,
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = &mut ctrl_c => return Ok(None),
            }
        }
    })?;
    let outcomes = load.stop();
    let failed = outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .count();
    match outcome {
        Some((phase, reason)) => println!(
            "\nrollout {} after {:.0} s: {reason}\nclients saw {failed} failed requests of {}.",
            phase.replace('_', " "),
            started.elapsed().as_secs_f64(),
            outcomes.len()
        ),
        None => println!("\ninterrupted."),
    }
    let _ = agent.stop();
    println!("removing namespaces; done.");
    Ok(())
}
