//! `kanari run`: the agent as one loop.
//!
//! The loop ([`agent::Agent`]) owns the state — configuration, telemetry,
//! rollout engine, what the maps hold, the data path — and takes typed
//! [`Input`]s through one channel: ticks, reloads, operator verbs, walks of
//! the conntrack table, stop. The pure parts decide (engine, plan); the loop
//! applies their effects, then publishes an immutable [`Snapshot`] that
//! `/metrics`, `/healthz` and the control API read.
//!
//! Threads: the loop runs on a thread of its own (its bpf system calls and
//! map walks block); the tokio runtime on the main thread serves HTTP, turns
//! signals and the tick timer into inputs, and waits for the loop to end.
//! Nothing on the tick's path waits for a scrape, a socket or a disk (rollout
//! states are written by the store's own thread, conntrack is counted on
//! another).

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot, watch},
};
use tracing::{error, info, warn};

use crate::{
    api::{self, VerbRequest},
    config::{self, Config},
    datapath::ConntrackScan,
    snapshot::Snapshot,
    telemetry::Telemetry,
};

mod agent;
mod conntrack;
mod kube;

/// Exit code for a configuration that does not validate.
pub const EXIT_CONFIG: u8 = 2;

/// What the loop acts on, one at a time.
pub enum Input {
    /// Read the kernel's counters, judge, reconcile the maps.
    Tick,
    /// SIGHUP: read the configuration file again.
    Reload,
    /// An operator's verb, answered once the kernel holds its result.
    Verb(VerbRequest),
    /// A walk of the conntrack table that began at `started_ms` (agent clock).
    Conntrack {
        started_ms: u64,
        scan: Result<ConntrackScan, String>,
    },
    /// A gate's webhooks answered.
    Gate(crate::hooks::GateAnswer),
    /// A new reading of the CanaryReleases (`kubernetes:`).
    Discovered(Vec<crate::discovery::releases::Discovered>),
    /// This agent now decides for the fleet (its term), or follows (whom).
    Leading(crate::fleet::Leadership),
    /// The fleet's agents as they last reported.
    Peers(Arc<crate::fleet::Peers>),
    /// The leader's decisions as etcd holds them (`fleet:`), by service.
    Decisions(std::collections::BTreeMap<String, crate::rollout::Decision>),
    /// SIGTERM or SIGINT.
    Stop(&'static str),
}

/// The agent's monotonic clock: every duration is measured on it, from
/// when the agent started. Wall-clock steps (NTP) do not move it.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether an interface of this name exists in the agent's network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The link type of an interface (`ARPHRD_*`), from `SIOCGIFHWADDR`.
fn link_type(name: &str) -> Option<u16> {
    if name.len() >= libc::IF_NAMESIZE {
        return None;
    }
    // SAFETY: a datagram socket, closed below; the ioctl reads the name we
    // copied into a zeroed ifreq and writes only into it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        let ok = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr) == 0;
        libc::close(fd);
        ok.then_some(ifr.ifr_ifru.ifru_hwaddr.sa_family)
    }
}

/// Every configured interface is an Ethernet device: the programs parse
/// Ethernet frames, and on another link type (a tunnel, `lo`, a raw IP
/// device) they would accept traffic and never translate it.
pub fn check_interfaces(file: &str, config: &Config) -> Result<(), config::ConfigError> {
    for (i, it) in config.interfaces.iter().enumerate() {
        let kind = link_type(&it.name);
        if kind != Some(libc::ARPHRD_ETHER) {
            let what = match kind {
                Some(libc::ARPHRD_LOOPBACK) => "the loopback".to_string(),
                Some(libc::ARPHRD_NONE) => {
                    "a raw IP device (no link header: tun, wireguard)".into()
                }
                Some(t) => format!("of link type {t}, not Ethernet (1)"),
                None => "of unknown link type".into(),
            };
            return Err(config::ConfigError {
                file: file.to_string(),
                field: format!("interfaces[{i}].name"),
                message: format!(
                    "`{}` is {what}; kanari reads Ethernet frames: name the Ethernet interface where client traffic enters (`ip -d link` shows link/ether)",
                    it.name
                ),
            });
        }
    }
    Ok(())
}

/// The name of an interface index in the agent's network namespace
/// (`socket` for the socket path's counters).
fn interface_name(index: u32) -> String {
    if index == kanari_common::maps::SOCKET_IFINDEX {
        return "socket".into();
    }
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

/// Runs the agent until SIGTERM or SIGINT; the exit code to end with.
pub fn run(path: PathBuf, detach_on_exit: bool) -> ExitCode {
    let file = path.display().to_string();
    let loaded = config::read(&path).and_then(|text| {
        let c = config::parse(&file, &text, &interface_exists)?;
        check_interfaces(&file, &c)?;
        Ok((text, c))
    });
    let (text, config) = match loaded {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(path, text, config, detach_on_exit)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime's side: listeners, signals and the tick timer, around the loop's thread.
async fn serve(
    path: PathBuf,
    text: String,
    config: Config,
    detach_on_exit: bool,
) -> Result<ExitCode> {
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let config = Arc::new(config);
    let (inputs, inputs_rx) = mpsc::channel::<Input>(64);
    let (snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::starting(
        config.clone(),
        Telemetry::new(crate::status::WINDOW_SECONDS).view().clone(),
    )));
    let metrics_listener = api::bind_metrics(config.metrics_listen).await?;
    let control_listener = api::bind_control(&config.control_socket)?;
    let _socket_file = api::SocketFile(config.control_socket.clone());
    let (verbs, mut verbs_rx) = mpsc::channel::<VerbRequest>(16);
    tokio::spawn(
        axum::serve(metrics_listener, api::metrics_router(snapshots_rx.clone())).into_future(),
    );
    let status_snapshots = snapshots_rx.clone();
    let merged = Arc::new(std::sync::Mutex::new(crate::fleet::merge::Merged::default()));
    tokio::spawn(
        axum::serve(control_listener, api::control_router(snapshots_rx, verbs)).into_future(),
    );
    let (answers, mut answers_rx) = mpsc::channel(16);
    let hooks = crate::hooks::Hooks::spawn(answers);
    let to_loop = inputs.clone();
    tokio::spawn(async move {
        while let Some(a) = answers_rx.recv().await {
            if to_loop.send(Input::Gate(a)).await.is_err() {
                break;
            }
        }
    });
    let to_loop = inputs.clone();
    tokio::spawn(async move {
        while let Some(v) = verbs_rx.recv().await {
            if to_loop.send(Input::Verb(v)).await.is_err() {
                break;
            }
        }
    });

    // The tick timer: at most one tick waits in the channel, so a verb
    // never queues behind a backlog of ticks when one ran long.
    let pending = Arc::new(AtomicBool::new(false));
    let (period, mut period_rx) = watch::channel(config.tick);
    let ticker = {
        let inputs = inputs.clone();
        let pending = pending.clone();
        tokio::spawn(async move {
            let mut every = interval(*period_rx.borrow());
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if !pending.swap(true, Ordering::AcqRel) && inputs.send(Input::Tick).await.is_err() {
                            break;
                        }
                    }
                    changed = period_rx.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        every = interval(*period_rx.borrow());
                    }
                }
            }
        })
    };

    // Told when the loop has stopped: the elector hands the leadership on.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut stopping = Vec::new();
    let fleet = FleetIo {
        snapshots: status_snapshots,
        merged: merged.clone(),
        inputs: inputs.clone(),
    };
    // With `kubernetes:`, the loop starts from a complete reading of the
    // CanaryReleases: starting without would remove their services from
    // the pinned data path, which keeps steering meanwhile.
    let discovered = match &config.kubernetes {
        None => None,
        Some(k) => {
            let client = crate::discovery::watch::client(k).await?;
            let (readings, mut readings_rx) = mpsc::channel(4);
            crate::discovery::watch::spawn(client.clone(), readings);
            let lease = crate::fleet::kubernetes::settings(k);
            info!(node = %lease.identity, lease = %format!("{}/{}", lease.namespace, lease.name), "electing the agent that writes the CanaryReleases' status");
            let node = lease.identity.clone();
            let (leadership, elector) =
                crate::fleet::kubernetes::elect(client.clone(), lease.clone(), stop_rx.clone());
            stopping.push(elector);
            let advertise = crate::fleet::kubernetes::advertise(k, config.metrics_listen);
            let every = (lease.duration / 3).max(Duration::from_millis(250));
            let cadence = crate::fleet::peers::Cadence {
                report_at_most: Duration::from_millis(250),
                every,
                list_leading: every,
            };
            let board = Arc::new(crate::fleet::kubernetes::Board::new(client, lease));
            fleet.spawn(
                board,
                node,
                advertise,
                "kubernetes.advertise",
                cadence,
                leadership,
            );
            info!("listing CanaryReleases, Services and EndpointSlices");
            let mut waited = interval(Duration::from_secs(10));
            waited.tick().await;
            let first = loop {
                tokio::select! {
                    r = readings_rx.recv() => break r.context("the Kubernetes watchers ended")?,
                    _ = waited.tick() => info!("still waiting for the Kubernetes API server to list CanaryReleases, Services and EndpointSlices; the pinned data path keeps steering"),
                    _ = term.recv() => { info!("SIGTERM: stopping"); return Ok(ExitCode::SUCCESS); }
                    _ = int.recv() => { info!("SIGINT: stopping"); return Ok(ExitCode::SUCCESS); }
                }
            };
            let to_loop = inputs.clone();
            tokio::spawn(async move {
                while let Some(r) = readings_rx.recv().await {
                    if to_loop.send(Input::Discovered(r)).await.is_err() {
                        break;
                    }
                }
            });
            Some(first)
        }
    };
    // With `fleet:`, etcd: the loop starts at once (each host keeps its
    // weights until etcd answers) and takes decisions as they are read.
    if let Some(f) = &config.fleet {
        use crate::fleet::etcd;
        let client = etcd::connect(f).await?;
        let s = etcd::settings(f);
        info!(node = %s.node, fleet = %f.name, ttl = ?s.ttl, "electing the agent that decides for the fleet");
        let (session, keeper) = etcd::session::spawn(client.clone(), s.ttl, stop_rx.clone());
        let leading = Arc::default();
        let (leadership, elector) = etcd::election::elect(
            client.clone(),
            s.clone(),
            session.clone(),
            Arc::clone(&leading),
            stop_rx.clone(),
        );
        stopping.extend([elector, keeper]);
        let cadence = crate::fleet::peers::Cadence {
            report_at_most: Duration::from_millis(100),
            every: s.ttl / 3,
            list_leading: Duration::from_millis(250),
        };
        let advertise = crate::fleet::telemetry_url(f.advertise, config.metrics_listen);
        let board = Arc::new(etcd::Board::new(
            client.clone(),
            s.keys.clone(),
            session,
            leading,
        ));
        fleet.spawn(
            board,
            s.node,
            advertise,
            "fleet.advertise",
            cadence,
            leadership,
        );
        let (decisions, mut decisions_rx) = mpsc::channel(4);
        etcd::decisions::spawn(client, s.keys, decisions);
        let to_loop = inputs.clone();
        tokio::spawn(async move {
            while let Some(d) = decisions_rx.recv().await {
                if to_loop.send(Input::Decisions(d)).await.is_err() {
                    break;
                }
            }
        });
    }

    let (done, mut done_rx) = oneshot::channel();
    let conntrack_inputs = inputs.clone();
    std::thread::Builder::new()
        .name("kanari-loop".into())
        .spawn(move || {
            let code = agent::run(agent::Setup {
                path,
                text,
                discovered,
                config,
                detach_on_exit,
                inputs: inputs_rx,
                conntrack_inputs,
                snapshots,
                tick_pending: pending,
                period,
                hooks,
                merged,
            });
            let _ = done.send(code);
        })
        .context("starting the agent's loop")?;

    let code = loop {
        tokio::select! {
            _ = hup.recv() => { let _ = inputs.send(Input::Reload).await; }
            _ = term.recv() => { let _ = inputs.send(Input::Stop("SIGTERM")).await; }
            _ = int.recv() => { let _ = inputs.send(Input::Stop("SIGINT")).await; }
            code = &mut done_rx => break code.context("the agent's loop ended without a word")?,
        }
    };
    ticker.abort();
    // The loop decides no more: hand the leadership on at once.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(stopping)).await;
    code
}

/// What the fleet's tasks share with the loop.
struct FleetIo {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    merged: Arc<std::sync::Mutex<crate::fleet::merge::Merged>>,
    inputs: mpsc::Sender<Input>,
}

impl FleetIo {
    /// The fleet's tasks over a coordination engine, written once: this
    /// agent's report and the listing of the others, the leader's writes,
    /// and what the loop hears of them.
    fn spawn<C: crate::fleet::Coordination>(
        &self,
        board: Arc<C>,
        node: String,
        advertise: Option<String>,
        advertise_field: &str,
        cadence: crate::fleet::peers::Cadence,
        leadership: watch::Receiver<crate::fleet::Leadership>,
    ) {
        match &advertise {
            Some(url) => info!(url, "serving this node's telemetry to the fleet"),
            None => warn!(
                "{advertise_field} is not set and metrics.listen is every address without $HOST_IP: the deciding agent cannot pull this node's telemetry"
            ),
        }
        let peers = crate::fleet::peers::spawn(
            board.clone(),
            node.clone(),
            advertise,
            cadence,
            self.snapshots.clone(),
            leadership.clone(),
            self.merged.clone(),
        );
        crate::fleet::publish::spawn(
            board,
            self.snapshots.clone(),
            leadership.clone(),
            peers.clone(),
            node,
        );
        let (to_loop, mut peers) = (self.inputs.clone(), peers);
        tokio::spawn(async move {
            while peers.changed().await.is_ok() {
                let now = peers.borrow_and_update().clone();
                if to_loop.send(Input::Peers(now)).await.is_err() {
                    break;
                }
            }
        });
        let (to_loop, mut leadership) = (self.inputs.clone(), leadership);
        tokio::spawn(async move {
            loop {
                let now = leadership.borrow_and_update().clone();
                if to_loop.send(Input::Leading(now)).await.is_err() {
                    break;
                }
                if leadership.changed().await.is_err() {
                    break;
                }
            }
        });
    }
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// Logs how the agent ends.
fn stopped(detached: bool, pins: &std::path::Path) {
    if detached {
        info!("stopped; no program left attached");
    } else {
        info!(pins = %pins.display(), "stopped; the pinned data path keeps steering (`kanari uninstall` removes it)");
    }
}
