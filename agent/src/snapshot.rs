//! What the agent knows at one moment, published by its loop after every
//! input and read by `/metrics`, `/healthz` and the control API. Immutable
//! and cheap to clone: a scrape never waits for a tick, a tick never waits
//! for a scrape. Pure data.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use kanari_common::maps::Counter;

use crate::{
    analysis::JudgeResult,
    config::Config,
    plan::Override,
    rollout::{Counts, State},
    telemetry::TelemetryView,
};

/// How long the kernel may disagree with the agent before `/healthz` says
/// not ready: a retried write normally lands on the next tick.
pub const DISAGREEMENT_GRACE_SECONDS: f64 = 3.0;

/// A rollout as shown: its state and the critical path's last results.
#[derive(Clone, Debug)]
pub struct RolloutView {
    pub state: State,
    pub critical: Vec<JudgeResult>,
    /// Until when (agent clock, ms) the critical path watches a promoted canary.
    pub watched_until_ms: Option<u64>,
}

/// Durations of the loop's ticks, as a Prometheus histogram.
#[derive(Clone, Debug, PartialEq)]
pub struct TickStats {
    /// Cumulative counts per bound of [`TickStats::BOUNDS`].
    pub buckets: [u64; TickStats::BOUNDS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Default for TickStats {
    fn default() -> Self {
        Self {
            buckets: [0; TickStats::BOUNDS.len()],
            count: 0,
            sum_seconds: 0.0,
        }
    }
}

impl TickStats {
    /// Upper bounds in seconds: a tick is 250 ms apart by default.
    pub const BOUNDS: [f64; 12] = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];

    pub fn record(&mut self, seconds: f64) {
        self.count += 1;
        self.sum_seconds += seconds;
        for (b, bound) in self.buckets.iter_mut().zip(Self::BOUNDS) {
            if seconds <= bound {
                *b += 1;
            }
        }
    }
}

pub struct Snapshot {
    /// The configuration in force, as loaded.
    pub config: Arc<Config>,
    /// What the rollouts want of their services (weight, canary segments).
    pub overrides: BTreeMap<String, Override>,
    /// The canary weight each service's map value holds, as last read back
    /// from the kernel (basis points).
    pub kernel_weights: BTreeMap<String, u32>,
    pub telemetry: Arc<TelemetryView>,
    /// Data-path packet counters by interface name.
    pub counters: Arc<Vec<(String, Counter, u64)>>,
    /// Entries in the conntrack table (both directions), when last counted.
    pub conntrack_entries: Option<u64>,
    /// Connections whose entries the agent removed, idle past their timeouts.
    pub conntrack_expired: ConntrackExpired,
    /// The programs are attached and the configuration applied.
    pub ready: bool,
    /// Since when the kernel has not held what the agent wants, and why.
    pub disagreement: Option<(Instant, String)>,
    /// Rebuilt only when a rollout changed.
    pub rollouts: Arc<BTreeMap<String, RolloutView>>,
    /// What the rollouts did, for the metrics.
    pub rollout_counts: Arc<Counts>,
    /// Reloads (SIGHUP) whose configuration was rejected.
    pub reload_failures: u64,
    /// Map writes that failed (and were retried).
    pub write_failures: u64,
    /// Backend ids held back while conntrack entries may still carry them.
    pub quarantined_ids: usize,
    pub ticks: TickStats,
    /// Webhook deliveries by outcome.
    pub webhooks: Arc<crate::hooks::DeliveryCounts>,
    /// The fleet's keys: the CanaryReleases read (`kubernetes:`), by
    /// NAMESPACE/NAME, or the services decided together (`fleet:`).
    pub releases: Arc<crate::fleet::status::Releases>,
    /// This node's name in the fleet.
    pub node: Option<String>,
    /// The fleet as this agent last heard of it.
    pub fleet: FleetView,
    /// This node's own cumulative counters of the discovered services'
    /// backends, as last read (`GET /telemetry`).
    pub served: Arc<Vec<crate::fleet::merge::Served>>,
    /// When the loop published it, on the agent's clock (ms) and as an instant.
    pub at_ms: u64,
    pub taken: Instant,
}

/// Who leads the fleet and who reports in it.
/// Connections the agent's conntrack walks removed, idle past their
/// state's timeout (`kanari_conntrack_expired_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackExpired {
    /// By state, in `CtState::ALL` order.
    pub by_state: [u64; 4],
    /// Reverse entries whose forward entry was already gone.
    pub reverse: u64,
}

impl ConntrackExpired {
    pub fn add(&mut self, scan: &crate::datapath::ConntrackScan) {
        for (total, n) in self.by_state.iter_mut().zip(scan.expired) {
            *total += n;
        }
        self.reverse += scan.expired_reverse;
    }
}

#[derive(Clone, Debug, Default)]
pub struct FleetView {
    /// The leader when last read.
    pub leader: Option<String>,
    /// Our term while this agent leads.
    pub term: Option<u32>,
    /// The agents reporting, this one among them.
    pub peers: Arc<crate::fleet::Peers>,
}

impl Snapshot {
    /// Before the loop has published anything.
    pub fn starting(config: Arc<Config>, telemetry: Arc<TelemetryView>) -> Self {
        Self {
            config,
            overrides: BTreeMap::new(),
            kernel_weights: BTreeMap::new(),
            telemetry,
            counters: Arc::default(),
            conntrack_entries: None,
            conntrack_expired: ConntrackExpired::default(),
            ready: false,
            disagreement: None,
            rollouts: Arc::default(),
            rollout_counts: Arc::default(),
            reload_failures: 0,
            write_failures: 0,
            quarantined_ids: 0,
            ticks: TickStats::default(),
            webhooks: Arc::default(),
            releases: Arc::default(),
            node: None,
            fleet: FleetView::default(),
            served: Arc::default(),
            at_ms: 0,
            taken: Instant::now(),
        }
    }

    /// The canary weight `service` should have (basis points).
    pub fn wanted_weight(&self, service: &crate::config::Service) -> u32 {
        self.overrides
            .get(&service.name)
            .map_or(service.canary_weight, |o| o.weight)
    }

    /// The canary weight in force: what the kernel holds, else what is wanted.
    pub fn weight(&self, service: &crate::config::Service) -> u32 {
        self.kernel_weights
            .get(&service.name)
            .copied()
            .unwrap_or_else(|| self.wanted_weight(service))
    }

    /// `Ok` when ready; else why not, for `/healthz`.
    pub fn health(&self, now: Instant) -> Result<(), String> {
        if !self.ready {
            return Err("starting".into());
        }
        if let Some((since, why)) = &self.disagreement {
            let secs = now.saturating_duration_since(*since).as_secs_f64();
            if secs > DISAGREEMENT_GRACE_SECONDS {
                return Err(format!(
                    "the kernel has not held the wanted data path for {secs:.1} s: {why}"
                ));
            }
        }
        let tick = self.config.tick.as_secs_f64();
        let quiet = now.saturating_duration_since(self.taken).as_secs_f64();
        if quiet > 10.0 * tick + 5.0 {
            return Err(format!("the agent's loop has not run for {quiet:.1} s"));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod fixture {
    use std::{net::SocketAddrV4, sync::Arc};

    use kanari_common::maps::{BackendStats, Group};

    use super::Snapshot;
    use crate::{
        config,
        telemetry::{BackendKey, GroupName, Telemetry},
    };

    /// Service `web` (one stable, one canary backend at 10.0.3.1:80) at
    /// `canary_weight` percent, whose canary backend (id 1) went from zero to
    /// `stats` over `seconds`.
    pub fn canary_snapshot(canary_weight: &str, stats: BackendStats, seconds: u64) -> Snapshot {
        let c = config::parse(
            "t.yaml",
            &format!(
                "interfaces: [{{name: eth0}}]\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    canary_weight: {canary_weight}\n    stable: {{backends: [10.0.2.1:80]}}\n    canary: {{backends: [10.0.3.1:80]}}\n"
            ),
            &|_| true,
        )
        .expect("a valid test configuration");
        let mut t = Telemetry::new(crate::status::WINDOW_SECONDS);
        let key = BackendKey {
            service: "web".into(),
            group: GroupName(Group::Canary),
            addr: SocketAddrV4::new([10, 0, 3, 1].into(), 80),
        };
        t.update(0, vec![(1, key.clone(), vec![BackendStats::ZERO])]);
        t.update(seconds * 1_000_000_000, vec![(1, key, vec![stats])]);
        let mut s = Snapshot::starting(Arc::new(c), t.view().clone());
        s.ready = true;
        s
    }
}
