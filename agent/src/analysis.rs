//! The judges: pure functions from what the canary and stable did over a
//! window to `Pass`, `Fail(reason)` or `Inconclusive(why)`, each with the
//! value measured and the limit it was held to.
//!
//! - fixed limits on the canary: error rate, p99 and p50 time to first
//!   byte, connect errors;
//! - comparison with stable: the error-rate increase (a two-proportion test
//!   against the allowed increase) and the latency increase (Mann-Whitney U
//!   on the two histograms, failing only when the canary is significantly
//!   slower *and* its median is slower by more than the allowed share — a
//!   significant but tiny difference passes);
//! - the critical fast path, every tick, on the most recent requests.
//!
//! Too little traffic is `Inconclusive`, never a failure.

use serde::{Deserialize, Serialize};

use crate::{
    config::{Analysis, Critical},
    sequential,
    telemetry::{Recent, Totals},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Judge {
    ErrorRate,
    LatencyP99,
    LatencyP50,
    ConnectErrors,
    ErrorRateVsStable,
    LatencyVsStable,
    TailLatencyVsStable,
    CriticalErrorRate,
    CriticalConnectErrors,
}

impl Judge {
    pub const ALL: [Judge; 9] = [
        Judge::ErrorRate,
        Judge::LatencyP99,
        Judge::LatencyP50,
        Judge::ConnectErrors,
        Judge::ErrorRateVsStable,
        Judge::LatencyVsStable,
        Judge::TailLatencyVsStable,
        Judge::CriticalErrorRate,
        Judge::CriticalConnectErrors,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Judge::ErrorRate => "error_rate",
            Judge::LatencyP99 => "latency_p99",
            Judge::LatencyP50 => "latency_p50",
            Judge::ConnectErrors => "connect_errors",
            Judge::ErrorRateVsStable => "error_rate_vs_stable",
            Judge::LatencyVsStable => "latency_vs_stable",
            Judge::TailLatencyVsStable => "tail_latency_vs_stable",
            Judge::CriticalErrorRate => "critical_error_rate",
            Judge::CriticalConnectErrors => "critical_connect_errors",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", content = "why", rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail(String),
    Inconclusive(String),
}

impl Verdict {
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "fail",
            Verdict::Inconclusive(_) => "inconclusive",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeResult {
    pub judge: Judge,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// What was measured (a ratio, or seconds for latencies).
    pub value: Option<f64>,
    /// What it was held to.
    pub limit: Option<f64>,
    /// Evaluated, shown and exported, never acted on (`analysis.dry_run`).
    #[serde(default)]
    pub dry_run: bool,
}

impl JudgeResult {
    /// Whether the result decides anything: a failure not in dry run.
    pub fn fails(&self) -> bool {
        !self.dry_run && matches!(self.verdict, Verdict::Fail(_))
    }
}

/// Marks the results of the judges `analysis.dry_run` names.
pub fn mark_dry_run(results: &mut [JudgeResult], dry_run: &[String]) {
    for r in results {
        r.dry_run = dry_run.iter().any(|n| n == r.judge.name());
    }
}

/// The verdict of a set of results, the dry-run ones left out: the first
/// failure, else the first
/// inconclusive one, else pass.
pub fn overall(results: &[JudgeResult]) -> Verdict {
    let live = || results.iter().filter(|r| !r.dry_run);
    if let Some(r) = live().find(|r| matches!(r.verdict, Verdict::Fail(_))) {
        return r.verdict.clone();
    }
    if let Some(r) = live().find(|r| matches!(r.verdict, Verdict::Inconclusive(_))) {
        return r.verdict.clone();
    }
    Verdict::Pass
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn ms(s: f64) -> String {
    format!("{:.2}ms", s * 1e3)
}

fn result(judge: Judge, verdict: Verdict, value: Option<f64>, limit: Option<f64>) -> JudgeResult {
    JudgeResult {
        judge,
        verdict,
        value,
        limit,
        dry_run: false,
    }
}

/// The error probabilities a check works to: `fail`, of failing a canary
/// that is as good as the limits and margins allow (a false rollback), per
/// judge and window; `pass`, of passing one that is not (a false step up).
/// Both hold under continuous monitoring ([`crate::sequential`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Levels {
    pub fail: f64,
    pub pass: f64,
}

impl Levels {
    /// `1 − confidence` shared out: a false rollback over a whole rollout
    /// of `windows` check windows and `judges` judges that can fail stays
    /// under `1 − confidence`; a false pass of one window under it.
    pub fn for_rollout(confidence: f64, windows: u32, judges: u32) -> Levels {
        let alpha = 1.0 - confidence;
        Levels {
            fail: alpha / (windows.max(1) * judges.max(1)) as f64,
            pass: alpha,
        }
    }
}

/// A decision on a share `x` of `n` against the most it may be (`bound`):
/// fail when it is above with confidence, pass when it is below with
/// confidence, else inconclusive with how many more samples it wants.
fn decide_share(
    x: u64,
    n: u64,
    bound: f64,
    tau: f64,
    levels: Levels,
    what: &dyn Fn(f64) -> String,
) -> Verdict {
    let fail = sequential::proportion(x, n, tau, levels.fail);
    let pass = sequential::proportion(x, n, tau, levels.pass);
    if fail.low > bound {
        Verdict::Fail(format!(
            "{} (at least {} with confidence)",
            what(fail.estimate),
            pct(fail.low)
        ))
    } else if pass.high <= bound {
        Verdict::Pass
    } else {
        let more = sequential::samples_needed(n, pass.high - pass.estimate, bound - pass.estimate)
            .saturating_sub(n);
        Verdict::Inconclusive(format!(
            "{}: not yet shown to be at most {} (about {} more samples)",
            what(fail.estimate),
            pct(bound),
            if more == u64::MAX {
                "many".into()
            } else {
                more.to_string()
            }
        ))
    }
}

/// Judges one check window: `canary` and `stable` are what each group did
/// during it. A judge without a configured limit is not run. A judge passes
/// only on evidence: the canary shown, at the configured confidence, to be
/// within the limit or margin; a canary shown to be beyond it fails; in
/// between the check is inconclusive (the window grows).
pub fn check(
    analysis: &Analysis,
    min_requests: u64,
    canary: &Totals,
    stable: &Totals,
    http: bool,
    levels: Levels,
) -> Vec<JudgeResult> {
    let mut out = Vec::new();
    // Every exchange counts, failed ones included: a canary that resets or
    // hangs instead of answering has fewer answers, not fewer failures.
    let canary_n = canary.exchanges(http);
    let stable_n = stable.exchanges(http);
    // A service behind `protocol: http` whose answers carry no HTTP/1 status
    // line (TLS, h2c, a WebSocket) cannot be judged on its error rate.
    let other = canary.requests[kanari_common::http::CLASS_OTHER];
    let not_http = (http && other * 2 > canary.http_responses()).then(|| {
        format!(
            "{} of {} canary answers are not HTTP/1 status lines (TLS, h2c, WebSocket?): \
             its error rate cannot be judged; use protocol: tcp",
            other,
            canary.http_responses()
        )
    });
    let few = |n: u64, who: &str| {
        Verdict::Inconclusive(format!(
            "{n} {who} requests, fewer than min_requests {min_requests}"
        ))
    };
    let limits = &analysis.limits;

    if let Some(limit) = limits.max_error_rate {
        let v = (canary_n > 0).then(|| canary.failures() as f64 / canary_n as f64);
        // Stable beyond the limit too: a shared outage, not the canary's doing.
        let shared = stable_n >= min_requests
            && sequential::proportion(stable.failures(), stable_n, limit, levels.fail).low > limit;
        let verdict = if canary_n < min_requests {
            few(canary_n, "canary")
        } else if let Some(why) = &not_http {
            Verdict::Inconclusive(why.clone())
        } else if shared {
            Verdict::Inconclusive(format!(
                "stable fails too ({} of its requests): a shared outage",
                pct(stable.failures() as f64 / stable_n as f64)
            ))
        } else {
            decide_share(
                canary.failures(),
                canary_n,
                limit,
                limit.max(0.001),
                levels,
                &|v| format!("failure rate {}, limit {}", pct(v), pct(limit)),
            )
        };
        out.push(result(Judge::ErrorRate, verdict, v, Some(limit)));
    }
    // A latency limit is a share: p99 <= L means at most 1 % of answers are slower than L.
    for (judge, limit, q) in [
        (Judge::LatencyP99, limits.max_latency_p99, 0.99),
        (Judge::LatencyP50, limits.max_latency_p50, 0.5),
    ] {
        let Some(limit) = limit else { continue };
        let n = canary.ttfb.count();
        let slower = canary.ttfb.count_above(limit.as_nanos() as f64).round() as u64;
        let value = canary.ttfb.quantile_ns(q).map(|n| n / 1e9);
        let verdict = if canary_n < min_requests {
            few(canary_n, "canary")
        } else if n == 0 {
            Verdict::Inconclusive("no latency samples".into())
        } else {
            let share = 1.0 - q;
            decide_share(slower, n, share, (share).min(0.1), levels, &|v| {
                format!(
                    "{} of answers slower than {} (p{} limit)",
                    pct(v),
                    ms(limit.as_secs_f64()),
                    (q * 100.0) as u32
                )
            })
        };
        out.push(result(judge, verdict, value, Some(limit.as_secs_f64())));
    }
    if let Some(limit) = limits.max_connect_errors_rate {
        // Failed attempts, not retransmitted SYNs: at most 100 %.
        let failed = canary.connect_failures().min(canary.connections);
        let v = (canary.connections > 0).then(|| failed as f64 / canary.connections as f64);
        let verdict = if canary.connections < min_requests {
            Verdict::Inconclusive(format!(
                "{} canary connections, fewer than min_requests {min_requests}",
                canary.connections
            ))
        } else {
            decide_share(
                failed,
                canary.connections,
                limit,
                limit.max(0.001),
                levels,
                &|v| {
                    format!(
                        "failed connection attempts {}, limit {}",
                        pct(v),
                        pct(limit)
                    )
                },
            )
        };
        out.push(result(Judge::ConnectErrors, verdict, v, Some(limit)));
    }

    let Some(cmp) = &analysis.compare else {
        mark_dry_run(&mut out, &analysis.dry_run);
        return out;
    };
    let too_few = if canary_n < min_requests {
        Some(few(canary_n, "canary"))
    } else if stable_n < min_requests {
        Some(few(stable_n, "stable"))
    } else {
        None
    };
    if let Some(delta) = cmp.max_error_rate_increase {
        let (pc, ps) = (
            canary.failures() as f64 / canary_n.max(1) as f64,
            stable.failures() as f64 / stable_n.max(1) as f64,
        );
        let verdict = match (&too_few, &not_http) {
            (Some(v), _) => v.clone(),
            (None, Some(why)) => Verdict::Inconclusive(why.clone()),
            (None, None) => {
                let d = |alpha| {
                    sequential::difference(
                        canary.failures(),
                        canary_n,
                        stable.failures(),
                        stable_n,
                        delta.max(0.001),
                        alpha,
                    )
                };
                let (fail, pass) = (d(levels.fail), d(levels.pass));
                if fail.low > delta {
                    Verdict::Fail(format!(
                        "failure rate {} vs stable {}: more than {} points higher (at least {} with confidence)",
                        pct(pc),
                        pct(ps),
                        delta * 100.0,
                        pct(fail.low)
                    ))
                } else if pass.high <= delta {
                    Verdict::Pass
                } else {
                    let more = sequential::samples_needed(
                        canary_n,
                        pass.high - pass.estimate,
                        delta - pass.estimate,
                    )
                    .saturating_sub(canary_n);
                    Verdict::Inconclusive(format!(
                        "failure rate {} vs stable {}: not yet shown to be at most {} points higher (about {} more canary requests)",
                        pct(pc),
                        pct(ps),
                        delta * 100.0,
                        if more == u64::MAX {
                            "many".into()
                        } else {
                            more.to_string()
                        }
                    ))
                }
            }
        };
        out.push(result(
            Judge::ErrorRateVsStable,
            verdict,
            Some(pc - ps),
            Some(delta),
        ));
    }
    if let Some(rel) = cmp.max_latency_increase {
        // The median and the tail: the canary's quantile may exceed stable's
        // by `rel` (and by at least `min_latency_increase`) — that is, at most
        // a share 1 − q of the canary's answers may be slower than stable's
        // quantile so raised.
        let tail = cmp.tail_quantile;
        for (judge, q, tau) in [
            (Judge::LatencyVsStable, 0.5, 0.1),
            (Judge::TailLatencyVsStable, tail, 1.0 - tail),
        ] {
            let quantiles = (canary.ttfb.quantile_ns(q), stable.ttfb.quantile_ns(q));
            let increase = match quantiles {
                (Some(c), Some(s)) if s > 0.0 => Some(c / s - 1.0),
                _ => None,
            };
            let floor = cmp.min_latency_increase.as_nanos() as f64;
            // A tail from few stable samples says little: 100 samples per 1 % at least.
            let stable_enough = stable.ttfb.count() as f64 * (1.0 - q) >= 1.0;
            let verdict = match (&too_few, quantiles) {
                (Some(v), _) => v.clone(),
                (None, (Some(_), Some(s))) if stable_enough => {
                    let threshold = (s * (1.0 + rel)).max(s + floor);
                    let n = canary.ttfb.count();
                    let slower = canary.ttfb.count_above(threshold).round() as u64;
                    decide_share(slower, n, 1.0 - q, tau, levels, &|v| {
                        format!(
                            "{} of canary answers slower than {} (stable's p{} {} + {})",
                            pct(v),
                            ms(threshold / 1e9),
                            (q * 100.0) as u32,
                            ms(s / 1e9),
                            pct(rel)
                        )
                    })
                }
                (None, (_, Some(_))) => Verdict::Inconclusive(format!(
                    "{} stable latency samples: too few for its p{}",
                    stable.ttfb.count(),
                    (q * 100.0) as u32
                )),
                _ => Verdict::Inconclusive("no latency samples".into()),
            };
            out.push(result(judge, verdict, increase, Some(rel)));
        }
    }
    mark_dry_run(&mut out, &analysis.dry_run);
    out
}

/// The critical fast path on the canary's most recent exchanges and
/// connection attempts, beside stable's over the same stretches of time
/// (the shortest recent one with `min_requests`, and the whole window). It
/// fails when, over a stretch, the canary fails at `critical.error_rate` (or
/// `connect_error_rate`) or more *and* is shown, at the strict level
/// `alpha`, to fail more than stable. When stable fails as badly the outage
/// is shared: the result is inconclusive and `shared` says why, so the
/// rollout holds instead of rolling back.
pub fn critical(
    c: &Critical,
    requests: &[(Recent, Recent)],
    connections: &[(Recent, Recent)],
    alpha: f64,
) -> (Vec<JudgeResult>, Option<String>) {
    let mut out = Vec::new();
    let mut shared = None;
    let mut judge = |judge: Judge,
                     limit: Option<f64>,
                     stretches: &[(Recent, Recent)],
                     of: fn(&Recent) -> (u64, u64),
                     what: &str| {
        let Some(limit) = limit else { return };
        let mut verdict = None;
        let mut value = None;
        for (cr, sr) in stretches {
            let ((failed, n), (sf, sn)) = (of(cr), of(sr));
            if n < c.min_requests {
                continue;
            }
            let v = failed as f64 / n as f64;
            value.get_or_insert(v);
            let sv = sf as f64 / sn.max(1) as f64;
            // Both failing at half the critical rate or more: stable's
            // trouble is the canary's too (a database down for both).
            let outage = sn >= c.min_requests && sv >= limit / 2.0 && v >= limit / 2.0;
            if v < limit {
                if outage {
                    shared.get_or_insert_with(|| {
                        format!(
                            "a shared outage: {} of the canary's last {n} {what} failed, and {} of stable's",
                            pct(v),
                            pct(sv)
                        )
                    });
                }
                verdict.get_or_insert(Verdict::Pass);
                continue;
            }
            // Worse than stable, with confidence; without enough of stable's
            // to compare (a promoted canary takes all the traffic), failing
            // at half the critical rate at least.
            let worse = if sn >= c.min_requests {
                sequential::difference(failed, n, sf, sn, limit, alpha).low > 0.0
            } else {
                sequential::proportion(failed, n, limit, alpha).low > limit / 2.0
            };
            if worse {
                value = Some(v);
                verdict = Some(Verdict::Fail(format!(
                    "{} of the last {n} canary {what} failed (critical at {}; stable {})",
                    pct(v),
                    pct(limit),
                    pct(sv)
                )));
                break;
            }
            let why = if outage {
                let why = format!(
                    "a shared outage: {} of the canary's last {n} {what} failed, and {} of stable's",
                    pct(v),
                    pct(sv)
                );
                shared = Some(why.clone());
                why
            } else {
                format!(
                    "{} of the last {n} canary {what} failed: not yet shown worse than stable's {}",
                    pct(v),
                    pct(sv)
                )
            };
            if !matches!(verdict, Some(Verdict::Inconclusive(_))) {
                verdict = Some(Verdict::Inconclusive(why));
            }
        }
        let verdict = verdict.unwrap_or_else(|| {
            Verdict::Inconclusive(format!("fewer than {} recent {what}", c.min_requests))
        });
        out.push(result(judge, verdict, value, Some(limit)));
    };
    judge(
        Judge::CriticalErrorRate,
        c.error_rate,
        requests,
        |r| (r.errors, r.requests),
        "requests",
    );
    judge(
        Judge::CriticalConnectErrors,
        c.connect_error_rate,
        connections,
        |r| (r.connect_errors, r.connections),
        "connection attempts",
    );
    (out, shared)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use kanari_common::{
        hist,
        http::{CLASS_2XX, CLASS_5XX},
    };

    use super::*;
    use crate::config::{Compare, Limits};
    use crate::telemetry::Histogram;

    /// `ok` + `errors` requests with times to first byte spread evenly
    /// from `ttfb_ns` to 1.5 x `ttfb_ns`.
    pub fn totals(ok: u64, errors: u64, ttfb_ns: u64) -> Totals {
        let mut t = Totals::default();
        t.requests[CLASS_2XX] = ok;
        t.requests[CLASS_5XX] = errors;
        let n = ok + errors;
        for i in 0..n {
            t.ttfb.0[hist::TTFB.index(ttfb_ns + ttfb_ns * i / (2 * n)) as usize] += 1;
        }
        t.connections = n;
        t
    }

    pub fn analysis() -> Analysis {
        Analysis {
            limits: Limits {
                max_error_rate: Some(0.05),
                max_latency_p99: Some(Duration::from_millis(500)),
                max_latency_p50: None,
                max_connect_errors_rate: Some(0.05),
            },
            compare: Some(Compare {
                max_error_rate_increase: Some(0.01),
                max_latency_increase: Some(0.2),
                min_latency_increase: crate::config::DEFAULT_MIN_LATENCY_INCREASE,
                tail_quantile: 0.99,
                confidence: 0.99,
            }),
            critical: Critical {
                error_rate: Some(0.5),
                connect_error_rate: Some(0.5),
                min_requests: 20,
                window: Duration::from_secs(10),
            },
            request_timeout: Duration::from_secs(10),
            warmup: Duration::ZERO,
            dry_run: Vec::new(),
        }
    }

    /// The levels of a default rollout: five steps below 100 %, five judges.
    pub fn levels() -> Levels {
        Levels::for_rollout(0.99, 5, 5)
    }

    fn judge(
        a: &Analysis,
        min: u64,
        canary: &Totals,
        stable: &Totals,
        http: bool,
    ) -> Vec<JudgeResult> {
        check(a, min, canary, stable, http, levels())
    }

    /// The critical path on the canary's recent counts, stable healthy beside it.
    fn crit(
        c: &Critical,
        requests: Option<Recent>,
        connections: Option<Recent>,
    ) -> Vec<JudgeResult> {
        let healthy = Recent {
            requests: 10_000,
            errors: 10,
            connections: 10_000,
            connect_errors: 10,
        };
        let pair = |r: Option<Recent>| r.map(|r| vec![(r, healthy)]).unwrap_or_default();
        critical(c, &pair(requests), &pair(connections), 1e-6).0
    }

    fn verdict_of(rs: &[JudgeResult], j: Judge) -> &Verdict {
        &rs.iter().find(|r| r.judge == j).unwrap().verdict
    }

    #[test]
    fn a_healthy_canary_passes_every_judge() {
        let rs = judge(
            &analysis(),
            100,
            &totals(1000, 2, 2_000_000),
            &totals(9000, 20, 2_000_000),
            true,
        );
        assert_eq!(rs.len(), 6);
        assert_eq!(overall(&rs), Verdict::Pass, "{rs:#?}");
    }

    #[test]
    fn too_little_traffic_is_inconclusive_not_a_failure() {
        let rs = judge(
            &analysis(),
            100,
            &totals(10, 10, 2_000_000),
            &totals(9000, 20, 2_000_000),
            true,
        );
        assert!(matches!(overall(&rs), Verdict::Inconclusive(_)), "{rs:#?}");
        assert!(rs.iter().all(|r| !matches!(r.verdict, Verdict::Fail(_))));
    }

    #[test]
    fn an_error_prone_canary_fails_the_limit_and_the_comparison() {
        let rs = judge(
            &analysis(),
            100,
            &totals(900, 100, 2_000_000),
            &totals(9000, 20, 2_000_000),
            true,
        );
        assert!(matches!(
            verdict_of(&rs, Judge::ErrorRate),
            Verdict::Fail(_)
        ));
        assert!(matches!(
            verdict_of(&rs, Judge::ErrorRateVsStable),
            Verdict::Fail(_)
        ));
        let r = rs.iter().find(|r| r.judge == Judge::ErrorRate).unwrap();
        assert_eq!((r.value, r.limit), (Some(0.1), Some(0.05)));
    }

    #[test]
    fn a_slower_canary_fails_the_comparison_while_limits_pass() {
        // 30 % (3 ms) slower at the median, same errors, well under the 500 ms limit.
        let rs = judge(
            &analysis(),
            100,
            &totals(1000, 0, 13_000_000),
            &totals(9000, 0, 10_000_000),
            true,
        );
        assert_eq!(verdict_of(&rs, Judge::LatencyP99), &Verdict::Pass);
        assert!(
            matches!(verdict_of(&rs, Judge::LatencyVsStable), Verdict::Fail(_)),
            "{rs:#?}"
        );
    }

    #[test]
    fn a_slowdown_under_the_absolute_floor_passes() {
        // 30 % slower, but stable answers in 50 µs: 15 µs is the machine's noise.
        let (canary, stable) = (totals(1000, 0, 65_000), totals(9000, 0, 50_000));
        let rs = judge(&analysis(), 100, &canary, &stable, true);
        assert_eq!(
            verdict_of(&rs, Judge::LatencyVsStable),
            &Verdict::Pass,
            "{rs:#?}"
        );
        // Without the floor the same data fails: the floor is what passes it.
        let mut a = analysis();
        a.compare.as_mut().unwrap().min_latency_increase = Duration::ZERO;
        let rs = judge(&a, 100, &canary, &stable, true);
        assert!(
            matches!(verdict_of(&rs, Judge::LatencyVsStable), Verdict::Fail(_)),
            "{rs:#?}"
        );
    }

    #[test]
    fn a_significant_but_tiny_slowdown_passes() {
        // 5 % slower: significant with this much data, below the 20 % floor.
        let mut canary = totals(5000, 0, 2_000_000);
        let mut stable = totals(50000, 0, 2_000_000);
        canary.ttfb = Default::default();
        stable.ttfb = Default::default();
        for i in 0..5000u64 {
            canary.ttfb.0[hist::TTFB.index(2_000_000 + i * 100 + 100_000) as usize] += 1;
        }
        for i in 0..50000u64 {
            stable.ttfb.0[hist::TTFB.index(2_000_000 + (i % 5000) * 100) as usize] += 1;
        }
        let rs = judge(&analysis(), 100, &canary, &stable, true);
        let lat = rs
            .iter()
            .find(|r| r.judge == Judge::LatencyVsStable)
            .unwrap();
        assert_eq!(lat.verdict, Verdict::Pass, "{lat:?}");
        assert!(lat.value.unwrap() < 0.2);
    }

    #[test]
    fn a_significant_slowdown_below_the_relative_threshold_passes() {
        // 10 % (2 ms) slower at the median: above the 1 ms floor, and
        // significant with 5,000 canary samples, but below the 20 % allowed.
        let (canary, stable) = (totals(5000, 0, 22_000_000), totals(50_000, 0, 20_000_000));
        let rs = judge(&analysis(), 100, &canary, &stable, true);
        let lat = rs
            .iter()
            .find(|r| r.judge == Judge::LatencyVsStable)
            .unwrap();
        assert_eq!(lat.verdict, Verdict::Pass, "{lat:?}");
        let inc = lat.value.unwrap();
        assert!((0.05..0.2).contains(&inc), "{inc}");
        // Allowed 5 % instead, the same data fails: the threshold is what passes it.
        let mut a = analysis();
        a.compare.as_mut().unwrap().max_latency_increase = Some(0.05);
        let rs = judge(&a, 100, &canary, &stable, true);
        assert!(
            matches!(verdict_of(&rs, Judge::LatencyVsStable), Verdict::Fail(_)),
            "{rs:#?}"
        );
    }

    /// Wherever latencies fall against the bucket edges, a canary 1 % slower
    /// than stable passes the 20 % comparison (median and tail), and one
    /// 25 % slower fails it.
    #[test]
    fn latency_verdicts_do_not_depend_on_the_bucket_edges() {
        let with = |h: Histogram| {
            let mut t = totals(0, 0, 1);
            t.requests[CLASS_2XX] = h.count();
            t.ttfb = h;
            t
        };
        for k in 0..32 {
            let median = 20e6 * 2f64.powf(k as f64 / 32.0);
            let stable = with(Histogram::log_logistic(median, 0.1, 50_000));
            for (slower, pass) in [(1.01, true), (1.25, false)] {
                let canary = with(Histogram::log_logistic(median * slower, 0.1, 20_000));
                let rs = judge(&analysis(), 100, &canary, &stable, true);
                let judges: &[Judge] = if pass {
                    &[Judge::LatencyVsStable, Judge::TailLatencyVsStable]
                } else {
                    &[Judge::LatencyVsStable]
                };
                for j in judges {
                    let v = verdict_of(&rs, *j);
                    let ok = if pass {
                        *v == Verdict::Pass
                    } else {
                        matches!(v, Verdict::Fail(_))
                    };
                    assert!(ok, "median {median:.0} ns, canary x{slower}: {j:?} {v:?}");
                }
            }
        }
    }

    #[test]
    fn the_critical_path_needs_enough_requests() {
        let c = analysis().critical;
        let bad = Recent {
            requests: 20,
            errors: 20,
            connections: 0,
            connect_errors: 0,
        };
        let rs = crit(&c, Some(bad), None);
        assert!(matches!(rs[0].verdict, Verdict::Fail(_)));
        let few = Recent {
            requests: 19,
            errors: 19,
            connections: 0,
            connect_errors: 0,
        };
        assert!(matches!(
            crit(&c, Some(few), None)[0].verdict,
            Verdict::Inconclusive(_)
        ));
        let ok = Recent {
            requests: 100,
            errors: 30,
            connections: 0,
            connect_errors: 0,
        };
        assert_eq!(crit(&c, Some(ok), None)[0].verdict, Verdict::Pass);
        let refused = Recent {
            requests: 0,
            errors: 0,
            connections: 30,
            connect_errors: 30,
        };
        assert!(matches!(
            crit(&c, None, Some(refused))[1].verdict,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn every_judge_has_the_name_the_configuration_knows() {
        let names: Vec<&str> = Judge::ALL.iter().map(|j| j.name()).collect();
        assert_eq!(names, crate::config::JUDGE_NAMES);
    }

    #[test]
    fn a_judge_in_dry_run_is_shown_but_decides_nothing() {
        let mut a = analysis();
        a.dry_run = vec!["error_rate".into(), "error_rate_vs_stable".into()];
        let rs = judge(
            &a,
            100,
            &totals(900, 100, 2_000_000),
            &totals(9000, 9, 2_000_000),
            true,
        );
        let e = rs.iter().find(|r| r.judge == Judge::ErrorRate).unwrap();
        assert!(e.dry_run && matches!(e.verdict, Verdict::Fail(_)), "{e:?}");
        assert!(!e.fails());
        assert!(!matches!(overall(&rs), Verdict::Fail(_)), "{rs:#?}");
    }

    #[test]
    fn a_worse_canary_on_few_requests_never_passes() {
        // 5 % of 100 against stable's 0.1 %: not significantly worse yet, but
        // not shown within 1 point either. It used to pass.
        let rs = judge(
            &analysis(),
            100,
            &totals(95, 5, 2_000_000),
            &totals(9000, 9, 2_000_000),
            true,
        );
        match verdict_of(&rs, Judge::ErrorRateVsStable) {
            Verdict::Inconclusive(why) => assert!(why.contains("more canary requests"), "{why}"),
            v => panic!("{v:?}"),
        }
        assert_ne!(overall(&rs), Verdict::Pass);
    }

    #[test]
    fn three_times_stable_s_p99_fails_with_the_same_median() {
        // Stable: 2-3 ms. The canary: the same, but 3 % of its answers take 9 ms.
        let stable = totals(50_000, 0, 2_000_000);
        let mut canary = totals(5000, 0, 2_000_000);
        canary.ttfb.0[hist::TTFB.index(9_000_000) as usize] += 150;
        canary.requests[CLASS_2XX] += 150;
        let rs = judge(&analysis(), 100, &canary, &stable, true);
        assert_eq!(
            verdict_of(&rs, Judge::LatencyVsStable),
            &Verdict::Pass,
            "{rs:#?}"
        );
        assert!(
            matches!(
                verdict_of(&rs, Judge::TailLatencyVsStable),
                Verdict::Fail(_)
            ),
            "{rs:#?}"
        );
    }

    #[test]
    fn resets_and_timeouts_are_failures() {
        // 1,000 answered fine; 200 reset after accept, 100 never answered.
        let mut canary = totals(1000, 0, 2_000_000);
        canary.resets = 200;
        canary.timeouts = 100;
        let stable = totals(9000, 9, 2_000_000);
        for http in [true, false] {
            let rs = judge(&analysis(), 100, &canary, &stable, http);
            let e = rs.iter().find(|r| r.judge == Judge::ErrorRate).unwrap();
            assert!(matches!(e.verdict, Verdict::Fail(_)), "http {http}: {e:?}");
            assert_eq!(e.value, Some(300.0 / 1300.0), "failed of all exchanges");
            assert!(
                matches!(verdict_of(&rs, Judge::ErrorRateVsStable), Verdict::Fail(_)),
                "http {http}: {rs:#?}"
            );
        }
        // The critical path counts them too.
        let recent = Recent::of(&canary);
        assert_eq!((recent.requests, recent.errors), (1300, 300));
        let c = Critical {
            error_rate: Some(0.2),
            ..analysis().critical
        };
        assert!(matches!(
            crit(&c, Some(recent), None)[0].verdict,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn connect_errors_count_failed_attempts_and_need_enough_of_them() {
        // 200 attempts, retransmitted (unanswered) 300 times, all connected in the end.
        let mut canary = totals(200, 0, 2_000_000);
        canary.unanswered = 300;
        let stable = totals(2000, 0, 2_000_000);
        let rs = judge(&analysis(), 100, &canary, &stable, true);
        let ce = rs.iter().find(|r| r.judge == Judge::ConnectErrors).unwrap();
        assert_eq!(
            (&ce.verdict, ce.value),
            (&Verdict::Pass, Some(0.0)),
            "{ce:?}"
        );
        // Refused and finally failed attempts fail; at most 100 %.
        canary.refused = 150;
        canary.connect_timeouts = 50;
        let rs = judge(&analysis(), 100, &canary, &stable, true);
        let ce = rs.iter().find(|r| r.judge == Judge::ConnectErrors).unwrap();
        assert!(matches!(ce.verdict, Verdict::Fail(_)), "{ce:?}");
        assert_eq!(ce.value, Some(1.0));
        assert_eq!(Recent::of(&canary).connect_errors, 200);
        // One refusal among 5 attempts is not enough to judge (min_requests 100).
        let mut few = totals(5, 0, 2_000_000);
        few.refused = 1;
        let rs = judge(&analysis(), 100, &few, &stable, true);
        assert!(matches!(
            verdict_of(&rs, Judge::ConnectErrors),
            Verdict::Inconclusive(_)
        ));
    }

    #[test]
    fn answers_that_are_mostly_not_http_are_inconclusive() {
        // TLS, h2c or a WebSocket behind protocol: http: no status line.
        let mut canary = totals(10, 0, 2_000_000);
        canary.requests[kanari_common::http::CLASS_OTHER] = 990;
        let stable = totals(9000, 0, 2_000_000);
        let rs = judge(&analysis(), 100, &canary, &stable, true);
        for j in [Judge::ErrorRate, Judge::ErrorRateVsStable] {
            match verdict_of(&rs, j) {
                Verdict::Inconclusive(why) => {
                    assert!(why.contains("not HTTP/1"), "{why}")
                }
                v => panic!("{j:?}: {v:?}"),
            }
        }
        assert!(matches!(overall(&rs), Verdict::Inconclusive(_)));
    }
}
