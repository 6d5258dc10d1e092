//! Runs the rollouts: one [`rollout::State`] per service with a `rollout:`
//! section, fed with telemetry every tick and with operator commands,
//! persisted in the state directory so a restarted agent resumes where it was.
//!
//! The decisions are the pure state machine's ([`rollout::step`]) and the
//! judges' ([`crate::analysis`]); this module keeps their inputs (the
//! window snapshots), writes the state files, counts what happened for the
//! metrics, and tells the agent which weights to write.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use kanari_common::maps::Group;
use tracing::{info, warn};

use crate::{
    analysis::{self, Judge, JudgeResult},
    config::{Config, Protocol, Service},
    rollout::{self, Action, Event, Phase, Refused, State},
    telemetry::{Telemetry, Totals},
};

/// An operator's request for one service.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Command {
    Pause,
    Resume,
    Promote,
    Abort,
    Start,
    /// Basis points.
    SetWeight(u32),
}

impl Command {
    fn event(self, now_ms: u64) -> Event {
        match self {
            Command::Pause => Event::Pause { now_ms },
            Command::Resume => Event::Resume { now_ms },
            Command::Promote => Event::Promote { now_ms },
            Command::Abort => Event::Abort { now_ms },
            Command::Start => Event::Start { now_ms },
            Command::SetWeight(weight) => Event::SetWeight { now_ms, weight },
        }
    }
}

struct Tracked {
    state: State,
    /// Group totals (stable, canary) when the current window began.
    window_start: Option<(Totals, Totals)>,
    /// The last critical-path results.
    critical: Vec<JudgeResult>,
}

/// What happened, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub checks: BTreeMap<(String, Judge, &'static str), u64>,
    pub rollbacks: BTreeMap<(String, String), u64>,
    pub promotions: BTreeMap<String, u64>,
    pub transitions: BTreeMap<(String, Phase, Phase), u64>,
}

pub struct Engine {
    dir: PathBuf,
    services: BTreeMap<String, Tracked>,
    pub counts: Counts,
}

/// The canary backend set, as a revision.
pub fn revision(s: &Service) -> String {
    let mut v: Vec<String> = s.canary.iter().map(|b| b.to_string()).collect();
    v.sort();
    v.join(",")
}

/// The label a rollback is counted under: the judge, or what ended it.
fn rollback_label(state: &State) -> String {
    match state.rollback_judge {
        Some(j) => j.name().to_string(),
        None if state.reason.starts_with("progress deadline") => "progress_deadline".into(),
        None => "operator".into(),
    }
}

impl Engine {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("rollouts"),
            services: BTreeMap::new(),
            counts: Counts::default(),
        }
    }

    fn path(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.json"))
    }

    fn persist(&self, service: &str, state: &State) {
        let write = || -> Result<()> {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("creating {}", self.dir.display()))?;
            let path = self.path(service);
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming to {}", path.display()))?;
            Ok(())
        };
        if let Err(e) = write() {
            warn!(service, "persisting the rollout state: {e:#}");
        }
    }

    fn load(&self, service: &str) -> Option<State> {
        let text = std::fs::read(self.path(service)).ok()?;
        match serde_json::from_slice(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(
                    service,
                    "ignoring the unreadable rollout state {}: {e}",
                    self.path(service).display()
                );
                None
            }
        }
    }

    pub fn state(&self, service: &str) -> Option<&State> {
        self.services.get(service).map(|t| &t.state)
    }

    pub fn critical(&self, service: &str) -> &[JudgeResult] {
        self.services.get(service).map_or(&[], |t| &t.critical)
    }

    /// Takes in a configuration: services with a rollout get a state (the
    /// persisted one when it is for the same canary revision), a changed
    /// canary revision starts a new rollout, services without one are dropped.
    pub fn sync(&mut self, config: &Config, now_ms: u64) {
        let wanted: Vec<&Service> = config
            .services
            .iter()
            .filter(|s| s.rollout.is_some())
            .collect();
        self.services
            .retain(|name, _| wanted.iter().any(|s| &s.name == name));
        for s in wanted {
            let cfg = &s.rollout.as_ref().expect("filtered").rollout;
            let rev = revision(s);
            let has_canary = !s.canary.is_empty();
            if let Some(t) = self.services.get(&s.name) {
                let event = Event::Revision {
                    now_ms,
                    revision: rev,
                    has_canary,
                };
                let (next, actions) =
                    rollout::step(&t.state, event, cfg).expect("a revision is never refused");
                self.record(&s.name, &next, &actions);
                let t = self.services.get_mut(&s.name).expect("present");
                if next.window_since_ms != t.state.window_since_ms {
                    t.window_start = None;
                }
                t.state = next;
                self.persist(&s.name, &self.services[&s.name].state);
                continue;
            }
            let state = match self.load(&s.name) {
                Some(mut saved) if saved.revision == rev => {
                    info!(service = %s.name, phase = saved.phase.name(), step = saved.step, weight = saved.weight, "resuming the persisted rollout");
                    // The window's start totals are gone with the old agent: start a new window.
                    saved.window_since_ms = now_ms;
                    saved.check_since_ms = now_ms;
                    saved
                }
                _ => {
                    let st = State::new(rev, has_canary, now_ms, cfg);
                    info!(service = %s.name, phase = st.phase.name(), weight = st.weight, "{}", st.reason);
                    st
                }
            };
            self.persist(&s.name, &state);
            self.services.insert(
                s.name.clone(),
                Tracked {
                    state,
                    window_start: None,
                    critical: Vec::new(),
                },
            );
        }
    }

    /// Logs and counts what a step did.
    fn record(&mut self, service: &str, next: &State, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Transition { from, to, reason } => {
                    info!(
                        service,
                        from = from.name(),
                        to = to.name(),
                        weight = next.weight,
                        "rollout {}: {reason}",
                        to.name()
                    );
                    *self
                        .counts
                        .transitions
                        .entry((service.to_string(), *from, *to))
                        .or_default() += 1;
                    match to {
                        Phase::RolledBack => {
                            *self
                                .counts
                                .rollbacks
                                .entry((service.to_string(), rollback_label(next)))
                                .or_default() += 1;
                        }
                        Phase::Promoted => {
                            *self
                                .counts
                                .promotions
                                .entry(service.to_string())
                                .or_default() += 1
                        }
                        _ => {}
                    }
                }
                Action::SetWeight(w) => {
                    info!(
                        service,
                        weight = format!("{}%", *w as f64 / 100.0),
                        "{}",
                        next.reason
                    );
                }
                Action::Checked(results) => {
                    for r in results {
                        *self
                            .counts
                            .checks
                            .entry((service.to_string(), r.judge, r.verdict.name()))
                            .or_default() += 1;
                    }
                    info!(
                        service,
                        verdict = analysis::overall(results).name(),
                        passes = next.passes,
                        failures = next.failures,
                        "check"
                    );
                }
                Action::CanarySegments(_) | Action::CutCanary => {}
            }
        }
    }

    /// One telemetry tick: the critical path for every progressing rollout,
    /// and the checks whose window ended. Returns the actions per service.
    pub fn tick(
        &mut self,
        config: &Config,
        telemetry: &Telemetry,
        now_ms: u64,
    ) -> Vec<(String, Vec<Action>)> {
        let mut out = Vec::new();
        let mono_now = telemetry.now_ns();
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let Some(svc) = config.services.iter().find(|s| s.name == name) else {
                continue;
            };
            let Some(spec) = &svc.rollout else { continue };
            let http = svc.protocol == Protocol::Http;
            let totals = |g| telemetry.group(&name, g).cloned().unwrap_or_default();
            let t = self.services.get_mut(&name).expect("listed");
            if t.window_start.is_none() {
                t.window_start = Some((totals(Group::Stable), totals(Group::Canary)));
            }
            if t.state.phase != Phase::Progressing {
                t.critical.clear();
                continue;
            }
            // Only what the canary did in this step counts for the critical path.
            let since_ns =
                mono_now.saturating_sub(now_ms.saturating_sub(t.state.step_since_ms) * 1_000_000);
            let min = spec.analysis.critical.min_requests;
            let requests = telemetry.recent(&name, Group::Canary, since_ns, |r| r.requests >= min);
            let connections =
                telemetry.recent(&name, Group::Canary, since_ns, |r| r.connections >= min);
            let critical = analysis::critical(
                &spec.analysis.critical,
                requests.filter(|_| http),
                connections,
            );
            t.critical = critical.clone();
            let mut actions = Vec::new();
            let (mut state, a) =
                rollout::step(&t.state, Event::Tick { now_ms, critical }, &spec.rollout)
                    .expect("ticks are never refused");
            actions.extend(a);
            if state.check_due(now_ms, &spec.rollout) {
                let (s0, c0) = t.window_start.clone().unwrap_or_default();
                let canary = &totals(Group::Canary) - &c0;
                let stable = &totals(Group::Stable) - &s0;
                let results = analysis::check(
                    &spec.analysis,
                    spec.rollout.min_requests,
                    &canary,
                    &stable,
                    http,
                );
                let (next, a) =
                    rollout::step(&state, Event::Check { now_ms, results }, &spec.rollout)
                        .expect("checks are never refused");
                state = next;
                actions.extend(a);
            }
            let window_moved = state.window_since_ms != t.state.window_since_ms;
            let changed = state != t.state;
            self.record(&name, &state, &actions);
            let t = self.services.get_mut(&name).expect("listed");
            if window_moved {
                t.window_start = Some((totals(Group::Stable), totals(Group::Canary)));
            }
            t.state = state;
            if changed {
                self.persist(&name, &self.services[&name].state);
            }
            if !actions.is_empty() {
                out.push((name, actions));
            }
        }
        out
    }

    /// An operator's command.
    pub fn command(
        &mut self,
        config: &Config,
        service: &str,
        cmd: Command,
        now_ms: u64,
    ) -> Result<Vec<Action>, Refused> {
        let svc = config
            .services
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| Refused(format!("no service named {service}")))?;
        let spec = svc.rollout.as_ref().ok_or_else(|| {
            Refused(format!("service {service} has no rollout section; its weight is canary_weight in the configuration"))
        })?;
        let t = self
            .services
            .get(service)
            .ok_or_else(|| Refused(format!("no rollout state for {service}")))?;
        let (next, actions) = rollout::step(&t.state, cmd.event(now_ms), &spec.rollout)?;
        info!(service, ?cmd, "operator command");
        self.record(service, &next, &actions);
        let t = self.services.get_mut(service).expect("present");
        if next.window_since_ms != t.state.window_since_ms {
            t.window_start = None;
        }
        t.state = next;
        self.persist(service, &self.services[service].state);
        Ok(actions)
    }

    /// Records that the weights in force were written at `now_ms`.
    pub fn written(&mut self, service: &str, now_ms: u64) {
        if let Some(t) = self.services.get_mut(service) {
            t.state.weight_written_ms = Some(now_ms);
        }
        if let Some(t) = self.services.get(service) {
            self.persist(service, &t.state);
        }
    }

    /// The configuration as the rollouts want it in force: each rolled-out
    /// service at its rollout's weight, without its canary segments when the
    /// rollout has them off.
    pub fn effective(&self, config: &Config) -> Config {
        let mut c = config.clone();
        for s in c.services.iter_mut() {
            if let Some(t) = self.services.get(&s.name) {
                s.canary_weight = t.state.weight;
                if !t.state.canary_segments {
                    s.segments.retain(|r| r.group != Group::Canary);
                }
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg(canary: &str, extra: &str) -> Config {
        let text = format!(
            "interfaces: [{{name: eth0}}]\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    stable: {{backends: [10.0.2.1:80]}}\n    canary: {{backends: [{canary}]}}\n    segments: [{{cidr: 10.1.5.0/24, group: canary}}]\n    rollout: {{steps: [10, 50, 100], interval: 1s}}\n{extra}  - name: fixed\n    vip: 10.0.0.101:80\n    canary_weight: 5\n    stable: {{backends: [10.0.2.1:81]}}\n    canary: {{backends: [10.0.3.1:81]}}\n"
        );
        config::parse("t.yaml", &text, &|_| true).unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("kanari-engine-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn rollouts_are_persisted_and_resumed_for_the_same_revision_only() {
        let d = dir("persist");
        let c = cfg("10.0.3.1:80", "");
        let mut e = Engine::new(&d);
        e.sync(&c, 1000);
        let s = e.state("web").unwrap();
        assert_eq!((s.phase, s.weight), (Phase::Progressing, 1000));
        assert!(
            e.state("fixed").is_none(),
            "a service without rollout has none"
        );
        // Another agent resumes what the first persisted.
        let mut saved = e.state("web").unwrap().clone();
        saved.step = 1;
        saved.weight = 5000;
        std::fs::write(
            d.join("rollouts/web.json"),
            serde_json::to_vec(&saved).unwrap(),
        )
        .unwrap();
        let mut again = Engine::new(&d);
        again.sync(&c, 9000);
        let s = again.state("web").unwrap();
        assert_eq!(
            (s.step, s.weight, s.window_since_ms),
            (1, 5000, 9000),
            "same step, a new window"
        );
        // A new canary revision starts over.
        again.sync(&cfg("10.0.3.2:80", ""), 10_000);
        let s = again.state("web").unwrap();
        assert_eq!((s.step, s.weight, s.phase), (0, 1000, Phase::Progressing));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_effective_configuration_carries_the_rollout_weight_and_segments() {
        let d = dir("effective");
        let c = cfg("10.0.3.1:80", "");
        let mut e = Engine::new(&d);
        e.sync(&c, 0);
        let eff = e.effective(&c);
        assert_eq!(eff.services[0].canary_weight, 1000);
        assert_eq!(eff.services[0].segments.len(), 1);
        assert_eq!(
            eff.services[1].canary_weight, 500,
            "fixed services keep their weight"
        );
        let actions = e.command(&c, "web", Command::Abort, 1).unwrap();
        assert!(actions.contains(&Action::SetWeight(0)));
        let eff = e.effective(&c);
        assert_eq!(eff.services[0].canary_weight, 0);
        assert!(
            eff.services[0].segments.is_empty(),
            "rolled back: the canary segment is off"
        );
        assert!(
            e.command(&c, "fixed", Command::Pause, 1)
                .unwrap_err()
                .0
                .contains("no rollout section")
        );
        assert!(
            e.command(&c, "nope", Command::Pause, 1)
                .unwrap_err()
                .0
                .contains("no service named nope")
        );
        assert_eq!(
            e.counts
                .rollbacks
                .get(&("web".to_string(), "operator".to_string())),
            Some(&1)
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
