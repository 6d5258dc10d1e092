//! `kanari`: the command line. Each verb is a thin shell over the library:
//! `run` is [`kanari::daemon::run`]; the operator verbs are
//! [`kanari::verb::Verb`]s sent to a running agent's control socket.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use kanari::{
    api,
    config::{self, DEFAULT_CONTROL_SOCKET},
    daemon::{self, EXIT_CONFIG},
    status,
    verb::Verb,
};
use tracing::error;

#[derive(Parser)]
#[command(
    name = "kanari",
    version,
    about = "Canary releases without a service mesh: eBPF splits each service's new connections \
             between stable and canary backends by weight and measures them in the kernel; the \
             agent judges the canary and moves the weight."
)]
struct Cli {
    /// The agent's control socket (control.socket in its config), for the verbs
    /// that talk to a running agent.
    #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground: load and attach the data path, apply the
    /// configuration, run the rollouts, serve /metrics and the control socket,
    /// reload the configuration on SIGHUP, detach everything on SIGTERM or SIGINT.
    Run {
        /// The configuration file (YAML).
        #[arg(long, short, default_value = "/etc/kanari/kanari.yaml")]
        config: PathBuf,
        /// On SIGTERM or SIGINT, detach everything and remove the pins (by
        /// default the pinned data path keeps steering until the next agent).
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Remove the pinned data path: detach kanari's programs from every
    /// interface and free its maps (conntrack, weights, counters). Run it with
    /// no agent running, or the agent re-pins on its next reload.
    Uninstall {
        /// The configuration whose bpf.pin_dir to clear (else the default).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file: exit 0 when it is valid, 2 with the
    /// field and the fix when it is not. Interfaces must exist on this host.
    CheckConfig {
        /// The configuration file (YAML).
        file: PathBuf,
    },
    /// Show each service's weight, rollout and, per version, requests/s, error
    /// rate, time to first byte, connect time and TCP errors over the last 10 s.
    Status {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Redraw every second until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Hold a service's rollout at its current step.
    Pause { service: String },
    /// Continue a paused rollout (from its step, with a new check window).
    Resume { service: String },
    /// Send the canary 100 % now.
    Promote { service: String },
    /// Roll the canary back now (weight 0; on_rollback: cut also drops its connections).
    Abort { service: String },
    /// Set the canary weight by hand; the rollout holds (paused) until resumed.
    SetWeight {
        service: String,
        /// Percent, 0 to 100.
        percent: f64,
    },
    /// Print the decisions a configuration would have taken on telemetry
    /// recorded by `telemetry.record`: each check's verdict per judge, each
    /// step, promotion and rollback, beside the weights the agent set then.
    /// The traffic split is the recorded one; gates count as answering 2xx.
    Replay {
        /// The recording (telemetry.record's file, or its rotated FILE.1).
        file: PathBuf,
        /// The configuration to judge with (by default the one recorded).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Rollout commands.
    Rollout {
        #[command(subcommand)]
        command: RolloutVerb,
    },
}

#[derive(Subcommand)]
enum RolloutVerb {
    /// Start the service's rollout again from its first step; with
    /// --revision, as a new release (a new build on the same backends).
    Start {
        service: String,
        /// The new build's revision (e.g. its image tag); refused when the
        /// configuration names the canary's revision (edit canary.revision there).
        #[arg(long)]
        revision: Option<String>,
    },
}

/// `kanari replay`: prints the replay's lines and each service's end.
fn replay(file: &std::path::Path, config_path: Option<&std::path::Path>) -> ExitCode {
    let (header, ticks) = match kanari::record::read(file) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // The data path is not touched: any interface name will do.
    let any = |_: &str| true;
    let parsed = match config_path {
        Some(path) => config::load(path, &any),
        None => config::parse(&header.config_path, &header.config, &any),
    };
    let config = match parsed {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let r = kanari::replay::replay(&config, &ticks);
    let span = match (ticks.first(), ticks.last()) {
        (Some(a), Some(b)) => b.t_ms.saturating_sub(a.t_ms) as f64 / 1e3,
        _ => 0.0,
    };
    println!(
        "replaying {} ({} ticks, {span:.1} s) with {}",
        file.display(),
        ticks.len(),
        config_path.map_or_else(
            || format!("the recorded {}", header.config_path),
            |p| p.display().to_string()
        )
    );
    for line in &r.lines {
        println!("{line}");
    }
    for (service, (phase, weight)) in &r.end {
        println!(
            "end: {service}: {} at {}%",
            phase.replace('_', " "),
            *weight as f64 / 100.0
        );
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KANARI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let socket = cli.socket;
    let verb = |service: String, verb: Verb| block_on(send(socket.clone(), service, verb));
    match cli.command {
        Command::Replay { file, config } => replay(&file, config.as_deref()),
        Command::CheckConfig { file } => match config::load(&file, &daemon::interface_exists)
            .and_then(|c| daemon::check_interfaces(&file.display().to_string(), &c).map(|()| c))
        {
            Ok(c) => {
                println!(
                    "{}: valid ({} interface(s), {} service(s))",
                    file.display(),
                    c.interfaces.len(),
                    c.services.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run {
            config,
            detach_on_exit,
        } => daemon::run(config, detach_on_exit),
        Command::Uninstall { config } => uninstall(config),
        Command::Status { json, watch } => block_on(show_status(socket, json, watch)),
        Command::Pause { service } => verb(service, Verb::Pause),
        Command::Resume { service } => verb(service, Verb::Resume),
        Command::Promote { service } => verb(service, Verb::Promote),
        Command::Abort { service } => verb(service, Verb::Abort),
        Command::SetWeight { service, percent } => match config::percent_to_basis_points(percent) {
            Ok(basis_points) => verb(service, Verb::SetWeight { basis_points }),
            Err(e) => {
                eprintln!("error: {service}: percent: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Rollout {
            command: RolloutVerb::Start { service, revision },
        } => verb(service, Verb::Start { revision }),
    }
}

fn block_on(f: impl std::future::Future<Output = Result<ExitCode>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn show_status(socket: PathBuf, json: bool, watch: bool) -> Result<ExitCode> {
    loop {
        let body = api::control_get(&socket, "/v1/status").await?;
        if json {
            println!("{}", String::from_utf8_lossy(&body));
            return Ok(ExitCode::SUCCESS);
        }
        let report: status::StatusReport =
            serde_json::from_slice(&body).context("reading the agent's answer")?;
        if !watch {
            print!("{}", status::render(&report));
            return Ok(ExitCode::SUCCESS);
        }
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H{}", status::render(&report));
        println!("\n(every second; Ctrl-C to stop)");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// Sends a verb to the running agent; its answer is printed.
async fn send(socket: PathBuf, service: String, verb: Verb) -> Result<ExitCode> {
    let (status, answer) = api::control_request(
        &socket,
        &format!("/v1/services/{service}/{}", verb.segment()),
        Some(verb.body()),
    )
    .await?;
    let message = serde_json::from_slice::<api::Answer>(&answer).map_or_else(
        |_| String::from_utf8_lossy(&answer).into_owned(),
        |a| a.message,
    );
    if status == 200 {
        println!("{service}: {message}");
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("{service}: {message}")
    }
}

fn uninstall(config: Option<PathBuf>) -> ExitCode {
    let dir = match config.map(|c| config::load(&c, &|_| true)) {
        None => PathBuf::from(kanari::pins::PIN_ROOT),
        Some(Ok(c)) => c.pin_dir,
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match kanari::pins::Pins::new(&dir).remove_all() {
        Ok(removed) if removed.is_empty() => {
            println!("nothing pinned under {}", dir.display());
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            println!(
                "removed {} pin(s) under {}: kanari's programs are detached and its maps freed",
                removed.len(),
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
