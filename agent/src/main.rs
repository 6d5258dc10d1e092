//! `kanari`: the command line. Each verb is a thin shell over the library.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use kanari::{
    api::{self, CommandRequest, unix_ms},
    config::{self, Config, DEFAULT_CONTROL_SOCKET},
    datapath::{ConntrackReader, Datapath, LoadOptions},
    engine::Engine,
    pins::Pins,
    plan::{self, Applied},
    rollout::Action,
    status,
    telemetry::{BackendKey, GroupName},
    view::{RolloutView, View},
};
use kanari_common::maps::Group;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;
/// How often the conntrack table's entries are counted (a read of the whole table).
/// How often the conntrack entries are counted, at most.
const CONNTRACK_COUNT_EVERY: Duration = Duration::from_secs(2);
/// The counting thread waits this many times its last walk's duration, at
/// least: its share of a core stays under 1 / (1 + this), about 2 %.
const CONNTRACK_COUNT_PAUSE_FACTOR: u32 = 50;

/// The pause before the next conntrack count, after a walk that took `walk`:
/// 2 s for a small table, 32 s for a full 1,000,000-connection one (0.64 s).
fn conntrack_count_pause(walk: Duration) -> Duration {
    CONNTRACK_COUNT_EVERY.max(walk.saturating_mul(CONNTRACK_COUNT_PAUSE_FACTOR))
}

/// Counts the conntrack entries for `kanari_conntrack_entries` on a thread of
/// its own. Counting walks every entry (`BPF_MAP_LOOKUP_BATCH`, ~0.3 µs each),
/// which on the tick would delay the critical path by as much (0.64 s for a
/// full million-connection table) and compete with the data path's own work.
/// Counts the conntrack entries into the view; returns how long the walk took.
fn count_conntrack(reader: &ConntrackReader, view: &api::Shared) -> Result<Duration> {
    let t = Instant::now();
    let n = reader.entries()?;
    view.lock().expect("view lock").conntrack_entries = Some(n);
    Ok(t.elapsed())
}

/// `walk` is how long the last count took.
fn spawn_conntrack_counter(
    reader: ConntrackReader,
    view: api::Shared,
    mut walk: Duration,
) -> Result<()> {
    std::thread::Builder::new()
        .name("kanari-ct-count".into())
        .spawn(move || {
            loop {
                std::thread::sleep(conntrack_count_pause(walk));
                match count_conntrack(&reader, &view) {
                    Ok(took) => walk = took,
                    Err(e) => warn!("counting conntrack entries: {e:#}"),
                }
            }
        })
        .context("starting the conntrack counting thread")?;
    Ok(())
}

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
    /// Rollout commands.
    Rollout {
        #[command(subcommand)]
        command: RolloutVerb,
    },
}

#[derive(Subcommand)]
enum RolloutVerb {
    /// Start the service's rollout again from its first step.
    Start { service: String },
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
        Command::Run {
            config,
            detach_on_exit,
        } => block_on(run(config, detach_on_exit)),
        Command::Uninstall { config } => uninstall(config),
        Command::Status { json, watch } => block_on(show_status(socket, json, watch)),
        Command::Pause { service } => block_on(command(socket, service, "pause", None)),
        Command::Resume { service } => block_on(command(socket, service, "resume", None)),
        Command::Promote { service } => block_on(command(socket, service, "promote", None)),
        Command::Abort { service } => block_on(command(socket, service, "abort", None)),
        Command::SetWeight { service, percent } => {
            let body = serde_json::to_string(&api::WeightBody { percent }).expect("serializable");
            block_on(command(socket, service, "weight", Some(body)))
        }
        Command::Rollout {
            command: RolloutVerb::Start { service },
        } => block_on(command(socket, service, "start", None)),
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

async fn command(
    socket: PathBuf,
    service: String,
    verb: &str,
    body: Option<String>,
) -> Result<ExitCode> {
    let (status, answer) = api::control_request(
        &socket,
        &format!("/v1/services/{service}/{verb}"),
        Some(body.unwrap_or_default()),
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

/// The running agent: the data path, the rollouts, what it was last told,
/// what it shows.
struct Agent {
    datapath: Datapath,
    applied: Applied,
    /// The configuration as loaded (resource sizes fixed at start).
    config: Config,
    engine: Engine,
    view: api::Shared,
    started: Instant,
}

impl Agent {
    /// Takes in a (re)loaded configuration: rollouts first, then the maps,
    /// then the attachments, so the first packet an attached program sees
    /// finds its services at the weights the rollouts want.
    fn apply(&mut self, config: Config) -> Result<()> {
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
            ("state.dir", config.state_dir != self.config.state_dir),
            ("bpf.pin_dir", config.pin_dir != self.config.pin_dir),
        ];
        for (field, changed) in fixed_at_start {
            if changed {
                warn!(field, "this setting takes effect when the agent restarts");
            }
        }
        let config = Config {
            conntrack_connections: self.config.conntrack_connections,
            max_backends: self.config.max_backends,
            metrics_listen: self.config.metrics_listen,
            control_socket: self.config.control_socket.clone(),
            state_dir: self.config.state_dir.clone(),
            pin_dir: self.config.pin_dir.clone(),
            ..config
        };
        self.engine.sync(&config, unix_ms());
        self.config = config;
        self.datapath
            .set_guard(self.config.new_connections_per_second)?;
        let written = self.write_maps()?;
        for s in &written {
            self.engine.written(s, unix_ms());
        }
        for (name, how) in self.datapath.attach_all(&self.config.interfaces)? {
            info!(interface = %name, mode = how.name(), "attached");
        }
        for s in &self.view.lock().expect("view lock").config.services {
            info!(
                service = %s.name,
                vip = %s.vip,
                canary_weight = format!("{}%", s.canary_weight as f64 / 100.0),
                stable = s.stable.len(),
                canary = s.canary.len(),
                segments = s.segments.len(),
                rollout = s.rollout.is_some(),
                "service"
            );
        }
        let names: Vec<String> = self
            .config
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        self.view
            .lock()
            .expect("view lock")
            .telemetry
            .retain_services(|s| names.iter().any(|n| n == s));
        self.refresh_rollouts();
        Ok(())
    }

    /// Writes the configuration the rollouts want into the maps; returns the
    /// services whose map value changed.
    fn write_maps(&mut self) -> Result<Vec<String>> {
        let effective = self.engine.effective(&self.config);
        let (ops, next) = plan::plan(&self.applied, &effective).map_err(anyhow::Error::msg)?;
        self.datapath.apply(&ops)?;
        let changed = next
            .services
            .iter()
            .filter(|(vip, s)| {
                self.applied
                    .services
                    .get(vip)
                    .is_none_or(|o| o.value != s.value)
            })
            .map(|(_, s)| s.name.clone())
            .collect();
        self.applied = next;
        self.view.lock().expect("view lock").config = effective;
        Ok(changed)
    }

    /// Carries out what the rollouts decided.
    fn act(&mut self, decided: Vec<(String, Vec<Action>)>) -> Result<()> {
        if decided
            .iter()
            .flat_map(|(_, a)| a)
            .any(|a| matches!(a, Action::SetWeight(_) | Action::CanarySegments(_)))
        {
            for s in self.write_maps()? {
                self.engine.written(&s, unix_ms());
            }
        }
        for (service, actions) in &decided {
            if actions.contains(&Action::CutCanary) {
                let id = self
                    .applied
                    .services
                    .values()
                    .find(|s| &s.name == service)
                    .map(|s| s.value.id);
                if let Some(id) = id {
                    let n = self.datapath.cut(id, Group::Canary)?;
                    info!(service = %service, connections = n, "cut the canary's connections");
                }
            }
        }
        self.refresh_rollouts();
        Ok(())
    }

    fn refresh_rollouts(&self) {
        let mut view = self.view.lock().expect("view lock");
        view.rollouts = self
            .config
            .services
            .iter()
            .filter_map(|s| {
                let state = self.engine.state(&s.name)?.clone();
                Some((
                    s.name.clone(),
                    RolloutView {
                        state,
                        critical: self.engine.critical(&s.name).to_vec(),
                    },
                ))
            })
            .collect();
        view.rollout_counts = self.engine.counts.clone();
    }

    /// Reads the kernel's counters into the view, then runs the rollouts on them.
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
        let decided = {
            let mut view = self.view.lock().expect("view lock");
            view.telemetry.update(now_ns, reads);
            view.counters = counters;
            self.engine.tick(&self.config, &view.telemetry, unix_ms())
        };
        self.act(decided)
    }

    /// An operator's command from the control socket.
    fn command(&mut self, req: CommandRequest) {
        let reply = match self
            .engine
            .command(&self.config, &req.service, req.command, unix_ms())
        {
            Ok(actions) => match self.act(vec![(req.service.clone(), actions)]) {
                Ok(()) => {
                    let s = self.engine.state(&req.service).expect("commanded");
                    Ok(format!(
                        "{} at {}%: {}",
                        s.phase.name().replace('_', " "),
                        s.weight as f64 / 100.0,
                        s.reason
                    ))
                }
                Err(e) => Err(format!("{e:#}")),
            },
            Err(refused) => Err(refused.0),
        };
        let _ = req.reply.send(reply);
    }
}

async fn run(path: PathBuf, detach_on_exit: bool) -> Result<ExitCode> {
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
    let (commands_tx, mut commands) = mpsc::channel::<CommandRequest>(16);
    let metrics_listener = api::bind_metrics(config.metrics_listen).await?;
    let control_listener = api::bind_control(&config.control_socket)?;
    let _socket_file = api::SocketFile(config.control_socket.clone());
    tokio::spawn(axum::serve(metrics_listener, api::metrics_router(view.clone())).into_future());
    tokio::spawn(
        axum::serve(
            control_listener,
            api::control_router(view.clone(), commands_tx),
        )
        .into_future(),
    );

    let datapath = Datapath::load(LoadOptions {
        conntrack_connections: config.conntrack_connections,
        max_backends: config.max_backends,
        pins: Some(Pins::new(&config.pin_dir)),
    })?;
    // An adopted data path: learn what its maps hold, so the plan writes only
    // what differs and the counters carry on.
    let applied = if datapath.adopted {
        datapath.read_applied(&config)?
    } else {
        Applied::default()
    };
    view.lock().expect("view lock").telemetry.adopt(
        applied
            .services
            .values()
            .flat_map(|s| s.backends.iter().flatten().map(|(_, id)| *id)),
    );
    let mut agent = Agent {
        datapath,
        applied,
        engine: Engine::new(&config.state_dir),
        config: config.clone(),
        view: view.clone(),
        started: Instant::now(),
    };
    agent.apply(config)?;
    agent.tick()?;
    let conntrack = agent.datapath.conntrack_reader()?;
    let walk = count_conntrack(&conntrack, &view)?;
    spawn_conntrack_counter(conntrack, view.clone(), walk)?;
    view.lock().expect("view lock").ready = true;
    kanari::notify::notify(&format!(
        "READY=1\nSTATUS=steering {} service(s) on {} interface(s)",
        agent.config.services.len(),
        agent.config.interfaces.len()
    ));
    info!(
        config = %path.display(),
        services = agent.config.services.len(),
        interfaces = agent.config.interfaces.len(),
        metrics = %agent.config.metrics_listen,
        control = %agent.config.control_socket.display(),
        "ready"
    );

    let path_of_pins = agent.config.pin_dir.clone();
    let mut ticks = tokio::time::interval(agent.config.tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if let Err(e) = agent.tick() {
                    warn!("tick: {e:#}");
                }
            }
            Some(req) = commands.recv() => agent.command(req),
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
                    Err(e) => {
                        view.lock().expect("view lock").reload_failures += 1;
                        error!("config reload rejected, the running configuration stays: {e}");
                    }
                }
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
        }
    }
    view.lock().expect("view lock").ready = false;
    kanari::notify::notify("STOPPING=1");
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
    if detach_on_exit {
        agent.datapath.uninstall()?;
        drop(agent);
        info!("stopped; no program left attached");
    } else {
        drop(agent);
        info!(pins = %path_of_pins.display(), "stopped; the pinned data path keeps steering (`kanari uninstall` removes it)");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_counting_backs_off_with_the_walk() {
        // A small table: every 2 s.
        assert_eq!(
            conntrack_count_pause(Duration::from_millis(3)),
            Duration::from_secs(2)
        );
        // A full million-connection table (0.64 s a walk): every 32 s, so
        // counting takes under 2 % of a core.
        let walk = Duration::from_millis(640);
        let pause = conntrack_count_pause(walk);
        assert_eq!(pause, Duration::from_secs(32));
        assert!(walk.as_secs_f64() / (walk + pause).as_secs_f64() < 0.02);
    }
}
