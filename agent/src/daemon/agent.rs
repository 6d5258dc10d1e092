//! The loop's state and what each input does to it.
//!
//! Every tick reconciles: it reads back what the kernel's maps hold, plans
//! the writes that make them hold what the configuration and the rollouts
//! want, and applies them. A write that fails is counted and retried on the
//! next tick; `/healthz` says not ready once the kernel has disagreed for a
//! few seconds. A verb is answered only when the kernel holds its result.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use kanari_common::maps::Group;
use std::{collections::HashSet, sync::atomic::AtomicU64};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{Clock, EXIT_CONFIG, Input, conntrack, interface_exists, interface_name};
use crate::{
    api::{VerbError, VerbRequest, unix_ms},
    config::{self, Config, ConfigError},
    config::{DEFAULT_REQUEST_TIMEOUT, Service},
    datapath::{ConntrackScan, Datapath, LoadOptions, Pending},
    discovery::releases::{Discovered, Known, service_name},
    fleet::merge::{Merged, Served},
    hooks::{GateAnswer, Hooks},
    pins::Pins,
    plan::{self, Applied, Quarantine},
    record::{self, Differ, Recorder},
    rollout::{Action, Engine, Event, Store},
    snapshot::{ConntrackExpired, RolloutView, Snapshot, TickStats},
    telemetry::{BackendKey, GroupName, Telemetry},
    verb::Verb,
};

/// A service's request timeout: its analysis's, or the default.
fn request_timeout(s: &Service) -> Duration {
    s.rollout
        .as_ref()
        .map_or(DEFAULT_REQUEST_TIMEOUT, |r| r.analysis.request_timeout)
}

/// Every rollout as published, by service.
type Rollouts = Arc<BTreeMap<String, RolloutView>>;

/// How much of what the kernel holds a reconcile reads back after writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Nothing: a verb is answered once its writes are done.
    None,
    /// Every service's map value (one lookup each); everything when one
    /// differs, and at least every [`FULL_CHECK_EVERY`].
    Cheap,
    /// Every service, backend set and segment.
    Full,
}

/// How often a tick reads back everything the maps hold, at least.
const FULL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the loop starts from.
pub(super) struct Setup {
    pub path: PathBuf,
    /// The configuration file's text, as validated into `config`.
    pub text: String,
    /// With `kubernetes:`, the first reading of the CanaryReleases.
    pub discovered: Option<Vec<Discovered>>,
    pub config: Arc<Config>,
    pub detach_on_exit: bool,
    pub inputs: mpsc::Receiver<Input>,
    /// For the conntrack walks' results.
    pub conntrack_inputs: mpsc::Sender<Input>,
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    /// Set by the timer when it queues a tick, cleared when one is taken.
    pub tick_pending: Arc<AtomicBool>,
    /// The tick period, for the timer.
    pub period: watch::Sender<Duration>,
    /// The webhooks' tasks.
    pub hooks: Hooks,
    /// The other nodes' counters, pulled by the fleet's task while this
    /// agent decides.
    pub merged: Arc<Mutex<Merged>>,
}

struct Agent {
    path: PathBuf,
    /// The configuration file's text in force (discovered releases are
    /// validated beside it).
    file_text: String,
    /// The CanaryReleases read (`kubernetes:`).
    known: Known,
    /// Our term while this agent decides for the fleet (`kubernetes:`,
    /// `fleet:`).
    leading: Option<u32>,
    /// Who leads, when last known.
    leader: Option<String>,
    /// This node's name in the fleet.
    node: Option<String>,
    /// This node's own counters of the discovered services, as last read.
    served: Arc<Vec<Served>>,
    /// The other nodes' counters, as the deciding agent pulls them.
    merged: Arc<Mutex<Merged>>,
    /// The fleet's agents as they last reported.
    peers: Arc<crate::fleet::Peers>,
    /// What the judges read with a fleet: this node's
    /// counters and, while leading, the other nodes'.
    fleet_telemetry: Option<Telemetry>,
    /// Removed services draining, by service id: since when (agent clock).
    draining_since: BTreeMap<u32, u64>,
    /// Removed services with no conntrack entry left: the next plan deletes them.
    drained: BTreeSet<u32>,
    clock: Clock,
    datapath: Datapath,
    /// What the maps held when last read back, or were last written to hold.
    applied: Applied,
    /// The configuration in force (resource sizes fixed at start).
    config: Arc<Config>,
    engine: Engine,
    telemetry: Telemetry,
    quarantine: Quarantine,
    counters: Arc<Vec<(String, kanari_common::maps::Counter, u64)>>,
    conntrack_entries: Option<u64>,
    /// Connections the walks removed, idle past their timeouts.
    conntrack_expired: ConntrackExpired,
    reload_failures: u64,
    write_failures: u64,
    /// Since when the kernel has not held what is wanted, and the last error.
    disagreement: Option<(Instant, String)>,
    /// When everything the maps hold was last read back.
    last_full: Instant,
    /// The rollouts as last published, and the engine's and configuration's
    /// generations they were copied at.
    rollouts: (Option<(u64, u64)>, Rollouts),
    /// The shortest request timeout of the services (ns), for the conntrack walks.
    pending_after: Arc<AtomicU64>,
    /// Requests and attempts already counted as timed out (until the walks
    /// no longer see them).
    timed_out: HashSet<Pending>,
    /// Counts the configurations taken in (each reload adds one).
    config_generation: u64,
    /// The configuration (by generation) and overrides the maps last took in full.
    written_for: Option<(u64, BTreeMap<String, plan::Override>)>,
    ready: bool,
    ticks: TickStats,
    snapshots: watch::Sender<Arc<Snapshot>>,
    period: watch::Sender<Duration>,
    hooks: Hooks,
    /// `telemetry.record`: the writer, and the totals its last tick was taken from.
    recorder: Option<(Recorder, Differ)>,
}

/// Runs the loop until a stop input; the exit code.
pub(super) fn run(setup: Setup) -> Result<ExitCode> {
    let Setup {
        path,
        text,
        discovered,
        config,
        detach_on_exit,
        mut inputs,
        conntrack_inputs,
        snapshots,
        tick_pending,
        period,
        hooks,
        merged,
    } = setup;
    let clock = Clock::new();
    let store = Store::new(&config.state_dir);
    let engine = Engine::new(store);
    // The release train's rule holds at start too: the persisted rollouts
    // know which version serves.
    let mut known = Known::default();
    let mut toggled = Vec::new();
    let config = match discovered {
        Some(readings) => {
            toggled = known.read(readings).toggled;
            match super::kube::compose(&engine, &path, &text, &mut known) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    error!("{e}");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            }
        }
        None => config,
    };
    if let Err((field, message)) = engine.admit(&config) {
        error!(
            "{}",
            ConfigError {
                file: path.display().to_string(),
                field,
                message,
            }
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let datapath = Datapath::load(LoadOptions {
        conntrack_connections: config.conntrack_connections,
        max_backends: config.max_backends,
        pins: Some(Pins::new(&config.pin_dir)),
        socket_lb: config.socket_lb.is_some(),
    })?;
    // The maps have the sizes configured: a pinned map of another size was
    // made anew with its contents carried over (Datapath::load).
    debug_assert_eq!(datapath.sizes.max_backends, config.max_backends);
    // Recording starts once the configuration is taken and the data path loaded.
    let recorder = match &config.record {
        Some(r) => {
            let header = record::Header {
                format: record::FORMAT.into(),
                version: record::VERSION,
                config_path: path.display().to_string(),
                config: std::fs::read_to_string(&path).unwrap_or_default(),
                started_unix_ms: unix_ms(),
            };
            let recorder = Recorder::start(r.path.clone(), r.max_bytes, header)?;
            info!(path = %r.path.display(), "recording the judges' telemetry");
            Some((recorder, Differ::default()))
        }
        None => None,
    };
    // An adopted data path: learn what its maps hold, so the plan writes only
    // what differs and the counters carry on.
    let applied = if datapath.adopted {
        datapath.read_applied(&config)?
    } else {
        Applied::default()
    };
    let adopted_ids = || {
        applied
            .services
            .values()
            .flat_map(|s| s.backends.iter().flatten().map(|(_, id)| *id))
    };
    let mut telemetry = Telemetry::new(crate::status::WINDOW_SECONDS);
    telemetry.adopt(adopted_ids());
    telemetry.socket_slots_from(datapath.socket_slots_from()?);
    // With a fleet, the judges read another telemetry: this node's counters
    // and the others' (the leader's). Metrics and status stay this node's.
    let fleet_telemetry = (config.kubernetes.is_some() || config.fleet.is_some()).then(|| {
        let mut t = Telemetry::new(crate::status::WINDOW_SECONDS);
        t.adopt(adopted_ids());
        t
    });
    let reader = datapath.conntrack_reader()?;
    let walked = Instant::now();
    // Nothing is pending yet for this agent: the first walk counts sizes and ids.
    let first = reader.scan(u64::MAX, &config.conntrack_timeouts)?;
    let walk = walked.elapsed();
    let mut quarantine = Quarantine::default();
    // Ids in conntrack that nothing adopted owns: backends removed while no
    // agent ran, still draining.
    let owned: BTreeSet<u32> = applied.backend_ids().into_values().collect();
    quarantine.hold(first.backend_ids.difference(&owned).copied(), 0);
    let mut agent = Agent {
        path,
        file_text: text,
        known,
        leading: None,
        leader: None,
        node: match (&config.kubernetes, &config.fleet) {
            (Some(k), _) => Some(crate::fleet::kubernetes::settings(k).identity),
            (_, Some(f)) => Some(crate::fleet::etcd::settings(f).node),
            _ => None,
        },
        served: Arc::default(),
        merged,
        peers: Arc::default(),
        fleet_telemetry,
        draining_since: BTreeMap::new(),
        drained: BTreeSet::new(),
        clock,
        datapath,
        applied,
        config: config.clone(),
        engine,
        telemetry,
        quarantine,
        counters: Arc::default(),
        conntrack_entries: Some(first.entries),
        conntrack_expired: ConntrackExpired::default(),
        reload_failures: 0,
        write_failures: 0,
        disagreement: None,
        last_full: Instant::now(),
        rollouts: (None, Arc::default()),
        pending_after: Arc::new(AtomicU64::new(u64::MAX)),
        timed_out: HashSet::new(),
        config_generation: 0,
        written_for: None,
        ready: false,
        ticks: TickStats::default(),
        snapshots,
        period,
        hooks,
        recorder,
    };
    agent.apply(Arc::unwrap_or_clone(config))?;
    agent.pause_as_specified(toggled);
    // Until elected, a CanaryRelease's weight is the leader's (or stays).
    agent.leading(None);
    agent.tick();
    agent.conntrack_expired.add(&first);
    conntrack::spawn(
        reader,
        agent.clock,
        conntrack_inputs,
        walk,
        agent.pending_after.clone(),
        agent.config.conntrack_timeouts,
    )?;
    agent.ready = true;
    agent.publish();
    crate::notify::notify(&format!(
        "READY=1\nSTATUS=steering {} service(s) on {} interface(s)",
        agent.config.services.len(),
        agent.config.interfaces.len()
    ));
    info!(
        config = %agent.path.display(),
        services = agent.config.services.len(),
        interfaces = agent.config.interfaces.len(),
        metrics = %agent.config.metrics_listen,
        control = %agent.config.control_socket.display(),
        "ready"
    );

    while let Some(input) = inputs.blocking_recv() {
        match input {
            Input::Tick => {
                tick_pending.store(false, Ordering::Release);
                agent.tick();
            }
            Input::Reload => agent.reload(),
            Input::Verb(req) => {
                agent.verb(req);
                continue; // published before answering
            }
            Input::Conntrack { started_ms, scan } => agent.walked(started_ms, scan),
            Input::Gate(answer) => agent.gate(answer),
            Input::Discovered(readings) => agent.discovered(readings),
            Input::Leading(l) => {
                agent.leader = l.holder;
                if l.term != agent.leading {
                    agent.leading(l.term);
                }
                agent.publish();
            }
            Input::Peers(peers) => agent.peers(peers),
            Input::Decisions(d) => {
                agent.known.take_decisions(d);
                agent.follow_decisions();
                agent.publish();
            }
            Input::Stop(why) => {
                info!("{why}: stopping");
                break;
            }
        }
        agent.publish();
    }
    agent.stop(detach_on_exit)
}

impl Agent {
    /// Takes in a (re)loaded configuration that passed validation and the
    /// release train's rule: rollouts first, then the maps, then the
    /// attachments, so the first packet an attached program sees finds its
    /// services at the weights the rollouts want.
    fn apply(&mut self, config: Config) -> Result<()> {
        let fixed_at_start = [
            (
                "conntrack.connections",
                config.conntrack_connections != self.config.conntrack_connections,
            ),
            (
                "conntrack.timeouts",
                config.conntrack_timeouts != self.config.conntrack_timeouts,
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
            ("telemetry.record", config.record != self.config.record),
            ("kubernetes", config.kubernetes != self.config.kubernetes),
            ("fleet", config.fleet != self.config.fleet),
            ("socket_lb", config.socket_lb != self.config.socket_lb),
        ];
        for (field, changed) in fixed_at_start {
            if changed {
                warn!(field, "this setting takes effect when the agent restarts");
            }
        }
        let config = Config {
            conntrack_connections: self.config.conntrack_connections,
            conntrack_timeouts: self.config.conntrack_timeouts,
            max_backends: self.config.max_backends,
            metrics_listen: self.config.metrics_listen,
            control_socket: self.config.control_socket.clone(),
            state_dir: self.config.state_dir.clone(),
            pin_dir: self.config.pin_dir.clone(),
            record: self.config.record.clone(),
            kubernetes: self.config.kubernetes.clone(),
            fleet: self.config.fleet.clone(),
            socket_lb: self.config.socket_lb.clone(),
            ..config
        };
        self.engine.sync(&config, self.clock.now_ms());
        self.config = Arc::new(config);
        self.config_generation += 1;
        let shortest = self
            .config
            .services
            .iter()
            .map(request_timeout)
            .min()
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        self.pending_after
            .store(shortest.as_nanos() as u64, Ordering::Relaxed);
        let longest_window = self
            .config
            .services
            .iter()
            .filter_map(|s| Some(s.rollout.as_ref()?.analysis.critical.window))
            .max()
            .unwrap_or_default();
        self.telemetry.keep_recent(longest_window.as_nanos() as u64);
        if let Some(t) = &mut self.fleet_telemetry {
            t.keep_recent(longest_window.as_nanos() as u64);
        }
        self.datapath
            .set_guard(self.config.new_connections_per_second)?;
        // A map write that fails is retried every tick (and reported): the
        // interfaces are attached all the same.
        let _ = self.reconcile(Check::Full);
        for (name, how) in self.datapath.attach_all(&self.config.interfaces)? {
            info!(interface = %name, mode = how.name(), "attached");
        }
        if let Some(s) = &self.config.socket_lb {
            let cgroup = crate::config::socket_cgroup(s)?;
            self.datapath.attach_socket(Some(&cgroup))?;
        }
        let overrides = self.overrides();
        for s in &self.config.services {
            let weight = overrides.get(&s.name).map_or(s.canary_weight, |o| o.weight);
            info!(
                service = %s.name,
                vip = %s.vip,
                canary_weight = format!("{}%", weight as f64 / 100.0),
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
        self.telemetry
            .retain_services(|s| names.iter().any(|n| n == s));
        if let Some(t) = &mut self.fleet_telemetry {
            t.retain_services(|s| names.iter().any(|n| n == s));
        }
        if self.config.tick != *self.period.borrow() {
            let _ = self.period.send(self.config.tick);
        }
        Ok(())
    }

    /// Makes the kernel's maps hold what the configuration and the rollouts
    /// want: writes the difference from what they are believed to hold, then
    /// checks what they hold (`check`) and writes again what differs. On
    /// failure the kernel keeps what it had; the next tick tries again.
    fn reconcile(&mut self, check: Check) -> Result<()> {
        let result = self.try_reconcile(check);
        match &result {
            Ok(()) => {
                if self.disagreement.take().is_some() {
                    info!("the kernel holds the wanted data path again");
                }
            }
            Err(e) => {
                self.write_failures += 1;
                let why = format!("{e:#}");
                warn!(
                    "the kernel does not hold the wanted data path, retrying on the next tick: {why}"
                );
                match &mut self.disagreement {
                    Some((_, last)) => *last = why,
                    None => self.disagreement = Some((Instant::now(), why)),
                }
            }
        }
        result
    }

    fn try_reconcile(&mut self, check: Check) -> Result<()> {
        // The weights decided now reach the kernel first; checking comes after.
        let written = self.write_wanted();
        let full = match check {
            Check::Full => true,
            _ if written.is_err() || self.disagreement.is_some() => true,
            Check::Cheap if self.last_full.elapsed() >= FULL_CHECK_EVERY => true,
            Check::Cheap => self.services_drifted()?,
            Check::None => false,
        };
        if !full {
            return written;
        }
        self.last_full = Instant::now();
        let kernel = self
            .datapath
            .read_applied(&self.config)
            .context("reading back the data path's maps")?;
        if kernel != self.applied {
            debug!("the maps differ from what was last written; planning from what they hold");
            self.applied = kernel;
            self.written_for = None;
        }
        self.write_wanted()
    }

    /// Whether a service's map value differs from what was last written (a
    /// lookup per service: cheap enough for every tick).
    fn services_drifted(&self) -> Result<bool> {
        for s in self.applied.services.values() {
            if self.datapath.service(&s.key)? != Some(s.value) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Plans from what the maps are believed to hold and writes the
    /// difference; nothing to plan when neither the configuration nor the
    /// rollouts' overrides changed since the maps last took them.
    fn write_wanted(&mut self) -> Result<()> {
        let overrides = self.overrides();
        let wanted = (self.config_generation, overrides);
        if self.written_for.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let plan = plan::plan(
            &self.applied,
            &self.config,
            &wanted.1,
            &self.quarantine.held(),
            &self.drained,
        )
        .map_err(|e| anyhow!("planning the map writes: {e}"))?;
        if !plan.reclaimed.is_empty() {
            warn!(ids = ?plan.reclaimed, "no free backend id: reusing ids whose conntrack entries may not have drained (raise limits.backends)");
        }
        if plan.ops.is_empty() {
            self.written_for = Some(wanted);
            return Ok(());
        }
        // New backends' slots, read before the kernel can count for them.
        let before = self.applied.backend_ids();
        for (vip, s) in &plan.next.services {
            for g in [Group::Stable, Group::Canary] {
                for (addr, id) in &s.backends[g as usize] {
                    if before.get(&(*vip, g, *addr)) != Some(id) {
                        let baseline = self.datapath.backend_stats(*id)?;
                        let key = BackendKey {
                            service: s.name.as_str().into(),
                            group: GroupName(g),
                            addr: *addr,
                        };
                        if let Some(t) = &mut self.fleet_telemetry {
                            let judged_as = self
                                .config
                                .services
                                .iter()
                                .find(|c| c.name == s.name)
                                .and_then(|c| c.follows.as_deref())
                                .unwrap_or(&s.name);
                            let key = BackendKey {
                                service: judged_as.into(),
                                ..key.clone()
                            };
                            t.expect(*id, key, &baseline);
                        }
                        self.telemetry.expect(*id, key, &baseline);
                    }
                }
            }
        }
        self.datapath.apply(&plan.ops)?;
        let now = unix_ms();
        let changed: Vec<String> = plan
            .next
            .services
            .iter()
            .filter(|(vip, s)| {
                self.applied
                    .services
                    .get(vip)
                    .is_none_or(|o| o.value.canary_weight != s.value.canary_weight)
            })
            .map(|(_, s)| s.name.clone())
            .collect();
        for s in changed {
            self.engine.written(&s, now);
        }
        self.quarantine
            .hold_freed(&self.applied, &plan.next, self.clock.now_ms());
        self.applied = plan.next;
        self.written_for = Some(wanted);
        Ok(())
    }

    /// Carries out what the rollouts decided: the weights, then the cuts.
    fn act(&mut self, decided: &[(String, Vec<Action>)], check: Check) -> Result<()> {
        let result = self.reconcile(check);
        for (service, actions) in decided {
            if actions.contains(&Action::CutCanary) {
                let id = self
                    .applied
                    .services
                    .values()
                    .find(|s| &s.name == service)
                    .map(|s| s.value.id);
                if let Some(id) = id {
                    match self.datapath.cut(id, Group::Canary) {
                        Ok(n) => {
                            info!(service = %service, connections = n, "cut the canary's connections")
                        }
                        Err(e) => {
                            warn!(service = %service, "cutting the canary's connections: {e:#}")
                        }
                    }
                }
            }
        }
        result
    }

    /// Reads the kernel's counters, runs the rollouts on them, reconciles.
    fn tick(&mut self) {
        let started = Instant::now();
        if let Err(e) = self.read() {
            warn!("reading the kernel's counters: {e:#}");
        }
        if self.fleet_telemetry.is_some() {
            self.sync_windows();
        }
        let now = self.clock.now_ms();
        let judged = self.fleet_telemetry.as_ref().unwrap_or(&self.telemetry);
        let decided = self.engine.tick(&self.config, judged, now);
        if let Some((recorder, differ)) = &mut self.recorder {
            let services: Vec<(String, u32)> = self
                .config
                .services
                .iter()
                .filter(|s| s.rollout.is_some())
                .map(|s| {
                    let w = self.engine.state(&s.name).map_or(0, |st| st.weight);
                    (s.name.clone(), w)
                })
                .collect();
            let before = recorder.dropped;
            recorder.record(&differ.tick(now, &self.telemetry, &services));
            if recorder.dropped > before && recorder.dropped.is_power_of_two() {
                warn!(
                    dropped = recorder.dropped,
                    "telemetry.record is behind: ticks dropped"
                );
            }
        }
        // A failed write is logged, counted and retried by reconcile itself.
        let _ = self.act(&decided, Check::Cheap);
        self.ticks.record(started.elapsed().as_secs_f64());
    }

    fn read(&mut self) -> Result<()> {
        let mut reads = Vec::new();
        // With a fleet, what the judges read: a release's other VIPs count
        // as its ClusterIP's service, and the other nodes' counts join it.
        let mut judged = Vec::new();
        // (Without a fleet none of it is needed: the tick stays as it was.)
        let mut follows: BTreeMap<&str, &str> = BTreeMap::new();
        let mut discovered: BTreeSet<&str> = BTreeSet::new();
        if self.fleet_telemetry.is_some() {
            for s in self.coordinated() {
                discovered.insert(&s.name);
                if let Some(p) = &s.follows {
                    follows.insert(&s.name, p);
                }
            }
        }
        // This node's own counts per backend (not per VIP), for the others.
        let mut sums: BTreeMap<(String, Group, std::net::SocketAddrV4), Vec<u64>> = BTreeMap::new();
        let merged = self.merged.lock().expect("not poisoned");
        for s in self.applied.services.values() {
            let name: Arc<str> = s.name.as_str().into();
            let judged_as = follows.get(s.name.as_str()).copied().unwrap_or(&s.name);
            let fleet = discovered.contains(s.name.as_str());
            for g in [Group::Stable, Group::Canary] {
                for (addr, id) in &s.backends[g as usize] {
                    let key = BackendKey {
                        service: name.clone(),
                        group: GroupName(g),
                        addr: *addr,
                    };
                    let stats = self.datapath.backend_stats(*id)?;
                    if self.fleet_telemetry.is_some() {
                        let mut all = stats.clone();
                        if fleet {
                            let sum = sums.entry((judged_as.to_string(), g, *addr)).or_default();
                            for c in &stats {
                                crate::fleet::merge::accumulate(sum, c);
                            }
                            if judged_as == s.name {
                                let k = (judged_as.to_string(), g.name().to_string(), *addr);
                                all.extend(merged.contributions(&k));
                            }
                        }
                        let key = BackendKey {
                            service: judged_as.into(),
                            ..key.clone()
                        };
                        judged.push((*id, key, all));
                    }
                    reads.push((*id, key, stats));
                }
            }
        }
        drop(merged);
        self.served = Arc::new(
            sums.into_iter()
                .map(|((service, g, addr), sum)| Served {
                    service,
                    group: g.name().to_string(),
                    addr,
                    counters: sum,
                })
                .collect(),
        );
        self.counters = Arc::new(
            self.datapath
                .counters()?
                .into_iter()
                .map(|(ifindex, c, n)| (interface_name(ifindex), c, n))
                .collect(),
        );
        let now = self.clock.now_ns();
        self.telemetry.update(now, reads);
        if let Some(t) = &mut self.fleet_telemetry {
            t.update(now, judged);
        }
        Ok(())
    }

    /// SIGHUP: the file again, validated, held to the release train, applied.
    fn reload(&mut self) {
        let loaded = config::read(&self.path).and_then(|text| {
            let c = if self.config.kubernetes.is_some() {
                let mut known = self.known.clone();
                let c = super::kube::compose(&self.engine, &self.path, &text, &mut known)?;
                self.known = known;
                c
            } else {
                config::parse(&self.path.display().to_string(), &text, &interface_exists)?
            };
            super::check_interfaces(&self.path.display().to_string(), &c)?;
            self.engine
                .admit(&c)
                .map(|()| (text, c))
                .map_err(|(field, message)| ConfigError {
                    file: self.path.display().to_string(),
                    field,
                    message,
                })
        });
        match loaded {
            Ok((text, c)) => match self.take_file(text, c) {
                Ok(()) => info!(config = %self.path.display(), "config reloaded"),
                Err(e) => error!("config reload failed while applying: {e:#}"),
            },
            Err(e) => {
                self.reload_failures += 1;
                error!("config reload rejected, the running configuration stays: {e}");
            }
        }
    }

    /// A reloaded file's text and configuration taken in.
    fn take_file(&mut self, text: String, config: Config) -> Result<()> {
        self.file_text = text;
        self.apply(config)
    }

    /// A new reading of the CanaryReleases: validated beside the file's
    /// services, then taken in like a reload.
    fn discovered(&mut self, readings: Vec<Discovered>) {
        let read = self.known.read(readings);
        // A reading that changed only the leader's decisions (status) is
        // no new configuration.
        if read.releases_changed {
            match super::kube::compose(&self.engine, &self.path, &self.file_text, &mut self.known) {
                Ok(c) => {
                    if let Err(e) = self.apply(c) {
                        error!("taking in the CanaryReleases failed while applying: {e:#}");
                    }
                }
                Err(e) => error!("the CanaryReleases could not be taken in: {e}"),
            }
        }
        self.pause_as_specified(read.toggled);
        // New releases are followed too (or decided, when leading).
        self.leading(self.leading);
    }

    /// The services the fleet decides together: with `kubernetes:` the
    /// CanaryReleases', with `fleet:` every service with a rollout.
    fn coordinated(&self) -> impl Iterator<Item = &config::Service> {
        let etcd = self.config.fleet.is_some();
        self.config.services.iter().filter(move |s| {
            if etcd {
                s.rollout.is_some()
            } else {
                s.discovered
            }
        })
    }

    /// The fleet's keys and their services: a CanaryRelease's
    /// NAMESPACE/NAME (service NAMESPACE.NAME), or with etcd a service's
    /// name.
    fn fleet_keys(&self) -> Vec<(String, String)> {
        if self.config.fleet.is_some() {
            return self
                .coordinated()
                .map(|s| (s.name.clone(), s.name.clone()))
                .collect();
        }
        self.known
            .paused
            .keys()
            .map(|k| (k.clone(), service_name(k)))
            .collect()
    }

    fn service_of(&self, key: &str) -> String {
        if self.config.fleet.is_some() {
            key.to_string()
        } else {
            service_name(key)
        }
    }

    /// This agent leads (its term) or follows.
    fn leading(&mut self, term: Option<u32>) {
        let following = match term {
            Some(_) => BTreeSet::new(),
            None => self.coordinated().map(|s| s.name.clone()).collect(),
        };
        self.leading = term;
        self.engine.set_following(following);
        self.follow_decisions();
    }

    /// The fleet's reports: while leading, a release's analysis window
    /// waits until every reporting node holds its weight.
    fn peers(&mut self, peers: Arc<crate::fleet::Peers>) {
        self.peers = peers;
        self.sync_windows();
    }

    fn sync_windows(&mut self) {
        let now = self.clock.now_ms();
        for (key, service) in self.fleet_keys() {
            let key = &key;
            let in_sync = self.leading.is_none()
                || match (self.known.decisions.get(key), self.engine.state(&service)) {
                    (Some(d), Some(s)) => {
                        d.weight == s.weight
                            && self
                                .peers
                                .values()
                                .all(|p| p.held.get(key) == Some(&d.generation))
                    }
                    // Nothing decided yet: nothing to wait for.
                    _ => true,
                };
            self.engine.set_in_sync(&service, in_sync, now);
        }
    }

    /// A follower takes the leader's decisions (only the leader raises).
    fn follow_decisions(&mut self) {
        let now = self.clock.now_ms();
        let mut taken = Vec::new();
        for (key, d) in &self.known.decisions {
            let service = self.service_of(key);
            if let Some(actions) = self.engine.follow(&service, d, now) {
                info!(release = %key, weight = format!("{}%", d.weight as f64 / 100.0), step = d.step, term = d.term, "took the leader's decision");
                taken.push((service, actions));
            }
        }
        if !taken.is_empty() {
            let _ = self.act(&taken, Check::Cheap);
        }
    }

    /// What the rollouts want of each service; a release's other VIPs take
    /// its ClusterIP's.
    fn overrides(&self) -> BTreeMap<String, plan::Override> {
        let mut o = self.engine.overrides();
        for s in &self.config.services {
            if let Some(p) = s.follows.as_ref().and_then(|p| o.get(p).copied()) {
                o.insert(s.name.clone(), p);
            }
        }
        o
    }

    /// The CanaryReleases as the status writer shows them.
    fn release_views(&self) -> Arc<crate::fleet::status::Releases> {
        let k = &self.known;
        let etcd = self.config.fleet.is_some();
        Arc::new(
            self.fleet_keys()
                .into_iter()
                .map(|(key, service)| {
                    let view = crate::fleet::status::ReleaseView {
                        service,
                        generation: k.generation.get(&key).copied().unwrap_or_default(),
                        why: k.why.get(&key).cloned(),
                        // A service of the file is steered once validated.
                        steered: etcd || k.taken.contains_key(&key),
                        decision: k.decisions.get(&key).cloned(),
                    };
                    (key, view)
                })
                .collect(),
        )
    }

    /// `spec.paused` set or cleared: the rollout paused or resumed, as an
    /// operator's verb would (an edge, so `kanari pause` is not undone).
    fn pause_as_specified(&mut self, toggled: Vec<(String, bool)>) {
        for (key, paused) in toggled {
            let service = service_name(&key);
            let verb = if paused { Verb::Pause } else { Verb::Resume };
            let now = self.clock.now_ms();
            match self.engine.command(&self.config, &service, &verb, now) {
                Ok(actions) => {
                    info!(release = %key, paused, "spec.paused changed");
                    let _ = self.act(&[(service, actions)], Check::Cheap);
                }
                Err(refused) => info!(release = %key, paused, "spec.paused: {}", refused.0),
            }
        }
    }

    /// An operator's verb: decided, applied, published, then answered.
    fn verb(&mut self, req: VerbRequest) {
        let now = self.clock.now_ms();
        let reply = match self
            .engine
            .command(&self.config, &req.service, &req.verb, now)
        {
            Err(refused) => Err(VerbError::Refused(refused.0)),
            Ok(actions) => {
                // Answered once written; the next tick checks what the kernel holds.
                let applied = self.act(&[(req.service.clone(), actions)], Check::None);
                let s = self.engine.state(&req.service).expect("commanded");
                let said = format!(
                    "{} at {}%: {}",
                    s.phase.name().replace('_', " "),
                    s.weight as f64 / 100.0,
                    s.reason
                );
                match applied {
                    Ok(()) => Ok(said),
                    Err(e) => Err(VerbError::Unapplied(format!(
                        "{said}; but the kernel does not hold it yet ({e:#}); the agent retries every tick"
                    ))),
                }
            }
        };
        self.publish();
        let _ = req.reply.send(reply);
    }

    /// A gate's answer: the step up or the promotion it held, if still due.
    fn gate(&mut self, a: GateAnswer) {
        let event = Event::Gate {
            now_ms: self.clock.now_ms(),
            kind: a.kind,
            open: a.open,
            why: a.why,
        };
        let actions = self
            .engine
            .gate_answered(&self.config, &a.service, &a.revision, event);
        if !actions.is_empty() {
            let _ = self.act(&[(a.service, actions)], Check::Cheap);
        }
    }

    /// A walk of the conntrack table: its size, and the quarantined ids it
    /// no longer found.
    fn walked(&mut self, started_ms: u64, scan: Result<ConntrackScan, String>) {
        match scan {
            Ok(scan) => {
                self.conntrack_entries = Some(scan.entries);
                self.conntrack_expired.add(&scan);
                self.count_timeouts(&scan);
                let released = self
                    .quarantine
                    .release_drained(started_ms, &scan.backend_ids);
                if !released.is_empty() {
                    debug!(ids = ?released, "backend ids drained: free to be given out again");
                }
                self.services_drained(started_ms, &scan);
            }
            Err(e) => warn!("walking the conntrack table: {e}"),
        }
    }

    /// Removed services whose connections are all gone (a walk begun after
    /// they began draining found none of their entries) are deleted.
    fn services_drained(&mut self, started_ms: u64, scan: &ConntrackScan) {
        let now = self.clock.now_ms();
        let draining: Vec<(u32, String)> = self
            .applied
            .services
            .values()
            .filter(|s| s.draining)
            .map(|s| (s.value.id, s.name.clone()))
            .collect();
        self.draining_since
            .retain(|id, _| draining.iter().any(|(d, _)| d == id));
        self.drained
            .retain(|id| draining.iter().any(|(d, _)| d == id));
        let mut newly = false;
        for (id, vip) in draining {
            let since = *self.draining_since.entry(id).or_insert(now);
            if started_ms >= since && !scan.service_ids.contains(&id) && self.drained.insert(id) {
                info!(vip = %vip, "a removed service's connections have all ended: deleting it");
                newly = true;
            }
        }
        if newly {
            self.written_for = None;
            let _ = self.reconcile(Check::None);
        }
    }

    /// Counts, once each, the requests and connection attempts the walk found
    /// unanswered past their service's `analysis.request_timeout`.
    fn count_timeouts(&mut self, scan: &ConntrackScan) {
        let timeouts: BTreeMap<u32, u64> = self
            .applied
            .services
            .values()
            .flat_map(|s| {
                let t = self
                    .config
                    .services
                    .iter()
                    .find(|c| c.name == s.name)
                    .map_or(DEFAULT_REQUEST_TIMEOUT, request_timeout)
                    .as_nanos() as u64;
                s.backends.iter().flatten().map(move |(_, id)| (*id, t))
            })
            .collect();
        let mut counted: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for p in &scan.pending {
            let Some(t) = timeouts.get(&p.backend_id) else {
                continue;
            };
            if scan.at_ns.saturating_sub(p.since_ns) >= *t && self.timed_out.insert(*p) {
                let c = counted.entry(p.backend_id).or_default();
                if p.connect {
                    c.1 += 1;
                } else {
                    c.0 += 1;
                }
            }
        }
        // Those the walk no longer sees were answered, reset or evicted.
        let seen: HashSet<&Pending> = scan.pending.iter().collect();
        self.timed_out.retain(|p| seen.contains(p));
        for (id, (requests, connects)) in counted {
            debug!(backend_id = id, requests, connects, "timed out");
            self.telemetry.add_timeouts(id, requests, connects);
            if let Some(t) = &mut self.fleet_telemetry {
                t.add_timeouts(id, requests, connects);
            }
        }
    }

    /// Publishes what the agent knows now. What did not change since the
    /// last snapshot (telemetry between ticks, rollouts between their
    /// changes) is shared with it, not copied.
    fn publish(&mut self) {
        // What the rollouts did since, for their webhooks (queued, never waited on).
        self.hooks.send(&self.config, self.engine.take_notices());
        let now = self.clock.now_ms();
        let rollouts_at = (self.engine.generation(), self.config_generation);
        if self.rollouts.0 != Some(rollouts_at) {
            let specs: BTreeMap<&str, &crate::config::RolloutSpec> = self
                .config
                .services
                .iter()
                .filter_map(|s| Some((s.name.as_str(), s.rollout.as_ref()?)))
                .collect();
            let views = self
                .engine
                .rollouts()
                .map(|(name, state, critical)| {
                    let view = RolloutView {
                        state: state.clone(),
                        critical: critical.to_vec(),
                        watched_until_ms: specs
                            .get(name)
                            .and_then(|spec| state.watched_until_ms(&spec.rollout)),
                    };
                    (name.to_string(), view)
                })
                .collect();
            self.rollouts = (Some(rollouts_at), Arc::new(views));
        }
        let kernel_weights: BTreeMap<String, u32> = self
            .applied
            .services
            .values()
            .map(|s| (s.name.clone(), s.value.canary_weight))
            .collect();
        let snapshot = Snapshot {
            config: self.config.clone(),
            overrides: self.overrides(),
            kernel_weights,
            telemetry: self.telemetry.view().clone(),
            counters: self.counters.clone(),
            conntrack_entries: self.conntrack_entries,
            conntrack_expired: self.conntrack_expired,
            ready: self.ready,
            disagreement: self.disagreement.clone(),
            rollouts: self.rollouts.1.clone(),
            rollout_counts: Arc::new(self.engine.counts.clone()),
            reload_failures: self.reload_failures,
            write_failures: self.write_failures,
            quarantined_ids: self.quarantine.len(),
            ticks: self.ticks.clone(),
            webhooks: Arc::new(self.hooks.counts()),
            releases: self.release_views(),
            node: self.node.clone(),
            fleet: crate::snapshot::FleetView {
                leader: self.leader.clone(),
                term: self.leading,
                peers: self.peers.clone(),
            },
            served: self.served.clone(),
            at_ms: now,
            taken: Instant::now(),
        };
        self.snapshots.send_replace(Arc::new(snapshot));
    }

    fn stop(mut self, detach_on_exit: bool) -> Result<ExitCode> {
        self.ready = false;
        self.publish();
        crate::notify::notify("STOPPING=1");
        self.engine.flush();
        match self.datapath.counter_totals() {
            Ok(counters) => {
                let summary: Vec<String> = counters
                    .iter()
                    .map(|(c, n)| format!("{}={n}", c.name()))
                    .collect();
                info!(counters = %summary.join(" "), "data path counters");
            }
            Err(e) => warn!("reading the data path counters: {e:#}"),
        }
        let pins = self.config.pin_dir.clone();
        if detach_on_exit {
            self.datapath.uninstall()?;
        }
        drop(self);
        super::stopped(detach_on_exit, &pins);
        Ok(ExitCode::SUCCESS)
    }
}
