//! `/metrics` in the Prometheus text format, built with the
//! `prometheus` crate's model and encoder, from a [`Snapshot`]. Pure: the
//! HTTP server lives in [`crate::api`].
//!
//! Label values come from the configuration only (service, version, backend
//! address, interface) and fixed sets (class, kind, direction, action): no
//! per-client label, so the number of series is bounded by the config.

use kanari_common::{
    http::{CLASS_NAMES, CLASSES},
    maps::{BASIS_POINTS, FROM_BACKEND, TO_BACKEND},
};
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    snapshot::{Snapshot, TickStats},
    telemetry::Histogram,
};

/// The build, as the binary knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("KANARI_GIT_COMMIT");

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(pairs: &[(&str, &str)], v: u64) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    let mut c = proto::Counter::default();
    c.set_value(v as f64);
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    let mut g = proto::Gauge::default();
    g.set_value(v);
    m.set_gauge(g);
    m
}

/// Kernel buckets exported as `le` bounds: the kernel boundaries at 2^n and
/// 1.5 x 2^n ns, from 1.024 µs up, in both layouts (the same `le` values for
/// every histogram); the kernel's finer buckets stay in the agent for its
/// own quantiles.
fn exported_bounds<const N: usize>() -> impl Iterator<Item = u32> {
    let layout = Histogram::<N>::LAYOUT;
    // Never the overflow bucket: that is +Inf.
    (0..layout.overflow()).filter(move |i| {
        let upper = layout.upper_ns(*i);
        upper.is_power_of_two() || (upper.is_multiple_of(3) && (upper / 3).is_power_of_two())
    })
}

fn histogram<const N: usize>(pairs: &[(&str, &str)], h: &Histogram<N>, sum_ns: u64) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    let mut p = proto::Histogram::default();
    let mut cumulative = Vec::with_capacity(N);
    let mut running = 0u64;
    for c in h.0.iter() {
        running += c;
        cumulative.push(running);
    }
    let buckets = exported_bounds::<N>()
        .map(|i| {
            let mut b = proto::Bucket::default();
            b.set_upper_bound(Histogram::<N>::LAYOUT.upper_ns(i) as f64 / 1e9);
            b.set_cumulative_count(cumulative[i as usize]);
            b
        })
        .collect();
    p.set_bucket(buckets);
    p.set_sample_count(running);
    p.set_sample_sum(sum_ns as f64 / 1e9);
    m.set_histogram(p);
    m
}

fn tick_histogram(t: &TickStats) -> Metric {
    let mut m = Metric::default();
    let mut p = proto::Histogram::default();
    p.set_bucket(
        TickStats::BOUNDS
            .iter()
            .zip(t.buckets)
            .map(|(bound, n)| {
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(n);
                b
            })
            .collect(),
    );
    p.set_sample_count(t.count);
    p.set_sample_sum(t.sum_seconds);
    m.set_histogram(p);
    m
}

/// The rollouts: phase, step, checks, judge values beside their limits,
/// rollbacks by reason, promotions.
fn rollout_families(view: &Snapshot) -> Vec<MetricFamily> {
    let mut phase = Vec::new();
    let mut step = Vec::new();
    let mut values = Vec::new();
    let mut limits = Vec::new();
    let mut dry = Vec::new();
    for (service, r) in view.rollouts.iter() {
        for p in crate::rollout::Phase::ALL {
            let v = if r.state.phase == p { 1.0 } else { 0.0 };
            phase.push(gauge(&[("service", service), ("phase", p.name())], v));
        }
        step.push(gauge(&[("service", service)], (r.state.step + 1) as f64));
        for j in r.state.last_check.iter().chain(r.critical.iter()) {
            let l = [("service", service.as_str()), ("judge", j.judge.name())];
            if let Some(v) = j.value {
                values.push(gauge(&l, v));
            }
            if let Some(v) = j.limit {
                limits.push(gauge(&l, v));
            }
            if j.dry_run {
                dry.push(gauge(&l, 1.0));
            }
        }
    }
    let c = &view.rollout_counts;
    let checks = c
        .checks
        .iter()
        .map(|((s, j, r), n)| {
            counter(
                &[("service", s.as_str()), ("judge", j.name()), ("result", r)],
                *n,
            )
        })
        .collect();
    let rollbacks = c
        .rollbacks
        .iter()
        .map(|((s, r), n)| counter(&[("service", s.as_str()), ("reason", r)], *n))
        .collect();
    let promotions = c
        .promotions
        .iter()
        .map(|(s, n)| counter(&[("service", s.as_str())], *n))
        .collect();
    let webhooks = view
        .webhooks
        .iter()
        .map(|((s, w, t, o), n)| {
            counter(
                &[
                    ("service", s.as_str()),
                    ("webhook", w.as_str()),
                    ("type", t),
                    ("outcome", o),
                ],
                *n,
            )
        })
        .collect();
    vec![
        family(
            "kanari_rollout_phase",
            "The rollout's phase (1 for the current one).",
            MetricType::GAUGE,
            phase,
        ),
        family(
            "kanari_rollout_step",
            "The rollout's current step (1-based).",
            MetricType::GAUGE,
            step,
        ),
        family(
            "kanari_rollout_checks_total",
            "Judge results of the rollout's checks and critical path, by result (pass, fail, inconclusive).",
            MetricType::COUNTER,
            checks,
        ),
        family(
            "kanari_rollout_judge_value",
            "What each judge measured last (a ratio, or seconds for latencies).",
            MetricType::GAUGE,
            values,
        ),
        family(
            "kanari_rollout_judge_limit",
            "The limit each judge holds its value to.",
            MetricType::GAUGE,
            limits,
        ),
        family(
            "kanari_rollout_judge_dry_run",
            "1 for a judge in dry run (analysis.dry_run): evaluated and shown, never acted on.",
            MetricType::GAUGE,
            dry,
        ),
        family(
            "kanari_rollbacks_total",
            "Rollbacks, by the judge or event that caused them.",
            MetricType::COUNTER,
            rollbacks,
        ),
        family(
            "kanari_promotions_total",
            "Rollouts promoted to 100 %.",
            MetricType::COUNTER,
            promotions,
        ),
        family(
            "kanari_webhook_deliveries_total",
            "Webhook deliveries (rollout.webhooks) by outcome: ok (2xx), failed (after its retries), dropped (queue full).",
            MetricType::COUNTER,
            webhooks,
        ),
    ]
}

/// Every metric family, in the text format.
pub fn render(view: &Snapshot) -> String {
    let fams = families(view);
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&fams, &mut out)
        .expect("encoding into memory cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

pub fn families(view: &Snapshot) -> Vec<MetricFamily> {
    let t = &view.telemetry;
    let mut requests = Vec::new();
    let mut durations = Vec::new();
    let mut connections = Vec::new();
    let mut connect = Vec::new();
    let mut tcp_errors = Vec::new();
    let mut bytes = Vec::new();
    let mut packets = Vec::new();
    // By the path that counted (packet: the XDP/TC programs; socket: the
    // socket path's cgroup programs); the judges see their sum.
    for (key, path, tot) in t.backends_by_path() {
        let tot = tot.as_ref();
        let backend = key.addr.to_string();
        let base = [
            ("service", &*key.service),
            ("version", key.group.0.name()),
            ("backend", backend.as_str()),
            ("path", path),
        ];
        let with = |k: &'static str, v: &'static str| [base[0], base[1], base[2], base[3], (k, v)];
        for (class, name) in CLASS_NAMES.iter().enumerate().take(CLASSES) {
            requests.push(counter(&with("class", name), tot.requests[class]));
        }
        durations.push(histogram(&base, &tot.ttfb, tot.ttfb_sum_ns));
        connections.push(counter(&base, tot.connections));
        connect.push(histogram(&base, &tot.connect, tot.connect_sum_ns));
        for (kind, v) in [
            ("reset", tot.resets),
            ("refused", tot.refused),
            ("unanswered", tot.unanswered),
            ("timeout", tot.timeouts),
            ("connect_timeout", tot.connect_timeouts),
        ] {
            tcp_errors.push(counter(&with("kind", kind), v));
        }
        for (dir, i) in [("to_backend", TO_BACKEND), ("from_backend", FROM_BACKEND)] {
            bytes.push(counter(&with("direction", dir), tot.bytes[i]));
            packets.push(counter(&with("direction", dir), tot.packets[i]));
        }
    }
    let datapath: Vec<Metric> = view
        .counters
        .iter()
        .map(|(iface, c, v)| counter(&[("interface", iface.as_str()), ("action", c.name())], *v))
        .collect();
    let weights: Vec<Metric> = view
        .config
        .services
        .iter()
        .map(|s| {
            gauge(
                &[("service", s.name.as_str())],
                view.weight(s) as f64 / BASIS_POINTS as f64,
            )
        })
        .collect();
    let mut fams = vec![
        family(
            "kanari_requests_total",
            "Requests answered, per backend and class (status class for HTTP; none for TCP exchanges), measured in the kernel.",
            MetricType::COUNTER,
            requests,
        ),
        family(
            "kanari_request_duration_seconds",
            "Time to first byte: from the client's first payload after the last response to the backend's first payload.",
            MetricType::HISTOGRAM,
            durations,
        ),
        family(
            "kanari_connections_total",
            "Connections opened to a backend (SYNs forwarded).",
            MetricType::COUNTER,
            connections,
        ),
        family(
            "kanari_connect_duration_seconds",
            "Connect time: from the SYN forwarded to the backend's SYN-ACK.",
            MetricType::HISTOGRAM,
            connect,
        ),
        family(
            "kanari_tcp_errors_total",
            "TCP failures by kind: reset (RST on an established connection), refused (RST answering a SYN), unanswered (a connection attempt whose SYN was sent again, once per attempt), timeout (a request unanswered past analysis.request_timeout), connect_timeout (an attempt never answered within it).",
            MetricType::COUNTER,
            tcp_errors,
        ),
        family(
            "kanari_bytes_total",
            "IP bytes steered, per backend and direction.",
            MetricType::COUNTER,
            bytes,
        ),
        family(
            "kanari_packets_total",
            "Packets steered, per backend and direction.",
            MetricType::COUNTER,
            packets,
        ),
        family(
            "kanari_datapath_packets_total",
            "Packets seen by the data path, per interface and action.",
            MetricType::COUNTER,
            datapath,
        ),
        family(
            "kanari_canary_weight_ratio",
            "Share of new clients or connections sent to the canary (0 to 1), as the kernel holds it.",
            MetricType::GAUGE,
            weights,
        ),
        family(
            "kanari_config_reload_failures_total",
            "Configuration reloads (SIGHUP) rejected; the running configuration stayed.",
            MetricType::COUNTER,
            vec![counter(&[], view.reload_failures)],
        ),
        family(
            "kanari_datapath_write_failures_total",
            "Writes to the data path's maps that failed; each is retried on the next tick.",
            MetricType::COUNTER,
            vec![counter(&[], view.write_failures)],
        ),
        family(
            "kanari_datapath_in_sync",
            "1 while the kernel holds what the agent wants (weights, backends, segments), 0 while a write is being retried.",
            MetricType::GAUGE,
            vec![gauge(
                &[],
                if view.disagreement.is_none() {
                    1.0
                } else {
                    0.0
                },
            )],
        ),
        family(
            "kanari_backend_ids_quarantined",
            "Backend ids held back from new backends while conntrack entries may still carry them.",
            MetricType::GAUGE,
            vec![gauge(&[], view.quarantined_ids as f64)],
        ),
        family(
            "kanari_tick_duration_seconds",
            "How long each tick of the agent's loop took: reading the kernel's counters, judging, writing the maps.",
            MetricType::HISTOGRAM,
            vec![tick_histogram(&view.ticks)],
        ),
        family(
            "kanari_build_info",
            "The running kanari build (always 1).",
            MetricType::GAUGE,
            vec![gauge(&[("version", VERSION), ("commit", COMMIT)], 1.0)],
        ),
    ];
    fams.extend(rollout_families(view));
    fams.push(family(
        "kanari_conntrack_capacity",
        "Entries the conntrack table holds at most (two per connection of conntrack.connections).",
        MetricType::GAUGE,
        vec![gauge(&[], view.config.conntrack_connections as f64 * 2.0)],
    ));
    if let Some(n) = view.conntrack_entries {
        fams.push(family(
            "kanari_conntrack_entries",
            "Entries in the conntrack table (two per connection), counted every 2 s.",
            MetricType::GAUGE,
            vec![gauge(&[], n as f64)],
        ));
    }
    let expired = &view.conntrack_expired;
    let mut samples: Vec<_> = kanari_common::maps::CtState::ALL
        .iter()
        .zip(expired.by_state)
        .map(|(s, n)| counter(&[("state", s.name())], n))
        .collect();
    samples.push(counter(&[("state", "reverse_only")], expired.reverse));
    fams.push(family(
        "kanari_conntrack_expired_total",
        "Connections whose conntrack entries the agent removed, idle past their state's timeout (conntrack.timeouts); reverse_only: a reply entry whose forward entry was gone.",
        MetricType::COUNTER,
        samples,
    ));
    // The encoder refuses families without samples.
    fams.retain(|f| !f.get_metric().is_empty());
    fams
}

#[cfg(test)]
mod tests {
    use kanari_common::maps::{BackendStats, Counter as DpCounter};

    use super::*;
    use crate::snapshot::fixture::canary_snapshot;

    fn view() -> Snapshot {
        let mut s = BackendStats::ZERO;
        s.requests[kanari_common::http::CLASS_5XX] = 3;
        s.requests[kanari_common::http::CLASS_2XX] = 7;
        s.ttfb_hist[kanari_common::hist::TTFB.index(20_000_000) as usize] = 10;
        s.ttfb_sum_ns = 200_000_000;
        let mut v = canary_snapshot("12.5", s, 1);
        v.counters = std::sync::Arc::new(vec![("eth0".into(), DpCounter::XdpSteered, 42)]);
        v.ticks.record(0.003);
        v.conntrack_entries = Some(8);
        v
    }

    #[test]
    fn exposition_has_help_type_and_the_numbers() {
        let text = render(&view());
        for fam in [
            "kanari_requests_total",
            "kanari_request_duration_seconds",
            "kanari_connections_total",
            "kanari_connect_duration_seconds",
            "kanari_tcp_errors_total",
            "kanari_bytes_total",
            "kanari_datapath_packets_total",
            "kanari_conntrack_entries",
            "kanari_conntrack_expired_total",
            "kanari_conntrack_capacity",
            "kanari_canary_weight_ratio",
            "kanari_datapath_write_failures_total",
            "kanari_datapath_in_sync",
            "kanari_tick_duration_seconds",
            "kanari_build_info",
        ] {
            assert!(
                text.contains(&format!("# HELP {fam} ")),
                "{fam} HELP:\n{text}"
            );
            assert!(text.contains(&format!("# TYPE {fam} ")), "{fam} TYPE");
        }
        assert!(text.contains(r#"kanari_requests_total{service="web",version="canary",backend="10.0.3.1:80",path="packet",class="5xx"} 3"#), "{text}");
        assert!(text.contains(r#"kanari_canary_weight_ratio{service="web"} 0.125"#));
        assert!(text.contains(
            r#"kanari_datapath_packets_total{interface="eth0",action="xdp_steered"} 42"#
        ));
        assert!(text.contains(r#"kanari_request_duration_seconds_count{service="web",version="canary",backend="10.0.3.1:80",path="packet"} 10"#));
        assert!(text.contains(r#"kanari_request_duration_seconds_sum{service="web",version="canary",backend="10.0.3.1:80",path="packet"} 0.2"#));
        assert!(
            text.contains("kanari_tick_duration_seconds_bucket{le=\"0.0025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("kanari_tick_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("kanari_datapath_in_sync 1"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let text = render(&view());
        let mut last = 0u64;
        let mut les = Vec::new();
        for line in text.lines().filter(|l| {
            l.starts_with("kanari_request_duration_seconds_bucket") && l.contains("10.0.3.1")
        }) {
            let v: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= last, "{line}");
            last = v;
            les.push(
                line.split("le=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(les.last().map(String::as_str), Some("+Inf"));
        assert_eq!(last, 10);
        // 20 ms lies in the kernel bucket [2^24 ns, 1.25 x 2^24 ns): the exported
        // le 2^24 ns holds none of it, the next exported one (1.5 x 2^24 ns) all.
        assert!(text.contains(r#"le="0.016777216"} 0"#), "{text}");
        assert!(text.contains(r#"le="0.025165824"} 10"#), "{text}");
    }
}
