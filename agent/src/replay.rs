//! `kanari replay FILE [--config C]`: the decisions a configuration would
//! have taken on recorded traffic ([`crate::record`]) — the way to tune
//! limits, margins and steps on yesterday's traffic before they act.
//!
//! The recorded ticks are fed, at their recorded times, to the same
//! telemetry, judges, engine and state machine the agent runs (no kernel,
//! no files: the rollouts start fresh). What it cannot replay: the traffic
//! split is the recorded one — a replayed decision that would have sent the
//! canary more or fewer clients does not change what it received — and
//! gates are taken as answering 2xx at once. Pure: lines out, nothing else.

use std::{collections::BTreeMap, net::SocketAddrV4, sync::Arc};

use kanari_common::maps::{BackendStats, Group};

use crate::{
    analysis,
    config::Config,
    record::{Tick, as_stats},
    rollout::{Action, Engine, Event, Store},
    telemetry::{BackendKey, GroupName, Telemetry, Totals},
};

/// What a replay found: its lines, and each service's end (phase, weight in basis points).
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    pub lines: Vec<String>,
    pub end: BTreeMap<String, (String, u32)>,
}

fn at(t_ms: u64, t0: u64) -> String {
    format!("t+{:>7.2}s", t_ms.saturating_sub(t0) as f64 / 1e3)
}

/// Replays `ticks` under `config`.
pub fn replay(config: &Config, ticks: &[Tick]) -> Replay {
    let mut lines = Vec::new();
    let Some(t0) = ticks.first().map(|t| t.t_ms) else {
        return Replay {
            lines: vec!["the recording has no ticks".into()],
            end: BTreeMap::new(),
        };
    };
    let mut engine = Engine::new(Store::none());
    engine.sync(config, t0);
    let mut telemetry = Telemetry::new(crate::status::WINDOW_SECONDS);
    // One backend per version: the judges see groups, not backends.
    let mut keys: BTreeMap<(String, Group), (u32, BackendKey, Totals)> = BTreeMap::new();
    for (i, s) in config
        .services
        .iter()
        .filter(|s| s.rollout.is_some())
        .enumerate()
    {
        for g in [Group::Stable, Group::Canary] {
            let id = (i * 2 + g as usize) as u32;
            let key = BackendKey {
                service: Arc::from(s.name.as_str()),
                group: GroupName(g),
                addr: SocketAddrV4::new([0, 0, 0, 0].into(), 0),
            };
            telemetry.expect(id, key.clone(), &[BackendStats::ZERO]);
            keys.insert((s.name.clone(), g), (id, key, Totals::default()));
        }
    }
    let mut recorded: BTreeMap<String, u32> = BTreeMap::new();
    for tick in ticks {
        let mut timeouts = Vec::new();
        for s in &tick.services {
            for (g, sample) in [(Group::Stable, &s.stable), (Group::Canary, &s.canary)] {
                if let Some((id, _, cum)) = keys.get_mut(&(s.name.clone(), g)) {
                    let mut d = sample.totals();
                    // Timeouts come from conntrack walks, added beside the kernel's counts.
                    timeouts.push((*id, d.timeouts, d.connect_timeouts));
                    d.timeouts = 0;
                    d.connect_timeouts = 0;
                    *cum += &d;
                }
            }
            let before = recorded.insert(s.name.clone(), s.weight);
            if before.is_some_and(|w| w != s.weight) {
                lines.push(format!(
                    "{} {}: (recorded) the agent set the canary to {}%",
                    at(tick.t_ms, t0),
                    s.name,
                    s.weight as f64 / 100.0
                ));
            }
        }
        let reads = keys
            .values()
            .map(|(id, key, cum)| (*id, key.clone(), vec![as_stats(cum)]))
            .collect();
        telemetry.update(tick.t_ms * 1_000_000, reads);
        for (id, requests, connects) in timeouts {
            if requests + connects > 0 {
                telemetry.add_timeouts(id, requests, connects);
            }
        }
        let decided = engine.tick(config, &telemetry, tick.t_ms);
        let mut gates = Vec::new();
        for (service, actions) in &decided {
            for a in actions {
                let line = match a {
                    Action::Checked(results) => {
                        let judges: Vec<String> = results
                            .iter()
                            .map(|r| {
                                format!(
                                    "{} {}{}",
                                    r.judge.name(),
                                    r.verdict.name(),
                                    if r.dry_run { " (dry run)" } else { "" }
                                )
                            })
                            .collect();
                        format!(
                            "check {}: {}",
                            analysis::overall(results).name(),
                            judges.join(", ")
                        )
                    }
                    Action::Transition { to, reason, .. } => {
                        format!("{}: {reason}", to.name().replace('_', " "))
                    }
                    Action::SetWeight(w) => format!("weight {}%", *w as f64 / 100.0),
                    Action::AskGate(kind) => {
                        gates.push((service.clone(), *kind));
                        format!("asks the {} gate (a replay takes it as 2xx)", kind.name())
                    }
                    Action::CutCanary => "cuts the canary's connections".into(),
                    Action::CanarySegments(_) => continue,
                };
                lines.push(format!("{} {service}: {line}", at(tick.t_ms, t0)));
            }
        }
        for (service, kind) in gates {
            let revision = engine
                .state(&service)
                .map(|s| s.revision.clone())
                .unwrap_or_default();
            let event = Event::Gate {
                now_ms: tick.t_ms,
                kind,
                open: true,
                why: String::new(),
            };
            for a in engine.gate_answered(config, &service, &revision, event) {
                if let Action::Transition { to, reason, .. } = a {
                    lines.push(format!(
                        "{} {service}: {}: {reason}",
                        at(tick.t_ms, t0),
                        to.name().replace('_', " ")
                    ));
                }
            }
        }
        engine.take_notices();
    }
    let end = engine
        .rollouts()
        .map(|(name, s, _)| (name.to_string(), (s.phase.name().to_string(), s.weight)))
        .collect();
    Replay { lines, end }
}
