//! `kanari`: the command line. Each verb is a thin shell over the library.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kanari::{
    api,
    config::{self, Config, DEFAULT_CONTROL_SOCKET},
    datapath::Datapath,
    plan::{self, Applied},
    status,
    telemetry::{BackendKey, GroupName},
    view::View,
};
use kanari_common::maps::Group;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;
/// How often the conntrack table's entries are counted (a read of the whole table).
const CONNTRACK_COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "kanari",
    version,
    about = "Canary releases without a service mesh: eBPF splits each service's new connections \
             between stable and canary backends by weight, and measures them, in the kernel."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground: load and attach the data path, apply the
    /// configuration, serve /metrics and the control socket, reload the
    /// configuration on SIGHUP, detach everything on SIGTERM or SIGINT.
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
    /// Show each service's weight and, per version, requests/s, error rate,
    /// time to first byte, connect time and TCP errors over the last 10 s,
    /// from a running agent.
    Status {
        /// The agent's control socket (control.socket in its config).
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
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
        Command::Run { config } => block_on(run(config)),
        Command::Status { socket, json } => block_on(show_status(socket, json)),
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

async fn show_status(socket: PathBuf, json: bool) -> Result<ExitCode> {
    let body = api::control_get(&socket, "/v1/status").await?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
    } else {
        let report: status::StatusReport =
            serde_json::from_slice(&body).context("reading the agent's answer")?;
        print!("{}", status::render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether an interface of this name exists in the agent's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The name of an interface index in the agent's network namespace.
fn interface_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The running agent: the data path, what it was last told, what it shows.
struct Agent {
    datapath: Datapath,
    applied: Applied,
    /// The configuration in force (resource sizes fixed at start).
    config: Config,
    view: api::Shared,
    started: Instant,
    conntrack_counted: Option<Instant>,
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
        let fixed_at_start = [
            (
                "conntrack.connections",
                config.conntrack_connections != self.config.conntrack_connections,
            ),
            (
                "limits.backends",
                config.max_backends != self.config.max_backends,
            ),
            (
                "metrics.listen",
                config.metrics_listen != self.config.metrics_listen,
            ),
            (
                "control.socket",
                config.control_socket != self.config.control_socket,
            ),
        ];
        for (field, changed) in fixed_at_start {
            if changed {
                warn!(field, "this setting takes effect when the agent restarts");
            }
        }
        self.config = Config {
            conntrack_connections: self.config.conntrack_connections,
            max_backends: self.config.max_backends,
            metrics_listen: self.config.metrics_listen,
            control_socket: self.config.control_socket.clone(),
            ..config
        };
        let mut view = self.view.lock().expect("view lock");
        view.config = self.config.clone();
        let names: Vec<String> = self
            .config
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        view.telemetry
            .retain_services(|s| names.iter().any(|n| n == s));
        Ok(())
    }

    /// Reads the kernel's counters into the view.
    fn tick(&mut self) -> Result<()> {
        let now_ns = self.started.elapsed().as_nanos() as u64;
        let mut reads = Vec::new();
        for s in self.applied.services.values() {
            for g in [Group::Stable, Group::Canary] {
                for (addr, id) in &s.backends[g as usize] {
                    let key = BackendKey {
                        service: s.name.clone(),
                        group: GroupName(g),
                        addr: *addr,
                    };
                    reads.push((*id, key, self.datapath.backend_stats(*id)?));
                }
            }
        }
        let counters: Vec<_> = self
            .datapath
            .counters()?
            .into_iter()
            .map(|(ifindex, c, n)| (interface_name(ifindex), c, n))
            .collect();
        let conntrack = if self
            .conntrack_counted
            .is_none_or(|t| t.elapsed() >= CONNTRACK_COUNT_EVERY)
        {
            self.conntrack_counted = Some(Instant::now());
            Some(self.datapath.conntrack_entries()?)
        } else {
            None
        };
        let mut view = self.view.lock().expect("view lock");
        view.telemetry.update(now_ns, reads);
        view.counters = counters;
        if conntrack.is_some() {
            view.conntrack_entries = conntrack;
        }
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

    let view: api::Shared = Arc::new(Mutex::new(View::new(config.clone())));
    let metrics_listener = api::bind_metrics(config.metrics_listen).await?;
    let control_listener = api::bind_control(&config.control_socket)?;
    let _socket_file = api::SocketFile(config.control_socket.clone());
    tokio::spawn(axum::serve(metrics_listener, api::metrics_router(view.clone())).into_future());
    tokio::spawn(axum::serve(control_listener, api::control_router(view.clone())).into_future());

    let datapath = Datapath::load(config.conntrack_connections, config.max_backends)?;
    let mut agent = Agent {
        datapath,
        applied: Applied::default(),
        config: config.clone(),
        view: view.clone(),
        started: Instant::now(),
        conntrack_counted: None,
    };
    agent.apply(config)?;
    agent.tick()?;
    view.lock().expect("view lock").ready = true;
    info!(
        config = %path.display(),
        services = agent.config.services.len(),
        interfaces = agent.config.interfaces.len(),
        metrics = %agent.config.metrics_listen,
        control = %agent.config.control_socket.display(),
        "ready"
    );

    let mut ticks = tokio::time::interval(agent.config.tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if let Err(e) = agent.tick() {
                    warn!("reading the kernel's counters: {e:#}");
                }
            }
            _ = hup.recv() => {
                match config::load(&path, &interface_exists) {
                    Ok(c) => {
                        let tick = c.tick;
                        match agent.apply(c) {
                            Ok(()) => {
                                if tick != ticks.period() {
                                    ticks = tokio::time::interval(tick);
                                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                                }
                                info!(config = %path.display(), "config reloaded");
                            }
                            Err(e) => error!("config reload failed while applying: {e:#}"),
                        }
                    }
                    Err(e) => error!("config reload rejected, the running configuration stays: {e}"),
                }
            }
            _ = term.recv() => { info!("SIGTERM: detaching"); break; }
            _ = int.recv() => { info!("SIGINT: detaching"); break; }
        }
    }
    view.lock().expect("view lock").ready = false;
    match agent.datapath.counter_totals() {
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
