//! The rollout of one service's canary, as a pure state machine:
//! `step(state, event, config) -> (state, actions)`.
//!
//! ```text
//! Idle --new release / start--> Progressing(step, passes, failures)
//! Progressing --checks pass on the last step--> Promoted (weight 100 %)
//! Progressing, Paused, Promoted (while watched) --critical failure--> RolledBack
//! Progressing --failed checks >= failure_limit, the progress deadline--> RolledBack
//! Progressing <--pause / resume--> Paused;  any but Idle --set-weight--> Paused
//! ```
//!
//! The weight only goes up while progressing, on passing checks; after a
//! rollback nothing raises it again but an operator or a new release. The
//! critical path judges the canary whenever it has clients and stable can
//! take them back ([`State::watched`]). Inconclusive checks (too little
//! traffic) hold the step; the progress deadline bounds how long.
//!
//! Times are milliseconds on the agent's monotonic clock: they mean nothing
//! to another agent, so a restored state restarts its clocks
//! ([`Event::Restored`]) — time the agent was down never counts.

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use crate::{
    analysis::{self, Judge, JudgeResult, Verdict},
    config::{HookKind, OnRollback, Rollout, Strategy},
};
use kanari_common::maps::BASIS_POINTS;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No canary to roll out.
    Idle,
    Progressing,
    /// Held by an operator (pause, or set-weight).
    Paused,
    Promoted,
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Idle,
        Phase::Progressing,
        Phase::Paused,
        Phase::Promoted,
        Phase::RolledBack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
        }
    }
}

/// Why a rollout was rolled back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "by", content = "judge", rename_all = "snake_case")]
pub enum RollbackCause {
    /// Failed checks reached `failure_limit`; the judge that failed last.
    Check(Judge),
    /// The critical path, on a tick.
    Critical(Judge),
    /// No step passed within `progress_deadline`.
    ProgressDeadline,
    /// `kanari abort`.
    Operator,
}

impl RollbackCause {
    /// The `reason` label of `kanari_rollbacks_total`.
    pub fn label(self) -> &'static str {
        match self {
            RollbackCause::Check(j) | RollbackCause::Critical(j) => j.name(),
            RollbackCause::ProgressDeadline => "progress_deadline",
            RollbackCause::Operator => "operator",
        }
    }
}

/// A version that served as stable until a promoted canary replaced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retired {
    pub revision: Option<String>,
    pub backends: Vec<SocketAddrV4>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The canary revision this rollout is for: `canary.revision`, the one an
    /// operator named (`rollout start --revision`), or one derived from the
    /// backends it started with.
    pub revision: String,
    /// The revision was named (not derived from the backends).
    #[serde(default)]
    pub revision_named: bool,
    /// The canary's backends as last configured: a derived revision stays
    /// the same while they overlap (the canary scaled).
    #[serde(default)]
    pub canary_backends: Vec<SocketAddrV4>,
    /// What stable serves, when known: `stable.revision`, or the canary
    /// promoted before it. Kept by the engine.
    #[serde(default)]
    pub stable_revision: Option<String>,
    /// Stable's backends as last configured. Kept by the engine.
    #[serde(default)]
    pub stable_backends: Vec<SocketAddrV4>,
    /// Versions a promotion replaced, the newest last: no configuration may
    /// make one of them stable again. Kept by the engine.
    #[serde(default)]
    pub retired: Vec<Retired>,
    pub phase: Phase,
    /// Index into the steps (the `canary` strategy's weights).
    pub step: usize,
    /// The canary weight in force, basis points.
    pub weight: u32,
    /// The weight the rollout itself is at: its step's, or less after the
    /// steps were reloaded under it. The weight in force differs only while
    /// an operator's `set-weight` holds.
    #[serde(default = "planned_unset")]
    pub planned_weight: u32,
    /// Whether segments pinned to the canary send it their clients.
    pub canary_segments: bool,
    /// Passing checks on this step.
    pub passes: u32,
    /// Failed checks in this rollout.
    pub failures: u32,
    /// When this step began (or the weight was last set): the progress
    /// deadline and the critical path count from here.
    pub step_since_ms: u64,
    /// When the current check window began: it grows over inconclusive
    /// checks, so a quiet service collects enough requests in the end.
    pub window_since_ms: u64,
    /// When the last check ran (the next is due an interval later).
    pub check_since_ms: u64,
    /// When the rollout began (an `ab` rollout's duration counts from here).
    #[serde(default)]
    pub started_ms: u64,
    /// When the canary was promoted: the critical path watches it for
    /// `watch_after_promotion` from here.
    #[serde(default)]
    pub promoted_ms: Option<u64>,
    /// Why the rollout is where it is.
    pub reason: String,
    /// What rolled it back, if it was.
    #[serde(default)]
    pub cause: Option<RollbackCause>,
    /// Since when a shared outage (stable failing as badly as the canary)
    /// holds the rollout: no check, no step, and its clocks stand still.
    #[serde(default)]
    pub held_since_ms: Option<u64>,
    /// The weight was set by an operator.
    pub manual: bool,
    /// The results of the last check.
    pub last_check: Vec<JudgeResult>,
    /// When the kernel last took this rollout's weight (wall clock, Unix ms;
    /// for display only).
    #[serde(default, alias = "weight_written_ms")]
    pub weight_written_unix_ms: Option<u64>,
    /// The checks passed and the step up (or the promotion) waits for this
    /// gate's webhooks to answer 2xx.
    #[serde(default)]
    pub awaiting: Option<HookKind>,
}

/// `planned_weight` of a state persisted before it existed: taken from `weight`.
pub(super) const PLANNED_UNSET: u32 = u32::MAX;

fn planned_unset() -> u32 {
    PLANNED_UNSET
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Every telemetry tick, with the critical judges' results (empty when
    /// the canary is not watched) and, while stable fails as badly as the
    /// canary, why the outage is shared.
    Tick {
        now_ms: u64,
        critical: Vec<JudgeResult>,
        outage: Option<String>,
    },
    /// A check window ended, with the judges' results.
    Check {
        now_ms: u64,
        results: Vec<JudgeResult>,
    },
    /// A canary revision this rollout has not seen: a new release.
    Release {
        now_ms: u64,
        revision: String,
        named: bool,
        backends: Vec<SocketAddrV4>,
    },
    /// The same revision on another set of backends: the step and the weight stay.
    Scaled {
        backends: Vec<SocketAddrV4>,
    },
    /// The configuration has no canary backends.
    NoCanary,
    /// The rollout's settings changed; `old` is what they were. The state
    /// machine's `cfg` is the new one.
    Reconfigured {
        now_ms: u64,
        old: Box<Rollout>,
    },
    /// A state persisted by an earlier agent, taken up by this one.
    Restored {
        now_ms: u64,
    },
    Pause {
        now_ms: u64,
    },
    Resume {
        now_ms: u64,
    },
    Promote {
        now_ms: u64,
    },
    Abort {
        now_ms: u64,
    },
    SetWeight {
        now_ms: u64,
        weight: u32,
    },
    Start {
        now_ms: u64,
        revision: Option<String>,
    },
    /// The webhooks of a gate answered: `open` when every one said 2xx,
    /// else `why` not.
    Gate {
        now_ms: u64,
        kind: HookKind,
        open: bool,
        why: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write this canary weight (basis points).
    SetWeight(u32),
    /// Let segments pinned to the canary reach it, or not.
    CanarySegments(bool),
    /// Drop the canary's connections (`on_rollback: cut`).
    CutCanary,
    /// The phase changed.
    Transition {
        from: Phase,
        to: Phase,
        reason: String,
    },
    /// A check was judged (for the metrics).
    Checked(Vec<JudgeResult>),
    /// Ask this gate's webhooks (the answer comes back as [`Event::Gate`]).
    AskGate(HookKind),
}

/// An operator request that does not apply in this phase.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The revision of a canary without a name: its backends when it started.
pub fn derived_revision(backends: &[SocketAddrV4]) -> String {
    let mut v: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    v.sort();
    match v.len() {
        0 => String::new(),
        1..=3 => v.join(","),
        n => format!("{},{},{} and {} more", v[0], v[1], v[2], n - 3),
    }
}

impl State {
    /// The state of a service first seen with a canary (`backends`, empty for none).
    pub fn new(
        revision: String,
        named: bool,
        backends: Vec<SocketAddrV4>,
        now_ms: u64,
        cfg: &Rollout,
    ) -> State {
        let has_canary = !backends.is_empty();
        let mut idle = State {
            revision: String::new(),
            revision_named: false,
            canary_backends: Vec::new(),
            stable_revision: None,
            stable_backends: Vec::new(),
            retired: Vec::new(),
            phase: Phase::Idle,
            step: 0,
            weight: 0,
            planned_weight: 0,
            canary_segments: false,
            passes: 0,
            failures: 0,
            step_since_ms: now_ms,
            window_since_ms: now_ms,
            check_since_ms: now_ms,
            started_ms: now_ms,
            promoted_ms: None,
            reason: "no canary backends".into(),
            cause: None,
            held_since_ms: None,
            manual: false,
            last_check: Vec::new(),
            weight_written_unix_ms: None,
            awaiting: None,
        };
        if has_canary {
            idle.revision = revision;
            idle.revision_named = named;
            idle.canary_backends = sorted(backends);
            begin(idle, now_ms, cfg, "new canary revision").0
        } else {
            idle
        }
    }

    /// Whether a check window has ended.
    pub fn check_due(&self, now_ms: u64, cfg: &Rollout) -> bool {
        self.phase == Phase::Progressing
            && now_ms >= self.check_since_ms + cfg.interval.as_millis() as u64
    }

    /// Whether the critical path judges the canary now: whenever it has
    /// clients (progressing, or held by an operator with some weight or its
    /// segments) and, once promoted, for `watch_after_promotion` — while the
    /// previous version is still the configured stable to roll back to.
    pub fn watched(&self, now_ms: u64, cfg: &Rollout) -> bool {
        match self.phase {
            Phase::Progressing => true,
            Phase::Paused => self.weight > 0 || self.canary_segments,
            Phase::Promoted => self
                .promoted_ms
                .is_some_and(|t| now_ms < t + cfg.watch_after_promotion.as_millis() as u64),
            Phase::Idle | Phase::RolledBack => false,
        }
    }

    /// Until when (agent clock) a promoted canary is watched.
    pub fn watched_until_ms(&self, cfg: &Rollout) -> Option<u64> {
        (self.phase == Phase::Promoted)
            .then_some(self.promoted_ms)
            .flatten()
            .map(|t| t + cfg.watch_after_promotion.as_millis() as u64)
    }
}

fn sorted(mut v: Vec<SocketAddrV4>) -> Vec<SocketAddrV4> {
    v.sort();
    v.dedup();
    v
}

/// The weight of a progressing rollout at `step`.
fn step_weight(cfg: &Rollout, step: usize) -> u32 {
    match cfg.strategy {
        Strategy::Canary => cfg.steps.get(step).copied().unwrap_or(BASIS_POINTS),
        Strategy::BlueGreen | Strategy::Ab => 0,
    }
}

/// Moves to `to`, emitting what changed. `weight` is the weight in force.
fn transition(
    mut s: State,
    to: Phase,
    weight: u32,
    segments: bool,
    reason: String,
    actions: &mut Vec<Action>,
) -> State {
    if s.phase != to {
        actions.push(Action::Transition {
            from: s.phase,
            to,
            reason: reason.clone(),
        });
    }
    if s.weight != weight {
        actions.push(Action::SetWeight(weight));
    }
    if s.canary_segments != segments {
        actions.push(Action::CanarySegments(segments));
    }
    s.phase = to;
    s.weight = weight;
    s.canary_segments = segments;
    s.reason = reason;
    s.awaiting = None;
    s
}

/// A fresh rollout at the first step.
fn begin(mut s: State, now_ms: u64, cfg: &Rollout, why: &str) -> (State, Vec<Action>) {
    let mut actions = Vec::new();
    s.step = 0;
    s.passes = 0;
    s.failures = 0;
    s.step_since_ms = now_ms;
    s.window_since_ms = now_ms;
    s.check_since_ms = now_ms;
    s.started_ms = now_ms;
    s.promoted_ms = None;
    s.cause = None;
    s.held_since_ms = None;
    s.manual = false;
    s.last_check.clear();
    s.planned_weight = step_weight(cfg, 0);
    let w = s.planned_weight;
    let s = transition(
        s,
        Phase::Progressing,
        w,
        true,
        why.to_string(),
        &mut actions,
    );
    (s, actions)
}

fn roll_back(
    s: State,
    cause: RollbackCause,
    reason: String,
    cfg: &Rollout,
    actions: &mut Vec<Action>,
) -> State {
    let mut s = transition(s, Phase::RolledBack, 0, false, reason, actions);
    s.cause = Some(cause);
    s.held_since_ms = None;
    s.planned_weight = 0;
    s.manual = false;
    s.promoted_ms = None;
    if cfg.on_rollback == OnRollback::Cut {
        actions.push(Action::CutCanary);
    }
    s
}

fn promote(mut s: State, now_ms: u64, reason: String, actions: &mut Vec<Action>) -> State {
    s.planned_weight = BASIS_POINTS;
    s.manual = false;
    s.promoted_ms = Some(now_ms);
    s.step_since_ms = now_ms;
    transition(s, Phase::Promoted, BASIS_POINTS, true, reason, actions)
}

/// After passing checks: the next step up, or the promotion. A rollout whose
/// steps were reloaded under it may sit below its step's weight: the step's
/// weight is then the next one.
/// `confirmed`: the gate whose webhooks just answered 2xx.
fn advance(
    mut s: State,
    now_ms: u64,
    cfg: &Rollout,
    confirmed: Option<HookKind>,
    actions: &mut Vec<Action>,
) -> State {
    let target = if s.planned_weight < step_weight(cfg, s.step) {
        s.step
    } else {
        s.step + 1
    };
    // A step of 100 % leaves stable nothing to compare with: reaching it is the promotion.
    let w = step_weight(cfg, target);
    if target >= cfg.steps.len() || w >= BASIS_POINTS {
        return gated_promote(
            s,
            now_ms,
            cfg,
            confirmed,
            "every check passed".into(),
            actions,
        );
    }
    if let Some(held) = gate(
        &mut s,
        cfg,
        HookKind::ConfirmTrafficIncrease,
        confirmed,
        actions,
    ) {
        return held;
    }
    s.step = target;
    s.passes = 0;
    s.step_since_ms = now_ms;
    s.planned_weight = w;
    let why = format!(
        "checks passed; step {} of {}: {}%",
        s.step + 1,
        cfg.steps.len(),
        w as f64 / 100.0
    );
    transition(s, Phase::Progressing, w, true, why, actions)
}

/// Holds `s` at a gate of `kind` unless it is `confirmed` or has no
/// webhooks: the state to keep (the gate asked), or `None` to go on.
fn gate(
    s: &mut State,
    cfg: &Rollout,
    kind: HookKind,
    confirmed: Option<HookKind>,
    actions: &mut Vec<Action>,
) -> Option<State> {
    if confirmed == Some(kind) || !cfg.has_hook(kind) {
        return None;
    }
    s.awaiting = Some(kind);
    s.reason = format!(
        "checks passed; waiting for the {} webhooks to answer 2xx",
        kind.name()
    );
    actions.push(Action::AskGate(kind));
    Some(s.clone())
}

/// The promotion, once a `confirm-promotion` gate (if any) allows it.
fn gated_promote(
    mut s: State,
    now_ms: u64,
    cfg: &Rollout,
    confirmed: Option<HookKind>,
    reason: String,
    actions: &mut Vec<Action>,
) -> State {
    match gate(&mut s, cfg, HookKind::ConfirmPromotion, confirmed, actions) {
        Some(held) => held,
        None => promote(s, now_ms, reason, actions),
    }
}

/// The first step at or above `weight` (the last when every step is below it).
fn step_at_or_above(cfg: &Rollout, weight: u32) -> usize {
    cfg.steps
        .iter()
        .position(|w| *w >= weight)
        .unwrap_or(cfg.steps.len().saturating_sub(1))
}

/// One event. Operator events that do not apply are refused with why.
pub fn step(s: &State, event: Event, cfg: &Rollout) -> Result<(State, Vec<Action>), Refused> {
    let mut actions = Vec::new();
    let mut s = s.clone();
    let next = match event {
        Event::Release {
            now_ms,
            revision,
            named,
            backends,
        } => {
            s.revision = revision;
            s.revision_named = named;
            s.canary_backends = sorted(backends);
            let (n, a) = begin(s, now_ms, cfg, "new canary revision");
            actions.extend(a);
            n
        }
        Event::Scaled { backends } => {
            s.canary_backends = sorted(backends);
            s
        }
        Event::NoCanary => {
            let mut idle = transition(
                s,
                Phase::Idle,
                0,
                false,
                "no canary backends".into(),
                &mut actions,
            );
            idle.planned_weight = 0;
            idle.manual = false;
            idle.promoted_ms = None;
            idle.canary_backends.clear();
            idle
        }
        Event::Reconfigured { now_ms: _, old } => {
            let moving = matches!(s.phase, Phase::Progressing | Phase::Paused);
            if moving && cfg.strategy == Strategy::Canary && old.steps != cfg.steps {
                // Keep the weight; continue from the first step at or above it.
                s.step = step_at_or_above(cfg, s.planned_weight);
                s.passes = 0;
                s.reason = format!(
                    "steps changed: at {}%, continuing from step {} of {} ({}%)",
                    s.planned_weight as f64 / 100.0,
                    s.step + 1,
                    cfg.steps.len(),
                    step_weight(cfg, s.step) as f64 / 100.0
                );
            }
            s
        }
        Event::Restored { now_ms } => {
            s.step_since_ms = now_ms;
            s.window_since_ms = now_ms;
            s.check_since_ms = now_ms;
            s.started_ms = now_ms;
            s.promoted_ms = s.promoted_ms.map(|_| now_ms);
            s
        }
        Event::Tick {
            now_ms,
            critical,
            outage,
        } => {
            let live = matches!(
                s.phase,
                Phase::Progressing | Phase::Paused | Phase::Promoted
            );
            // A shared outage holds a progressing rollout; its end resumes it
            // with the clocks moved on by the time it lasted.
            match (s.phase, &outage, s.held_since_ms) {
                (Phase::Progressing, Some(why), None) => {
                    s.held_since_ms = Some(now_ms);
                    s.reason = format!("held: {why}");
                }
                (_, None, Some(since)) => {
                    let lasted = now_ms.saturating_sub(since);
                    s.held_since_ms = None;
                    s.step_since_ms += lasted;
                    s.window_since_ms += lasted;
                    s.check_since_ms += lasted;
                    s.reason = format!(
                        "the shared outage ended after {}; the rollout goes on",
                        humantime::format_duration(std::time::Duration::from_millis(lasted))
                    );
                }
                _ => {}
            }
            if let Some(r) = critical.iter().find(|r| r.fails()).filter(|_| live) {
                let Verdict::Fail(why) = &r.verdict else {
                    unreachable!()
                };
                roll_back(
                    s,
                    RollbackCause::Critical(r.judge),
                    why.clone(),
                    cfg,
                    &mut actions,
                )
            } else if s.phase != Phase::Progressing || s.held_since_ms.is_some() {
                s
            } else {
                // An A/B test makes no steps: it is held to its deadline only
                // while no check reaches a verdict.
                let since = match cfg.strategy {
                    Strategy::Ab => s.window_since_ms,
                    Strategy::Canary | Strategy::BlueGreen => s.step_since_ms,
                };
                if now_ms >= since + cfg.progress_deadline.as_millis() as u64 {
                    let why = format!(
                        "progress deadline: no step passed in {} ({} failed checks; last: {})",
                        humantime::format_duration(cfg.progress_deadline),
                        s.failures,
                        match analysis::overall(&s.last_check) {
                            Verdict::Inconclusive(w) | Verdict::Fail(w) => w,
                            Verdict::Pass => "pass".into(),
                        }
                    );
                    roll_back(s, RollbackCause::ProgressDeadline, why, cfg, &mut actions)
                } else {
                    s
                }
            }
        }
        Event::Check { now_ms, results } => {
            if s.phase != Phase::Progressing || s.held_since_ms.is_some() {
                return Ok((s, actions));
            }
            actions.push(Action::Checked(results.clone()));
            // A gate is asked again after each passing check; a late answer
            // to an earlier one does not count.
            s.awaiting = None;
            s.check_since_ms = now_ms;
            s.last_check = results.clone();
            let verdict = if results.is_empty() {
                Verdict::Inconclusive("no judge ran".into())
            } else {
                analysis::overall(&results)
            };
            if !matches!(verdict, Verdict::Inconclusive(_)) {
                s.window_since_ms = now_ms;
            }
            match verdict {
                Verdict::Fail(why) => {
                    s.failures += 1;
                    if s.failures >= cfg.failure_limit {
                        let judge = results
                            .iter()
                            .find(|r| r.fails())
                            .map(|r| r.judge)
                            .expect("a failed check has a failed judge");
                        roll_back(s, RollbackCause::Check(judge), why, cfg, &mut actions)
                    } else {
                        s
                    }
                }
                Verdict::Inconclusive(_) => s,
                Verdict::Pass => {
                    s.passes += 1;
                    match cfg.strategy {
                        Strategy::Ab => match cfg.duration {
                            Some(d) if now_ms >= s.started_ms + d.as_millis() as u64 => {
                                let why = format!(
                                    "the A/B test ran its {} with its checks passing",
                                    humantime::format_duration(d)
                                );
                                gated_promote(s, now_ms, cfg, None, why, &mut actions)
                            }
                            // Keeps analysing until an operator decides.
                            _ => s,
                        },
                        _ if s.passes < cfg.checks_per_step => s,
                        Strategy::Canary => advance(s, now_ms, cfg, None, &mut actions),
                        Strategy::BlueGreen => gated_promote(
                            s,
                            now_ms,
                            cfg,
                            None,
                            "every check passed".into(),
                            &mut actions,
                        ),
                    }
                }
            }
        }
        Event::Pause { .. } => match s.phase {
            Phase::Progressing => {
                let (w, segments) = (s.weight, s.canary_segments);
                transition(
                    s,
                    Phase::Paused,
                    w,
                    segments,
                    "paused by an operator".into(),
                    &mut actions,
                )
            }
            p => {
                return Err(Refused(format!(
                    "nothing to pause: the rollout is {}",
                    p.name()
                )));
            }
        },
        Event::Resume { now_ms } => match s.phase {
            Phase::Paused => {
                s.manual = false;
                s.step_since_ms = now_ms;
                s.window_since_ms = now_ms;
                s.check_since_ms = now_ms;
                let w = s.planned_weight;
                transition(
                    s,
                    Phase::Progressing,
                    w,
                    true,
                    "resumed by an operator; the step's clock restarts".into(),
                    &mut actions,
                )
            }
            p => {
                return Err(Refused(format!(
                    "nothing to resume: the rollout is {}",
                    p.name()
                )));
            }
        },
        Event::Promote { now_ms } => match s.phase {
            Phase::Progressing | Phase::Paused | Phase::RolledBack => {
                promote(s, now_ms, "promoted by an operator".into(), &mut actions)
            }
            p => {
                return Err(Refused(format!(
                    "cannot promote: the rollout is {}",
                    p.name()
                )));
            }
        },
        Event::Abort { .. } => match s.phase {
            Phase::Progressing | Phase::Paused | Phase::Promoted => roll_back(
                s,
                RollbackCause::Operator,
                "aborted by an operator".into(),
                cfg,
                &mut actions,
            ),
            p => {
                return Err(Refused(format!(
                    "nothing to abort: the rollout is {}",
                    p.name()
                )));
            }
        },
        Event::SetWeight { now_ms, weight } => match s.phase {
            Phase::Idle => return Err(Refused("no canary backends to send traffic to".into())),
            _ => {
                let w = weight.min(BASIS_POINTS);
                s.step_since_ms = now_ms;
                let mut n = transition(
                    s,
                    Phase::Paused,
                    w,
                    true,
                    format!(
                        "weight set to {}% by an operator; resume continues the rollout",
                        w as f64 / 100.0
                    ),
                    &mut actions,
                );
                n.manual = true;
                n
            }
        },
        Event::Start { now_ms, revision } => match s.phase {
            Phase::Idle => return Err(Refused("no canary backends to roll out".into())),
            Phase::Progressing => return Err(Refused("the rollout is already progressing".into())),
            Phase::Promoted => {
                return Err(Refused(format!(
                    "revision {} is promoted and serves every client: starting again would send \
                     them back to the older stable. Release a new canary instead: make the \
                     promoted backends stable.backends and put the new build under canary",
                    s.revision
                )));
            }
            _ => {
                if let Some(r) = revision {
                    s.revision = r;
                    s.revision_named = true;
                }
                let (n, a) = begin(s, now_ms, cfg, "started by an operator");
                actions.extend(a);
                n
            }
        },
        Event::Gate {
            now_ms,
            kind,
            open,
            why,
        } => {
            if s.awaiting != Some(kind) || s.phase != Phase::Progressing {
                // Asked before a rollback, pause or later check: moot.
                return Ok((s, actions));
            }
            if !open {
                s.reason = format!("checks passed; held by the {} webhooks: {why}", kind.name());
                return Ok((s, actions));
            }
            s.awaiting = None;
            match cfg.strategy {
                Strategy::Canary => advance(s, now_ms, cfg, Some(kind), &mut actions),
                Strategy::BlueGreen | Strategy::Ab => gated_promote(
                    s,
                    now_ms,
                    cfg,
                    Some(kind),
                    format!("every check passed; the {} webhooks agreed", kind.name()),
                    &mut actions,
                ),
            }
        }
    };
    Ok((next, actions))
}

#[cfg(test)]
mod tests;
