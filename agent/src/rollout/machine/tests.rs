//! The state machine on scripted events.

use std::time::Duration;

use super::*;

fn cfg() -> Rollout {
    Rollout {
        webhooks: Vec::new(),
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
        dry_run: false,
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
    step(
        s,
        Event::Tick {
            now_ms,
            critical,
            outage: None,
        },
        cfg,
    )
    .unwrap()
    .0
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
    assert!(acts.contains(&Action::SetWeight(0)) && acts.contains(&Action::CanarySegments(false)));
    assert_eq!(s.cause, Some(RollbackCause::Operator));
    for e in [
        Event::Check {
            now_ms: 99_000,
            results: pass(),
        },
        Event::Tick {
            now_ms: 99_000,
            critical: vec![],
            outage: None,
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

fn with_gates(kinds: &[HookKind]) -> Rollout {
    let mut c = cfg();
    c.steps = vec![100, 1000, 10000];
    c.webhooks = kinds
        .iter()
        .map(|k| crate::config::Webhook {
            name: k.name().into(),
            kind: *k,
            url: "http://gate/".into(),
            timeout: Duration::from_secs(1),
            retries: 0,
            metadata: Default::default(),
        })
        .collect();
    c
}

fn gate(s: &State, now_ms: u64, kind: HookKind, open: bool, cfg: &Rollout) -> State {
    let event = Event::Gate {
        now_ms,
        kind,
        open,
        why: "answered 403".into(),
    };
    step(s, event, cfg).unwrap().0
}

/// A step up waits for confirm-traffic-increase: asked after each passing
/// check, held on a refusal, taken on a 2xx; a late answer counts for nothing.
#[test]
fn a_traffic_increase_waits_for_its_gate() {
    let cfg = with_gates(&[HookKind::ConfirmTrafficIncrease]);
    let s = fresh(&cfg);
    let (held, actions) = step(
        &s,
        Event::Check {
            now_ms: 10_000,
            results: pass(),
        },
        &cfg,
    )
    .unwrap();
    assert!(actions.contains(&Action::AskGate(HookKind::ConfirmTrafficIncrease)));
    assert_eq!(
        (held.weight, held.step),
        (100, 0),
        "no step up before the gate"
    );
    assert_eq!(held.awaiting, Some(HookKind::ConfirmTrafficIncrease));
    let refused = gate(&held, 10_100, HookKind::ConfirmTrafficIncrease, false, &cfg);
    assert_eq!(refused.weight, 100);
    assert!(refused.reason.contains("403"), "{}", refused.reason);
    // A later passing check asks again; its 2xx takes the step.
    let again = check(&refused, 20_000, pass(), &cfg);
    assert_eq!(again.awaiting, Some(HookKind::ConfirmTrafficIncrease));
    let up = gate(&again, 20_100, HookKind::ConfirmTrafficIncrease, true, &cfg);
    assert_eq!((up.weight, up.step, up.awaiting), (1000, 1, None));
    // An answer nobody waits for (after the step, or for another gate) changes nothing.
    assert_eq!(
        gate(&up, 20_200, HookKind::ConfirmTrafficIncrease, true, &cfg),
        up
    );
    // The last step up is the promotion: without its own gate, it goes.
    let promoted = check(&up, 30_000, pass(), &cfg);
    assert_eq!(promoted.phase, Phase::Promoted);
    // A check that fails while the gate is asked voids the question.
    let failed = check(&held, 20_000, fail(Judge::ErrorRate), &cfg);
    assert_eq!(failed.phase, Phase::RolledBack);
    assert_eq!(
        gate(
            &failed,
            20_100,
            HookKind::ConfirmTrafficIncrease,
            true,
            &cfg
        )
        .weight,
        0
    );
}

#[test]
fn a_promotion_waits_for_confirm_promotion() {
    let cfg = with_gates(&[HookKind::ConfirmPromotion]);
    let s = check(&fresh(&cfg), 10_000, pass(), &cfg);
    assert_eq!(s.weight, 1000, "steps need no gate of their own");
    let (held, actions) = step(
        &s,
        Event::Check {
            now_ms: 20_000,
            results: pass(),
        },
        &cfg,
    )
    .unwrap();
    assert_eq!(
        actions.last(),
        Some(&Action::AskGate(HookKind::ConfirmPromotion))
    );
    assert_eq!((held.phase, held.weight), (Phase::Progressing, 1000));
    // The critical path still watches while it waits.
    assert!(held.watched(20_050, &cfg));
    let promoted = gate(&held, 20_100, HookKind::ConfirmPromotion, true, &cfg);
    assert_eq!((promoted.phase, promoted.weight), (Phase::Promoted, 10_000));
    // An operator's promotion needs no gate.
    let by_hand = step(&held, Event::Promote { now_ms: 20_100 }, &cfg)
        .unwrap()
        .0;
    assert_eq!(by_hand.phase, Phase::Promoted);
}
