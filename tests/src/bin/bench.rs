//! `kanari-bench`: runs the benchmark suites and writes the results
//! (`cargo xtask bench` builds it in release mode, installs the peer tools and
//! runs it as root).

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, ValueEnum};
use kanari_tests::bench::{Ctx, SuiteReport, report};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// Throughput and latency: kanari (xdp, tc) beside iptables, NGINX, HAProxy and direct.
    Datapath,
    /// ns per packet from BPF_PROG_TEST_RUN, per path.
    Perpacket,
    /// Time from fault to weight 0, and failed requests, at several request rates.
    Rollback,
    /// Agent memory and CPU, kernel map memory.
    Footprint,
    /// A million conntrack entries, a thousand services, weight-change latency.
    Scale,
    /// Simulated rollouts: the judge's wrong decisions and detection times beside others'.
    Judge,
    /// The socket path's connect() cost and same-node requests/s beside iptables DNAT.
    Socketlb,
}

#[derive(Parser)]
#[command(about = "kanari's benchmarks (run by `cargo xtask bench`, as root)")]
struct Args {
    /// Fewer rounds and shorter runs: everything in under three minutes.
    #[arg(long)]
    quick: bool,
    /// Suites to run (default: all), e.g. `--suite perpacket --suite scale`.
    #[arg(long, value_enum)]
    suite: Vec<Suite>,
    /// Where latest.md, latest.json and the charts go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The `kanari` binary to measure (default: `$KANARI_BIN`, else target/debug/kanari).
    #[arg(long)]
    kanari: Option<PathBuf>,
    /// The command line recorded in the results.
    #[arg(long, default_value = "kanari-bench")]
    command_line: String,
    /// The commit recorded in the results.
    #[arg(long, default_value = "unknown")]
    commit: String,
    /// Seed for every random choice.
    #[arg(long, default_value_t = 0x6b61_6e61_7269)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !kanari_tests::netns::require_root() {
        eprintln!(
            "error: the benchmarks create network namespaces and load eBPF programs: run as root"
        );
        return ExitCode::FAILURE;
    }
    let kanari = args
        .kanari
        .clone()
        .unwrap_or_else(kanari_tests::agent::kanari_bin);
    // The harness starts agents from $KANARI_BIN.
    // SAFETY: no other thread runs yet.
    unsafe { std::env::set_var("KANARI_BIN", &kanari) };
    let ctx = Ctx {
        quick: args.quick,
        seed: args.seed,
        kanari,
    };
    let suites = if args.suite.is_empty() {
        Suite::value_variants().to_vec()
    } else {
        args.suite.clone()
    };
    let started = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut done: Vec<SuiteReport> = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    for suite in suites {
        let name = suite
            .to_possible_value()
            .expect("named")
            .get_name()
            .to_string();
        eprintln!("bench: {name} ...");
        let t = Instant::now();
        let result = match suite {
            Suite::Datapath => kanari_tests::bench::datapath::run(&ctx),
            Suite::Perpacket => kanari_tests::bench::perpacket::run(&ctx),
            Suite::Rollback => kanari_tests::bench::rollback::run(&ctx),
            Suite::Footprint => kanari_tests::bench::footprint::run(&ctx),
            Suite::Scale => kanari_tests::bench::scale::run(&ctx),
            Suite::Judge => kanari_tests::bench::judge::run(&ctx),
            Suite::Socketlb => kanari_tests::bench::socketlb::run(&ctx),
        };
        match result {
            Ok(r) => {
                eprintln!("bench: {name} done in {:.0} s", t.elapsed().as_secs_f64());
                done.push(r);
            }
            Err(e) => {
                let e = format!("{e:#}");
                eprintln!(
                    "bench: {name} FAILED after {:.0} s: {e}",
                    t.elapsed().as_secs_f64()
                );
                failed.push((name, e));
            }
        }
    }
    let run = report::RunInfo {
        command: args.command_line,
        commit: args.commit,
        started_unix,
        seconds: started.elapsed().as_secs_f64(),
        quick: args.quick,
        seed: args.seed,
    };
    if let Err(e) = report::write(&args.out, &run, &done, &failed) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "bench: results in {}/latest.md ({:.0} s)",
        args.out.display(),
        run.seconds
    );
    for t in done.iter().flat_map(|s| &s.targets) {
        eprintln!(
            "  {} {}: {} (goal {})",
            if t.met { "met " } else { "MISS" },
            t.name,
            t.measured,
            t.goal
        );
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
