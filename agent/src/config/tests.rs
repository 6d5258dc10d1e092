//! The configuration's parse and validation, on plain text.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use kanari_common::maps::{DEFAULT_CONNTRACK_CONNECTIONS, DEFAULT_MAX_BACKENDS, Group};

use super::{locate::path_at_line, *};

const GOOD: &str = r#"
interfaces:
  - name: eth0
  - name: eth1
    mode: tc
conntrack:
  connections: 65536
services:
  - name: web
    vip: 10.0.0.100:80
    canary_weight: 12.5
    stable:
      backends: [10.0.2.1:8080, 10.0.2.2:8080]
    canary:
      backends: [10.0.3.1:8080]
    segments:
      - cidr: 10.1.5.0/24
        group: canary
  - name: api
    vip: 10.0.0.101:443
    affinity: connection
    canary_weight: "5%"
    salt: 7
    stable:
      backends: [10.0.2.1:8443]
    canary:
      backends: [10.0.3.1:8443]
"#;

fn exists(name: &str) -> bool {
    name.starts_with("eth")
}

fn parse_err(text: &str) -> ConfigError {
    parse("k.yaml", text, &exists).expect_err("config should be rejected")
}

#[test]
fn a_good_config_parses_with_defaults_filled_in() {
    let c = parse("k.yaml", GOOD, &exists).unwrap();
    assert_eq!(c.conntrack_connections, 65536);
    assert_eq!(c.interfaces[0].mode, AttachMode::Auto);
    assert_eq!(c.interfaces[1].mode, AttachMode::Tc);
    let web = &c.services[0];
    assert_eq!(web.canary_weight, 1250);
    assert_eq!(web.affinity, Affinity::Client);
    assert_eq!(web.protocol, Protocol::Http);
    assert_eq!(web.salt, default_salt("web"));
    assert_eq!(web.segments[0].cidr.to_string(), "10.1.5.0/24");
    assert_eq!(web.segments[0].group, Group::Canary);
    let api = &c.services[1];
    assert_eq!(api.canary_weight, 500);
    assert_eq!(api.salt, 7);
    assert_eq!(api.affinity, Affinity::Connection);
    assert_eq!(api.canary.len(), 1);
}

#[test]
fn conntrack_timeouts_default_by_state_and_each_can_be_set() {
    use kanari_common::maps::CtState;
    let c = parse("k.yaml", "interfaces: [{name: eth0}]\n", &exists).unwrap();
    let t = c.conntrack_timeouts;
    assert_eq!(
        CtState::ALL.map(|s| t.of(s).as_secs()),
        [10, 6 * 3600, 120, 10]
    );
    let c = parse(
        "k.yaml",
        "interfaces: [{name: eth0}]\nconntrack: {timeouts: {established: 1h, closed: 2s}}\n",
        &exists,
    )
    .unwrap();
    let t = c.conntrack_timeouts;
    assert_eq!(CtState::ALL.map(|s| t.of(s).as_secs()), [10, 3600, 120, 2]);
    let e = parse_err("interfaces: [{name: eth0}]\nconntrack: {timeouts: {fin_wait: 2s}}\n");
    assert!(e.to_string().contains("fin_wait"), "{e}");
}

#[test]
fn defaults() {
    let c = parse("k.yaml", "interfaces: [{name: eth0}]\n", &exists).unwrap();
    assert_eq!(c.conntrack_connections, DEFAULT_CONNTRACK_CONNECTIONS);
    assert_eq!(
        c.new_connections_per_second,
        DEFAULT_CONNTRACK_CONNECTIONS / 16
    );
    assert_eq!(c.max_backends, DEFAULT_MAX_BACKENDS);
    assert_eq!(c.metrics_listen.to_string(), "0.0.0.0:9477");
    assert_eq!(c.control_socket, PathBuf::from("/run/kanari/kanari.sock"));
    assert_eq!(c.tick, Duration::from_millis(250));
    assert!(c.services.is_empty());
    let c = parse(
        "k.yaml",
        "interfaces: [{name: eth0}]\ntelemetry: {tick: 1s}\nmetrics: {listen: \"[::1]:9000\"}\n",
        &exists,
    )
    .unwrap();
    assert_eq!(c.tick, Duration::from_secs(1));
    assert_eq!(c.metrics_listen.to_string(), "[::1]:9000");
}

/// Each bad input gives one error naming the field and saying what is expected.
#[test]
fn bad_inputs_name_the_field_and_the_fix() {
    let svc = |extra: &str| {
        format!(
            "interfaces: [{{name: eth0}}]\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    stable: {{backends: [10.0.2.1:8080]}}\n{extra}"
        )
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "interfaces: [name: eth0\n".into(),
            "interfaces",
            "expected ',' or ']'",
        ),
        (
            "interfaces: [{name: eth0, speed: 10}]\n".into(),
            "interfaces[0].speed",
            "unknown field `speed`",
        ),
        (
            "interfaces: [{name: eth0, mode: ebpf}]\n".into(),
            "interfaces[0].mode",
            "unknown variant `ebpf`",
        ),
        (
            "interfaces: []\n".into(),
            "interfaces",
            "at least one interface",
        ),
        (
            "interfaces: [{name: wlan9}]\n".into(),
            "interfaces[0].name",
            "does not exist",
        ),
        (
            "interfaces: [{name: eth0}, {name: eth0}]\n".into(),
            "interfaces[1].name",
            "listed twice",
        ),
        (
            "interfaces: [{name: eth0}]\nconntrack: {connections: 10}\n".into(),
            "conntrack.connections",
            "outside",
        ),
        (
            "interfaces: [{name: eth0}]\nconntrack: {timeouts: {closed: 500ms}}\n".into(),
            "conntrack.timeouts.closed",
            "outside 1s to 7days",
        ),
        (
            "interfaces: [{name: eth0}]\nconntrack: {timeouts: {established: 8days}}\n".into(),
            "conntrack.timeouts.established",
            "outside 1s to 7days",
        ),
        (
            svc("").replace("10.0.0.100:80", "10.0.0.100"),
            "services[0].vip",
            "has no port",
        ),
        (
            svc("").replace("10.0.0.100:80", "10.0.0.300:80"),
            "services[0].vip",
            "not an IPv4 address",
        ),
        (
            svc("").replace("10.0.0.100:80", "10.0.0.100:http"),
            "services[0].vip",
            "not a port",
        ),
        (
            svc("").replace("10.0.2.1:8080", "backend-1:8080"),
            "services[0].stable.backends[0]",
            "not an IPv4 address",
        ),
        (
            svc("").replace("10.0.2.1:8080", "fd00::1:8080"),
            "services[0].stable.backends[0]",
            "not an IPv4 address",
        ),
        (
            svc("    canary_weight: 101\n    canary: {backends: [10.0.3.1:80]}\n"),
            "services[0].canary_weight",
            "outside 0 to 100",
        ),
        (
            svc("    canary_weight: -1\n    canary: {backends: [10.0.3.1:80]}\n"),
            "services[0].canary_weight",
            "outside 0 to 100",
        ),
        (
            svc("    canary_weight: 1.234\n    canary: {backends: [10.0.3.1:80]}\n"),
            "services[0].canary_weight",
            "two decimals",
        ),
        (
            svc("    canary_weight: lots\n"),
            "services[0].canary_weight",
            "not a percentage",
        ),
        (
            svc("    canary_weight: 10\n"),
            "services[0].canary_weight",
            "canary.backends is empty",
        ),
        (
            svc("    affinity: sticky\n"),
            "services[0].affinity",
            "unknown variant `sticky`",
        ),
        (
            svc("    canary: {backends: [10.0.2.1:8080]}\n"),
            "services[0].canary.backends[0]",
            "also a stable backend",
        ),
        (
            svc("").replace("[10.0.2.1:8080]", "[10.0.0.100:80]"),
            "services[0].stable.backends[0]",
            "own VIP",
        ),
        (
            svc("").replace("[10.0.2.1:8080]", "[10.0.2.1:8080, 10.0.2.1:8080]"),
            "services[0].stable.backends[1]",
            "listed twice",
        ),
        (
            svc("").replace("[10.0.2.1:8080]", "[]"),
            "services[0].stable.backends",
            "at least one stable backend",
        ),
        (
            svc("    segments: [{cidr: 10.1.5.1/24, group: stable}]\n"),
            "services[0].segments[0].cidr",
            "write 10.1.5.0/24",
        ),
        (
            svc("    segments: [{cidr: 10.1.5.0/33, group: stable}]\n"),
            "services[0].segments[0].cidr",
            "0 to 32",
        ),
        (
            svc("    segments: [{cidr: 10.1.5.0, group: stable}]\n"),
            "services[0].segments[0].cidr",
            "not a CIDR",
        ),
        (
            svc("    segments: [{cidr: 10.1.5.0/24, group: beta}]\n"),
            "services[0].segments[0].group",
            "`stable` or `canary`",
        ),
        (
            svc("    segments: [{cidr: 10.1.5.0/24, group: canary}]\n"),
            "services[0].segments[0].group",
            "canary.backends is empty",
        ),
        (
            svc(
                "    segments: [{cidr: 10.1.5.0/24, group: stable}, {cidr: 10.1.5.0/24, group: stable}]\n",
            ),
            "services[0].segments[1].cidr",
            "also segments[0]",
        ),
        (
            svc("  - name: web\n    vip: 10.0.0.101:80\n    stable: {backends: [10.0.2.1:8080]}\n"),
            "services[1].name",
            "names must be unique",
        ),
        (
            svc(
                "  - name: web2\n    vip: 10.0.0.100:80\n    stable: {backends: [10.0.2.1:8080]}\n",
            ),
            "services[1].vip",
            "also the VIP of services[0]",
        ),
        (
            svc("").replace("name: web", "name: \"web site\""),
            "services[0].name",
            "not a service name",
        ),
        (
            "interfaces: [{name: eth0}]\nservices: [{name: web, vip: 10.0.0.1:80}]\n".into(),
            "services[0]",
            "missing field `stable`",
        ),
        (
            "interfaces: [{name: eth0}]\nservces: []\n".into(),
            "servces",
            "unknown field `servces`",
        ),
        (
            svc("    protocol: grpc\n"),
            "services[0].protocol",
            "unknown variant `grpc`",
        ),
        (
            "interfaces: [{name: eth0}]\nlimits: {backends: 0}\n".into(),
            "limits.backends",
            "outside 1 to",
        ),
        (
            svc("")
                .replace("services:", "limits: {backends: 1}\nservices:")
                .replace("[10.0.2.1:8080]", "[10.0.2.1:8080, 10.0.2.2:8080]"),
            "limits.backends",
            "raise limits.backends",
        ),
        (
            "interfaces: [{name: eth0}]\nmetrics: {listen: 9477}\n".into(),
            "metrics.listen",
            "not an address to listen on",
        ),
        (
            "interfaces: [{name: eth0}]\ntelemetry: {tick: fast}\n".into(),
            "telemetry.tick",
            "not a duration",
        ),
        (
            "interfaces: [{name: eth0}]\ntelemetry: {tick: 1ms}\n".into(),
            "telemetry.tick",
            "outside 10ms",
        ),
        (
            "interfaces: [{name: eth0}]\ncontrol: {socket: kanari.sock}\n".into(),
            "control.socket",
            "absolute path",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {steps: [10, 5]}\n"),
            "services[0].rollout.steps[1]",
            "steps must increase",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {steps: [0, 5]}\n"),
            "services[0].rollout.steps[0]",
            "more than 0 %",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {steps: [5], step_weight: 5}\n",
            ),
            "services[0].rollout.steps",
            "not both",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {strategy: blue-green}\n"),
            "services[0].rollout.strategy",
            "add a segment pinned to the canary",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {strategy: rolling}\n"),
            "services[0].rollout.strategy",
            "unknown variant `rolling`",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    canary_weight: 10\n    rollout: {}\n"),
            "services[0].canary_weight",
            "the rollout drives",
        ),
        (
            svc("    analysis: {}\n"),
            "services[0].analysis",
            "add a rollout section",
        ),
        (
            svc("    rollout: {}\n"),
            "services[0].canary.backends",
            "a rollout needs canary backends",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {interval: 10}\n"),
            "services[0].rollout.interval",
            "not a duration",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {interval: 10s, progress_deadline: 5s}\n",
            ),
            "services[0].rollout.progress_deadline",
            "must be more than checks_per_step x interval (10s)",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {interval: 10s, checks_per_step: 3, progress_deadline: 30s}\n",
            ),
            "services[0].rollout.progress_deadline",
            "must be more than checks_per_step x interval (30s)",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {steps: [100]}\n"),
            "services[0].rollout.steps",
            "at least one step must be below 100 %",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {min_requests: 0}\n"),
            "services[0].rollout.min_requests",
            "safe values are 10 or more",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {critical: {error_rate: 0}}\n",
            ),
            "services[0].analysis.critical.error_rate",
            "safe values are 1% to 100%",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {critical: {connect_error_rate: 0.5}}\n",
            ),
            "services[0].analysis.critical.connect_error_rate",
            "safe values are 1% to 100%",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {critical: {min_requests: 0}}\n",
            ),
            "services[0].analysis.critical.min_requests",
            "safe values are 5 or more",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {compare_to_stable: {confidence: 0.5}}\n",
            ),
            "services[0].analysis.compare_to_stable.confidence",
            "outside 0.9 to 0.9999",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {compare_to_stable: {enabled: false}}\n",
            ),
            "services[0].analysis",
            "a check needs at least one judge",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {duration: 1h}\n"),
            "services[0].rollout.duration",
            "only an ab rollout",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {watch_after_promotion: 30h}\n",
            ),
            "services[0].rollout.watch_after_promotion",
            "0s (off) to 1day",
        ),
        (
            svc("    canary: {revision: \"\", backends: [10.0.3.1:80]}\n"),
            "services[0].canary.revision",
            "not a revision",
        ),
        (
            svc("    canary: {revision: v2, backends: [10.0.3.1:80]}\n")
                .replace("stable: {backends", "stable: {revision: v2, backends"),
            "services[0].canary.revision",
            "also stable's revision",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {compare_to_stable: {confidence: 1.5}}\n",
            ),
            "services[0].analysis.compare_to_stable.confidence",
            "outside 0.9 to 0.9999",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {limits: {max_latency: 1s}}\n",
            ),
            "services[0].analysis.limits.max_latency",
            "unknown field `max_latency`",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {request_timeout: 100ms}\n",
            ),
            "services[0].analysis.request_timeout",
            "must be 1s to 10m",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n    analysis: {dry_run: [error_rate, p99]}\n",
            ),
            "services[0].analysis.dry_run[1]",
            "`p99` is not a judge; one of error_rate",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    rollout: {interval: 10s}\n    analysis: {warmup: 10s}\n",
            ),
            "services[0].analysis.warmup",
            "shorter than rollout.interval (10s)",
        ),
        (
            svc("    canary: {backends: [10.0.3.1:80]}\n    rollout: {on_rollback: kill}\n"),
            "services[0].rollout.on_rollback",
            "unknown variant `kill`",
        ),
        (
            "interfaces: [{name: eth0}]\nstate: {dir: state}\n".into(),
            "state.dir",
            "absolute path",
        ),
        (
            svc(
                "    canary: {backends: [10.0.3.1:80]}\n    segments: [{cidr: 10.9.0.0/16, group: canary}]\n  - name: api\n    vip: 10.0.0.101:80\n    stable: {backends: [10.0.2.1:81]}\n    segments: [{cidr: 10.9.0.0/16, group: stable}]\n",
            ),
            "services[1].segments[0].group",
            "pin it to the same group in both",
        ),
        (
            "interfaces: [{name: eth0}]\nbpf: {pin_dir: kanari}\n".into(),
            "bpf.pin_dir",
            "absolute directory",
        ),
    ];
    for (text, field, needle) in cases {
        let e = parse_err(&text);
        assert_eq!(e.field, field, "for:\n{text}\ngot: {e}");
        assert!(
            e.message.contains(needle),
            "for:\n{text}\nexpected `{needle}` in: {e}"
        );
        assert!(e.to_string().starts_with("k.yaml"), "{e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }
}

#[test]
fn rollouts_parse_with_defaults() {
    let text = "interfaces: [{name: eth0}]\nservices:\n  - name: web\n    vip: 10.0.0.100:80\n    stable: {backends: [10.0.2.1:80]}\n    canary: {backends: [10.0.3.1:80]}\n    rollout: {}\n";
    let c = parse("k.yaml", text, &exists).unwrap();
    let r = c.services[0].rollout.as_ref().unwrap();
    assert_eq!(r.rollout.strategy, Strategy::Canary);
    assert_eq!(r.rollout.steps, vec![100, 500, 1000, 2500, 5000, 10000]);
    assert_eq!(r.rollout.interval, Duration::from_secs(30));
    assert_eq!(
        (
            r.rollout.checks_per_step,
            r.rollout.failure_limit,
            r.rollout.min_requests
        ),
        (1, 1, 100)
    );
    assert_eq!(r.rollout.on_rollback, OnRollback::Drain);
    let cmp = r.analysis.compare.as_ref().unwrap();
    assert_eq!(
        (
            cmp.max_error_rate_increase,
            cmp.max_latency_increase,
            cmp.confidence
        ),
        (Some(0.01), Some(0.2), 0.99)
    );
    assert_eq!(cmp.min_latency_increase, Duration::from_millis(1));
    assert_eq!(
        (
            r.analysis.critical.error_rate,
            r.analysis.critical.min_requests
        ),
        (Some(0.5), 20)
    );
    assert_eq!(r.analysis.limits, Limits::default());
    assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));

    let text = text.replace(
    "rollout: {}",
    "rollout: {step_weight: 20, max_weight: 60, interval: 5s, on_rollback: cut}\n    analysis:\n      limits: {max_error_rate: 2, max_latency_p99: 250ms}\n      compare_to_stable: {max_latency_increase: \"10%\", min_latency_increase: 5ms, confidence: 0.95}\n      critical: {error_rate: 40, min_requests: 10}",
);
    let c = parse("k.yaml", &text, &exists).unwrap();
    let r = c.services[0].rollout.as_ref().unwrap();
    assert_eq!(r.rollout.steps, vec![2000, 4000, 6000]);
    assert_eq!(r.rollout.on_rollback, OnRollback::Cut);
    assert_eq!(r.analysis.limits.max_error_rate, Some(0.02));
    assert_eq!(
        r.analysis.limits.max_latency_p99,
        Some(Duration::from_millis(250))
    );
    let cmp = r.analysis.compare.as_ref().unwrap();
    assert_eq!(
        (
            cmp.max_error_rate_increase,
            cmp.max_latency_increase,
            cmp.confidence
        ),
        (Some(0.01), Some(0.1), 0.95),
        "the fields not written keep their defaults"
    );
    assert_eq!(cmp.min_latency_increase, Duration::from_millis(5));
    assert_eq!(
        (
            r.analysis.critical.error_rate,
            r.analysis.critical.min_requests
        ),
        (Some(0.4), 10)
    );
}

#[test]
fn the_shipped_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/kanari.yaml");
    let c = load(&path, &|_| true).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.services.len(), 2);
    assert!(c.services[1].rollout.is_some());
}

#[test]
fn a_line_s_field_path_comes_from_its_indentation() {
    let text = "interfaces:\n  - name: eth0\nservices:\n  - name: web\n    vip: 1\n    stable:\n      backends: [x]\n  - name: api\n    vip: 2\n\tsalt: 3\n";
    assert_eq!(path_at_line(text, 2).as_deref(), Some("interfaces[0].name"));
    assert_eq!(path_at_line(text, 5).as_deref(), Some("services[0].vip"));
    assert_eq!(
        path_at_line(text, 7).as_deref(),
        Some("services[0].stable.backends")
    );
    assert_eq!(path_at_line(text, 8).as_deref(), Some("services[1].name"));
    assert_eq!(path_at_line(text, 9).as_deref(), Some("services[1].vip"));
    assert_eq!(path_at_line(text, 10).as_deref(), Some("services[1].salt"));
    assert_eq!(path_at_line(text, 3).as_deref(), Some("services"));
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let e = parse_err("interfaces:\n  - name: eth0\n   mode: [\n");
    assert!(e.file.starts_with("k.yaml:"), "{e}");
}

#[test]
fn an_unclosed_bracket_names_the_key_it_opened_on() {
    // The parser gives up on a later line; the broken one is where `[` opened.
    let e = parse_err("interfaces: [name: n0\ncontrol:\n  socket: /tmp/x.sock\n");
    assert_eq!(e.field, "interfaces", "{e}");
    let e = parse_err("state:\n  dir: /tmp/s\nservices: {name: web\ncontrol: {}\n");
    assert_eq!(e.field, "services", "{e}");
}

#[test]
fn percentages_convert_to_basis_points() {
    assert_eq!(percent_to_basis_points(0.0), Ok(0));
    assert_eq!(percent_to_basis_points(0.01), Ok(1));
    assert_eq!(percent_to_basis_points(10.0), Ok(1000));
    assert_eq!(percent_to_basis_points(33.33), Ok(3333));
    assert_eq!(percent_to_basis_points(100.0), Ok(10000));
    assert!(percent_to_basis_points(100.01).is_err());
    assert!(percent_to_basis_points(f64::NAN).is_err());
}

#[test]
fn cidr_contains() {
    let c: Cidr = "10.1.5.0/24".parse().unwrap();
    assert!(c.contains(Ipv4Addr::new(10, 1, 5, 200)));
    assert!(!c.contains(Ipv4Addr::new(10, 1, 6, 1)));
    let all: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains(Ipv4Addr::new(192, 168, 1, 1)));
}

#[test]
fn a_fleet_takes_its_defaults_and_tls_pairs_its_files() {
    let c = parse(
        "k.yaml",
        "interfaces: [{name: eth0}]\nfleet: {name: shop, etcd: {endpoints: ['http://10.0.0.21:2379']}}\n",
        &exists,
    )
    .unwrap();
    let f = c.fleet.expect("a fleet");
    assert_eq!(f.name, "shop");
    assert_eq!(f.node, None);
    assert_eq!(f.ttl, DEFAULT_ETCD_TTL);
    assert_eq!(f.tls, None);
    let c = parse(
        "k.yaml",
        "interfaces: [{name: eth0}]\nfleet: {name: shop, node: lb-1, advertise: '10.0.0.5:9477', etcd: {endpoints: ['https://etcd-1.example:2379'], ttl: 30s, tls: {ca: /ca.pem, cert: /c.pem, key: /k.pem}}}\n",
        &exists,
    )
    .unwrap();
    let f = c.fleet.expect("a fleet");
    assert_eq!(f.node.as_deref(), Some("lb-1"));
    assert_eq!(
        f.advertise.map(|a| a.to_string()).as_deref(),
        Some("10.0.0.5:9477")
    );
    assert_eq!(f.ttl, Duration::from_secs(30));
    let tls = f.tls.expect("tls");
    assert_eq!(tls.ca, PathBuf::from("/ca.pem"));
    assert_eq!(
        tls.identity,
        Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
    );
    // Seconds only: etcd's leases count whole seconds.
    let e = parse(
        "k.yaml",
        "interfaces: [{name: eth0}]\nfleet: {name: shop, etcd: {endpoints: ['http://10.0.0.21:2379'], ttl: 2500ms}}\n",
        &exists,
    )
    .unwrap_err();
    assert_eq!(e.field, "fleet.etcd.ttl");
}

#[test]
fn the_socket_path_finds_the_unified_hierarchy_in_mountinfo() {
    let hybrid = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                  26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,relatime shared:6 - cgroup2 cgroup2 rw\n\
                  27 25 0:24 / /sys/fs/cgroup/cpu rw shared:7 - cgroup cgroup rw,cpu\n";
    assert_eq!(
        unified_root(hybrid),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
    assert_eq!(unified_root(unified), Some(PathBuf::from("/sys/fs/cgroup")));
    assert_eq!(
        unified_root("27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n"),
        None
    );
    let spaced = r"50 1 0:40 / /mnt/my\040cgroups rw - cgroup2 none rw";
    assert_eq!(unified_root(spaced), Some(PathBuf::from("/mnt/my cgroups")));
    let c = parse(
        "k.yaml",
        "interfaces: [{name: eth0}]\nsocket_lb: {enabled: true}\n",
        &exists,
    )
    .unwrap();
    assert_eq!(c.socket_lb, Some(SocketLb { cgroup: None }));
    let off = parse(
        "k.yaml",
        "interfaces: [{name: eth0}]\nsocket_lb: {enabled: false, cgroup: /sys/fs/cgroup/x}\n",
        &exists,
    )
    .unwrap();
    assert_eq!(off.socket_lb, None);
}

#[test]
fn a_udp_service_needs_the_socket_path_and_may_share_a_tcp_services_vip() {
    let services = "services:\n  - name: dns\n    vip: 10.0.0.53:53\n    protocol: udp\n    stable: {backends: [10.0.2.1:53]}\n  - name: dns-tcp\n    vip: 10.0.0.53:53\n    protocol: tcp\n    stable: {backends: [10.0.2.1:53]}\n";
    let e = parse_err(&format!("interfaces: [{{name: eth0}}]\n{services}"));
    assert_eq!(e.field, "services[0].protocol");
    assert!(e.message.contains("socket_lb"), "{}", e.message);
    let c = parse(
        "k.yaml",
        &format!("interfaces: [{{name: eth0}}]\nsocket_lb: {{enabled: true}}\n{services}"),
        &exists,
    )
    .unwrap();
    assert_eq!(c.services[0].protocol, Protocol::Udp);
    assert_eq!(c.services[1].protocol, Protocol::Tcp);
    // Two UDP services on one VIP:port are still one too many.
    let twice = services.replace("protocol: tcp", "protocol: udp");
    let e = parse_err(&format!(
        "interfaces: [{{name: eth0}}]\nsocket_lb: {{enabled: true}}\n{twice}"
    ));
    assert_eq!(e.field, "services[1].vip");
}
