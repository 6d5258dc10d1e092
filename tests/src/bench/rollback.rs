//! The `rollback` suite: how long a failing canary keeps receiving users, and
//! how many users it hurts, under open-loop load at fixed rates.
//!
//! Each run builds the harness topology (client, node running a release
//! agent, two stable and one canary backend), starts a rollout held at 10 %,
//! sends requests at a fixed rate (one new connection each, each from the next
//! of 64,000 client addresses), then turns the canary bad and waits for the
//! agent to set its weight to 0:
//!
//! - `5xx`: the canary answers every request with HTTP 500 (the critical path
//!   is expected to catch it within a telemetry tick or two);
//! - `+200 ms`: the canary answers correctly, 200 ms late (no errors; only the
//!   comparison with stable can catch it, at the end of a check interval).
//!
//! Beside the measurements, the same scenario is computed (not run) for
//! Flagger's default policy and a common production one.

use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kanari::status::{RolloutStatus, StatusReport};
use kanari_common::maps::Group;
use serde_json::{Value, json};

use super::{
    Chart, Ctx, SuiteReport, Target, chart,
    openloop::{Finished, OpenLoop, Sample, unix_us},
    report::{median, table},
};
use crate::{
    agent::Agent,
    client::runtime,
    rng::splitmix64,
    topology::{Topology, TopologyOptions, VIP},
};

/// The canary's share while it is judged.
const WEIGHT_PERCENT: f64 = 10.0;
/// A request this slow or slower counts as slow (the latency fault adds 200 ms).
const SLOW_MS: u64 = 200;
/// The latency fault.
const DELAY: Duration = Duration::from_millis(200);
/// The check interval chosen for these runs (see [`ROLLOUT`]).
const INTERVAL_S: f64 = 5.0;
/// Load before the fault, on top of a random phase.
const WARMUP: Duration = Duration::from_secs(2);
/// Load after the rollback, to show nothing more reaches the canary.
const TAIL: Duration = Duration::from_millis(1500);
/// Timeline buckets.
const BUCKET_MS: u64 = 100;

/// The rollout a user who wants fast rollbacks would write: a 5 s check
/// interval, 50 canary requests at least per check, fixed limits a +200 ms
/// slowdown stays within (so only the comparison with stable catches it), the
/// comparison and the critical path at their defaults. `checks_per_step: 100`
/// only holds the canary at 10 % for the whole run; it changes no verdict.
const ROLLOUT: &str = "    rollout:
      steps: [10, 100]
      interval: 5s
      checks_per_step: 100
      min_requests: 50
      progress_deadline: 10m
    analysis:
      limits: {max_error_rate: 5, max_latency_p99: 500ms}
";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Errors,
    Latency,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Errors => "5xx",
            Fault::Latency => "+200ms",
        }
    }
    /// How long after the fault the rollback may come before the run fails.
    fn deadline(self) -> Duration {
        match self {
            Fault::Errors => Duration::from_secs(10),
            Fault::Latency => Duration::from_secs_f64(INTERVAL_S * 4.0),
        }
    }
    /// The random phase of the fault against the agent's schedule: within a
    /// telemetry tick pair for the critical path, within a check interval for
    /// the comparison.
    fn phase_span(self) -> Duration {
        match self {
            Fault::Errors => Duration::from_millis(500),
            Fault::Latency => Duration::from_secs_f64(INTERVAL_S),
        }
    }
}

/// One 100 ms slice of a run's timeline, by send time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bucket {
    /// Start of the slice, seconds from the fault.
    pub t_s: f64,
    pub sent: u64,
    /// Answered by the canary.
    pub canary: u64,
    /// Answered by the canary with an error status.
    pub canary_failed: u64,
    /// Not answered 200, by anyone (errors included).
    pub failed: u64,
    /// Took `SLOW_MS` or longer.
    pub slow: u64,
}

/// Buckets `samples` by send time into `width_ms` slices from `from_ms` to
/// `to_ms` (ms relative to `origin_us`).
pub fn buckets(
    samples: &[Sample],
    origin_us: u64,
    width_ms: u64,
    from_ms: i64,
    to_ms: i64,
    is_canary: impl Fn(SocketAddrV4) -> bool,
) -> Vec<Bucket> {
    let width = width_ms.max(1) as i64;
    let n = ((to_ms - from_ms).max(0) + width - 1) / width;
    let mut out: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            t_s: (from_ms + i * width) as f64 / 1e3,
            ..Default::default()
        })
        .collect();
    for s in samples {
        let rel_ms = (s.sent_us as i64 - origin_us as i64).div_euclid(1000);
        if rel_ms < from_ms || rel_ms >= to_ms {
            continue;
        }
        let b = &mut out[((rel_ms - from_ms) / width) as usize];
        b.sent += 1;
        if !s.ok() {
            b.failed += 1;
        }
        if s.latency_us >= SLOW_MS * 1000 {
            b.slow += 1;
        }
        if let Ok((backend, status)) = s.result
            && is_canary(backend)
        {
            b.canary += 1;
            if status >= 500 {
                b.canary_failed += 1;
            }
        }
    }
    out
}

/// The `p`-th percentile (0–100) by nearest rank; NaN when empty.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A policy evaluated every `interval_s` that rolls back after `threshold`
/// failed checks, computed (not run).
#[derive(Clone, Debug, PartialEq)]
pub struct Computed {
    pub name: String,
    pub interval_s: f64,
    pub threshold: u32,
    /// Fault to weight 0: best, mean, worst (s).
    pub detect_s: (f64, f64, f64),
}

impl Computed {
    /// Flagger's schedule: every `interval` the controller first rolls back if
    /// `failedChecks >= threshold`, else runs the analysis (a failing one adds
    /// a failed check). The first check after the fault comes after a phase
    /// uniform in [0, interval) and fails; the threshold-th failure is counted
    /// `threshold − 1` intervals later and acted on one interval after that:
    /// detection = phase + threshold × interval (mean: + half an interval).
    /// Prometheus scrape and `rate()` lag and the router's propagation come
    /// on top (not modelled: these figures are lower bounds).
    pub fn flagger(name: &str, interval_s: f64, threshold: u32) -> Self {
        let base = threshold as f64 * interval_s;
        Self {
            name: name.to_string(),
            interval_s,
            threshold,
            detect_s: (base, base + interval_s / 2.0, base + interval_s),
        }
    }

    /// Requests that reach the failing canary meanwhile at `rate` requests/s
    /// with the canary at `weight` (0–1): best, mean, worst.
    pub fn failed(&self, rate: f64, weight: f64) -> (f64, f64, f64) {
        let f = |d: f64| rate * weight * d;
        (f(self.detect_s.0), f(self.detect_s.1), f(self.detect_s.2))
    }
}

/// One measured run.
#[derive(Clone, Debug)]
struct Run {
    rate: f64,
    fault: Fault,
    achieved: f64,
    skipped: u64,
    requests: usize,
    /// Fault to weight 0 (ms); None when it never came.
    took_ms: Option<f64>,
    reason: String,
    judge: String,
    /// Not answered 200, completed after the fault.
    failed: u64,
    /// Not answered 200 before the fault (should be 0).
    failed_before: u64,
    /// `SLOW_MS` or longer, completed after the fault.
    slow: u64,
    /// Answered by the canary, sent after the fault.
    canary_after_fault: u64,
    /// New connections answered by the canary sent more than 50 ms after weight 0.
    canary_after_rollback: u64,
    /// The last request sent that the canary answered, ms after the fault.
    last_canary_ms: Option<f64>,
    /// The run by send time, in `BUCKET_MS` slices.
    timeline: Vec<Bucket>,
    /// The timeline's range, ms from the fault.
    span_ms: (i64, i64),
    attached: Vec<String>,
}

fn status(rt: &tokio::runtime::Runtime, agent: &Agent) -> Result<(f64, RolloutStatus)> {
    let body = rt.block_on(kanari::api::control_get(&agent.socket, "/v1/status"))?;
    let r: StatusReport = serde_json::from_slice(&body).context("a status report")?;
    let s = r.services.first().context("no service in the status")?;
    Ok((
        s.canary_weight_percent,
        s.rollout.clone().context("the service has no rollout")?,
    ))
}

/// The name of the judge that failed, if any.
fn failed_judge(r: &RolloutStatus) -> String {
    r.critical
        .iter()
        .chain(r.last_check.iter())
        .find(|j| j.verdict.name() == "fail")
        .map_or_else(|| "?".to_string(), |j| j.judge.name().to_string())
}

/// The configuration: the harness's, with the default conntrack size
/// (262,144 connections, 16,384 new per second) and [`ROLLOUT`].
fn config(topo: &Topology) -> String {
    topo.config(0.0, ROLLOUT, "auto")
        .replace("conntrack:\n  connections: 65536\n", "")
}

/// One run; `Ok(Err(why))` when the run is void (the canary was rolled back
/// before the fault).
fn one_run(rate: f64, fault: Fault, phase: Duration) -> Result<Result<Run, String>> {
    let topo = Topology::new(&TopologyOptions {
        complete_client_checksums: true,
        ..Default::default()
    })
    .context("building the topology")?;
    let attached = topo.attached_programs().unwrap_or_default();
    let agent = Agent::start(&topo.node, &config(&topo)).context("starting kanari")?;
    let attached = if attached.is_empty() {
        topo.attached_programs().unwrap_or_default()
    } else {
        attached
    };
    let rt = runtime();
    let (w, r) = status(&rt, &agent)?;
    if r.phase != "progressing" || w != WEIGHT_PERCENT {
        bail!(
            "the rollout did not start at {WEIGHT_PERCENT} %: {} at {w} %",
            r.phase
        );
    }
    let threads = if rate > 1500.0 { 2 } else { 1 };
    let load = OpenLoop::start(&topo.client, VIP, rate, threads, 0)?;
    std::thread::sleep(WARMUP + phase);
    let (w, r) = status(&rt, &agent)?;
    if r.phase != "progressing" || w != WEIGHT_PERCENT {
        drop(load);
        return Ok(Err(format!(
            "before the fault: {} at {w} % ({})",
            r.phase, r.reason
        )));
    }
    let fault_us = unix_us();
    let canary = topo.canary_server();
    match fault {
        Fault::Errors => canary.behavior.set_error_rate(1.0),
        Fault::Latency => canary.behavior.set_delay(DELAY),
    }
    let deadline = Instant::now() + fault.deadline();
    let last = loop {
        let (w, r) = status(&rt, &agent)?;
        if r.phase != "progressing" || w == 0.0 || Instant::now() >= deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    std::thread::sleep(TAIL);
    let fin = load.stop();
    let _ = agent.stop();
    let rolled_back = last.phase == "rolled_back";
    let written_us = last
        .weight_written_unix_ms
        .filter(|_| rolled_back)
        .map(|ms| ms * 1000);
    let is_canary = |a: SocketAddrV4| topo.group_of(a) == Some(Group::Canary);
    Ok(Ok(summarize(
        rate, fault, &fin, fault_us, written_us, &last, attached, is_canary,
    )))
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    rate: f64,
    fault: Fault,
    fin: &Finished,
    fault_us: u64,
    written_us: Option<u64>,
    last: &RolloutStatus,
    attached: Vec<String>,
    is_canary: impl Fn(SocketAddrV4) -> bool,
) -> Run {
    let s = &fin.samples;
    let done_after = |x: &Sample| x.sent_us + x.latency_us >= fault_us;
    let failed = s.iter().filter(|x| !x.ok() && done_after(x)).count() as u64;
    let failed_before = s.iter().filter(|x| !x.ok() && !done_after(x)).count() as u64;
    let slow = s
        .iter()
        .filter(|x| x.latency_us >= SLOW_MS * 1000 && done_after(x))
        .count() as u64;
    let by_canary =
        |x: &&Sample| matches!(x.result, Ok((b, _)) if is_canary(b)) && x.sent_us >= fault_us;
    let canary_after_fault = s.iter().filter(by_canary).count() as u64;
    let canary_after_rollback = written_us.map_or(0, |w| {
        s.iter()
            .filter(by_canary)
            .filter(|x| x.sent_us > w + 50_000)
            .count() as u64
    });
    let last_canary_ms = s
        .iter()
        .filter(by_canary)
        .map(|x| (x.sent_us - fault_us) as f64 / 1e3)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let took_ms = written_us.map(|w| (w as f64 - fault_us as f64) / 1e3);
    let from_ms = -1000;
    let to_ms = (fin.stopped_us as i64 - fault_us as i64) / 1000;
    Run {
        rate,
        fault,
        achieved: fin.achieved_rate(),
        skipped: fin.skipped,
        requests: s.len(),
        took_ms,
        reason: last.reason.clone(),
        judge: failed_judge(last),
        failed,
        failed_before,
        slow,
        canary_after_fault,
        canary_after_rollback,
        last_canary_ms,
        timeline: buckets(s, fault_us, BUCKET_MS, from_ms, to_ms, &is_canary),
        span_ms: (from_ms, to_ms),
        attached,
    }
}

fn run_json(r: &Run) -> Value {
    json!({
        "rate_target": r.rate,
        "rate_achieved": r.achieved,
        "skipped": r.skipped,
        "fault": r.fault.name(),
        "requests": r.requests,
        "fault_to_weight_0_ms": r.took_ms,
        "reason": r.reason,
        "judge": r.judge,
        "failed": r.failed,
        "failed_before_fault": r.failed_before,
        "slow": r.slow,
        "canary_answers_after_fault": r.canary_after_fault,
        "canary_new_connections_after_weight_0": r.canary_after_rollback,
        "last_canary_request_after_fault_ms": r.last_canary_ms,
        "attached": r.attached,
        "timeline": {
            "bucket_ms": BUCKET_MS,
            "columns": ["t_s", "sent", "canary", "canary_failed", "failed", "slow"],
            "rows": r.timeline.iter().map(|b| json!([b.t_s, b.sent, b.canary, b.canary_failed, b.failed, b.slow])).collect::<Vec<_>>(),
        },
    })
}

fn fmt_ms(x: f64) -> String {
    if x.is_nan() {
        "—".into()
    } else {
        format!("{x:.0} ms")
    }
}

/// A count: one decimal below 100, whole up to 1,000, three significant
/// figures with thousands separators above.
fn fmt_n(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    if x < 100.0 {
        return format!("{x:.1}").trim_end_matches(".0").to_string();
    }
    let digits = x.abs().log10().floor() as i32 + 1;
    let unit = 10f64.powi((digits - 3).max(0));
    let n = ((x / unit).round() * unit) as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate_label(r: f64) -> String {
    let r = r.round() as u64;
    if r >= 1000 {
        format!("{},{:03}", r / 1000, r % 1000)
    } else {
        r.to_string()
    }
}

/// The chart of one run: weight, canary error rate, failed (or slow) requests.
fn timeline_chart(r: &Run) -> Result<Chart> {
    let took_s = r.took_ms.map(|t| t / 1e3);
    let end_s = r.span_ms.1 as f64 / 1e3;
    let start_s = r.span_ms.0 as f64 / 1e3;
    let weight = match took_s {
        Some(t) => vec![
            (start_s, WEIGHT_PERCENT),
            (t, WEIGHT_PERCENT),
            (t, 0.0),
            (end_s, 0.0),
        ],
        None => vec![(start_s, WEIGHT_PERCENT), (end_s, WEIGHT_PERCENT)],
    };
    let mid = |b: &Bucket| b.t_s + BUCKET_MS as f64 / 2e3;
    let error_rate: Vec<(f64, f64)> = r
        .timeline
        .iter()
        .filter(|b| b.canary > 0)
        .map(|b| (mid(b), b.canary_failed as f64 * 100.0 / b.canary as f64))
        .collect();
    let (what, hurt): (&str, Vec<(f64, f64)>) = match r.fault {
        Fault::Errors => (
            "failed requests per 100 ms",
            r.timeline
                .iter()
                .map(|b| (mid(b), b.failed as f64))
                .collect(),
        ),
        Fault::Latency => (
            "slow (≥ 200 ms) requests per 100 ms",
            r.timeline.iter().map(|b| (mid(b), b.slow as f64)).collect(),
        ),
    };
    let mut series = vec![("canary weight (%)".to_string(), weight)];
    if r.fault == Fault::Errors {
        series.push(("canary error rate (%)".to_string(), error_rate));
    }
    series.push((what.to_string(), hurt));
    let rate = r.rate.round() as u64;
    let title = format!(
        "canary {} at {} requests/s: fault at 0 s, weight 0 at {}",
        r.fault.name(),
        rate_label(r.rate),
        took_s.map_or("never".into(), |t| format!("{:.2} s", t))
    );
    let file = format!(
        "rollback-{}-{rate}.svg",
        if r.fault == Fault::Errors {
            "5xx"
        } else {
            "latency"
        }
    );
    Ok(Chart {
        svg: chart::lines(&title, "seconds from the fault", "", &series)?,
        file,
        title,
    })
}

pub fn run(ctx: &Ctx) -> Result<SuiteReport> {
    let rates: Vec<f64> = ctx.pick(vec![200.0, 1000.0, 5000.0], vec![1000.0]);
    let runs_per = ctx.pick(5usize, 1);
    let faults = [Fault::Errors, Fault::Latency];
    let started = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    let mut void: Vec<Value> = Vec::new();
    let mut rng = ctx.seed ^ 0x726f_6c6c_6261_636b;
    for &fault in &faults {
        for &rate in &rates {
            let mut ok = 0;
            let mut attempts = 0;
            while ok < runs_per && attempts < runs_per + 3 {
                attempts += 1;
                rng = splitmix64(rng);
                let phase = fault
                    .phase_span()
                    .mul_f64((rng >> 11) as f64 / (1u64 << 53) as f64);
                eprintln!(
                    "bench: rollback: {} at {rate}/s, run {} (phase {:.2} s)",
                    fault.name(),
                    ok + 1,
                    phase.as_secs_f64()
                );
                match one_run(rate, fault, phase)? {
                    Ok(r) => {
                        eprintln!(
                            "bench: rollback:   weight 0 after {}, {} failed, {} slow, {:.0} requests/s achieved ({})",
                            r.took_ms.map_or("never".into(), fmt_ms),
                            r.failed,
                            r.slow,
                            r.achieved,
                            r.judge
                        );
                        runs.push(r);
                        ok += 1;
                    }
                    Err(why) => {
                        eprintln!("bench: rollback:   void run: {why}");
                        void.push(json!({"rate": rate, "fault": fault.name(), "why": why}));
                    }
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    report(ctx, &rates, &runs, &void, seconds)
}

fn report(
    ctx: &Ctx,
    rates: &[f64],
    runs: &[Run],
    void: &[Value],
    seconds: f64,
) -> Result<SuiteReport> {
    let of = |fault: Fault, rate: f64| -> Vec<&Run> {
        runs.iter()
            .filter(|r| r.fault == fault && r.rate == rate)
            .collect()
    };
    let took = |rs: &[&Run]| -> Vec<f64> {
        rs.iter()
            .map(|r| r.took_ms.unwrap_or(f64::INFINITY))
            .collect()
    };
    let mut md = String::new();
    let mut targets = Vec::new();
    let mut summary = Vec::new();

    // 5xx.
    let mut rows = Vec::new();
    for &rate in rates {
        let rs = of(Fault::Errors, rate);
        if rs.is_empty() {
            continue;
        }
        let t = took(&rs);
        let achieved = median(&rs.iter().map(|r| r.achieved).collect::<Vec<_>>());
        let failed: Vec<f64> = rs.iter().map(|r| r.failed as f64).collect();
        let bound = achieved * WEIGHT_PERCENT / 100.0 * 1.5;
        let worst = failed.iter().copied().fold(0.0, f64::max);
        let never = rs.iter().filter(|r| r.took_ms.is_none()).count();
        let last_canary = median(
            &rs.iter()
                .filter_map(|r| r.last_canary_ms)
                .collect::<Vec<_>>(),
        );
        let judges: Vec<String> = {
            let mut j: Vec<String> = rs.iter().map(|r| r.judge.clone()).collect();
            j.sort();
            j.dedup();
            j
        };
        rows.push(vec![
            rate_label(rate),
            format!("{achieved:.0}"),
            rs.len().to_string(),
            format!(
                "**{}** ({}–{}){}",
                fmt_ms(median(&t)),
                fmt_ms(percentile(&t, 0.0)),
                fmt_ms(percentile(&t, 100.0)),
                if never > 0 {
                    format!(", {never} never")
                } else {
                    String::new()
                }
            ),
            fmt_ms(last_canary),
            format!("**{}** (max {})", fmt_n(median(&failed)), fmt_n(worst)),
            fmt_n(bound),
            rs.iter()
                .map(|r| r.canary_after_rollback)
                .sum::<u64>()
                .to_string(),
            judges.join(", "),
        ]);
        if rate >= 1000.0 {
            let m = median(&t);
            targets.push(Target {
                name: format!(
                    "rollback: canary 5xx → weight 0 at {} requests/s",
                    rate_label(rate)
                ),
                goal: "≤ 1 s median".into(),
                measured: format!("{} median over {} runs", fmt_ms(m), rs.len()),
                met: m <= 1000.0,
            });
        }
        targets.push(Target {
            name: format!(
                "rollback: failed requests at {} requests/s, canary 10 %",
                rate_label(rate)
            ),
            goal: format!("≤ rate × weight × 1.5 s = {}", fmt_n(bound)),
            measured: format!("{} in the worst of {} runs", fmt_n(worst), rs.len()),
            met: worst <= bound,
        });
        summary.push(json!({
            "fault": "5xx", "rate_target": rate, "rate_achieved_median": achieved, "runs": rs.len(),
            "fault_to_weight_0_ms": {"median": median(&t), "min": percentile(&t, 0.0), "max": percentile(&t, 100.0)},
            "failed": {"median": median(&failed), "max": worst, "bound": bound},
        }));
    }
    let _ = writeln!(
        md,
        "**Canary answers every request with HTTP 500** (canary at {WEIGHT_PERCENT} %, open-loop load, \
         one new connection per request from a new client address; median (min–max) over runs):\n"
    );
    md.push_str(&table(
        &[
            "requests/s",
            "achieved",
            "runs",
            "fault → weight 0",
            "last request sent to the canary",
            "failed requests",
            "bound (rate × 10 % × 1.5 s)",
            "new connections to the canary after weight 0",
            "judge",
        ],
        &rows,
    ));

    // +200 ms.
    let mut rows = Vec::new();
    for &rate in rates {
        let rs = of(Fault::Latency, rate);
        if rs.is_empty() {
            continue;
        }
        let t = took(&rs);
        let achieved = median(&rs.iter().map(|r| r.achieved).collect::<Vec<_>>());
        let slow: Vec<f64> = rs.iter().map(|r| r.slow as f64).collect();
        let failed: u64 = rs.iter().map(|r| r.failed).sum();
        let judges: Vec<String> = {
            let mut j: Vec<String> = rs.iter().map(|r| r.judge.clone()).collect();
            j.sort();
            j.dedup();
            j
        };
        let expected = achieved * WEIGHT_PERCENT / 100.0 * median(&t) / 1e3;
        rows.push(vec![
            rate_label(rate),
            format!("{achieved:.0}"),
            rs.len().to_string(),
            format!(
                "**{}** ({}–{})",
                fmt_ms(median(&t)),
                fmt_ms(percentile(&t, 0.0)),
                fmt_ms(percentile(&t, 100.0))
            ),
            format!(
                "**{}** (max {})",
                fmt_n(median(&slow)),
                fmt_n(slow.iter().copied().fold(0.0, f64::max))
            ),
            fmt_n(expected),
            failed.to_string(),
            judges.join(", "),
        ]);
        summary.push(json!({
            "fault": "+200ms", "rate_target": rate, "rate_achieved_median": achieved, "runs": rs.len(),
            "fault_to_weight_0_ms": {"median": median(&t), "min": percentile(&t, 0.0), "max": percentile(&t, 100.0)},
            "slow": {"median": median(&slow)}, "failed_total": failed,
        }));
    }
    let _ = writeln!(
        md,
        "\n**Canary answers correctly but {} ms late** (no errors; slow = took ≥ {SLOW_MS} ms, \
         connect to last byte):\n",
        DELAY.as_millis()
    );
    md.push_str(&table(
        &[
            "requests/s",
            "achieved",
            "runs",
            "fault → weight 0",
            "slow requests",
            "rate × 10 % × median time",
            "failed (all runs)",
            "judge",
        ],
        &rows,
    ));

    // Computed.
    let policies = [
        Computed::flagger("Flagger default (interval 60 s, threshold 1)", 60.0, 1),
        Computed::flagger("Flagger, common production (60 s, threshold 5)", 60.0, 5),
    ];
    let mut header = vec!["policy (computed, not run)", "fault → weight 0"];
    let labels: Vec<String> = rates
        .iter()
        .map(|r| format!("failed at {}/s", rate_label(*r)))
        .collect();
    header.extend(labels.iter().map(String::as_str));
    let mut rows = Vec::new();
    let mut computed_json = Vec::new();
    for p in &policies {
        let mut row = vec![
            p.name.clone(),
            format!(
                "{:.0} s ({:.0}–{:.0} s)",
                p.detect_s.1, p.detect_s.0, p.detect_s.2
            ),
        ];
        let mut per_rate = Vec::new();
        for &rate in rates {
            // The rate the runs achieved, else the target.
            let achieved = median(
                &runs
                    .iter()
                    .filter(|r| r.rate == rate && r.fault == Fault::Errors)
                    .map(|r| r.achieved)
                    .collect::<Vec<_>>(),
            );
            let rr = if achieved.is_nan() { rate } else { achieved };
            let (lo, mean, hi) = p.failed(rr, WEIGHT_PERCENT / 100.0);
            row.push(format!("{} ({}–{})", fmt_n(mean), fmt_n(lo), fmt_n(hi)));
            per_rate.push(json!({"rate": rr, "failed": {"min": lo, "mean": mean, "max": hi}}));
        }
        rows.push(row);
        computed_json.push(json!({
            "policy": p.name, "interval_s": p.interval_s, "threshold": p.threshold,
            "fault_to_weight_0_s": {"min": p.detect_s.0, "mean": p.detect_s.1, "max": p.detect_s.2},
            "per_rate": per_rate, "computed_not_run": true,
        }));
    }
    let _ = writeln!(
        md,
        "\n**The same fault under a Flagger analysis, computed (not run)** from the rates achieved above:\n"
    );
    md.push_str(&table(&header, &rows));

    let _ = writeln!(
        md,
        "\n**Method.** Each run builds the harness topology (a client namespace, the node running the \
         release agent, two stable and one canary backend, each in its own namespace; the client sends \
         complete checksums, as through a NIC, so XDP steers), starts a rollout held at {WEIGHT_PERCENT} % \
         with the default conntrack size (262,144 connections, 16,384 new per second), and sends requests \
         open loop: each leaves at its scheduled time whatever earlier ones do (no coordinated omission), on \
         a new connection (`Connection: close`), from the next of 64,000 client addresses, so the \
         split is by client. After {} s plus a seeded random phase (0–{} ms for the 5xx fault, 0–{INTERVAL_S:.0} s \
         for the latency fault, against the agent's tick and check schedules) the canary backend turns bad. \
         *Fault → weight 0* is the agent's recorded weight-write time (`weight_written_unix_ms` in \
         `/v1/status`) minus the fault time, both from the same clock; the client-side check beside it is the \
         send time of the last request the canary answered. *Failed* counts requests not answered 200 that \
         completed after the fault ({} failed before the fault, in all runs). The load runs {:.1} s past the \
         rollback. A run where the canary was rolled back before the fault is void and repeated: {}. This \
         suite took {seconds:.0} s.\n",
        WARMUP.as_secs(),
        Fault::Errors.phase_span().as_millis(),
        runs.iter().map(|r| r.failed_before).sum::<u64>(),
        TAIL.as_secs_f64(),
        if void.is_empty() {
            "none this time".to_string()
        } else {
            format!(
                "{} this time ({})",
                void.len(),
                void.iter()
                    .map(|v| format!(
                        "{} at {}/s: {}",
                        v["fault"].as_str().unwrap_or("?"),
                        v["rate"],
                        v["why"].as_str().unwrap_or("?")
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    );
    let _ = writeln!(
        md,
        "**Settings** (what a user wanting fast rollbacks would write): `interval: 5s`, `min_requests: 50`, \
         `analysis.limits: {{max_error_rate: 5, max_latency_p99: 500ms}}`, `compare_to_stable` and `critical` \
         at their defaults (latency may rise 20 % over stable's median at 99 % confidence; the critical path \
         rolls back at 50 % errors over at least 20 recent canary requests, checked every 250 ms tick). \
         `steps: [10, 100]` with `checks_per_step: 100` only holds the canary at 10 % for the run. The 5xx \
         fault is caught by the critical path (`critical_error_rate`) at the first tick where at least half of \
         the most recent (at least 20) canary requests failed — at 200 requests/s, 20 canary requests a \
         second, that takes most of a second. The +200 ms fault passes the fixed limits (p99 stays under 500 ms) and is caught by the \
         comparison with stable (`latency_vs_stable`) at the end of a check interval: at the first check whose \
         window holds enough slow requests to move the canary's median more than 20 % above stable's (about \
         half the window; less under heavy load, when the fast requests' own spread is wide), else at the \
         next — fault → weight 0 within 1½ intervals, about one interval on average, whatever the rate. With \
         the default `interval: 30s` the same fault would take about 30 s (up to 45 s); a shorter interval \
         buys a faster latency rollback at the cost of smaller windows. The comparison can also fail a healthy \
         canary at these µs-scale medians on a busy machine (void runs, if any, are listed above).\n"
    );
    let _ = writeln!(
        md,
        "**Flagger model** (computed, not run). Flagger runs its analysis every `analysis.interval` \
         (default 60 s) and rolls back once `failedChecks` reaches `analysis.threshold` (default 1) — its \
         controller checks the count at the start of each interval, before running that interval's \
         analysis ([Canary CRD defaults](https://docs.flagger.app/usage/how-it-works), \
         `GetAnalysisInterval`/`GetAnalysisThreshold` in `pkg/apis/flagger/v1beta1/canary.go`; threshold 5 \
         with a 1 m interval is the value in Flagger's own tutorials and common in production). So \
         detection ≈ phase + threshold × interval, the phase uniform in [0, interval): mean (threshold + ½) \
         × interval; failed = rate × weight × detection. Left out, so these are lower bounds: Prometheus \
         scrape interval and `rate()` window lag before a failure shows in the metric, and the mesh or ingress \
         propagating the new weights. For the +200 ms fault the same model holds only if the latency metric \
         catches it: Flagger's built-in `request-duration` check as documented (p99 ≤ 500 ms) would never \
         fail on a service answering in a few ms plus 200 ms.\n"
    );
    let _ = writeln!(
        md,
        "**Caveats.** One 2-core machine runs the client, the backends, the agent and the kernel's work, \
         shared with other benchmark runs: achieved rates are shown beside targets and timing noise is real. \
         Weight-write times have 1 ms resolution. Loopback veths, not NICs. The failed-request bound uses \
         the achieved rate."
    );

    let mut charts = Vec::new();
    for &rate in rates {
        let mut rs = of(Fault::Errors, rate);
        rs.sort_by(|a, b| {
            a.took_ms
                .unwrap_or(f64::INFINITY)
                .total_cmp(&b.took_ms.unwrap_or(f64::INFINITY))
        });
        if let Some(r) = rs.get(rs.len() / 2) {
            charts.push(timeline_chart(r)?);
        }
    }
    let latency_rate = if rates.contains(&1000.0) {
        1000.0
    } else {
        rates[0]
    };
    let mut rs = of(Fault::Latency, latency_rate);
    rs.sort_by(|a, b| {
        a.took_ms
            .unwrap_or(f64::INFINITY)
            .total_cmp(&b.took_ms.unwrap_or(f64::INFINITY))
    });
    if let Some(r) = rs.get(rs.len() / 2) {
        charts.push(timeline_chart(r)?);
    }

    Ok(SuiteReport {
        name: "rollback".into(),
        title: "Rollback: fault to weight 0, and the requests users saw fail".into(),
        markdown: md,
        json: json!({
            "quick": ctx.quick,
            "seconds": seconds,
            "weight_percent": WEIGHT_PERCENT,
            "slow_ms": SLOW_MS,
            "rollout_yaml": ROLLOUT,
            "summary": summary,
            "computed_not_run": computed_json,
            "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
            "void_runs": void,
        }),
        charts,
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(
        sent_ms: u64,
        latency_ms: u64,
        result: Result<(SocketAddrV4, u16), String>,
    ) -> Sample {
        Sample {
            sent_us: sent_ms * 1000,
            latency_us: latency_ms * 1000,
            result,
        }
    }

    #[test]
    fn counts_are_formatted_for_reading() {
        assert_eq!(fmt_n(25.0), "25");
        assert_eq!(fmt_n(2.5), "2.5");
        assert_eq!(fmt_n(150.0), "150");
        assert_eq!(fmt_n(9003.3), "9,000");
        assert_eq!(fmt_n(33011.0), "33,000");
        assert_eq!(fmt_n(165_432.0), "165,000");
        assert_eq!(fmt_n(f64::NAN), "—");
    }

    #[test]
    fn flagger_detection_and_failed_requests() {
        let d = Computed::flagger("default", 60.0, 1);
        assert_eq!(d.detect_s, (60.0, 90.0, 120.0));
        // 1,000 requests/s, canary at 10 %: 100 failing requests a second.
        assert_eq!(d.failed(1000.0, 0.1), (6000.0, 9000.0, 12000.0));
        let p = Computed::flagger("prod", 60.0, 5);
        assert_eq!(p.detect_s, (300.0, 330.0, 360.0));
        assert_eq!(p.failed(200.0, 0.1).1, 6600.0);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let xs = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&xs, 50.0), 3.0);
        assert_eq!(percentile(&xs, 100.0), 5.0);
        assert_eq!(percentile(&xs, 90.0), 5.0);
        assert_eq!(percentile(&[7.0, f64::NAN], 50.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(median(&[f64::INFINITY, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn timeline_buckets_by_send_time() {
        let stable: SocketAddrV4 = "10.2.1.1:8080".parse().unwrap();
        let canary: SocketAddrV4 = "10.2.3.1:8080".parse().unwrap();
        let fault = 10_000; // ms
        let samples = [
            sample(fault - 1500, 1, Ok((stable, 200))), // before the range
            sample(fault - 950, 1, Ok((canary, 200))),
            sample(fault - 1, 250, Ok((stable, 200))), // slow, last bucket before 0
            sample(fault, 1, Ok((canary, 500))),
            sample(fault + 99, 1, Err("reset".into())),
            sample(fault + 100, 1, Ok((canary, 200))),
            sample(fault + 5000, 1, Ok((canary, 500))), // past the range
        ];
        let b = buckets(&samples, fault * 1000, 100, -1000, 300, |a| a == canary);
        assert_eq!(b.len(), 13);
        assert_eq!(b[0].t_s, -1.0);
        assert_eq!((b[0].sent, b[0].canary, b[0].failed), (1, 1, 0));
        assert_eq!((b[9].sent, b[9].slow), (1, 1));
        assert_eq!(b[10].t_s, 0.0);
        assert_eq!(
            (b[10].sent, b[10].canary, b[10].canary_failed, b[10].failed),
            (2, 1, 1, 2)
        );
        assert_eq!((b[11].canary, b[11].canary_failed, b[11].failed), (1, 0, 0));
        assert_eq!(b.iter().map(|b| b.sent).sum::<u64>(), 5);
    }

    #[test]
    fn a_run_is_summarized_from_its_samples() {
        let stable: SocketAddrV4 = "10.2.1.1:8080".parse().unwrap();
        let canary: SocketAddrV4 = "10.2.3.1:8080".parse().unwrap();
        let fault_ms = 100_000;
        let fin = Finished {
            samples: vec![
                sample(fault_ms - 500, 1, Ok((canary, 200))),
                sample(fault_ms - 10, 20, Ok((canary, 500))), // in flight at the fault
                sample(fault_ms + 100, 1, Ok((canary, 500))),
                sample(fault_ms + 200, 1, Ok((stable, 200))),
                sample(fault_ms + 400, 1, Ok((canary, 200))), // after weight 0 (300)
            ],
            skipped: 0,
            started_us: (fault_ms - 1000) * 1000,
            stopped_us: (fault_ms + 1000) * 1000,
        };
        let status: RolloutStatus = serde_json::from_value(json!({
            "strategy": "canary", "phase": "rolled_back", "steps_percent": [10.0, 100.0],
            "step": 0, "passes": 0, "checks_per_step": 1, "failures": 0, "failure_limit": 1,
            "seconds_in_step": 1.0, "reason": "canary requests failed", "manual": false,
            "last_check": [], "critical": [], "weight_written_unix_ms": fault_ms + 300,
        }))
        .unwrap();
        let r = summarize(
            1000.0,
            Fault::Errors,
            &fin,
            fault_ms * 1000,
            Some((fault_ms + 300) * 1000),
            &status,
            vec![],
            |a| a == canary,
        );
        assert_eq!(r.took_ms, Some(300.0));
        assert_eq!((r.failed, r.failed_before), (2, 0));
        assert_eq!(r.canary_after_fault, 2);
        assert_eq!(r.canary_after_rollback, 1);
        assert_eq!(r.last_canary_ms, Some(400.0));
        assert_eq!(r.achieved, 2.5);
        assert_eq!(r.requests, 5);
    }
}
