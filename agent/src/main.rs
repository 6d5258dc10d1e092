//! `kanari`: the command line. Each verb is a thin shell over the library.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kanari::{
    config::{self, Config},
    datapath::Datapath,
    plan::{self, Applied},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "kanari",
    version,
    about = "Canary releases without a service mesh: eBPF splits each service's new connections \
             between stable and canary backends by weight, in the kernel."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground: load and attach the data path, apply the
    /// configuration, reload it on SIGHUP, detach everything on SIGTERM or SIGINT.
    Run {
        /// The configuration file (YAML).
        #[arg(long, short, default_value = "/etc/kanari/kanari.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration file: exit 0 when it is valid, 2 with the
    /// field and the fix when it is not. Interfaces must exist on this host.
    CheckConfig {
        /// The configuration file (YAML).
        file: PathBuf,
    },
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
    match cli.command {
        Command::CheckConfig { file } => match config::load(&file, &interface_exists) {
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
        Command::Run { config } => {
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
            match rt.block_on(run(config)) {
                Ok(code) => code,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Whether an interface of this name exists in the agent's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The running agent: the data path and what it was last told.
struct Agent {
    datapath: Datapath,
    applied: Applied,
    config: Config,
}

impl Agent {
    /// Brings maps and attachments in line with `config`: maps first, so the
    /// first packet an attached program sees finds its services.
    fn apply(&mut self, config: Config) -> Result<()> {
        let (ops, next) = plan::plan(&self.applied, &config).map_err(anyhow::Error::msg)?;
        self.datapath.apply(&ops)?;
        self.applied = next;
        for (name, how) in self.datapath.attach_all(&config.interfaces)? {
            info!(interface = %name, mode = how.name(), "attached");
        }
        for s in &config.services {
            info!(
                service = %s.name,
                vip = %s.vip,
                canary_weight = format!("{}%", s.canary_weight as f64 / 100.0),
                stable = s.stable.len(),
                canary = s.canary.len(),
                segments = s.segments.len(),
                "service"
            );
        }
        if config.conntrack_connections != self.config.conntrack_connections {
            warn!(
                running = self.config.conntrack_connections,
                configured = config.conntrack_connections,
                "conntrack.connections changes take effect when the agent restarts"
            );
        }
        self.config = Config {
            conntrack_connections: self.config.conntrack_connections,
            ..config
        };
        Ok(())
    }
}

async fn run(path: PathBuf) -> Result<ExitCode> {
    let config = match config::load(&path, &interface_exists) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let datapath = Datapath::load(config.conntrack_connections)?;
    let mut agent = Agent {
        datapath,
        applied: Applied::default(),
        config: config.clone(),
    };
    agent.apply(config)?;
    info!(
        config = %path.display(),
        services = agent.config.services.len(),
        interfaces = agent.config.interfaces.len(),
        "ready"
    );

    loop {
        tokio::select! {
            _ = hup.recv() => {
                match config::load(&path, &interface_exists) {
                    Ok(c) => match agent.apply(c) {
                        Ok(()) => info!(config = %path.display(), "config reloaded"),
                        Err(e) => error!("config reload failed while applying: {e:#}"),
                    },
                    Err(e) => error!("config reload rejected, the running configuration stays: {e}"),
                }
            }
            _ = term.recv() => { info!("SIGTERM: detaching"); break; }
            _ = int.recv() => { info!("SIGINT: detaching"); break; }
        }
    }
    match agent.datapath.counters() {
        Ok(counters) => {
            let summary: Vec<String> = counters
                .iter()
                .map(|(c, n)| format!("{}={n}", c.name()))
                .collect();
            info!(counters = %summary.join(" "), "data path counters");
        }
        Err(e) => warn!("reading the data path counters: {e:#}"),
    }
    drop(agent);
    info!("stopped; no program left attached");
    Ok(ExitCode::SUCCESS)
}
