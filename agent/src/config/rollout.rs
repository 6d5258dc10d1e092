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
//! analysis:
//!   limits:                   # fixed limits on the canary (none by default)
//!     max_error_rate: 1       # percent of HTTP responses that are 5xx
//!     max_latency_p99: 500ms
//!     max_latency_p50: 100ms
//!     max_connect_errors_rate: 1   # percent of connections refused or unanswered
//!   compare_to_stable:        # statistical comparison with stable (on by default)
//!     max_error_rate_increase: 1   # percentage points, two-proportion test
//!     max_latency_increase: 20     # percent of stable's median, Mann-Whitney U test
//!     min_latency_increase: 1ms    # and at least this much (a smaller slowdown passes)
//!     confidence: 0.99
//!   critical:                 # every tick: roll back at once
//!     error_rate: 50          # percent, over at least min_requests
//!     connect_error_rate: 50
//!     min_requests: 20
//! ```

use std::time::Duration;

use kanari_common::maps::BASIS_POINTS;

use super::{
    Analysis, Compare, Critical, DEFAULT_MIN_LATENCY_INCREASE, DEFAULT_STEPS, FieldError, Limits,
    Rollout, Strategy, err,
    raw::{PercentField, RawAnalysis, RawRollout},
};

/// What validation of a service's rollout needs to know about the service.
pub(super) struct ServiceFacts {
    pub has_canary_backends: bool,
    pub canary_segments: usize,
    pub http: bool,
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
    let progress_deadline = rollout
        .progress_deadline
        .map_or(Duration::from_secs(600), |d| d.0);
    if progress_deadline < interval {
        return err(
            at("rollout.progress_deadline"),
            "must be at least one interval",
        );
    }
    if !facts.has_canary_backends {
        return err(at("canary.backends"), "a rollout needs canary backends");
    }

    let l = analysis.limits;
    if !facts.http && (l.max_error_rate.is_some() || analysis.critical.error_rate.is_some()) {
        return err(
            at("analysis"),
            "error rates need HTTP status codes: this service has protocol: tcp",
        );
    }
    let compare = match analysis.compare_to_stable {
        None => Some(Compare {
            max_error_rate_increase: facts.http.then_some(0.01),
            max_latency_increase: Some(0.2),
            min_latency_increase: DEFAULT_MIN_LATENCY_INCREASE,
            confidence: 0.99,
        }),
        Some(c) => {
            let confidence = c.confidence.unwrap_or(0.99);
            if !(0.5..1.0).contains(&confidence) {
                return err(
                    at("analysis.compare_to_stable.confidence"),
                    "must be at least 0.5 and below 1, e.g. 0.99",
                );
            }
            Some(Compare {
                max_error_rate_increase: c
                    .max_error_rate_increase
                    .map(PercentField::fraction)
                    .filter(|_| facts.http),
                max_latency_increase: c.max_latency_increase.map(|i| i.0),
                min_latency_increase: c
                    .min_latency_increase
                    .map_or(DEFAULT_MIN_LATENCY_INCREASE, |d| d.0),
                confidence,
            })
        }
    };
    let critical = Critical {
        error_rate: analysis
            .critical
            .error_rate
            .map_or(facts.http.then_some(0.5), |p| Some(p.fraction())),
        connect_error_rate: Some(
            analysis
                .critical
                .connect_error_rate
                .map_or(0.5, PercentField::fraction),
        ),
        min_requests: analysis.critical.min_requests.unwrap_or(20).max(1),
    };
    Ok((
        Rollout {
            strategy: rollout.strategy,
            steps,
            interval,
            checks_per_step,
            min_requests: rollout.min_requests.unwrap_or(100),
            failure_limit,
            progress_deadline,
            on_rollback: rollout.on_rollback,
        },
        Analysis {
            limits: Limits {
                max_error_rate: l.max_error_rate.map(PercentField::fraction),
                max_latency_p99: l.max_latency_p99.map(|d| d.0),
                max_latency_p50: l.max_latency_p50.map(|d| d.0),
                max_connect_errors_rate: l.max_connect_errors_rate.map(PercentField::fraction),
            },
            compare,
            critical,
        },
    ))
}
