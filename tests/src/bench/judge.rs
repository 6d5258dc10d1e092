//! The `judge` suite: how often the judge is wrong, and how fast it is
//! right, over many simulated rollouts (seeded, no kernel: the pure judges
//! and state machine on simulated check windows).
//!
//! Each simulated rollout runs check window after check window: the canary
//! gets its weight's share of the service's requests, each request fails
//! with its version's error rate, and answers take a log-logistic time (its
//! median and spread; a slower tail is a wider spread with the same median).
//! Counts are drawn as binomials and the latency histogram as a multinomial
//! over the kernel's buckets. Three judges decide on the same windows:
//!
//! - **kanari**: the agent's own [`kanari::analysis::check`] and
//!   [`kanari::rollout::step`] with the default configuration (always-valid
//!   intervals; evidence needed to pass).
//! - **fixed-horizon**: a textbook per-check test, as kanari's were before its judge v2: a
//!   one-sided two-proportion z-test at 99 % and stable's median + 20 %, per
//!   check; a check passes unless the canary is shown worse (absence of
//!   evidence passes), one failed check rolls back.
//! - **Flagger-style**: a fixed threshold per interval, as Flagger's
//!   built-in metrics are usually written: request success rate ≥ 99 % and
//!   p99 ≤ 500 ms; five failed checks (`threshold: 5`) roll back.
//!
//! The check path only: kanari's critical path, which catches a canary
//! failing most requests within a tick or two, is measured end to end by
//! the `rollback` suite. A failing canary's detection time therefore counts
//! in check intervals here.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};
use kanari::{
    analysis::{self, Verdict},
    config::{Analysis, RolloutSpec},
    rollout::{Event, Phase, State, step},
    telemetry::{Histogram, Totals},
};
use kanari_common::{
    hist::TTFB,
    http::{CLASS_2XX, CLASS_5XX},
};
use serde_json::{Value, json};

use super::{Ctx, SuiteReport, Target, report::table};
use crate::rng::splitmix64;

/// A version's behaviour.
#[derive(Clone, Copy, Debug)]
struct Model {
    error_rate: f64,
    median_ms: f64,
    /// Log-logistic scale of the latency (its log's spread × √3 / π).
    scale: f64,
}

const STABLE: Model = Model {
    error_rate: 0.002,
    median_ms: 20.0,
    scale: 0.165,
};

impl Model {
    fn errors(self, points: f64) -> Model {
        Model {
            error_rate: self.error_rate + points,
            ..self
        }
    }

    /// The same median, the p99 `factor` times stable's.
    fn tail(self, factor: f64) -> Model {
        Model {
            scale: self.scale + factor.ln() / 99f64.ln(),
            ..self
        }
    }

    fn cdf(self, ns: f64) -> f64 {
        if ns <= 0.0 {
            return 0.0;
        }
        let m = self.median_ms * 1e6;
        1.0 / (1.0 + (m / ns).powf(1.0 / self.scale))
    }
}

/// Seeded draws.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (splitmix64(self.0) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Binomial(n, p): exact by inversion when small, else the normal
    /// approximation (variance above 25), rounded and kept within 0..=n.
    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if n == 0 || p <= 0.0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        let var = n as f64 * p * (1.0 - p);
        if var > 25.0 {
            let x = (n as f64 * p + var.sqrt() * self.normal()).round();
            return x.clamp(0.0, n as f64) as u64;
        }
        // Inversion over the pmf, from 0 up.
        let q = 1.0 - p;
        let mut pmf = q.powf(n as f64);
        if pmf < 1e-300 {
            // p close to 1 with small variance: count the failures instead.
            return n - self.binomial(n, q);
        }
        let u = self.unit();
        let (mut k, mut cdf) = (0u64, pmf);
        while u > cdf && k < n {
            pmf *= (n - k) as f64 / (k + 1) as f64 * p / q;
            k += 1;
            cdf += pmf;
        }
        k
    }
}

/// `n` requests of `m`: their classes and times to first byte.
fn window(rng: &mut Rng, m: Model, n: u64) -> Totals {
    let mut t = Totals::default();
    let errors = rng.binomial(n, m.error_rate);
    t.requests[CLASS_5XX] = errors;
    t.requests[CLASS_2XX] = n - errors;
    t.connections = n;
    // A multinomial over the buckets, as conditional binomials.
    let mut h = Histogram::default();
    let (mut left, mut mass_left) = (n, 1.0f64);
    for i in 0..TTFB.buckets() as u32 {
        if left == 0 {
            break;
        }
        let (lo, hi) = (TTFB.lower_ns(i) as f64, TTFB.upper_ns(i));
        let p = if hi == u64::MAX {
            mass_left
        } else {
            m.cdf(hi as f64) - m.cdf(lo)
        };
        if p <= 0.0 {
            continue;
        }
        let k = if p >= mass_left {
            left
        } else {
            rng.binomial(left, p / mass_left)
        };
        h.0[i as usize] = k;
        left -= k;
        mass_left -= p;
    }
    t.ttfb = h;
    t
}

/// A check's verdict by one of the reference judges.
type Judge = fn(&Totals, &Totals) -> Verdict;

/// kanari before judge v2: fail only when shown worse at 99 % (one-sided
/// two-proportion z-test on 5xx, margin 1 point) or when the canary's
/// median exceeds stable's by more than 20 %; anything else passes once
/// there are 100 canary requests.
fn fixed_horizon(c: &Totals, s: &Totals) -> Verdict {
    let (nc, ns) = (c.requests(), s.requests());
    if nc < 100 {
        return Verdict::Inconclusive("few".into());
    }
    let (pc, ps) = (
        c.requests[CLASS_5XX] as f64 / nc as f64,
        s.requests[CLASS_5XX] as f64 / ns.max(1) as f64,
    );
    // Unpooled (Wald): the null is a difference of one point, not equality.
    let se = (pc * (1.0 - pc) / nc as f64 + ps * (1.0 - ps) / ns.max(1) as f64).sqrt();
    if se > 0.0 && (pc - ps - 0.01) / se > 2.326 {
        return Verdict::Fail("errors".into());
    }
    match (c.ttfb.quantile_ns(0.5), s.ttfb.quantile_ns(0.5)) {
        (Some(a), Some(b)) if a > b * 1.2 => Verdict::Fail("median".into()),
        _ => Verdict::Pass,
    }
}

/// Flagger's usual analysis: success rate at least 99 % and p99 at most
/// 500 ms over the interval; no minimum sample.
fn flagger(c: &Totals, _s: &Totals) -> Verdict {
    let n = c.requests();
    if n == 0 {
        return Verdict::Pass;
    }
    let success = 1.0 - c.requests[CLASS_5XX] as f64 / n as f64;
    let p99 = c.ttfb.quantile_ns(0.99).unwrap_or(0.0);
    if success < 0.99 || p99 > 500e6 {
        Verdict::Fail("threshold".into())
    } else {
        Verdict::Pass
    }
}

/// How a simulated rollout ended, after how many canary requests and seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    Promoted,
    RolledBack,
    /// Still undecided when the simulation stopped (or at the deadline).
    Undecided,
}

#[derive(Clone, Copy, Debug)]
struct Outcome {
    end: End,
    canary_requests: u64,
    seconds: f64,
}

/// The traffic a scenario sends: requests per second over the service.
#[derive(Clone, Copy, Debug)]
struct Traffic {
    rps: f64,
}

/// kanari's own judge and state machine, on one rollout.
fn run_kanari(
    spec: &RolloutSpec,
    traffic: Traffic,
    canary: Model,
    cap_s: f64,
    rng: &mut Rng,
) -> Outcome {
    let cfg = &spec.rollout;
    let levels = kanari::rollout::engine::levels(spec, confidence(&spec.analysis));
    let mut s = State::new("r".into(), true, vec![backend()], 0, cfg);
    let interval_ms = cfg.interval.as_millis() as u64;
    let (mut acc_c, mut acc_s) = (Totals::default(), Totals::default());
    let mut served = 0u64;
    let mut now = 0u64;
    let limit_ms = (cap_s * 1e3) as u64;
    while now < limit_ms {
        now += interval_ms;
        let w = s.weight as f64 / 10_000.0;
        let total = traffic.rps * cfg.interval.as_secs_f64();
        let nc = (total * w).round() as u64;
        acc_c += &window(rng, canary, nc);
        acc_s += &window(rng, STABLE, (total - nc as f64).round() as u64);
        served += nc;
        let results = analysis::check(
            &spec.analysis,
            cfg.min_requests,
            &acc_c,
            &acc_s,
            true,
            levels,
        );
        let before = s.window_since_ms;
        s = step(
            &s,
            Event::Check {
                now_ms: now,
                results,
            },
            cfg,
        )
        .expect("never refused")
        .0;
        let tick = Event::Tick {
            now_ms: now,
            critical: Vec::new(),
            outage: None,
        };
        s = step(&s, tick, cfg).expect("never refused").0;
        if s.window_since_ms != before {
            acc_c = Totals::default();
            acc_s = Totals::default();
        }
        let end = match s.phase {
            Phase::Promoted => Some(End::Promoted),
            Phase::RolledBack => Some(match s.cause {
                Some(kanari::rollout::RollbackCause::ProgressDeadline) => End::Undecided,
                _ => End::RolledBack,
            }),
            _ => None,
        };
        if let Some(end) = end {
            return Outcome {
                end,
                canary_requests: served,
                seconds: now as f64 / 1e3,
            };
        }
    }
    Outcome {
        end: End::Undecided,
        canary_requests: served,
        seconds: now as f64 / 1e3,
    }
}

/// A reference judge on the same steps and interval: `failures` failed
/// checks roll back, one passing check per step goes up.
fn run_reference(
    spec: &RolloutSpec,
    traffic: Traffic,
    canary: Model,
    judge: Judge,
    failures: u32,
    cap_s: f64,
    rng: &mut Rng,
) -> Outcome {
    let cfg = &spec.rollout;
    let (mut step_i, mut failed, mut served, mut passes) = (0usize, 0u32, 0u64, 0u32);
    let interval = cfg.interval.as_secs_f64();
    let mut checks = 0u32;
    while (checks as f64 + 1.0) * interval <= cap_s {
        checks += 1;
        let w = cfg.steps[step_i] as f64 / 10_000.0;
        let total = traffic.rps * interval;
        let nc = (total * w).round() as u64;
        let c = window(rng, canary, nc);
        let s = window(rng, STABLE, (total - nc as f64).round() as u64);
        served += nc;
        let seconds = checks as f64 * interval;
        match judge(&c, &s) {
            Verdict::Fail(_) => {
                failed += 1;
                if failed >= failures {
                    return Outcome {
                        end: End::RolledBack,
                        canary_requests: served,
                        seconds,
                    };
                }
            }
            Verdict::Pass => {
                passes += 1;
                if passes < cfg.checks_per_step {
                    continue;
                }
                passes = 0;
                step_i += 1;
                if step_i >= cfg.steps.len() || cfg.steps[step_i] >= 10_000 {
                    return Outcome {
                        end: End::Promoted,
                        canary_requests: served,
                        seconds,
                    };
                }
            }
            Verdict::Inconclusive(_) => {}
        }
    }
    Outcome {
        end: End::Undecided,
        canary_requests: served,
        seconds: checks as f64 * interval,
    }
}

fn confidence(a: &Analysis) -> f64 {
    a.compare.as_ref().map_or(0.99, |c| c.confidence)
}

fn backend() -> std::net::SocketAddrV4 {
    std::net::SocketAddrV4::new([10, 0, 3, 1].into(), 80)
}

/// The default rollout of a service, as the configuration gives it, with `rollout` YAML.
fn spec(rollout: &str) -> Result<RolloutSpec> {
    let yaml = format!(
        "interfaces: [{{name: n0}}]\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    stable: {{backends: [10.0.2.1:80]}}\n    canary: {{backends: [10.0.3.1:80]}}\n    rollout: {rollout}\n"
    );
    let c = kanari::config::parse("judge-suite.yaml", &yaml, &|_| true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.services[0].rollout.clone().context("a rollout")
}

/// Each judge's outcomes over `n` rollouts of one scenario.
struct Row {
    name: String,
    outcomes: [Vec<Outcome>; 3],
}

const JUDGES: [&str; 3] = ["kanari", "fixed-horizon", "Flagger-style"];

fn scenario(
    ctx: &Ctx,
    name: &str,
    spec: &RolloutSpec,
    traffic: Traffic,
    canary: Model,
    (n, cap_s): (usize, f64),
) -> Row {
    let mut outcomes: [Vec<Outcome>; 3] = Default::default();
    for i in 0..n {
        let seed =
            splitmix64(ctx.seed ^ splitmix64(i as u64) ^ splitmix64(name.len() as u64 * 7919));
        outcomes[0].push(run_kanari(spec, traffic, canary, cap_s, &mut Rng(seed)));
        outcomes[1].push(run_reference(
            spec,
            traffic,
            canary,
            fixed_horizon,
            1,
            cap_s,
            &mut Rng(seed),
        ));
        outcomes[2].push(run_reference(
            spec,
            traffic,
            canary,
            flagger,
            5,
            cap_s,
            &mut Rng(seed),
        ));
    }
    Row {
        name: name.into(),
        outcomes,
    }
}

fn share(o: &[Outcome], end: End) -> f64 {
    o.iter().filter(|x| x.end == end).count() as f64 / o.len().max(1) as f64
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// "12 s (1,200 req)" of the rollouts rolled back, and the share rolled back.
fn detection(o: &[Outcome]) -> String {
    let back: Vec<&Outcome> = o.iter().filter(|x| x.end == End::RolledBack).collect();
    let secs = median(back.iter().map(|x| x.seconds).collect());
    let reqs = median(back.iter().map(|x| x.canary_requests as f64).collect());
    match (secs, reqs) {
        (Some(s), Some(r)) => format!(
            "{:.0} s ({:.0} req), {:.1} % caught",
            s,
            r,
            share(o, End::RolledBack) * 100.0
        ),
        _ => "none caught".to_string(),
    }
}

fn row_json(r: &Row) -> Value {
    let per: Vec<Value> = JUDGES
        .iter()
        .zip(r.outcomes.iter())
        .map(|(j, o)| {
            json!({
                "judge": j,
                "rollouts": o.len(),
                "promoted": share(o, End::Promoted),
                "rolled_back": share(o, End::RolledBack),
                "undecided": share(o, End::Undecided),
                "median_seconds_to_rollback": median(o.iter().filter(|x| x.end == End::RolledBack).map(|x| x.seconds).collect()),
                "median_canary_requests_to_rollback": median(o.iter().filter(|x| x.end == End::RolledBack).map(|x| x.canary_requests as f64).collect()),
            })
        })
        .collect();
    json!({"scenario": r.name, "judges": per})
}

pub fn run(ctx: &Ctx) -> Result<SuiteReport> {
    let many = ctx.pick(10_000, 1_000);
    let some = ctx.pick(1_000, 200);
    // A rollout runs to its end (its deadlines bound it); a held canary is
    // watched for half an hour.
    let (whole, watched) = ((many, 24.0 * 3600.0), (some, 1800.0));
    let full = spec("{}")?;
    let held = spec("{steps: [10, 100], checks_per_step: 1000, progress_deadline: 24h}")?;
    let busy = Traffic { rps: 1000.0 };
    // 100 canary requests a check at the first step (1 % of 30 s).
    let quiet = Traffic { rps: 333.4 };
    let healthy = scenario(ctx, "healthy, full rollout", &full, busy, STABLE, whole);
    let at_margin = scenario(
        ctx,
        "+1 point errors (the margin), full rollout",
        &full,
        busy,
        STABLE.errors(0.01),
        whole,
    );
    let worse = scenario(
        ctx,
        "+5 points errors, 100 canary requests a check",
        &full,
        quiet,
        STABLE.errors(0.05),
        whole,
    );
    let slightly_worse = scenario(
        ctx,
        "+2 points errors, 100 canary requests a check",
        &full,
        quiet,
        STABLE.errors(0.02),
        whole,
    );
    let mut detect = Vec::new();
    for (name, m) in [
        ("+2 points errors", STABLE.errors(0.02)),
        ("+5 points errors", STABLE.errors(0.05)),
        ("+50 points errors", STABLE.errors(0.5)),
        ("p99 +10 %", STABLE.tail(1.1)),
        ("p99 +50 %", STABLE.tail(1.5)),
    ] {
        detect.push(scenario(ctx, name, &held, busy, m, watched));
    }

    let header = ["", JUDGES[0], JUDGES[1], JUDGES[2]];
    let rate_row = |r: &Row, label: &str, end: End| -> Vec<String> {
        let mut v = vec![label.to_string()];
        v.extend(
            r.outcomes
                .iter()
                .map(|o| format!("{:.2} %", share(o, end) * 100.0)),
        );
        v
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Simulated rollouts (seeded; the pure judges and state machine on binomial counts and \
         multinomial latency histograms). Stable: 0.2 % errors, median 20 ms, p99 {:.0} ms. \
         Default rollout (steps 1, 5, 10, 25, 50, 100 %, 30 s interval, min_requests 100, \
         confidence 0.99).\n",
        STABLE.median_ms * 99f64.powf(STABLE.scale)
    );
    let _ = writeln!(md, "Wrong decisions ({many} rollouts each):\n");
    md.push_str(&table(
        &header,
        &[
            rate_row(
                &healthy,
                "healthy canary (= stable), 1,000 req/s: rolled back",
                End::RolledBack,
            ),
            rate_row(
                &at_margin,
                "canary +1 point errors (at the margin), 1,000 req/s: rolled back",
                End::RolledBack,
            ),
            rate_row(
                &worse,
                "canary +5 points errors, 100 canary req a check: promoted",
                End::Promoted,
            ),
            rate_row(
                &slightly_worse,
                "canary +2 points errors, 100 canary req a check: promoted",
                End::Promoted,
            ),
        ],
    ));
    let _ = writeln!(
        md,
        "\nDetection at 10 % of 1,000 req/s, watched for 30 minutes ({some} rollouts each; \
         median time and canary requests to rollback among those rolled back, and the share \
         rolled back; the check path only, see above). p99 +10 % is within the default 20 % \
         margin: passing it is right.\n"
    );
    let rows: Vec<Vec<String>> = detect
        .iter()
        .map(|r| {
            let mut v = vec![r.name.clone()];
            v.extend(r.outcomes.iter().map(|o| detection(o)));
            v
        })
        .collect();
    md.push_str(&table(&header, &rows));
    md.push_str(
        "\nfixed-horizon: a textbook per-check test, as kanari's judges were before v2 (one-sided \
         two-proportion z-test at 99 % with a 1-point margin, median + 20 %, one failed check \
         rolls back; absence of evidence passes). \
         Flagger-style: success rate ≥ 99 % and p99 ≤ 500 ms per interval, five failed checks \
         roll back. kanari's critical path (not simulated here) rolls a canary failing half its \
         requests back within about a second: see the rollback suite.\n",
    );

    let false_rollback = share(&healthy.outcomes[0], End::RolledBack);
    let false_promotion = share(&worse.outcomes[0], End::Promoted);
    let at_margin_rollback = share(&at_margin.outcomes[0], End::RolledBack);
    let targets = vec![
        Target {
            name: "healthy canary: false rollbacks over a full rollout".into(),
            goal: "≤ 1 % (1 − confidence)".into(),
            measured: format!("{:.2} % of {many}", false_rollback * 100.0),
            met: false_rollback <= 0.01,
        },
        Target {
            name: "canary exactly at the margin: rolled back over a full rollout".into(),
            goal: "≤ 1 % (1 − confidence)".into(),
            measured: format!("{:.2} % of {many}", at_margin_rollback * 100.0),
            met: at_margin_rollback <= 0.01,
        },
        Target {
            name: "+5 points errors at 100 requests a check: false promotions".into(),
            goal: "≤ 1 %".into(),
            measured: format!("{:.2} % of {many}", false_promotion * 100.0),
            met: false_promotion <= 0.01,
        },
    ];
    let mut all = vec![
        row_json(&healthy),
        row_json(&at_margin),
        row_json(&worse),
        row_json(&slightly_worse),
    ];
    all.extend(detect.iter().map(row_json));
    Ok(SuiteReport {
        name: "judge".into(),
        title: "Judge: wrong decisions and detection, simulated".into(),
        markdown: md,
        json: json!({"scenarios": all, "rollouts": many, "detection_rollouts": some}),
        charts: Vec::new(),
        targets,
    })
}
