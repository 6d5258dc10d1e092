//! The rollout of one service's canary, as a pure state machine:
//! `step(state, event, config) -> (state, actions)`.
//!
//! ```text
//! Idle --new revision / start--> Progressing(step, passes, failures)
//! Progressing --checks pass on the last step--> Promoted (weight 100 %)
//! Progressing --failed checks >= failure_limit, a critical failure,
//!               the progress deadline, abort--> RolledBack(reason) (weight 0)
//! Progressing <--pause / resume--> Paused
//! ```
//!
//! The weight only goes up while progressing; after a rollback nothing raises
//! it again but an operator (promote, set-weight, start) or a new revision.
//! Inconclusive checks (too little traffic) hold the step; the progress
//! deadline bounds how long. Times are wall-clock milliseconds, so a state
//! persisted by one agent means the same to the next.

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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The canary backend set this rollout is for.
    pub revision: String,
    pub phase: Phase,
    /// Index into the steps (the `canary` strategy's weights).
    pub step: usize,
    /// The canary weight in force, basis points.
    pub weight: u32,
    /// Whether segments pinned to the canary send it their clients.
    pub canary_segments: bool,
    /// Passing checks on this step.
    pub passes: u32,
    /// Failed checks in this rollout.
    pub failures: u32,
    /// When this step (or the rollout) began, for the progress deadline.
    pub step_since_ms: u64,
    /// When the current check window began: it grows over inconclusive
    /// checks, so a quiet service collects enough requests in the end.
    pub window_since_ms: u64,
    /// When the last check ran (the next is due an interval later).
    pub check_since_ms: u64,
    /// Why the rollout is where it is.
    pub reason: String,
    /// The judge that rolled it back, if one did.
    pub rollback_judge: Option<Judge>,
    /// The weight was set by an operator.
    pub manual: bool,
    /// The results of the last check.
    pub last_check: Vec<JudgeResult>,
    /// When the weight was last written (set by the agent after writing it).
    pub weight_written_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Every telemetry tick, with the critical judges' results.
    Tick {
        now_ms: u64,
        critical: Vec<JudgeResult>,
    },
    /// A check window ended, with the judges' results.
    Check {
        now_ms: u64,
        results: Vec<JudgeResult>,
    },
    /// The configured canary backend set, when the configuration is read.
    Revision {
        now_ms: u64,
        revision: String,
        has_canary: bool,
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

impl State {
    /// The state of a service first seen with `revision`.
    pub fn new(revision: String, has_canary: bool, now_ms: u64, cfg: &Rollout) -> State {
        let idle = State {
            revision,
            phase: Phase::Idle,
            step: 0,
            weight: 0,
            canary_segments: false,
            passes: 0,
            failures: 0,
            step_since_ms: now_ms,
            window_since_ms: now_ms,
            check_since_ms: now_ms,
            reason: "no canary backends".into(),
            rollback_judge: None,
            manual: false,
            last_check: Vec::new(),
            weight_written_ms: None,
        };
        if has_canary {
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
}

/// The weight of a progressing rollout at `step`.
fn step_weight(cfg: &Rollout, step: usize) -> u32 {
    match cfg.strategy {
        Strategy::Canary => cfg.steps.get(step).copied().unwrap_or(BASIS_POINTS),
        Strategy::BlueGreen | Strategy::Ab => 0,
    }
}

/// Moves to `to`, emitting what changed.
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
    s.rollback_judge = None;
    s.manual = false;
    s.last_check.clear();
    let s = transition(
        s,
        Phase::Progressing,
        step_weight(cfg, 0),
        true,
        why.to_string(),
        &mut actions,
    );
    (s, actions)
}

fn roll_back(
    s: State,
    judge: Option<Judge>,
    reason: String,
    cfg: &Rollout,
    actions: &mut Vec<Action>,
) -> State {
    let mut s = transition(s, Phase::RolledBack, 0, false, reason, actions);
    s.rollback_judge = judge;
    if cfg.on_rollback == OnRollback::Cut {
        actions.push(Action::CutCanary);
    }
    s
}

fn promote(s: State, reason: String, actions: &mut Vec<Action>) -> State {
    transition(s, Phase::Promoted, BASIS_POINTS, true, reason, actions)
}

/// One event. Operator events that do not apply are refused with why.
pub fn step(s: &State, event: Event, cfg: &Rollout) -> Result<(State, Vec<Action>), Refused> {
    let mut actions = Vec::new();
    let s = s.clone();
    let next = match event {
        Event::Revision {
            now_ms,
            revision,
            has_canary,
        } => {
            if revision == s.revision {
                return Ok((s, actions));
            }
            if !has_canary {
                let mut idle = transition(
                    s,
                    Phase::Idle,
                    0,
                    false,
                    "no canary backends".into(),
                    &mut actions,
                );
                idle.revision = revision;
                idle
            } else {
                let (mut n, a) = begin(s, now_ms, cfg, "new canary revision");
                n.revision = revision;
                actions.extend(a);
                n
            }
        }
        Event::Tick { now_ms, critical } => {
            if s.phase != Phase::Progressing {
                return Ok((s, actions));
            }
            if let Some(r) = critical
                .iter()
                .find(|r| matches!(r.verdict, Verdict::Fail(_)))
            {
                let Verdict::Fail(why) = &r.verdict else {
                    unreachable!()
                };
                roll_back(s, Some(r.judge), why.clone(), cfg, &mut actions)
            } else if now_ms >= s.step_since_ms + cfg.progress_deadline.as_millis() as u64 {
                let why = format!(
                    "progress deadline: no step passed in {} ({} failed checks; last: {})",
                    humantime::format_duration(cfg.progress_deadline),
                    s.failures,
                    match analysis::overall(&s.last_check) {
                        Verdict::Inconclusive(w) | Verdict::Fail(w) => w,
                        Verdict::Pass => "pass".into(),
                    }
                );
                roll_back(s, None, why, cfg, &mut actions)
            } else {
                s
            }
        }
        Event::Check { now_ms, results } => {
            if s.phase != Phase::Progressing {
                return Ok((s, actions));
            }
            actions.push(Action::Checked(results.clone()));
            let mut s = s;
            s.check_since_ms = now_ms;
            s.last_check = results.clone();
            let verdict = analysis::overall(&results);
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
                            .map(|r| r.judge);
                        roll_back(s, judge, why, cfg, &mut actions)
                    } else {
                        s
                    }
                }
                Verdict::Inconclusive(_) => s,
                Verdict::Pass => {
                    s.passes += 1;
                    if s.passes < cfg.checks_per_step {
                        s
                    } else {
                        // A step of 100 % leaves stable nothing to compare with:
                        // reaching it is the promotion.
                        let next_is_last =
                            cfg.steps.get(s.step + 1).is_none_or(|w| *w >= BASIS_POINTS);
                        match cfg.strategy {
                            Strategy::Canary if !next_is_last => {
                                s.step += 1;
                                s.passes = 0;
                                s.step_since_ms = now_ms;
                                let w = step_weight(cfg, s.step);
                                let why = format!(
                                    "checks passed; step {} of {}: {}%",
                                    s.step + 1,
                                    cfg.steps.len(),
                                    w as f64 / 100.0
                                );
                                transition(s, Phase::Progressing, w, true, why, &mut actions)
                            }
                            Strategy::Canary | Strategy::BlueGreen => {
                                promote(s, "every check passed".into(), &mut actions)
                            }
                            // A/B keeps analysing until an operator decides.
                            Strategy::Ab => s,
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
                let mut s = s;
                s.manual = false;
                s.step_since_ms = now_ms;
                s.window_since_ms = now_ms;
                s.check_since_ms = now_ms;
                let w = step_weight(cfg, s.step);
                transition(
                    s,
                    Phase::Progressing,
                    w,
                    true,
                    "resumed by an operator".into(),
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
        Event::Promote { .. } => match s.phase {
            Phase::Progressing | Phase::Paused | Phase::RolledBack => {
                promote(s, "promoted by an operator".into(), &mut actions)
            }
            p => {
                return Err(Refused(format!(
                    "cannot promote: the rollout is {}",
                    p.name()
                )));
            }
        },
        Event::Abort { .. } => match s.phase {
            Phase::Progressing | Phase::Paused | Phase::Promoted => {
                roll_back(s, None, "aborted by an operator".into(), cfg, &mut actions)
            }
            p => {
                return Err(Refused(format!(
                    "nothing to abort: the rollout is {}",
                    p.name()
                )));
            }
        },
        Event::SetWeight { weight, .. } => match s.phase {
            Phase::Idle => return Err(Refused("no canary backends to send traffic to".into())),
            _ => {
                let mut n = transition(
                    s,
                    Phase::Paused,
                    weight.min(BASIS_POINTS),
                    true,
                    format!(
                        "weight set to {}% by an operator",
                        weight.min(BASIS_POINTS) as f64 / 100.0
                    ),
                    &mut actions,
                );
                n.manual = true;
                n
            }
        },
        Event::Start { now_ms } => match s.phase {
            Phase::Idle => return Err(Refused("no canary backends to roll out".into())),
            Phase::Progressing => return Err(Refused("the rollout is already progressing".into())),
            _ => {
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

    use kanari_common::{
        hist,
        http::{CLASS_2XX, CLASS_5XX},
    };

    use super::*;
    use crate::{
        analysis::{check, critical, tests::analysis},
        telemetry::{Recent, Totals},
    };

    const TICK_MS: u64 = 250;

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

    /// SplitMix64, for seeded traffic.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// How a group answers: share of 5xx and a median time to first byte;
    /// times are spread (x0.5 .. x2, skewed) around the median.
    #[derive(Clone, Copy)]
    struct Model {
        error_rate: f64,
        median_ms: f64,
    }

    fn serve(t: &mut Totals, m: Model, n: u64, rng: &mut Rng) {
        for _ in 0..n {
            let fail = rng.unit() < m.error_rate;
            t.requests[if fail { CLASS_5XX } else { CLASS_2XX }] += 1;
            t.connections += 1;
            let ms = m.median_ms * 2f64.powf(2.0 * rng.unit() - 1.0);
            t.ttfb.0[hist::bucket_index((ms * 1e6) as u64) as usize] += 1;
        }
    }

    struct Run {
        state: State,
        /// The weights written, in order.
        weights: Vec<u32>,
        ticks: u64,
    }

    /// Drives a rollout with traffic at `rps` requests/s split by the weight.
    /// `canary_at(t_ms)` gives the canary's behaviour over time.
    fn simulate(
        rps: f64,
        stable: Model,
        canary_at: impl Fn(u64) -> Model,
        seed: u64,
        limit_s: u64,
    ) -> Run {
        let cfg = cfg();
        let a = analysis();
        let mut rng = Rng(seed);
        let mut s = State::new("r1".into(), true, 0, &cfg);
        let mut weights = vec![s.weight];
        let (mut win_c, mut win_s) = (Totals::default(), Totals::default());
        let mut recent: Vec<Recent> = Vec::new();
        let mut t = 0;
        let mut ticks = 0;
        while t < limit_s * 1000 && matches!(s.phase, Phase::Progressing) {
            t += TICK_MS;
            ticks += 1;
            let per_tick = rps * TICK_MS as f64 / 1000.0;
            let nc = (per_tick * s.weight as f64 / 10_000.0).round() as u64;
            let ns = per_tick.round() as u64 - nc;
            let mut tick_c = Totals::default();
            serve(&mut tick_c, canary_at(t), nc, &mut rng);
            serve(&mut win_s, stable, ns, &mut rng);
            win_c += &tick_c;
            recent.push(Recent {
                requests: tick_c.requests(),
                errors: tick_c.errors_5xx(),
                connections: 0,
                connect_errors: 0,
            });
            let mut sum = Recent::default();
            for r in recent.iter().rev() {
                sum.requests += r.requests;
                sum.errors += r.errors;
                if sum.requests >= a.critical.min_requests {
                    break;
                }
            }
            let crit = critical(&a.critical, Some(sum), None);
            let (n, acts) = step(
                &s,
                Event::Tick {
                    now_ms: t,
                    critical: crit,
                },
                &cfg,
            )
            .unwrap();
            s = n;
            collect(&acts, &mut weights);
            if s.check_due(t, &cfg) {
                let results = check(&a, cfg.min_requests, &win_c, &win_s, true);
                let (n, acts) = step(&s, Event::Check { now_ms: t, results }, &cfg).unwrap();
                if n.window_since_ms == t {
                    win_c = Totals::default();
                    win_s = Totals::default();
                    recent.clear();
                }
                s = n;
                collect(&acts, &mut weights);
            }
        }
        Run {
            state: s,
            weights,
            ticks,
        }
    }

    fn collect(actions: &[Action], weights: &mut Vec<u32>) {
        for a in actions {
            if let Action::SetWeight(w) = a {
                weights.push(*w);
            }
        }
    }

    const HEALTHY: Model = Model {
        error_rate: 0.001,
        median_ms: 5.0,
    };

    #[test]
    fn a_healthy_canary_is_promoted_through_every_step() {
        let run = simulate(2000.0, HEALTHY, |_| HEALTHY, 1, 600);
        assert_eq!(run.state.phase, Phase::Promoted, "{:?}", run.state);
        assert_eq!(
            run.weights,
            vec![100, 500, 1000, 2500, 5000, 10000],
            "every step, in order"
        );
    }

    #[test]
    fn a_canary_failing_everything_is_rolled_back_by_the_critical_path_on_the_first_tick_with_enough_requests()
     {
        // 2,000 rps at 1 %: 5 canary requests a tick; the fault starts after 2 s.
        let broken = Model {
            error_rate: 1.0,
            median_ms: 5.0,
        };
        let run = simulate(
            2000.0,
            HEALTHY,
            |t| if t > 2000 { broken } else { HEALTHY },
            2,
            600,
        );
        assert_eq!(run.state.phase, Phase::RolledBack);
        assert_eq!(
            run.state.rollback_judge,
            Some(Judge::CriticalErrorRate),
            "{}",
            run.state.reason
        );
        assert_eq!(run.weights.last(), Some(&0));
        // Tick 9 and 10 fail (10 requests); with ticks 7 and 8 that is 20
        // requests, half failed: the 50 % threshold is met on tick 10, 0.5 s in.
        assert_eq!(
            run.ticks,
            2000 / TICK_MS + 2,
            "rolled back on the first tick with 20 recent requests, half failed"
        );
    }

    #[test]
    fn a_slower_canary_is_rolled_back_by_the_comparison_while_limits_pass() {
        let slow = Model {
            error_rate: 0.001,
            median_ms: 6.5,
        }; // 30 % slower at p50
        let run = simulate(1000.0, HEALTHY, |_| slow, 3, 600);
        assert_eq!(run.state.phase, Phase::RolledBack);
        assert_eq!(
            run.state.rollback_judge,
            Some(Judge::LatencyVsStable),
            "{}",
            run.state.reason
        );
        let fixed: Vec<_> = run
            .state
            .last_check
            .iter()
            .filter(|r| matches!(r.judge, Judge::ErrorRate | Judge::LatencyP99))
            .collect();
        assert!(
            fixed.iter().all(|r| r.verdict == Verdict::Pass),
            "{fixed:#?}"
        );
    }

    #[test]
    fn a_quiet_service_collects_its_window_over_inconclusive_checks() {
        // 300 rps at 1 %: one canary request a tick (75 x 1 %, rounded), 40 per
        // 10 s interval, so the window must grow to 30 s to hold min_requests (100).
        let run = simulate(300.0, HEALTHY, |_| HEALTHY, 7, 25);
        assert_eq!(run.weights, vec![100], "still on the first step");
        assert_eq!(
            run.state.window_since_ms, 0,
            "the window grew over two inconclusive checks"
        );
        assert!(matches!(
            analysis::overall(&run.state.last_check),
            Verdict::Inconclusive(_)
        ));
        let run = simulate(300.0, HEALTHY, |_| HEALTHY, 7, 35);
        assert_eq!(
            run.weights,
            vec![100, 500],
            "the first step passed once its window held enough"
        );
        assert_eq!(run.state.step_since_ms, 30_000);
    }

    #[test]
    fn no_traffic_holds_the_step_then_fails_at_the_deadline() {
        let run = simulate(0.0, HEALTHY, |_| HEALTHY, 4, 600);
        assert_eq!(run.state.phase, Phase::RolledBack);
        assert_eq!(run.weights, vec![100, 0], "never raised, then rolled back");
        assert!(
            run.state.reason.starts_with("progress deadline"),
            "{}",
            run.state.reason
        );
        assert_eq!(run.ticks * TICK_MS, 60_000, "at the deadline");
        assert!(matches!(
            analysis::overall(&run.state.last_check),
            Verdict::Inconclusive(_)
        ));
    }

    #[test]
    fn a_noisy_but_equal_canary_is_promoted_with_under_1_percent_false_rollbacks() {
        let noisy = Model {
            error_rate: 0.02,
            median_ms: 5.0,
        };
        let seeds = 300;
        let rolled_back = (0..seeds)
            .filter(|seed| {
                simulate(2000.0, noisy, |_| noisy, 1000 + seed, 600)
                    .state
                    .phase
                    != Phase::Promoted
            })
            .count();
        assert!(
            rolled_back * 100 < seeds as usize,
            "{rolled_back} of {seeds} equal canaries rolled back"
        );
    }

    #[test]
    fn operator_events_in_every_phase() {
        let cfg = cfg();
        let progressing = State::new("r".into(), true, 0, &cfg);
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
            // For Idle, Progressing, Paused, Promoted, RolledBack: the phase after, or None = refused.
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
                |n| Event::Start { now_ms: n },
                [
                    None,
                    None,
                    Some(Progressing),
                    Some(Progressing),
                    Some(Progressing),
                ],
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
    fn after_a_rollback_only_an_operator_or_a_new_revision_raises_the_weight() {
        let cfg = cfg();
        let s = State::new("r1".into(), true, 0, &cfg);
        let (s, acts) = step(&s, Event::Abort { now_ms: 1 }, &cfg).unwrap();
        assert!(
            acts.contains(&Action::SetWeight(0)) && acts.contains(&Action::CanarySegments(false))
        );
        let pass = vec![JudgeResult {
            judge: Judge::ErrorRate,
            verdict: Verdict::Pass,
            value: None,
            limit: None,
        }];
        for e in [
            Event::Check {
                now_ms: 99_000,
                results: pass,
            },
            Event::Tick {
                now_ms: 99_000,
                critical: vec![],
            },
        ] {
            let (n, acts) = step(&s, e, &cfg).unwrap();
            assert_eq!((n.phase, n.weight), (Phase::RolledBack, 0));
            assert!(acts.is_empty());
        }
        let (n, _) = step(
            &s,
            Event::Revision {
                now_ms: 2,
                revision: "r1".into(),
                has_canary: true,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(
            n.phase,
            Phase::RolledBack,
            "the same revision again does not restart"
        );
        let (n, acts) = step(
            &s,
            Event::Revision {
                now_ms: 2,
                revision: "r2".into(),
                has_canary: true,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(
            (n.phase, n.weight, n.step, n.failures),
            (Phase::Progressing, 100, 0, 0)
        );
        assert!(acts.contains(&Action::SetWeight(100)));
        let (n, _) = step(
            &s,
            Event::Revision {
                now_ms: 2,
                revision: "".into(),
                has_canary: false,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!((n.phase, n.weight), (Phase::Idle, 0));
    }

    #[test]
    fn cut_drops_canary_connections_on_rollback() {
        let mut cfg = cfg();
        cfg.on_rollback = OnRollback::Cut;
        let s = State::new("r".into(), true, 0, &cfg);
        let (_, acts) = step(&s, Event::Abort { now_ms: 1 }, &cfg).unwrap();
        assert!(acts.contains(&Action::CutCanary));
    }

    #[test]
    fn failures_below_the_limit_hold_then_roll_back() {
        let mut cfg = cfg();
        cfg.failure_limit = 2;
        let fail = vec![JudgeResult {
            judge: Judge::ErrorRate,
            verdict: Verdict::Fail("x".into()),
            value: None,
            limit: None,
        }];
        let s = State::new("r".into(), true, 0, &cfg);
        let (s, _) = step(
            &s,
            Event::Check {
                now_ms: 10_000,
                results: fail.clone(),
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(
            (s.phase, s.failures, s.weight),
            (Phase::Progressing, 1, 100)
        );
        let (s, _) = step(
            &s,
            Event::Check {
                now_ms: 20_000,
                results: fail,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(
            (s.phase, s.rollback_judge),
            (Phase::RolledBack, Some(Judge::ErrorRate))
        );
    }

    #[test]
    fn blue_green_switches_at_once_and_ab_waits_for_an_operator() {
        let pass = vec![JudgeResult {
            judge: Judge::ErrorRate,
            verdict: Verdict::Pass,
            value: None,
            limit: None,
        }];
        let mut cfg = cfg();
        cfg.strategy = Strategy::BlueGreen;
        let s = State::new("r".into(), true, 0, &cfg);
        assert_eq!(
            (s.weight, s.canary_segments),
            (0, true),
            "segment traffic only"
        );
        let (s, _) = step(
            &s,
            Event::Check {
                now_ms: 10_000,
                results: pass.clone(),
            },
            &cfg,
        )
        .unwrap();
        assert_eq!((s.phase, s.weight), (Phase::Promoted, 10_000));
        cfg.strategy = Strategy::Ab;
        let s = State::new("r".into(), true, 0, &cfg);
        let (s, _) = step(
            &s,
            Event::Check {
                now_ms: 10_000,
                results: pass,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!((s.phase, s.weight), (Phase::Progressing, 0));
    }
}
