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
    stats,
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
    CriticalErrorRate,
    CriticalConnectErrors,
}

impl Judge {
    pub const ALL: [Judge; 8] = [
        Judge::ErrorRate,
        Judge::LatencyP99,
        Judge::LatencyP50,
        Judge::ConnectErrors,
        Judge::ErrorRateVsStable,
        Judge::LatencyVsStable,
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
}

/// The verdict of a set of results: the first failure, else the first
/// inconclusive one, else pass.
pub fn overall(results: &[JudgeResult]) -> Verdict {
    if let Some(r) = results
        .iter()
        .find(|r| matches!(r.verdict, Verdict::Fail(_)))
    {
        return r.verdict.clone();
    }
    if let Some(r) = results
        .iter()
        .find(|r| matches!(r.verdict, Verdict::Inconclusive(_)))
    {
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
    }
}

/// Judges one check window: `canary` and `stable` are what each group did
/// during it. A judge without a configured limit is not run.
pub fn check(
    analysis: &Analysis,
    min_requests: u64,
    canary: &Totals,
    stable: &Totals,
    http: bool,
) -> Vec<JudgeResult> {
    let mut out = Vec::new();
    // Every exchange counts, failed ones included: a canary that resets or
    // hangs instead of answering has fewer answers, not fewer failures.
    let canary_n = canary.exchanges(http);
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
    let few =
        |n: u64, who: &str| format!("{n} {who} requests, fewer than min_requests {min_requests}");
    let limits = &analysis.limits;

    // `blocked`: why the judge cannot say anything of this window.
    let mut fixed = |judge: Judge,
                     value: Option<f64>,
                     limit: f64,
                     show: fn(f64) -> String,
                     blocked: Option<&String>| {
        let verdict = match value {
            _ if canary_n < min_requests => Verdict::Inconclusive(few(canary_n, "canary")),
            _ if blocked.is_some() => Verdict::Inconclusive(blocked.cloned().unwrap_or_default()),
            None => Verdict::Inconclusive("no samples".into()),
            Some(v) if v > limit => Verdict::Fail(format!(
                "{} {} above the limit {}",
                judge.name(),
                show(v),
                show(limit)
            )),
            Some(_) => Verdict::Pass,
        };
        out.push(result(judge, verdict, value, Some(limit)));
    };
    if let Some(limit) = limits.max_error_rate {
        let v = (canary_n > 0).then(|| canary.failures() as f64 / canary_n as f64);
        fixed(Judge::ErrorRate, v, limit, pct, not_http.as_ref());
    }
    if let Some(limit) = limits.max_latency_p99 {
        fixed(
            Judge::LatencyP99,
            canary.ttfb.quantile_ns(0.99).map(|n| n / 1e9),
            limit.as_secs_f64(),
            ms,
            None,
        );
    }
    if let Some(limit) = limits.max_latency_p50 {
        fixed(
            Judge::LatencyP50,
            canary.ttfb.quantile_ns(0.5).map(|n| n / 1e9),
            limit.as_secs_f64(),
            ms,
            None,
        );
    }
    if let Some(limit) = limits.max_connect_errors_rate {
        // Failed attempts, not retransmitted SYNs: at most 100 %.
        let v = (canary.connections > 0).then(|| {
            canary.connect_failures().min(canary.connections) as f64 / canary.connections as f64
        });
        let verdict = match v {
            _ if canary.connections < min_requests => Verdict::Inconclusive(format!(
                "{} canary connections, fewer than min_requests {min_requests}",
                canary.connections
            )),
            None => Verdict::Inconclusive("no connections".into()),
            Some(v) if v > limit => Verdict::Fail(format!(
                "connect errors {} above the limit {}",
                pct(v),
                pct(limit)
            )),
            Some(_) => Verdict::Pass,
        };
        out.push(result(Judge::ConnectErrors, verdict, v, Some(limit)));
    }

    let Some(cmp) = &analysis.compare else {
        return out;
    };
    let z_crit = stats::normal_quantile(cmp.confidence);
    let stable_n = stable.exchanges(http);
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
            (Some(why), _) | (None, Some(why)) => Verdict::Inconclusive(why.clone()),
            (None, None) => {
                let z = stats::proportion_excess_z(
                    (canary.failures(), canary_n),
                    (stable.failures(), stable_n),
                    delta,
                );
                if z > z_crit {
                    Verdict::Fail(format!(
                        "error rate {} vs stable {}: more than {} points higher (z {z:.1} > {z_crit:.2})",
                        pct(pc),
                        pct(ps),
                        delta * 100.0
                    ))
                } else {
                    Verdict::Pass
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
        let medians = (canary.ttfb.quantile_ns(0.5), stable.ttfb.quantile_ns(0.5));
        let increase = match medians {
            (Some(c), Some(s)) if s > 0.0 => Some(c / s - 1.0),
            _ => None,
        };
        // Smaller slowdowns pass however significant: noise of the machine.
        let floor = cmp.min_latency_increase.as_nanos() as f64;
        let large_enough = matches!(medians, (Some(c), Some(s)) if c - s >= floor);
        let verdict = match (
            &too_few,
            increase,
            stats::mann_whitney(&canary.ttfb, &stable.ttfb),
        ) {
            (Some(why), _, _) => Verdict::Inconclusive(why.clone()),
            (None, Some(inc), Some(mw)) if inc > rel && large_enough && mw.z > z_crit => {
                Verdict::Fail(format!(
                    "median time to first byte {} above stable's ({}), more than {} (Mann-Whitney z {:.1} > {z_crit:.2})",
                    pct(inc),
                    medians.1.map_or_else(String::new, |s| ms(s / 1e9)),
                    pct(rel),
                    mw.z
                ))
            }
            (None, Some(_), Some(_)) => Verdict::Pass,
            _ => Verdict::Inconclusive("no latency samples".into()),
        };
        out.push(result(Judge::LatencyVsStable, verdict, increase, Some(rel)));
    }
    out
}

/// The critical fast path on the canary's most recent requests and connections.
pub fn critical(
    c: &Critical,
    recent_requests: Option<Recent>,
    recent_connections: Option<Recent>,
) -> Vec<JudgeResult> {
    let mut out = Vec::new();
    if let Some(limit) = c.error_rate {
        let (verdict, value) = match recent_requests {
            Some(r) if r.requests >= c.min_requests => {
                let v = r.errors as f64 / r.requests as f64;
                let verdict = if v >= limit {
                    Verdict::Fail(format!(
                        "{} of the last {} canary requests failed (critical at {})",
                        pct(v),
                        r.requests,
                        pct(limit)
                    ))
                } else {
                    Verdict::Pass
                };
                (verdict, Some(v))
            }
            _ => (
                Verdict::Inconclusive(format!("fewer than {} recent requests", c.min_requests)),
                None,
            ),
        };
        out.push(result(
            Judge::CriticalErrorRate,
            verdict,
            value,
            Some(limit),
        ));
    }
    if let Some(limit) = c.connect_error_rate {
        let (verdict, value) = match recent_connections {
            Some(r) if r.connections >= c.min_requests => {
                let v = r.connect_errors as f64 / r.connections as f64;
                let verdict = if v >= limit {
                    Verdict::Fail(format!(
                        "{} of the last {} canary connections refused or unanswered (critical at {})",
                        pct(v),
                        r.connections,
                        pct(limit)
                    ))
                } else {
                    Verdict::Pass
                };
                (verdict, Some(v))
            }
            _ => (
                Verdict::Inconclusive(format!("fewer than {} recent connections", c.min_requests)),
                None,
            ),
        };
        out.push(result(
            Judge::CriticalConnectErrors,
            verdict,
            value,
            Some(limit),
        ));
    }
    out
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

    /// `ok` + `errors` requests with times to first byte spread evenly
    /// from `ttfb_ns` to 1.5 x `ttfb_ns`.
    pub fn totals(ok: u64, errors: u64, ttfb_ns: u64) -> Totals {
        let mut t = Totals::default();
        t.requests[CLASS_2XX] = ok;
        t.requests[CLASS_5XX] = errors;
        let n = ok + errors;
        for i in 0..n {
            t.ttfb.0[hist::bucket_index(ttfb_ns + ttfb_ns * i / (2 * n)) as usize] += 1;
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
                confidence: 0.99,
            }),
            critical: Critical {
                error_rate: Some(0.5),
                connect_error_rate: Some(0.5),
                min_requests: 20,
            },
            request_timeout: Duration::from_secs(10),
            warmup: Duration::ZERO,
        }
    }

    fn verdict_of(rs: &[JudgeResult], j: Judge) -> &Verdict {
        &rs.iter().find(|r| r.judge == j).unwrap().verdict
    }

    #[test]
    fn a_healthy_canary_passes_every_judge() {
        let rs = check(
            &analysis(),
            100,
            &totals(1000, 2, 2_000_000),
            &totals(9000, 20, 2_000_000),
            true,
        );
        assert_eq!(rs.len(), 5);
        assert_eq!(overall(&rs), Verdict::Pass, "{rs:#?}");
    }

    #[test]
    fn too_little_traffic_is_inconclusive_not_a_failure() {
        let rs = check(
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
        let rs = check(
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
        let rs = check(
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
        let rs = check(&analysis(), 100, &canary, &stable, true);
        assert_eq!(
            verdict_of(&rs, Judge::LatencyVsStable),
            &Verdict::Pass,
            "{rs:#?}"
        );
        // Without the floor the same data fails: the floor is what passes it.
        let mut a = analysis();
        a.compare.as_mut().unwrap().min_latency_increase = Duration::ZERO;
        let rs = check(&a, 100, &canary, &stable, true);
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
            canary.ttfb.0[hist::bucket_index(2_000_000 + i * 100 + 100_000) as usize] += 1;
        }
        for i in 0..50000u64 {
            stable.ttfb.0[hist::bucket_index(2_000_000 + (i % 5000) * 100) as usize] += 1;
        }
        let rs = check(&analysis(), 100, &canary, &stable, true);
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
        let rs = check(&analysis(), 100, &canary, &stable, true);
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
        let rs = check(&a, 100, &canary, &stable, true);
        assert!(
            matches!(verdict_of(&rs, Judge::LatencyVsStable), Verdict::Fail(_)),
            "{rs:#?}"
        );
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
        let rs = critical(&c, Some(bad), None);
        assert!(matches!(rs[0].verdict, Verdict::Fail(_)));
        let few = Recent {
            requests: 19,
            errors: 19,
            connections: 0,
            connect_errors: 0,
        };
        assert!(matches!(
            critical(&c, Some(few), None)[0].verdict,
            Verdict::Inconclusive(_)
        ));
        let ok = Recent {
            requests: 100,
            errors: 30,
            connections: 0,
            connect_errors: 0,
        };
        assert_eq!(critical(&c, Some(ok), None)[0].verdict, Verdict::Pass);
        let refused = Recent {
            requests: 0,
            errors: 0,
            connections: 30,
            connect_errors: 30,
        };
        assert!(matches!(
            critical(&c, None, Some(refused))[1].verdict,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn resets_and_timeouts_are_failures() {
        // 1,000 answered fine; 200 reset after accept, 100 never answered.
        let mut canary = totals(1000, 0, 2_000_000);
        canary.resets = 200;
        canary.timeouts = 100;
        let stable = totals(9000, 9, 2_000_000);
        for http in [true, false] {
            let rs = check(&analysis(), 100, &canary, &stable, http);
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
            critical(&c, Some(recent), None)[0].verdict,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn connect_errors_count_failed_attempts_and_need_enough_of_them() {
        // 200 attempts, retransmitted (unanswered) 300 times, all connected in the end.
        let mut canary = totals(200, 0, 2_000_000);
        canary.unanswered = 300;
        let stable = totals(2000, 0, 2_000_000);
        let rs = check(&analysis(), 100, &canary, &stable, true);
        let ce = rs.iter().find(|r| r.judge == Judge::ConnectErrors).unwrap();
        assert_eq!(
            (&ce.verdict, ce.value),
            (&Verdict::Pass, Some(0.0)),
            "{ce:?}"
        );
        // Refused and finally failed attempts fail; at most 100 %.
        canary.refused = 150;
        canary.connect_timeouts = 50;
        let rs = check(&analysis(), 100, &canary, &stable, true);
        let ce = rs.iter().find(|r| r.judge == Judge::ConnectErrors).unwrap();
        assert!(matches!(ce.verdict, Verdict::Fail(_)), "{ce:?}");
        assert_eq!(ce.value, Some(1.0));
        assert_eq!(Recent::of(&canary).connect_errors, 200);
        // One refusal among 5 attempts is not enough to judge (min_requests 100).
        let mut few = totals(5, 0, 2_000_000);
        few.refused = 1;
        let rs = check(&analysis(), 100, &few, &stable, true);
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
        let rs = check(&analysis(), 100, &canary, &stable, true);
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
