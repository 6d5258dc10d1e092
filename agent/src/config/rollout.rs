//! A service's `rollout:` and `analysis:` sections: how the canary's weight
//! progresses and what it is judged against.
//!
//! ```yaml
//! rollout:
//!   strategy: canary          # canary | blue-green | ab
//!   steps: [1, 5, 10, 25, 50, 100]   # percent; or step_weight + max_weight
//!   interval: 30s             # one check's window
//!   checks_per_step: 1        # passing checks before the next step
//!   min_requests: 100         # canary requests a check needs, else inconclusive
//!   failure_limit: 1          # failed checks before rolling back
//!   progress_deadline: 10m    # longest time on one step (inconclusive checks hold it)
//!   on_rollback: drain        # drain (weight 0) | cut (also drop canary connections)
//!   watch_after_promotion: 5m # the critical path watches a promoted canary this long
//!   duration: 1h              # ab only: promoted on a passing check after this long
//!   webhooks: []              # lifecycle events and gates (see `webhooks`)
//! analysis:
//!   limits:                   # fixed limits on the canary (none by default)
//!     max_error_rate: 1       # percent of HTTP responses that are 5xx
//!     max_latency_p99: 500ms
//!     max_latency_p50: 100ms
//!     max_connect_errors_rate: 1   # percent of connections refused or unanswered
//!   compare_to_stable:        # statistical comparison with stable (on by default;
//!     enabled: true           #   unwritten fields keep their defaults)
//!     max_error_rate_increase: 1   # percentage points (always-valid interval)
//!     max_latency_increase: 20     # percent of stable's median and tail quantile
//!     min_latency_increase: 1ms    # and at least this much (a smaller slowdown passes)
//!     tail_quantile: 0.99     # the tail compared beside the median (0.75 to 0.999)
//!     confidence: 0.99        # 0.9 to 0.9999
//!   request_timeout: 10s      # a request unanswered this long is a failure (1s to 10m)
//!   warmup: 0s                # after each weight change, data counts only after this
//!   dry_run: []               # judges evaluated and shown, never acted on
//!   critical:                 # every tick: roll back at once
//!     error_rate: 50          # percent (1 to 100), over at least min_requests (5 or more)
//!     connect_error_rate: 50
//!     min_requests: 20
//!     window: 10s             # looks back this far at most (1s to 1m)
//! ```

use std::time::Duration;

use kanari_common::maps::BASIS_POINTS;

use super::{
    Analysis, Compare, Critical, DEFAULT_MIN_LATENCY_INCREASE, DEFAULT_STEPS, FieldError,
    JUDGE_NAMES, Limits, Rollout, Strategy, err,
    raw::{PercentField, RawAnalysis, RawRollout},
};

/// What validation of a service's rollout needs to know about the service.
pub(super) struct ServiceFacts {
    pub has_canary_backends: bool,
    pub canary_segments: usize,
}

/// Validates the two sections; `at` turns a field into its full path.
pub(super) fn validate(
    rollout: RawRollout,
    analysis: RawAnalysis,
    facts: &ServiceFacts,
    at: &dyn Fn(&str) -> String,
) -> Result<(Rollout, Analysis), FieldError> {
    let steps = match (&rollout.steps, rollout.step_weight, rollout.max_weight) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return err(
                at("rollout.steps"),
                "give either steps or step_weight + max_weight, not both",
            );
        }
        (Some(s), None, None) => s.iter().map(|p| p.0).collect::<Vec<_>>(),
        (None, Some(w), max) => {
            let max = max.map_or(BASIS_POINTS, |m| m.0);
            if w.0 == 0 {
                return err(at("rollout.step_weight"), "must be more than 0 %");
            }
            if max < w.0 {
                return err(at("rollout.max_weight"), "must be at least step_weight");
            }
            (1..).map(|k| k * w.0).take_while(|x| *x <= max).collect()
        }
        (None, None, Some(_)) => return err(at("rollout.max_weight"), "needs step_weight"),
        (None, None, None) => DEFAULT_STEPS.iter().map(|p| p * 100).collect(),
    };
    if rollout.strategy == Strategy::Canary {
        if steps.is_empty() {
            return err(
                at("rollout.steps"),
                "at least one step is needed, e.g. [1, 5, 10, 25, 50, 100]",
            );
        }
        for (i, pair) in steps.windows(2).enumerate() {
            if pair[1] <= pair[0] {
                return err(
                    at(&format!("rollout.steps[{}]", i + 1)),
                    format!(
                        "{}% does not go up from {}%: steps must increase",
                        pair[1] as f64 / 100.0,
                        pair[0] as f64 / 100.0
                    ),
                );
            }
        }
        if steps[0] == 0 {
            return err(
                at("rollout.steps[0]"),
                "the first step must send the canary some traffic (more than 0 %)",
            );
        }
    } else if facts.canary_segments == 0 {
        return err(
            at("rollout.strategy"),
            "blue-green and ab analyse segment traffic: add a segment pinned to the canary (segments: [{cidr: ..., group: canary}])",
        );
    }
    if rollout.strategy == Strategy::Canary && steps.iter().all(|w| *w >= BASIS_POINTS) {
        return err(
            at("rollout.steps"),
            "at least one step must be below 100 %: reaching 100 % is the promotion, and a \
             canary must be judged beside stable first, e.g. [10, 50, 100]",
        );
    }
    let interval = rollout.interval.map_or(Duration::from_secs(30), |d| d.0);
    if interval < Duration::from_secs(1) || interval > Duration::from_secs(3600) {
        return err(at("rollout.interval"), "must be 1s to 1h");
    }
    let checks_per_step = rollout.checks_per_step.unwrap_or(1);
    if checks_per_step == 0 {
        return err(at("rollout.checks_per_step"), "must be at least 1");
    }
    let failure_limit = rollout.failure_limit.unwrap_or(1);
    if failure_limit == 0 {
        return err(at("rollout.failure_limit"), "must be at least 1");
    }
    let min_requests = rollout.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS);
    if min_requests < MIN_MIN_REQUESTS {
        return err(
            at("rollout.min_requests"),
            format!(
                "{min_requests} is below {MIN_MIN_REQUESTS}: a check on fewer canary requests \
                 judges noise; safe values are {MIN_MIN_REQUESTS} or more (default {DEFAULT_MIN_REQUESTS})"
            ),
        );
    }
    // The least time a step takes: checks_per_step passing checks.
    let step_time = interval.saturating_mul(checks_per_step);
    let progress_deadline = rollout
        .progress_deadline
        .map_or(Duration::from_secs(600), |d| d.0);
    if progress_deadline <= step_time {
        return err(
            at("rollout.progress_deadline"),
            format!(
                "{} leaves no time to pass a step: it must be more than checks_per_step x interval ({}), e.g. {}",
                humantime::format_duration(progress_deadline),
                humantime::format_duration(step_time),
                humantime::format_duration(
                    step_time.saturating_mul(10).max(Duration::from_secs(600))
                )
            ),
        );
    }
    let watch_after_promotion = rollout
        .watch_after_promotion
        .map_or(DEFAULT_WATCH_AFTER_PROMOTION, |d| d.0);
    if watch_after_promotion > MAX_WATCH_AFTER_PROMOTION {
        return err(
            at("rollout.watch_after_promotion"),
            format!(
                "must be 0s (off) to {}",
                humantime::format_duration(MAX_WATCH_AFTER_PROMOTION)
            ),
        );
    }
    let duration = rollout.duration.map(|d| d.0);
    if let Some(d) = duration {
        if rollout.strategy != Strategy::Ab {
            return err(
                at("rollout.duration"),
                "only an ab rollout runs for a duration; canary and blue-green end when their checks pass",
            );
        }
        if d < step_time {
            return err(
                at("rollout.duration"),
                format!(
                    "must be at least checks_per_step x interval ({}), the time one verdict takes",
                    humantime::format_duration(step_time)
                ),
            );
        }
    }
    if !facts.has_canary_backends {
        return err(at("canary.backends"), "a rollout needs canary backends");
    }

    let l = analysis.limits;
    let request_timeout = analysis
        .request_timeout
        .map_or(DEFAULT_REQUEST_TIMEOUT, |d| d.0);
    if !(MIN_REQUEST_TIMEOUT..=MAX_REQUEST_TIMEOUT).contains(&request_timeout) {
        return err(
            at("analysis.request_timeout"),
            format!(
                "must be {} to {}: a request unanswered that long is a failure",
                humantime::format_duration(MIN_REQUEST_TIMEOUT),
                humantime::format_duration(MAX_REQUEST_TIMEOUT)
            ),
        );
    }
    for (k, name) in analysis.dry_run.iter().enumerate() {
        if !JUDGE_NAMES.contains(&name.as_str()) {
            return err(
                at(&format!("analysis.dry_run[{k}]")),
                format!("`{name}` is not a judge; one of {}", JUDGE_NAMES.join(", ")),
            );
        }
    }
    let warmup = analysis.warmup.map_or(Duration::ZERO, |d| d.0);
    if warmup >= interval {
        return err(
            at("analysis.warmup"),
            format!(
                "must be shorter than rollout.interval ({}): data counts only after it",
                humantime::format_duration(interval)
            ),
        );
    }
    // Every field not written keeps its default: writing one field changes that one.
    let c = analysis.compare_to_stable.unwrap_or_default();
    let compare = if c.enabled == Some(false) {
        None
    } else {
        let tail_quantile = c.tail_quantile.unwrap_or(DEFAULT_TAIL_QUANTILE);
        if !(0.75..=0.999).contains(&tail_quantile) {
            return err(
                at("analysis.compare_to_stable.tail_quantile"),
                format!(
                    "{tail_quantile} is outside 0.75 to 0.999: the tail compared beside the median, \
                     e.g. 0.99 (p99) or 0.9 (p90, judged on ten times fewer requests)"
                ),
            );
        }
        let confidence = c.confidence.unwrap_or(DEFAULT_CONFIDENCE);
        if !(MIN_CONFIDENCE..=MAX_CONFIDENCE).contains(&confidence) {
            return err(
                at("analysis.compare_to_stable.confidence"),
                format!(
                    "{confidence} is outside {MIN_CONFIDENCE} to {MAX_CONFIDENCE}: below, equal \
                     versions fail by chance; e.g. {DEFAULT_CONFIDENCE}"
                ),
            );
        }
        Some(Compare {
            max_error_rate_increase: Some(
                c.max_error_rate_increase
                    .map_or(DEFAULT_MAX_ERROR_RATE_INCREASE, PercentField::fraction),
            ),
            max_latency_increase: Some(
                c.max_latency_increase
                    .map_or(DEFAULT_MAX_LATENCY_INCREASE, |i| i.0),
            ),
            min_latency_increase: c
                .min_latency_increase
                .map_or(DEFAULT_MIN_LATENCY_INCREASE, |d| d.0),
            tail_quantile,
            confidence,
        })
    };
    let rate = |field: &str, p: Option<PercentField>| -> Result<f64, FieldError> {
        let bp = p.map_or(DEFAULT_CRITICAL_RATE, |p| p.0);
        if bp < MIN_CRITICAL_RATE {
            return err(
                at(&format!("analysis.critical.{field}")),
                format!(
                    "{}% would roll back a healthy canary on its first failure; safe values \
                     are {}% to 100% (default {}%)",
                    bp as f64 / 100.0,
                    MIN_CRITICAL_RATE / 100,
                    DEFAULT_CRITICAL_RATE / 100
                ),
            );
        }
        Ok(bp as f64 / BASIS_POINTS as f64)
    };
    let critical_min = analysis
        .critical
        .min_requests
        .unwrap_or(DEFAULT_CRITICAL_MIN_REQUESTS);
    if critical_min < MIN_CRITICAL_MIN_REQUESTS {
        return err(
            at("analysis.critical.min_requests"),
            format!(
                "{critical_min} is below {MIN_CRITICAL_MIN_REQUESTS}: one unlucky request would \
                 roll back; safe values are {MIN_CRITICAL_MIN_REQUESTS} or more (default \
                 {DEFAULT_CRITICAL_MIN_REQUESTS})"
            ),
        );
    }
    let window = analysis
        .critical
        .window
        .map_or(DEFAULT_CRITICAL_WINDOW, |d| d.0);
    if !(MIN_CRITICAL_WINDOW..=MAX_CRITICAL_WINDOW).contains(&window) {
        return err(
            at("analysis.critical.window"),
            format!(
                "must be {} to {}",
                humantime::format_duration(MIN_CRITICAL_WINDOW),
                humantime::format_duration(MAX_CRITICAL_WINDOW)
            ),
        );
    }
    let critical = Critical {
        window,
        error_rate: Some(rate("error_rate", analysis.critical.error_rate)?),
        connect_error_rate: Some(rate(
            "connect_error_rate",
            analysis.critical.connect_error_rate,
        )?),
        min_requests: critical_min,
    };
    let limits = Limits {
        max_error_rate: l.max_error_rate.map(PercentField::fraction),
        max_latency_p99: l.max_latency_p99.map(|d| d.0),
        max_latency_p50: l.max_latency_p50.map(|d| d.0),
        max_connect_errors_rate: l.max_connect_errors_rate.map(PercentField::fraction),
    };
    let judged = limits.max_error_rate.is_some()
        || limits.max_latency_p99.is_some()
        || limits.max_latency_p50.is_some()
        || limits.max_connect_errors_rate.is_some()
        || compare.is_some();
    if !judged {
        return err(
            at("analysis"),
            "a check needs at least one judge: keep compare_to_stable on (remove enabled: false) \
             or set a limit under analysis.limits",
        );
    }
    Ok((
        Rollout {
            strategy: rollout.strategy,
            steps,
            interval,
            checks_per_step,
            min_requests,
            failure_limit,
            progress_deadline,
            on_rollback: rollout.on_rollback,
            watch_after_promotion,
            duration,
            webhooks: super::webhooks::validate(rollout.webhooks, at)?,
        },
        Analysis {
            limits,
            compare,
            critical,
            request_timeout,
            warmup,
            dry_run: analysis.dry_run,
        },
    ))
}

/// `compare_to_stable.tail_quantile` by default.
pub const DEFAULT_TAIL_QUANTILE: f64 = 0.99;

/// `critical.window` by default and its bounds.
pub const DEFAULT_CRITICAL_WINDOW: Duration = Duration::from_secs(10);
pub const MIN_CRITICAL_WINDOW: Duration = Duration::from_secs(1);
pub const MAX_CRITICAL_WINDOW: Duration = Duration::from_secs(60);

/// `analysis.request_timeout` by default and its bounds.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// `rollout.min_requests` by default, and its least safe value.
pub const DEFAULT_MIN_REQUESTS: u64 = 100;
pub const MIN_MIN_REQUESTS: u64 = 10;
/// `compare_to_stable` defaults and the confidence's safe range.
pub const DEFAULT_CONFIDENCE: f64 = 0.99;
pub const MIN_CONFIDENCE: f64 = 0.9;
pub const MAX_CONFIDENCE: f64 = 0.9999;
pub const DEFAULT_MAX_ERROR_RATE_INCREASE: f64 = 0.01;
pub const DEFAULT_MAX_LATENCY_INCREASE: f64 = 0.2;
/// `critical.error_rate` and `critical.connect_error_rate`, basis points.
pub const DEFAULT_CRITICAL_RATE: u32 = 5000;
pub const MIN_CRITICAL_RATE: u32 = 100;
pub const DEFAULT_CRITICAL_MIN_REQUESTS: u64 = 20;
pub const MIN_CRITICAL_MIN_REQUESTS: u64 = 5;
/// `rollout.watch_after_promotion` by default and at most.
pub const DEFAULT_WATCH_AFTER_PROMOTION: Duration = Duration::from_secs(300);
pub const MAX_WATCH_AFTER_PROMOTION: Duration = Duration::from_secs(24 * 3600);
