//! What the agent knows at a moment, shared by the loop that updates it and
//! the servers that show it (`/metrics`, the control socket). Pure data.

use std::collections::BTreeMap;

use kanari_common::maps::Counter;

use crate::{
    analysis::JudgeResult, config::Config, engine::Counts, rollout::State, telemetry::Telemetry,
};

/// A rollout as shown: its state and the critical path's last results.
#[derive(Clone, Debug)]
pub struct RolloutView {
    pub state: State,
    pub critical: Vec<JudgeResult>,
}

pub struct View {
    pub config: Config,
    pub telemetry: Telemetry,
    /// Data-path packet counters by interface name.
    pub counters: Vec<(String, Counter, u64)>,
    /// Entries in the conntrack table (both directions), when last counted.
    pub conntrack_entries: Option<u64>,
    /// The programs are attached and the configuration applied.
    pub ready: bool,
    /// Rollouts by service.
    pub rollouts: BTreeMap<String, RolloutView>,
    /// What the rollouts did, for the metrics.
    pub rollout_counts: Counts,
    /// Reloads (SIGHUP) whose configuration was rejected.
    pub reload_failures: u64,
}

impl View {
    pub fn new(config: Config) -> Self {
        let horizon = crate::status::WINDOW_SECONDS;
        Self {
            config,
            telemetry: Telemetry::new(horizon),
            counters: Vec::new(),
            conntrack_entries: None,
            ready: false,
            rollouts: BTreeMap::new(),
            rollout_counts: Counts::default(),
            reload_failures: 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod fixture {
    use std::net::SocketAddrV4;

    use kanari_common::maps::{BackendStats, Group};

    use super::View;
    use crate::{
        config,
        telemetry::{BackendKey, GroupName},
    };

    /// Service `web` (one stable, one canary backend at 10.0.3.1:80) at
    /// `canary_weight` percent, whose canary backend (id 1) went from zero to
    /// `stats` over `seconds`.
    pub fn canary_view(canary_weight: &str, stats: BackendStats, seconds: u64) -> View {
        let c = config::parse(
            "t.yaml",
            &format!(
                "interfaces: [{{name: eth0}}]\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    canary_weight: {canary_weight}\n    stable: {{backends: [10.0.2.1:80]}}\n    canary: {{backends: [10.0.3.1:80]}}\n"
            ),
            &|_| true,
        )
        .expect("a valid test configuration");
        let mut v = View::new(c);
        let key = BackendKey {
            service: "web".into(),
            group: GroupName(Group::Canary),
            addr: SocketAddrV4::new([10, 0, 3, 1].into(), 80),
        };
        v.telemetry
            .update(0, vec![(1, key.clone(), vec![BackendStats::ZERO])]);
        v.telemetry
            .update(seconds * 1_000_000_000, vec![(1, key, vec![stats])]);
        v
    }
}
