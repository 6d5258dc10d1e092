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
    config::{OnRollback, Rollout, Strategy},
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
    /// The weight was set by an operator.
    pub manual: bool,
    /// The results of the last check.
    pub last_check: Vec<JudgeResult>,
    /// When the kernel last took this rollout's weight (wall clock, Unix ms;
    /// for display only).
    #[serde(default, alias = "weight_written_ms")]
    pub weight_written_unix_ms: Option<u64>,
}

/// `planned_weight` of a state persisted before it existed: taken from `weight`.
pub(super) const PLANNED_UNSET: u32 = u32::MAX;

fn planned_unset() -> u32 {
    PLANNED_UNSET
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Every telemetry tick, with the critical judges' results (empty when
    /// the canary is not watched).
    Tick {
        now_ms: u64,
        critical: Vec<JudgeResult>,
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
            manual: false,
            last_check: Vec::new(),
            weight_written_unix_ms: None,
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
fn advance(mut s: State, now_ms: u64, cfg: &Rollout, actions: &mut Vec<Action>) -> State {
    let target = if s.planned_weight < step_weight(cfg, s.step) {
        s.step
    } else {
        s.step + 1
    };
    // A step of 100 % leaves stable nothing to compare with: reaching it is the promotion.
    let w = step_weight(cfg, target);
    if target >= cfg.steps.len() || w >= BASIS_POINTS {
        return promote(s, now_ms, "every check passed".into(), actions);
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
        Event::Tick { now_ms, critical } => {
            let live = matches!(
                s.phase,
                Phase::Progressing | Phase::Paused | Phase::Promoted
            );
            if let Some(r) = critical
                .iter()
                .find(|r| matches!(r.verdict, Verdict::Fail(_)))
                .filter(|_| live)
            {
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
            } else if s.phase != Phase::Progressing {
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
            if s.phase != Phase::Progressing {
                return Ok((s, actions));
            }
            actions.push(Action::Checked(results.clone()));
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
                            .find(|r| matches!(r.verdict, Verdict::Fail(_)))
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
                                promote(s, now_ms, why, &mut actions)
                            }
                            // Keeps analysing until an operator decides.
                            _ => s,
                        },
                        _ if s.passes < cfg.checks_per_step => s,
                        Strategy::Canary => advance(s, now_ms, cfg, &mut actions),
                        Strategy::BlueGreen => {
                            promote(s, now_ms, "every check passed".into(), &mut actions)
                        }
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
    };
    Ok((next, actions))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg() -> Rollout {
        Rollout {
            strategy: Strategy::Canary,
            steps: vec![100, 500, 1000, 2500, 5000, 10000],
            interval: Duration::from_secs(10),
            checks_per_step: 1,
            min_requests: 100,
            failure_limit: 1,
            progress_deadline: Duration::from_secs(60),
            on_rollback: OnRollback::Drain,
            watch_after_promotion: Duration::from_secs(300),
            duration: None,
        }
    }

    fn backends(last: u8) -> Vec<SocketAddrV4> {
        vec![SocketAddrV4::new([10, 0, 3, last].into(), 80)]
    }

    fn fresh(cfg: &Rollout) -> State {
        State::new("r1".into(), true, backends(1), 0, cfg)
    }

    fn result(judge: Judge, verdict: Verdict) -> Vec<JudgeResult> {
        vec![JudgeResult {
            judge,
            verdict,
            value: None,
            limit: None,
        }]
    }

    fn pass() -> Vec<JudgeResult> {
        result(Judge::ErrorRate, Verdict::Pass)
    }

    fn fail(judge: Judge) -> Vec<JudgeResult> {
        result(judge, Verdict::Fail("x".into()))
    }

    fn check(s: &State, now_ms: u64, results: Vec<JudgeResult>, cfg: &Rollout) -> State {
        step(s, Event::Check { now_ms, results }, cfg).unwrap().0
    }

    fn tick(s: &State, now_ms: u64, critical: Vec<JudgeResult>, cfg: &Rollout) -> State {
        step(s, Event::Tick { now_ms, critical }, cfg).unwrap().0
    }

    #[test]
    fn operator_events_in_every_phase() {
        let cfg = cfg();
        let progressing = fresh(&cfg);
        let at = |phase: Phase| {
            let mut s = progressing.clone();
            s.phase = phase;
            s.weight = match phase {
                Phase::Promoted => 10_000,
                Phase::RolledBack | Phase::Idle => 0,
                _ => 100,
            };
            s
        };
        use Phase::*;
        /// An operator event, and for each phase (in `Phase::ALL` order) the phase after it, or None = refused.
        type Case = (fn(u64) -> Event, [Option<Phase>; 5]);
        let cases: [Case; 5] = [
            (
                |n| Event::Pause { now_ms: n },
                [None, Some(Paused), None, None, None],
            ),
            (
                |n| Event::Resume { now_ms: n },
                [None, None, Some(Progressing), None, None],
            ),
            (
                |n| Event::Promote { now_ms: n },
                [None, Some(Promoted), Some(Promoted), None, Some(Promoted)],
            ),
            (
                |n| Event::Abort { now_ms: n },
                [
                    None,
                    Some(RolledBack),
                    Some(RolledBack),
                    Some(RolledBack),
                    None,
                ],
            ),
            (
                |n| Event::Start {
                    now_ms: n,
                    revision: None,
                },
                // A promoted canary serves everyone: starting it again is refused.
                [None, None, Some(Progressing), None, Some(Progressing)],
            ),
        ];
        for (event, expected) in cases {
            for (phase, want) in Phase::ALL.into_iter().zip(expected) {
                let e = event(5000);
                let got = step(&at(phase), e.clone(), &cfg);
                match (want, got) {
                    (None, Err(_)) => {}
                    (Some(p), Ok((s, _))) => {
                        assert_eq!(s.phase, p, "{e:?} in {phase:?}");
                        let w = match p {
                            Promoted => 10_000,
                            RolledBack => 0,
                            Progressing => 100,
                            _ => s.weight,
                        };
                        assert_eq!(s.weight, w, "{e:?} in {phase:?}");
                    }
                    (want, got) => panic!("{e:?} in {phase:?}: want {want:?}, got {got:?}"),
                }
            }
        }
        // set-weight: manual, paused at that weight; resume goes back to the step's weight.
        let (s, acts) = step(
            &progressing,
            Event::SetWeight {
                now_ms: 1,
                weight: 3000,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!((s.phase, s.weight, s.manual), (Paused, 3000, true));
        assert!(acts.contains(&Action::SetWeight(3000)));
        let (s, _) = step(&s, Event::Resume { now_ms: 2 }, &cfg).unwrap();
        assert_eq!((s.phase, s.weight, s.manual), (Progressing, 100, false));
        assert!(
            step(
                &at(Idle),
                Event::SetWeight {
                    now_ms: 1,
                    weight: 3000
                },
                &cfg
            )
            .is_err()
        );
    }

    #[test]
    fn after_a_rollback_only_an_operator_or_a_new_release_raises_the_weight() {
        let cfg = cfg();
        let (s, acts) = step(&fresh(&cfg), Event::Abort { now_ms: 1 }, &cfg).unwrap();
        assert!(
            acts.contains(&Action::SetWeight(0)) && acts.contains(&Action::CanarySegments(false))
        );
        assert_eq!(s.cause, Some(RollbackCause::Operator));
        for e in [
            Event::Check {
                now_ms: 99_000,
                results: pass(),
            },
            Event::Tick {
                now_ms: 99_000,
                critical: vec![],
            },
            Event::Scaled {
                backends: backends(2),
            },
        ] {
            let (n, acts) = step(&s, e, &cfg).unwrap();
            assert_eq!((n.phase, n.weight), (Phase::RolledBack, 0));
            assert!(acts.is_empty());
        }
        let (n, acts) = step(
            &s,
            Event::Release {
                now_ms: 2,
                revision: "r2".into(),
                named: true,
                backends: backends(2),
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(
            (n.phase, n.weight, n.step, n.failures, n.cause),
            (Phase::Progressing, 100, 0, 0, None)
        );
        assert!(acts.contains(&Action::SetWeight(100)));
        let (n, _) = step(&s, Event::NoCanary, &cfg).unwrap();
        assert_eq!((n.phase, n.weight), (Phase::Idle, 0));
    }

    #[test]
    fn scaling_the_canary_keeps_its_step_and_weight() {
        let cfg = cfg();
        let s = check(&fresh(&cfg), 10_000, pass(), &cfg);
        assert_eq!((s.step, s.weight), (1, 500));
        let mut more = backends(1);
        more.extend(backends(2));
        let (n, acts) = step(&s, Event::Scaled { backends: more }, &cfg).unwrap();
        assert!(acts.is_empty(), "{acts:?}");
        assert_eq!((n.phase, n.step, n.weight), (Phase::Progressing, 1, 500));
        assert_eq!(n.canary_backends.len(), 2);
    }

    #[test]
    fn reloaded_steps_never_raise_the_weight() {
        let cfg = cfg();
        // Paused at step 5 of six (50 %).
        let mut s = fresh(&cfg);
        for t in 1..=4 {
            s = check(&s, t * 10_000, pass(), &cfg);
        }
        assert_eq!((s.step, s.weight), (4, 5000));
        let (s, _) = step(&s, Event::Pause { now_ms: 50_000 }, &cfg).unwrap();
        // Reloaded with two steps.
        let mut two = cfg.clone();
        two.steps = vec![1000, 10_000];
        let (s, acts) = step(
            &s,
            Event::Reconfigured {
                now_ms: 51_000,
                old: Box::new(cfg.clone()),
            },
            &two,
        )
        .unwrap();
        assert!(acts.is_empty(), "nothing written: {acts:?}");
        assert_eq!((s.phase, s.step, s.weight), (Phase::Paused, 1, 5000));
        // Resumed: still 50 %, not 100 % at once.
        let (s, acts) = step(&s, Event::Resume { now_ms: 52_000 }, &two).unwrap();
        assert_eq!((s.phase, s.weight), (Phase::Progressing, 5000), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::SetWeight(_))));
        // The next passing check is the next step: here, the promotion.
        let s = check(&s, 62_000, pass(), &two);
        assert_eq!((s.phase, s.weight), (Phase::Promoted, 10_000));

        // Progressing at 25 % (step 4 of 6), reloaded with [10, 20, 30, 100]:
        // 25 % stays, and the next pass goes to 30 %, not 100 %.
        let mut s = fresh(&cfg);
        for t in 1..=3 {
            s = check(&s, t * 10_000, pass(), &cfg);
        }
        let mut four = cfg.clone();
        four.steps = vec![1000, 2000, 3000, 10_000];
        let (s, _) = step(
            &s,
            Event::Reconfigured {
                now_ms: 31_000,
                old: Box::new(cfg.clone()),
            },
            &four,
        )
        .unwrap();
        assert_eq!((s.step, s.weight), (2, 2500));
        let s = check(&s, 41_000, pass(), &four);
        assert_eq!((s.step, s.weight), (2, 3000));
        let s = check(&s, 51_000, pass(), &four);
        assert_eq!(s.phase, Phase::Promoted);
    }

    #[test]
    fn a_changed_strategy_applies_from_the_next_check() {
        let cfg = cfg();
        let s = check(&fresh(&cfg), 10_000, pass(), &cfg);
        let mut bg = cfg.clone();
        bg.strategy = Strategy::BlueGreen;
        let (s, acts) = step(
            &s,
            Event::Reconfigured {
                now_ms: 11_000,
                old: Box::new(cfg.clone()),
            },
            &bg,
        )
        .unwrap();
        assert!(acts.is_empty());
        assert_eq!(s.weight, 500, "the weight stays until the next check");
        let s = check(&s, 20_000, pass(), &bg);
        assert_eq!((s.phase, s.weight), (Phase::Promoted, 10_000));
    }

    #[test]
    fn the_critical_path_watches_every_canary_with_clients() {
        let cfg = cfg();
        let critical = fail(Judge::CriticalErrorRate);
        // Held by hand at 50 %.
        let (held, _) = step(
            &fresh(&cfg),
            Event::SetWeight {
                now_ms: 1000,
                weight: 5000,
            },
            &cfg,
        )
        .unwrap();
        assert!(held.watched(2000, &cfg));
        let s = tick(&held, 2000, critical.clone(), &cfg);
        assert_eq!(
            (s.phase, s.weight, s.cause),
            (
                Phase::RolledBack,
                0,
                Some(RollbackCause::Critical(Judge::CriticalErrorRate))
            )
        );
        // Paused.
        let (paused, _) = step(&fresh(&cfg), Event::Pause { now_ms: 1 }, &cfg).unwrap();
        assert!(paused.watched(2, &cfg));
        assert_eq!(
            tick(&paused, 2, critical.clone(), &cfg).phase,
            Phase::RolledBack
        );
        // Promoted: watched for watch_after_promotion, then not.
        let (promoted, _) = step(&fresh(&cfg), Event::Promote { now_ms: 10_000 }, &cfg).unwrap();
        assert!(promoted.watched(10_000 + 299_999, &cfg));
        assert!(!promoted.watched(10_000 + 300_000, &cfg));
        assert_eq!(promoted.watched_until_ms(&cfg), Some(310_000));
        let s = tick(&promoted, 20_000, critical.clone(), &cfg);
        assert_eq!((s.phase, s.weight), (Phase::RolledBack, 0));
        // Rolled back or idle: nothing to watch.
        assert!(!s.watched(20_001, &cfg));
        let mut off = cfg.clone();
        off.watch_after_promotion = Duration::ZERO;
        assert!(!promoted.watched(10_000, &off));
    }

    #[test]
    fn ab_never_ends_by_deadline_while_checks_pass_and_is_promoted_after_its_duration() {
        let mut cfg = cfg();
        cfg.strategy = Strategy::Ab;
        let mut s = fresh(&cfg);
        assert_eq!((s.weight, s.canary_segments), (0, true));
        // An hour of passing checks every 10 s, the deadline 60 s.
        for t in 1..=360 {
            s = tick(&s, t * 10_000 - 1, vec![], &cfg);
            s = check(&s, t * 10_000, pass(), &cfg);
            assert_eq!(s.phase, Phase::Progressing, "at {t}0 s: {}", s.reason);
        }
        // Inconclusive checks for longer than the deadline end it.
        let mut quiet = s.clone();
        let inconclusive = result(Judge::ErrorRate, Verdict::Inconclusive("few".into()));
        for t in 361..=367 {
            quiet = check(&quiet, t * 10_000, inconclusive.clone(), &cfg);
            quiet = tick(&quiet, t * 10_000 + 1, vec![], &cfg);
        }
        assert_eq!(
            (quiet.phase, quiet.cause),
            (Phase::RolledBack, Some(RollbackCause::ProgressDeadline))
        );
        // With a duration: promoted on the first passing check after it.
        cfg.duration = Some(Duration::from_secs(3700));
        let s = check(&s, 3_690_000, pass(), &cfg);
        assert_eq!((s.phase, s.weight), (Phase::Progressing, 0), "not yet");
        let s = check(&s, 3_700_000, pass(), &cfg);
        assert_eq!(
            (s.phase, s.weight),
            (Phase::Promoted, 10_000),
            "{}",
            s.reason
        );
    }

    #[test]
    fn a_restored_rollout_restarts_its_clocks() {
        let cfg = cfg();
        let s = fresh(&cfg);
        // Persisted at agent time 0..30 s; restored by an agent whose clock reads 5 s.
        let (s, _) = step(&s, Event::Restored { now_ms: 5000 }, &cfg).unwrap();
        assert_eq!(
            (s.step_since_ms, s.window_since_ms, s.check_since_ms),
            (5000, 5000, 5000)
        );
        // No deadline until 60 s of this agent's running time.
        assert_eq!(tick(&s, 64_999, vec![], &cfg).phase, Phase::Progressing);
        assert_eq!(tick(&s, 65_000, vec![], &cfg).phase, Phase::RolledBack);
    }

    #[test]
    fn cut_drops_canary_connections_on_rollback() {
        let mut cfg = cfg();
        cfg.on_rollback = OnRollback::Cut;
        let (_, acts) = step(&fresh(&cfg), Event::Abort { now_ms: 1 }, &cfg).unwrap();
        assert!(acts.contains(&Action::CutCanary));
    }

    #[test]
    fn failures_below_the_limit_hold_then_roll_back() {
        let mut cfg = cfg();
        cfg.failure_limit = 2;
        let s = check(&fresh(&cfg), 10_000, fail(Judge::ErrorRate), &cfg);
        assert_eq!(
            (s.phase, s.failures, s.weight),
            (Phase::Progressing, 1, 100)
        );
        let s = check(&s, 20_000, fail(Judge::ErrorRate), &cfg);
        assert_eq!(
            (s.phase, s.cause),
            (
                Phase::RolledBack,
                Some(RollbackCause::Check(Judge::ErrorRate))
            )
        );
    }

    #[test]
    fn a_check_with_no_judge_is_inconclusive() {
        let cfg = cfg();
        let s = check(&fresh(&cfg), 10_000, vec![], &cfg);
        assert_eq!((s.phase, s.step, s.passes), (Phase::Progressing, 0, 0));
    }

    #[test]
    fn blue_green_switches_at_once() {
        let mut cfg = cfg();
        cfg.strategy = Strategy::BlueGreen;
        let s = fresh(&cfg);
        assert_eq!(
            (s.weight, s.canary_segments),
            (0, true),
            "segment traffic only"
        );
        let s = check(&s, 10_000, pass(), &cfg);
        assert_eq!((s.phase, s.weight), (Phase::Promoted, 10_000));
    }

    #[test]
    fn derived_revisions_name_their_backends() {
        assert_eq!(derived_revision(&backends(1)), "10.0.3.1:80");
        let many: Vec<_> = (1..=5).flat_map(backends).collect();
        assert_eq!(
            derived_revision(&many),
            "10.0.3.1:80,10.0.3.2:80,10.0.3.3:80 and 2 more"
        );
    }
}
