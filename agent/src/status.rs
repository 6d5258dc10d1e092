//! `kanari status`: what each service is doing now, per version, over the
//! last [`WINDOW_SECONDS`]. Built from a [`Snapshot`] by the agent (pure), sent
//! as JSON over the control socket, printed by the CLI.

use std::{collections::BTreeMap, fmt::Write as _};

use kanari_common::maps::{BASIS_POINTS, Group};
use serde::{Deserialize, Serialize};

use crate::{
    analysis::{Judge, JudgeResult, Verdict},
    config::Strategy,
    snapshot::Snapshot,
};

/// The window `kanari status` reports over.
pub const WINDOW_SECONDS: u64 = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub window_seconds: u64,
    pub services: Vec<ServiceStatus>,
    pub conntrack_entries: Option<u64>,
    /// Why the kernel does not hold what the agent wants, while it does not.
    #[serde(default)]
    pub kernel_error: Option<String>,
    /// With a fleet (`kubernetes:` or `fleet:`): who leads, who reports.
    #[serde(default)]
    pub fleet: Option<FleetStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// This host's name in the fleet.
    pub node: String,
    /// The leader when last read.
    pub leader: Option<String>,
    /// This agent's term while it leads.
    pub term: Option<u32>,
    /// The hosts reporting, and the canary weight each one's kernel holds.
    pub hosts: Vec<FleetHost>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetHost {
    pub node: String,
    /// By service.
    pub canary_weight_percent: BTreeMap<String, f64>,
    /// Services whose newest decision this host holds.
    pub in_sync: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    /// The canary weight the kernel holds.
    pub canary_weight_percent: f64,
    /// The weight the agent wants, when the kernel does not hold it yet.
    #[serde(default)]
    pub wanted_canary_weight_percent: Option<f64>,
    pub versions: Vec<VersionStatus>,
    /// The rollout driving the weight, if the service has one.
    pub rollout: Option<RolloutStatus>,
    /// With a fleet: the leader's decision and the hosts that hold it.
    #[serde(default)]
    pub fleet: Option<ServiceFleet>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceFleet {
    /// The weight generation last decided (none yet: no decision read).
    pub generation: Option<u64>,
    pub hosts_in_sync: usize,
    pub hosts: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub strategy: String,
    pub phase: String,
    /// The canary revision the rollout is for, and what stable serves when known.
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub stable_revision: Option<String>,
    /// What rolled it back: a judge, `progress_deadline` or `operator`.
    #[serde(default)]
    pub rolled_back_by: Option<String>,
    /// How much longer the critical path watches a promoted canary.
    #[serde(default)]
    pub watched_for_seconds: Option<f64>,
    pub steps_percent: Vec<f64>,
    /// Index into the steps.
    pub step: usize,
    pub passes: u32,
    pub checks_per_step: u32,
    pub failures: u32,
    pub failure_limit: u32,
    pub seconds_in_step: f64,
    pub reason: String,
    /// The gate (`confirm-traffic-increase`, `confirm-promotion`) whose
    /// webhooks the next step waits for.
    #[serde(default)]
    pub awaiting: Option<String>,
    pub manual: bool,
    pub last_check: Vec<JudgeResult>,
    pub critical: Vec<JudgeResult>,
    /// When the agent last wrote this service's weight (Unix ms).
    pub weight_written_unix_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionStatus {
    /// `stable` or `canary`.
    pub version: String,
    pub backends: usize,
    /// Requests answered in the window.
    pub requests: u64,
    pub requests_per_second: f64,
    /// Share of HTTP responses that were 5xx.
    pub error_rate: Option<f64>,
    pub ttfb_p50_ms: Option<f64>,
    pub ttfb_p99_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    /// Resets, refusals and unanswered SYNs in the window.
    pub tcp_errors: u64,
}

/// The report for every configured service, as of the snapshot.
pub fn report(view: &Snapshot) -> StatusReport {
    // The fleet's keys by service (a CanaryRelease's, or etcd's).
    let keys: BTreeMap<&str, (&str, Option<u64>)> = view
        .releases
        .iter()
        .map(|(k, v)| {
            let generation = v.decision.as_ref().map(|d| d.generation);
            (v.service.as_str(), (k.as_str(), generation))
        })
        .collect();
    let peers = &view.fleet.peers;
    let services = view
        .config
        .services
        .iter()
        .map(|s| ServiceStatus {
            rollout: s
                .rollout
                .as_ref()
                .zip(view.rollouts.get(&s.name))
                .map(|(spec, r)| {
                    let st = &r.state;
                    RolloutStatus {
                        strategy: match spec.rollout.strategy {
                            Strategy::Canary => "canary",
                            Strategy::BlueGreen => "blue-green",
                            Strategy::Ab => "ab",
                        }
                        .to_string(),
                        phase: st.phase.name().to_string(),
                        revision: st.revision.clone(),
                        stable_revision: st.stable_revision.clone(),
                        rolled_back_by: st
                            .cause
                            .filter(|_| st.phase == crate::rollout::Phase::RolledBack)
                            .map(|c| c.label().to_string()),
                        watched_for_seconds: r
                            .watched_until_ms
                            .filter(|u| *u > view.at_ms)
                            .map(|u| (u - view.at_ms) as f64 / 1e3),
                        steps_percent: spec
                            .rollout
                            .steps
                            .iter()
                            .map(|w| *w as f64 / 100.0)
                            .collect(),
                        step: st.step,
                        passes: st.passes,
                        checks_per_step: spec.rollout.checks_per_step,
                        failures: st.failures,
                        failure_limit: spec.rollout.failure_limit,
                        seconds_in_step: view.at_ms.saturating_sub(st.step_since_ms) as f64 / 1e3,
                        reason: st.reason.clone(),
                        awaiting: st.awaiting.map(|k| k.name().to_string()),
                        manual: st.manual,
                        last_check: st.last_check.clone(),
                        critical: r.critical.clone(),
                        weight_written_unix_ms: st.weight_written_unix_ms,
                    }
                }),
            fleet: keys
                .get(s.name.as_str())
                .map(|(key, generation)| ServiceFleet {
                    generation: *generation,
                    hosts_in_sync: peers
                        .values()
                        .filter(|p| generation.is_some() && p.held.get(*key) == generation.as_ref())
                        .count(),
                    hosts: peers.len(),
                }),
            name: s.name.clone(),
            vip: s.vip.to_string(),
            canary_weight_percent: view.weight(s) as f64 * 100.0 / BASIS_POINTS as f64,
            wanted_canary_weight_percent: (view.wanted_weight(s) != view.weight(s))
                .then(|| view.wanted_weight(s) as f64 * 100.0 / BASIS_POINTS as f64),
            versions: [
                (Group::Stable, s.stable.len()),
                (Group::Canary, s.canary.len()),
            ]
            .into_iter()
            .map(|(g, backends)| {
                let w = view
                    .telemetry
                    .window(&s.name, g, WINDOW_SECONDS)
                    .unwrap_or_default();
                VersionStatus {
                    version: g.name().to_string(),
                    backends,
                    requests: w.delta.requests(),
                    requests_per_second: w.requests_per_second(),
                    error_rate: w.error_rate(),
                    ttfb_p50_ms: w.ttfb_quantile_s(0.5).map(|s| s * 1e3),
                    ttfb_p99_ms: w.ttfb_quantile_s(0.99).map(|s| s * 1e3),
                    connect_p99_ms: w.connect_quantile_s(0.99).map(|s| s * 1e3),
                    tcp_errors: w.delta.tcp_errors(),
                }
            })
            .collect(),
        })
        .collect();
    StatusReport {
        window_seconds: WINDOW_SECONDS,
        services,
        conntrack_entries: view.conntrack_entries,
        kernel_error: view.disagreement.as_ref().map(|(_, e)| e.clone()),
        fleet: view.node.as_ref().map(|node| FleetStatus {
            node: node.clone(),
            leader: view.fleet.leader.clone(),
            term: view.fleet.term,
            hosts: peers
                .values()
                .map(|p| {
                    let service = |k: &String| {
                        view.releases
                            .get(k)
                            .map_or_else(|| k.clone(), |v| v.service.clone())
                    };
                    FleetHost {
                        node: p.node.clone(),
                        canary_weight_percent: p
                            .weights
                            .iter()
                            .map(|(k, w)| (service(k), *w as f64 * 100.0 / BASIS_POINTS as f64))
                            .collect(),
                        in_sync: p
                            .held
                            .iter()
                            .filter(|(k, g)| {
                                view.releases
                                    .get(*k)
                                    .and_then(|v| v.decision.as_ref())
                                    .is_some_and(|d| d.generation == **g)
                            })
                            .map(|(k, _)| service(k))
                            .collect(),
                    }
                })
                .collect(),
        }),
    }
}

/// One service's judgement, for tools that decide on it (Argo Rollouts'
/// `web` metric provider, scripts): `GET /analysis/SERVICE` on the metrics
/// listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnalysisReport {
    pub service: String,
    /// `pass`, `fail` or `inconclusive`: the last check's verdict, the
    /// critical path's failure first (dry-run judges left out).
    pub verdict: String,
    pub why: String,
    pub phase: String,
    pub canary_weight_percent: f64,
    pub step: usize,
    pub judges: Vec<JudgeResult>,
    pub critical: Vec<JudgeResult>,
}

/// The judgement of `service`, if it has a rollout.
pub fn analysis(view: &Snapshot, service: &str) -> Option<AnalysisReport> {
    let s = view.config.services.iter().find(|s| s.name == service)?;
    let r = view.rollouts.get(service)?;
    let all: Vec<JudgeResult> = r
        .critical
        .iter()
        .filter(|j| matches!(j.verdict, Verdict::Fail(_)))
        .chain(r.state.last_check.iter())
        .cloned()
        .collect();
    let verdict = crate::analysis::overall(&all);
    let why = match &verdict {
        Verdict::Pass => String::new(),
        Verdict::Fail(w) | Verdict::Inconclusive(w) => w.clone(),
    };
    Some(AnalysisReport {
        service: s.name.clone(),
        verdict: verdict.name().to_string(),
        why,
        phase: r.state.phase.name().to_string(),
        canary_weight_percent: view.weight(s) as f64 * 100.0 / BASIS_POINTS as f64,
        step: r.state.step,
        judges: r.state.last_check.clone(),
        critical: r.critical.clone(),
    })
}

/// `value vs limit` of a judge, in its unit.
fn judged(r: &JudgeResult) -> String {
    let latency = matches!(r.judge, Judge::LatencyP50 | Judge::LatencyP99);
    let show = |v: f64| {
        if latency {
            format!("{:.2}ms", v * 1e3)
        } else {
            format!("{:.2}%", v * 100.0)
        }
    };
    let value = r.value.map_or_else(|| "-".into(), show);
    let limit = r.limit.map_or_else(|| "-".into(), show);
    let (mark, why) = match &r.verdict {
        Verdict::Pass => ("pass", String::new()),
        Verdict::Fail(w) => ("FAIL", format!(": {w}")),
        Verdict::Inconclusive(w) => ("inconclusive", format!(": {w}")),
    };
    let dry = if r.dry_run { " (dry run)" } else { "" };
    format!("{}{dry} {mark} ({value} vs {limit}){why}", r.judge.name())
}

/// The steps as a bar, the current one in brackets.
fn steps_bar(r: &RolloutStatus) -> String {
    if r.strategy != "canary" {
        return format!(
            "{} (segment traffic, then {})",
            r.strategy,
            if r.strategy == "ab" {
                "an operator decides"
            } else {
                "100 %"
            }
        );
    }
    let mut parts = Vec::new();
    for (i, p) in r.steps_percent.iter().enumerate() {
        let done = i < r.step || r.phase == "promoted";
        let label = format!("{p}%");
        parts.push(if i == r.step && r.phase != "promoted" {
            format!("[{label}]")
        } else if done {
            format!("{label}✓")
        } else {
            label
        });
    }
    parts.join(" ─ ")
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

/// The report as a terminal table.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    if let Some(f) = &r.fleet {
        let leader = match (&f.leader, f.term) {
            (_, Some(t)) => format!("this host (term {t})"),
            (Some(l), None) => l.clone(),
            (None, None) => "none known (every host keeps its weights)".into(),
        };
        let _ = writeln!(
            out,
            "fleet: host {}, leader {leader}, {} hosts reporting",
            f.node,
            f.hosts.len()
        );
        for h in &f.hosts {
            let weights: Vec<String> = h
                .canary_weight_percent
                .iter()
                .map(|(s, w)| {
                    let held = if h.in_sync.contains(s) {
                        ""
                    } else {
                        " (not in sync)"
                    };
                    format!("{s} {w}%{held}")
                })
                .collect();
            let _ = writeln!(out, "  host {}: {}", h.node, weights.join(", "));
        }
    }
    if r.services.is_empty() {
        out.push_str("no services configured\n");
    }
    for s in &r.services {
        let _ = write!(
            out,
            "service {} at {}: canary weight {}%",
            s.name, s.vip, s.canary_weight_percent
        );
        if let Some(w) = s.wanted_canary_weight_percent {
            let _ = write!(out, " (wanted {w}%: the kernel has not taken it yet)");
        }
        out.push('\n');
        if let Some(ro) = &s.rollout {
            let _ = writeln!(
                out,
                "  release: canary {}{}{}",
                if ro.revision.is_empty() {
                    "-"
                } else {
                    &ro.revision
                },
                ro.stable_revision
                    .as_ref()
                    .map_or_else(String::new, |r| format!(" beside stable {r}")),
                ro.watched_for_seconds.map_or_else(String::new, |w| format!(
                    "; the critical path watches it {w:.0}s more"
                ))
            );
            let _ = writeln!(
                out,
                "  rollout ({}): {}{} — {:.0}s on this step, checks {}/{} passed, {}/{} failed",
                ro.strategy,
                ro.phase.replace('_', " "),
                if ro.manual { " (manual weight)" } else { "" },
                ro.seconds_in_step,
                ro.passes,
                ro.checks_per_step,
                ro.failures,
                ro.failure_limit
            );
            let _ = writeln!(out, "  steps: {}", steps_bar(ro));
            if let Some(f) = &s.fleet {
                match f.generation {
                    Some(g) => {
                        let _ = writeln!(
                            out,
                            "  fleet: decision {g} held by {}/{} hosts",
                            f.hosts_in_sync, f.hosts
                        );
                    }
                    None => {
                        let _ = writeln!(out, "  fleet: no decision read yet");
                    }
                }
            }
            let _ = writeln!(out, "  why: {}", ro.reason);
            for j in ro.last_check.iter().chain(ro.critical.iter()) {
                let _ = writeln!(out, "    {}", judged(j));
            }
        }
        let _ = writeln!(
            out,
            "  {:<7} {:>8} {:>9} {:>8} {:>10} {:>10} {:>12} {:>10}",
            "version",
            "backends",
            "req/s",
            "errors",
            "ttfb p50",
            "ttfb p99",
            "connect p99",
            "tcp errors"
        );
        for v in &s.versions {
            let errors = v
                .error_rate
                .map_or_else(|| "-".to_string(), |e| format!("{:.2}%", e * 100.0));
            let _ = writeln!(
                out,
                "  {:<7} {:>8} {:>9.1} {:>8} {:>8}ms {:>8}ms {:>10}ms {:>10}",
                v.version,
                v.backends,
                v.requests_per_second,
                errors,
                ms(v.ttfb_p50_ms),
                ms(v.ttfb_p99_ms),
                ms(v.connect_p99_ms),
                v.tcp_errors
            );
        }
    }
    if let Some(e) = &r.kernel_error {
        let _ = writeln!(out, "kernel: out of sync, retrying every tick: {e}");
    }
    let _ = write!(out, "(last {} s", r.window_seconds);
    if let Some(n) = r.conntrack_entries {
        let _ = write!(out, "; conntrack entries: {n}");
    }
    out.push_str(")\n");
    out
}

#[cfg(test)]
mod tests {
    use kanari_common::{
        hist,
        http::{CLASS_2XX, CLASS_5XX},
        maps::BackendStats,
    };

    use super::*;
    use crate::snapshot::fixture::canary_snapshot;

    #[test]
    fn report_and_render_show_each_version() {
        let mut s = BackendStats::ZERO;
        s.requests[CLASS_2XX] = 80;
        s.requests[CLASS_5XX] = 20;
        s.ttfb_hist[hist::TTFB.index(20_000_000) as usize] = 100;
        s.refused = 2;
        let v = canary_snapshot("10", s, 10);
        let r = report(&v);
        let canary = &r.services[0].versions[1];
        assert_eq!(canary.version, "canary");
        assert_eq!(canary.requests, 100);
        assert!((canary.requests_per_second - 10.0).abs() < 1e-9);
        assert_eq!(canary.error_rate, Some(0.2));
        assert_eq!(canary.tcp_errors, 2);
        let p50 = canary.ttfb_p50_ms.unwrap();
        assert!((16.7..21.0).contains(&p50), "{p50}");
        assert_eq!(r.services[0].versions[0].requests, 0);
        let text = render(&r);
        assert!(
            text.contains("service web at 10.0.0.100:80: canary weight 10%"),
            "{text}"
        );
        assert!(text.contains("canary") && text.contains("20.00%"), "{text}");
        let json = serde_json::to_string(&r).unwrap();
        let back: StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.services[0].versions[1].requests, 100);
        assert_eq!(back.services[0].versions[1].error_rate, Some(0.2));
    }

    #[test]
    fn the_fleet_shows_its_leader_and_each_hosts_weight_and_sync() {
        let mut v = canary_snapshot("10", BackendStats::ZERO, 10);
        let d = crate::rollout::Decision {
            revision: "r".into(),
            phase: crate::rollout::Phase::Progressing,
            weight: 1000,
            step: 0,
            generation: 4,
            term: 7,
        };
        let view = crate::fleet::status::ReleaseView {
            service: "web".into(),
            generation: 0,
            why: None,
            steered: true,
            decision: Some(d),
        };
        v.releases = std::sync::Arc::new([("web".to_string(), view)].into());
        v.node = Some("lb-1".into());
        let peer = |node: &str, g: u64, w: u32| crate::fleet::Peer {
            node: node.into(),
            telemetry: None,
            held: [("web".to_string(), g)].into(),
            weights: [("web".to_string(), w)].into(),
        };
        v.fleet = crate::snapshot::FleetView {
            leader: Some("lb-2".into()),
            term: None,
            peers: std::sync::Arc::new(
                [
                    ("lb-1".into(), peer("lb-1", 4, 1000)),
                    ("lb-2".into(), peer("lb-2", 3, 500)),
                ]
                .into(),
            ),
        };
        let r = report(&v);
        let f = r.fleet.as_ref().expect("a fleet");
        assert_eq!(f.leader.as_deref(), Some("lb-2"));
        assert_eq!(f.hosts[1].canary_weight_percent["web"], 5.0);
        assert_eq!(f.hosts[0].in_sync, ["web"]);
        assert!(f.hosts[1].in_sync.is_empty());
        let text = render(&r);
        assert!(
            text.contains("fleet: host lb-1, leader lb-2, 2 hosts reporting"),
            "{text}"
        );
        assert!(text.contains("host lb-2: web 5% (not in sync)"), "{text}");
    }
}
