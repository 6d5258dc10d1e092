//! Runs the rollouts: one [`State`] per service with a `rollout:` section,
//! fed with the configuration, telemetry every tick and operator verbs, and
//! kept in a [`Store`] so a restarted agent resumes where it was.
//!
//! The decisions are the pure state machine's ([`machine::step`]) and the
//! judges' ([`crate::analysis`]); this module tells releases from scaling,
//! holds the release train's rule ([`Engine::admit`]), keeps the judges'
//! inputs (the window's start), counts what happened for the metrics, and
//! says which weight each service should have ([`Engine::overrides`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use kanari_common::maps::{BASIS_POINTS, Group};
use tracing::info;

use super::{
    Store,
    machine::{
        self, Action, Event, Phase, Refused, Retired, RollbackCause, State, derived_revision,
    },
};
use crate::{
    analysis::{self, Judge, JudgeResult},
    config::{
        Config, DEFAULT_CONFIDENCE, HookKind, Protocol, Rollout, RolloutSpec, Service, Strategy,
    },
    plan::Override,
    telemetry::{Recent, Telemetry, Totals},
    verb::Verb,
};

struct Tracked {
    state: State,
    /// The settings the state was last stepped with.
    cfg: Rollout,
    /// Group totals (stable, canary) when the current window began.
    window_start: Option<(Totals, Totals)>,
    /// The last critical-path results.
    critical: Vec<JudgeResult>,
}

/// What happened, for the metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub checks: BTreeMap<(String, Judge, &'static str), u64>,
    pub rollbacks: BTreeMap<(String, &'static str), u64>,
    pub promotions: BTreeMap<String, u64>,
    pub transitions: BTreeMap<(String, Phase, Phase), u64>,
}

/// A rollout's lifecycle event, or a gate to ask, for its webhooks.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    pub service: String,
    /// `event` webhooks: what happened (`step`, `paused`, `promoted`,
    /// `rolled_back`, ...); gates: `None`.
    pub event: Option<&'static str>,
    /// The gate to ask.
    pub gate: Option<HookKind>,
    pub phase: Phase,
    pub awaiting: Option<HookKind>,
    pub weight: u32,
    pub step: usize,
    pub revision: String,
    pub reason: String,
    pub cause: Option<RollbackCause>,
}

/// How a configured canary relates to the one a rollout is for.
#[derive(Debug, PartialEq)]
enum Change {
    Same,
    /// The same revision on other backends.
    Scaled,
    /// A new release.
    Release {
        revision: String,
        named: bool,
    },
    NoCanary,
}

fn sorted(v: &[SocketAddrV4]) -> Vec<SocketAddrV4> {
    let mut v = v.to_vec();
    v.sort();
    v.dedup();
    v
}

/// A named revision is the name; a derived one stays while the backends
/// overlap (adding or removing a replica is scaling, not a release).
fn classify(state: &State, svc: &Service) -> Change {
    if svc.canary.is_empty() {
        // A CanaryRelease's canary without endpoints (its pods restarting)
        // holds the rollout; the kernel sends its share to stable.
        return if state.phase == Phase::Idle || svc.discovered {
            Change::Same
        } else {
            Change::NoCanary
        };
    }
    let backends = sorted(&svc.canary);
    let release = || Change::Release {
        revision: svc
            .canary_revision
            .clone()
            .unwrap_or_else(|| derived_revision(&backends)),
        named: svc.canary_revision.is_some(),
    };
    if state.phase == Phase::Idle {
        return release();
    }
    let same = match &svc.canary_revision {
        Some(r) => *r == state.revision,
        None => state.canary_backends.iter().any(|b| backends.contains(b)),
    };
    match (same, backends == state.canary_backends) {
        (false, _) => release(),
        (true, true) => Change::Same,
        (true, false) => Change::Scaled,
    }
}

/// Whether `svc`'s stable runs what `state`'s canary ran: by name when both
/// have one, else by backends (all of stable's were the canary's).
fn stable_is(state: &State, svc: &Service) -> bool {
    match &svc.stable_revision {
        Some(r) if state.revision_named => *r == state.revision,
        _ => !svc.stable.is_empty() && svc.stable.iter().all(|b| state.canary_backends.contains(b)),
    }
}

/// The check's error levels for a rollout: a false rollback over the whole
/// rollout stays under `1 − confidence`, shared over its windows (one per
/// passing check it needs: `checks_per_step` per step below 100 %; an A/B
/// test's over its duration, or 100) and over the judges that can fail.
pub fn levels(spec: &RolloutSpec, confidence: f64) -> analysis::Levels {
    let r = &spec.rollout;
    let windows = match r.strategy {
        Strategy::Canary => {
            r.steps.iter().filter(|w| **w < BASIS_POINTS).count() as u32 * r.checks_per_step
        }
        Strategy::BlueGreen => r.checks_per_step,
        Strategy::Ab => r.duration.map_or(100, |d| {
            (d.as_millis() / r.interval.as_millis().max(1)).max(1) as u32
        }),
    };
    let l = &spec.analysis.limits;
    let limits = [
        l.max_error_rate.is_some(),
        l.max_latency_p99.is_some(),
        l.max_latency_p50.is_some(),
        l.max_connect_errors_rate.is_some(),
    ];
    let compared = spec.analysis.compare.as_ref().map_or(0, |c| {
        c.max_error_rate_increase.is_some() as u32 + 2 * c.max_latency_increase.is_some() as u32
    });
    let judges = limits.iter().filter(|x| **x).count() as u32 + compared;
    analysis::Levels::for_rollout(confidence, windows, judges)
}

/// How many replaced versions a rollout remembers.
const RETIRED_KEPT: usize = 8;

/// Keeps what stable serves: a canary that served every client and is now
/// stable retires the version it replaced; a named stable is its name; an
/// unnamed one on other backends is unknown.
fn track_stable(state: &mut State, svc: &Service) {
    let stable = sorted(&svc.stable);
    let change = classify(state, svc);
    let promoted_to_stable = state.phase != Phase::Idle
        && state.weight >= BASIS_POINTS
        && matches!(change, Change::Release { .. } | Change::NoCanary)
        && stable_is(state, svc);
    if promoted_to_stable {
        if !state.stable_backends.is_empty() {
            state.retired.push(Retired {
                revision: state.stable_revision.clone(),
                backends: state.stable_backends.clone(),
            });
            let extra = state.retired.len().saturating_sub(RETIRED_KEPT);
            state.retired.drain(..extra);
        }
        state.stable_revision = svc
            .stable_revision
            .clone()
            .or_else(|| Some(state.revision.clone()));
    } else if svc.stable_revision.is_some() {
        state.stable_revision = svc.stable_revision.clone();
    } else if !stable.iter().any(|b| state.stable_backends.contains(b)) {
        state.stable_revision = None;
    }
    state.stable_backends = stable;
}

/// Whether `svc`'s stable is a version `r` that a promotion replaced (and
/// not, on the same backends, the current stable).
fn is_retired(r: &Retired, state: &State, svc: &Service) -> bool {
    match (&svc.stable_revision, &r.revision) {
        (Some(a), Some(b)) => a == b,
        _ => {
            !svc.stable.is_empty()
                && svc.stable.iter().all(|b| r.backends.contains(b))
                && !svc.stable.iter().all(|b| state.stable_backends.contains(b))
        }
    }
}

fn list(addrs: &[SocketAddrV4]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub struct Engine {
    store: Store,
    services: BTreeMap<String, Tracked>,
    pub counts: Counts,
    /// What the webhooks are to be told or asked, oldest first ([`Engine::take_notices`]).
    notices: Vec<Notice>,
    /// Grows whenever a state or a critical-path result changes, so a
    /// publisher knows when to copy them again.
    generation: u64,
    /// Services another agent decides ([`follow`]).
    following: BTreeSet<String>,
    /// Services whose analysis window waits for every node ([`follow`]).
    held_windows: BTreeSet<String>,
}

impl Engine {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            services: BTreeMap::new(),
            counts: Counts::default(),
            notices: Vec::new(),
            generation: 0,
            following: BTreeSet::new(),
            held_windows: BTreeSet::new(),
        }
    }

    pub fn state(&self, service: &str) -> Option<&State> {
        self.services.get(service).map(|t| &t.state)
    }

    pub fn critical(&self, service: &str) -> &[JudgeResult] {
        self.services.get(service).map_or(&[], |t| &t.critical)
    }

    /// Changes whenever [`Engine::rollouts`] would show something else.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every rollout: its service, state and last critical-path results.
    pub fn rollouts(&self) -> impl Iterator<Item = (&str, &State, &[JudgeResult])> {
        self.services
            .iter()
            .map(|(n, t)| (n.as_str(), &t.state, t.critical.as_slice()))
    }

    /// Waits until every state is on disk.
    pub fn flush(&self) {
        self.store.flush();
    }

    /// The release train's rule, checked before a configuration is taken in:
    /// once a canary serves every client (promoted, or set to 100 % by hand),
    /// a configuration whose canary is another revision, or none, must run
    /// that canary's revision as stable. Otherwise the next release would be
    /// judged against, and send clients back to, the older version. Returns
    /// the field and the message of the refusal.
    pub fn admit(&self, config: &Config) -> Result<(), (String, String)> {
        for (i, svc) in config.services.iter().enumerate() {
            let persisted;
            let state = match self.services.get(&svc.name) {
                Some(t) => &t.state,
                None => match self.store.load(&svc.name) {
                    Some(s) => {
                        persisted = s;
                        &persisted
                    }
                    None => continue,
                },
            };
            if let Some(old) = state
                .retired
                .iter()
                .rev()
                .find(|r| is_retired(r, state, svc))
            {
                let name = |rev: &Option<String>, backends: &[SocketAddrV4]| {
                    rev.clone()
                        .unwrap_or_else(|| format!("on {}", list(backends)))
                };
                return Err((
                    format!("services[{i}].stable"),
                    format!(
                        "{}: stable {} is older than the version serving now ({}), which replaced \
                         it on promotion; a configuration never sends clients back to it. Keep \
                         stable.backends at {}; the running configuration stays",
                        svc.name,
                        name(&old.revision, &old.backends),
                        name(&state.stable_revision, &state.stable_backends),
                        list(&state.stable_backends)
                    ),
                ));
            }
            if state.weight < BASIS_POINTS || state.phase == Phase::Idle {
                continue;
            }
            let same = matches!(classify(state, svc), Change::Same | Change::Scaled);
            let keeps_serving =
                same && (svc.rollout.is_some() || svc.canary_weight >= BASIS_POINTS);
            if keeps_serving || stable_is(state, svc) {
                continue;
            }
            let rev = &state.revision;
            let name_it = if state.revision_named {
                format!(" and set stable.revision: {rev}")
            } else {
                String::new()
            };
            return Err((
                format!("services[{i}].stable.backends"),
                format!(
                    "{}: canary {rev} was {} and serves every client; the next release is judged \
                     against it and must not send clients back to the older stable. Move its \
                     backends ({}) to stable.backends{name_it}, with the new build under \
                     canary.backends; the running configuration stays",
                    svc.name,
                    if state.phase == Phase::Promoted {
                        "promoted"
                    } else {
                        "set to 100 %"
                    },
                    list(&state.canary_backends)
                ),
            ));
        }
        Ok(())
    }

    /// Takes in a configuration (that [`Engine::admit`] accepted): services
    /// with a rollout get a state — the persisted one when it is for the same
    /// revision — a new revision starts a new rollout, scaling keeps the
    /// step, changed settings apply from here; services without a rollout
    /// are dropped.
    pub fn sync(&mut self, config: &Config, now_ms: u64) {
        let wanted: Vec<&Service> = config
            .services
            .iter()
            .filter(|s| s.rollout.is_some())
            .collect();
        let before = self.services.len();
        self.services
            .retain(|name, _| wanted.iter().any(|s| &s.name == name));
        if self.services.len() != before {
            self.generation += 1;
        }
        for svc in wanted {
            let cfg = &svc.rollout.as_ref().expect("filtered").rollout;
            let mut events = Vec::new();
            let (state, old_cfg) = match self.services.get(&svc.name) {
                Some(t) => (t.state.clone(), Some(t.cfg.clone())),
                None => match self.store.load(&svc.name) {
                    Some(saved) => {
                        events.push(Event::Restored { now_ms });
                        info!(service = %svc.name, phase = saved.phase.name(), step = saved.step, weight = saved.weight,
                            "resuming the persisted rollout; its clocks restart (time the agent was down does not count)");
                        // The persisted settings are unknown: the steps are taken as changed.
                        let mut unknown = cfg.clone();
                        unknown.steps.clear();
                        (saved, Some(unknown))
                    }
                    None => {
                        let mut st = State::new(
                            svc.canary_revision
                                .clone()
                                .unwrap_or_else(|| derived_revision(&svc.canary)),
                            svc.canary_revision.is_some(),
                            svc.canary.clone(),
                            now_ms,
                            cfg,
                        );
                        track_stable(&mut st, svc);
                        info!(service = %svc.name, phase = st.phase.name(), weight = st.weight, revision = %st.revision, "{}", st.reason);
                        self.generation += 1;
                        self.store.save(&svc.name, &st);
                        self.services.insert(
                            svc.name.clone(),
                            Tracked {
                                state: st,
                                cfg: cfg.clone(),
                                window_start: None,
                                critical: Vec::new(),
                            },
                        );
                        continue;
                    }
                },
            };
            match classify(&state, svc) {
                Change::Same => {}
                Change::Scaled => {
                    info!(service = %svc.name, from = state.canary_backends.len(), to = svc.canary.len(),
                        "the canary scaled; its step and weight stay");
                    events.push(Event::Scaled {
                        backends: svc.canary.clone(),
                    });
                }
                Change::Release { revision, named } => {
                    events.push(Event::Release {
                        now_ms,
                        revision,
                        named,
                        backends: svc.canary.clone(),
                    });
                }
                Change::NoCanary => events.push(Event::NoCanary),
            }
            if let Some(old) = old_cfg.filter(|o| o != cfg) {
                events.push(Event::Reconfigured {
                    now_ms,
                    old: Box::new(old),
                });
            }
            let mut next = state.clone();
            track_stable(&mut next, svc);
            for e in events {
                let (n, actions) = machine::step(&next, e, cfg).expect("never refused");
                self.record(&svc.name, &n, &actions);
                next = n;
            }
            let window_moved = next.window_since_ms != state.window_since_ms;
            let changed = next != state;
            let t = self
                .services
                .entry(svc.name.clone())
                .or_insert_with(|| Tracked {
                    state: state.clone(),
                    cfg: cfg.clone(),
                    window_start: None,
                    critical: Vec::new(),
                });
            if window_moved {
                t.window_start = None;
            }
            t.cfg = cfg.clone();
            t.state = next;
            if changed {
                self.generation += 1;
                self.store.save(&svc.name, &t.state);
            }
        }
    }

    /// The notices since the last call, oldest first.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Logs and counts what a step did, and notes it for the webhooks.
    fn record(&mut self, service: &str, next: &State, actions: &[Action]) {
        let notice = |event, gate| Notice {
            service: service.to_string(),
            event,
            gate,
            phase: next.phase,
            awaiting: next.awaiting,
            weight: next.weight,
            step: next.step,
            revision: next.revision.clone(),
            reason: next.reason.clone(),
            cause: next.cause,
        };
        // One event per step of the machine: the phase it entered, else a new weight.
        let event = actions.iter().find_map(|a| match a {
            Action::Transition { to, .. } => Some(to.name()),
            _ => None,
        });
        let event = event.or_else(|| {
            actions
                .iter()
                .any(|a| matches!(a, Action::SetWeight(_)))
                .then_some("step")
        });
        if let Some(e) = event {
            self.notices.push(notice(Some(e), None));
        }
        for a in actions {
            if let Action::AskGate(kind) = a {
                self.notices.push(notice(None, Some(*kind)));
            }
        }
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
                            let label = next.cause.map_or("operator", RollbackCause::label);
                            *self
                                .counts
                                .rollbacks
                                .entry((service.to_string(), label))
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
                Action::AskGate(kind) => {
                    info!(service, gate = kind.name(), "{}", next.reason);
                }
                Action::CanarySegments(_) | Action::CutCanary => {}
            }
        }
    }

    /// One telemetry tick: the critical path for every watched canary, and
    /// the checks whose window ended. `now_ms` is on the telemetry's clock.
    /// Returns the actions per service.
    pub fn tick(
        &mut self,
        config: &Config,
        telemetry: &Telemetry,
        now_ms: u64,
    ) -> Vec<(String, Vec<Action>)> {
        let mut out = Vec::new();
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let Some(svc) = config.services.iter().find(|s| s.name == name) else {
                continue;
            };
            let Some(spec) = &svc.rollout else { continue };
            let http = svc.protocol == Protocol::Http;
            let totals = |g| telemetry.group(&name, g).cloned().unwrap_or_default();
            let following = self.following.contains(&name);
            let waiting = self.held_windows.contains(&name);
            let t = self.services.get_mut(&name).expect("listed");
            if waiting {
                t.window_start = None;
            }
            // After a weight change, data counts once the warm-up is over.
            let warmup_ms = spec.analysis.warmup.as_millis() as u64;
            let warm = |s: &State| now_ms >= s.step_since_ms + warmup_ms;
            if t.window_start.is_none() && warm(&t.state) && !waiting {
                t.window_start = Some((totals(Group::Stable), totals(Group::Canary)));
            }
            let confidence = spec
                .analysis
                .compare
                .as_ref()
                .map_or(DEFAULT_CONFIDENCE, |c| c.confidence);
            let (critical, outage) = if t.state.watched(now_ms, &spec.rollout) {
                // Only what the canary did since its weight was set (and
                // warmed up) counts, and no more than the window.
                let since_ns = (t.state.step_since_ms + warmup_ms) * 1_000_000;
                let c = &spec.analysis.critical;
                let window_ns = c.window.as_nanos() as u64;
                let min = c.min_requests;
                // The shortest recent stretch with enough (a sudden failure),
                // and the whole window (a sustained one).
                let stretches = |enough: fn(&Recent, u64) -> bool| -> Vec<(Recent, Recent)> {
                    [
                        telemetry.recent_pair(&name, since_ns, window_ns, |r| enough(r, min)),
                        telemetry.recent_pair(&name, since_ns, window_ns, |_| false),
                    ]
                    .into_iter()
                    .flatten()
                    .collect()
                };
                let requests = stretches(|r, min| r.requests >= min);
                let connections = stretches(|r, min| r.connections >= min);
                // The same test as the checks', at a level that keeps a false
                // rollback under 1 − confidence per hour of looking: two
                // looks a tick, each at (1 − confidence) / looks per hour.
                let looks_per_hour = 2.0 * 3600.0 / config.tick.as_secs_f64();
                let (mut results, outage) = analysis::critical(
                    c,
                    &requests,
                    &connections,
                    (1.0 - confidence) / looks_per_hour,
                );
                analysis::mark_dry_run(&mut results, &spec.analysis.dry_run);
                // A critical path all in dry run holds nothing either.
                let outage = outage.filter(|_| results.iter().any(|r| !r.dry_run));
                (results, outage)
            } else {
                (Vec::new(), None)
            };
            if t.critical != critical {
                t.critical = critical.clone();
                self.generation += 1;
            }
            let mut actions = Vec::new();
            let (mut state, a) = machine::step(
                &t.state,
                Event::Tick {
                    now_ms,
                    critical,
                    outage,
                },
                &spec.rollout,
            )
            .expect("ticks are never refused");
            // Decided elsewhere: only a rollback by this node's critical
            // path is taken here.
            let lowered_here = state.phase == Phase::RolledBack
                && t.state.phase != Phase::RolledBack
                && matches!(state.cause, Some(RollbackCause::Critical(_)));
            if following && !lowered_here {
                state = t.state.clone();
            } else {
                actions.extend(a);
            }
            // No window yet: still warming up (warmup < interval, so rare).
            if let Some((s0, c0)) = t
                .window_start
                .clone()
                .filter(|_| !following && !waiting && state.check_due(now_ms, &spec.rollout))
            {
                let canary = &totals(Group::Canary) - &c0;
                let stable = &totals(Group::Stable) - &s0;
                let results = analysis::check(
                    &spec.analysis,
                    spec.rollout.min_requests,
                    &canary,
                    &stable,
                    http,
                    levels(spec, confidence),
                );
                let (next, a) =
                    machine::step(&state, Event::Check { now_ms, results }, &spec.rollout)
                        .expect("checks are never refused");
                state = next;
                actions.extend(a);
            }
            let window_moved = state.window_since_ms != t.state.window_since_ms;
            let changed = state != t.state;
            let raised = state.weight > t.state.weight;
            self.record(&name, &state, &actions);
            let t = self.services.get_mut(&name).expect("listed");
            if window_moved {
                t.window_start =
                    warm(&state).then(|| (totals(Group::Stable), totals(Group::Canary)));
            }
            t.state = state;
            if changed {
                self.generation += 1;
                self.persist(&name, raised);
            }
            if !actions.is_empty() {
                out.push((name, actions));
            }
        }
        out
    }

    /// An operator's verb, at `now_ms` on the engine's clock.
    pub fn command(
        &mut self,
        config: &Config,
        service: &str,
        verb: &Verb,
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
        let event = match verb {
            Verb::Pause => Event::Pause { now_ms },
            Verb::Resume => Event::Resume { now_ms },
            Verb::Promote => Event::Promote { now_ms },
            Verb::Abort => Event::Abort { now_ms },
            Verb::SetWeight { basis_points } => Event::SetWeight {
                now_ms,
                weight: *basis_points,
            },
            Verb::Start { revision } => {
                if let (Some(_), Some(named)) = (revision, &svc.canary_revision) {
                    return Err(Refused(format!(
                        "the configuration names this canary's revision ({named}): a new release \
                         is a new canary.revision there"
                    )));
                }
                Event::Start {
                    now_ms,
                    revision: revision.clone(),
                }
            }
        };
        let (next, actions) = machine::step(&t.state, event, &spec.rollout)?;
        info!(service, ?verb, "operator command");
        self.record(service, &next, &actions);
        let t = self.services.get_mut(service).expect("present");
        if next.window_since_ms != t.state.window_since_ms {
            t.window_start = None;
        }
        let raised = next.weight > t.state.weight;
        t.state = next;
        self.generation += 1;
        self.persist(service, raised);
        Ok(actions)
    }

    /// The answer of `service`'s gate webhooks, asked for `revision`.
    pub fn gate_answered(
        &mut self,
        config: &Config,
        service: &str,
        revision: &str,
        event: Event,
    ) -> Vec<Action> {
        let Some(spec) = config
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.rollout.as_ref())
        else {
            return Vec::new();
        };
        let Some(t) = self.services.get(service) else {
            return Vec::new();
        };
        if t.state.revision != revision {
            return Vec::new();
        }
        let (next, actions) = machine::step(&t.state, event, &spec.rollout).expect("never refused");
        self.record(service, &next, &actions);
        let t = self.services.get_mut(service).expect("present");
        if next != t.state {
            let raised = next.weight > t.state.weight;
            t.state = next;
            self.generation += 1;
            self.persist(service, raised);
        }
        actions
    }

    /// Saves `service`'s state. A raised weight is on disk before the
    /// kernel takes it (the caller writes the maps after this returns): an
    /// agent killed at any moment resumes at least at the step whose weight
    /// the kernel holds. Lowered weights go to the kernel first, at once.
    fn persist(&self, service: &str, raised: bool) {
        if let Some(t) = self.services.get(service) {
            self.store.save(service, &t.state);
            if raised {
                self.store.flush();
            }
        }
    }

    /// Records that the kernel took `service`'s weight at `unix_ms` (wall clock).
    pub fn written(&mut self, service: &str, unix_ms: u64) {
        if let Some(t) = self.services.get_mut(service) {
            t.state.weight_written_unix_ms = Some(unix_ms);
            self.generation += 1;
            self.store.save(service, &t.state);
        }
    }

    /// What each rollout wants of its service's map value.
    pub fn overrides(&self) -> BTreeMap<String, Override> {
        self.services
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    Override {
                        weight: t.state.weight,
                        canary_segments: t.state.canary_segments,
                    },
                )
            })
            .collect()
    }
}

mod follow;
pub use follow::Decision;

#[cfg(test)]
mod tests;
