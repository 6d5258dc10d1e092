//! The deployment files in `deploy/`, checked by the tools operators trust and
//! end to end:
//!
//! - every YAML file passes yamllint; the kustomization renders with kubectl
//!   and every resource validates (kubernetes-validate, strict) against the
//!   oldest and newest Kubernetes it is written for; the DaemonSet, PodMonitor,
//!   ConfigMap and the agent's configuration agree with each other;
//! - the systemd unit passes `systemd-analyze verify` and stays under an
//!   exposure score; the Dockerfile passes hadolint; the Prometheus configs and
//!   rules pass promtool, and each alert fires after its `for:` in promtool's
//!   unit tests (`deploy/prometheus/rules.test.yml`);
//! - the agent runs, steers, reloads and adopts a predecessor's pinned data
//!   path with exactly the capabilities the DaemonSet and the unit grant (and
//!   fails without any one of them), and makes no system call the unit's
//!   filter forbids;
//! - a real Prometheus scrapes an agent whose canary was promoted, started
//!   again and rolled back, and every PromQL expression of the Grafana dashboard and
//!   of the alert rules returns data; every alert is firing in the scenario made
//!   for it (the rules loaded with a test-only `for: 1s`; their real `for:`
//!   is promtool's unit tests' to check).
//!
//! The static checks run the PyPI tools `cargo xtask test` installs
//! (`$KANARI_PYTHON_TOOLS`); they fail, never skip, when a tool is missing.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kanari::status::{RolloutStatus, StatusReport};
use kanari_common::maps::Group;
use kanari_tests::{
    agent::{Agent, kanari_bin},
    cgroup::SocketLbCgroup,
    client::{get_once, http_get, run_bounded, runtime},
    load::Load,
    netns::{Netns, require_root, unique_tag},
    prometheus::Prometheus,
    python::python_tool,
    socket_client::tcp_requests,
    topology::{Topology, TopologyOptions, VIP, client_addr},
};
use serde_json::Value;

/// The capabilities kanari runs with, as `setpriv` names them. Found by running
/// the agent with a set and removing one at a time (see
/// `the_agent_runs_with_exactly_its_three_capabilities`); the DaemonSet and the
/// systemd unit must grant exactly these.
const CAPABILITIES: [&str; 3] = ["bpf", "net_admin", "perfmon"];

/// Kubernetes versions the manifests are validated against: the first with
/// `securityContext.appArmorProfile`, and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// The unit's `systemd-analyze security` exposure, times ten, may not exceed this.
const MAX_EXPOSURE: u32 = 25;

const METRICS: &str = "127.0.0.1:9477";

// ---- files and tools ---------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace root")
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs a command to completion; panics naming it if it cannot start.
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (`cargo xtask test` installs it): {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a check; panics with its output unless it succeeds. Returns the output.
fn check(what: &str, cmd: &mut Command) -> String {
    let out = output(cmd);
    let all = text(&out);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{all}",
        out.status
    );
    all
}

/// A directory of the test's own, removed when dropped.
/// Removes a file on every exit path.
struct RemoveFile(PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kanari-deploy-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating a temporary directory");
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every document of a YAML text, as JSON (PyYAML from the Python tools).
fn yaml_documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python_tool("python"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python from the Python tools");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), yaml.as_bytes())
        .expect("writing YAML to python");
    let out = child.wait_with_output().expect("python runs");
    assert!(out.status.success(), "YAML does not parse:\n{}", text(&out));
    let docs: Value = serde_json::from_slice(&out.stdout).expect("JSON from python");
    docs.as_array().expect("a list of documents").clone()
}

fn yaml_file(path: &Path) -> Value {
    let mut docs = yaml_documents(&read(path));
    assert_eq!(docs.len(), 1, "{}: one document", path.display());
    docs.remove(0)
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---- static checks -------------------------------------------------------------

#[test]
fn every_yaml_file_passes_yamllint() {
    let out = check(
        "yamllint",
        Command::new(python_tool("yamllint"))
            .current_dir(repo())
            .args([
                "--strict",
                "-f",
                "parsable",
                "-c",
                "deploy/.yamllint.yaml",
                "deploy/",
            ]),
    );
    assert!(out.trim().is_empty(), "yamllint reported:\n{out}");
}

#[test]
fn the_dockerfile_passes_hadolint() {
    check(
        "hadolint deploy/docker/Dockerfile",
        Command::new(python_tool("hadolint"))
            .arg("--no-color")
            .arg(deploy("docker/Dockerfile")),
    );
    let dockerfile = read(&deploy("docker/Dockerfile"));
    // A multi-stage build whose runtime stage only gets the one binary.
    assert_eq!(dockerfile.matches("\nFROM ").count(), 2, "two stages");
    assert!(dockerfile.contains("cargo build --release --locked --package kanari"));
    assert!(dockerfile.contains("--component rust-src"));
    assert!(dockerfile.contains("COPY --from=build /out/kanari /usr/local/bin/kanari"));
}

/// The kustomization rendered by kubectl, as JSON documents by kind.
fn rendered_kubernetes(dir: &TempDir) -> (PathBuf, BTreeMap<String, Vec<Value>>) {
    let out = output(
        Command::new(python_tool("kubectl"))
            .arg("kustomize")
            .arg(deploy("kubernetes")),
    );
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/kubernetes failed:\n{}",
        text(&out)
    );
    let rendered = dir.join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).expect("writing the rendered manifests");
    let mut kinds: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for doc in yaml_documents(&String::from_utf8_lossy(&out.stdout)) {
        let kind = doc["kind"].as_str().expect("a kind").to_string();
        kinds.entry(kind).or_default().push(doc);
    }
    (rendered, kinds)
}

fn one<'a>(kinds: &'a BTreeMap<String, Vec<Value>>, kind: &str) -> &'a Value {
    match kinds.get(kind).map(Vec::as_slice) {
        Some([one]) => one,
        other => panic!("expected one {kind}, found {other:?}"),
    }
}

#[test]
fn the_kubernetes_manifests_render_and_validate() {
    let dir = TempDir::new("k8s");
    let (rendered, kinds) = rendered_kubernetes(&dir);

    // Every manifest in the directory is part of the kustomization.
    let kustomization = yaml_file(&deploy("kubernetes/kustomization.yaml"));
    let resources = strings(&kustomization["resources"]);
    let generated: BTreeSet<String> = kustomization["configMapGenerator"]
        .as_array()
        .expect("a configMapGenerator")
        .iter()
        .flat_map(|g| strings(&g["files"]))
        .collect();
    for entry in std::fs::read_dir(deploy("kubernetes")).expect("deploy/kubernetes") {
        let name = entry
            .expect("an entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                resources.contains(&name) || generated.contains(&name),
                "deploy/kubernetes/{name} is not in kustomization.yaml"
            );
        }
    }

    // kubernetes-validate knows the built-in kinds only: the PodMonitor
    // (a Prometheus Operator CRD) is skipped explicitly here, and checked
    // against the DaemonSet below instead.
    for version in KUBERNETES_VERSIONS {
        let out = check(
            &format!("kubernetes-validate --strict against Kubernetes {version}"),
            Command::new(python_tool("kubernetes-validate"))
                .args(["--strict", "-k", version])
                .arg(&rendered),
        );
        let mut passed = 0;
        for line in out.lines() {
            if line.starts_with("INFO ") && line.contains(" passed for resource ") {
                passed += 1;
            } else if line.starts_with("WARN ")
                && line.contains("kind PodMonitor with api version monitoring.coreos.com/v1")
            {
                // The one kind without a schema.
            } else {
                panic!("kubernetes-validate against {version}: {line}\n{out}");
            }
        }
        let builtin: usize = kinds
            .iter()
            .filter(|(k, _)| k.as_str() != "PodMonitor")
            .map(|(_, v)| v.len())
            .sum();
        assert_eq!(passed, builtin, "every built-in resource validated:\n{out}");
        eprintln!(
            "kubernetes-validate --strict, Kubernetes {version}: {passed} resources valid (PodMonitor: no schema, checked below)"
        );
    }

    // Least privilege: the agent reads CanaryReleases, Services and
    // EndpointSlices, writes releases' status and Events, and holds a Lease
    // in its own namespace; nothing else, bound to its account only.
    let account = one(&kinds, "ServiceAccount");
    let granted = |role: &Value| {
        let mut granted: Vec<(String, String, Vec<String>)> = Vec::new();
        for rule in role["rules"].as_array().expect("rules") {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    let verbs: Vec<String> = strings(&rule["verbs"]).into_iter().collect();
                    granted.push((group.clone(), resource, verbs));
                }
            }
        }
        granted.sort();
        granted
    };
    let verbs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let read = verbs(&["get", "list", "watch"]);
    let cluster_role = one(&kinds, "ClusterRole");
    assert_eq!(
        granted(cluster_role),
        vec![
            ("".to_string(), "events".to_string(), verbs(&["create"])),
            ("".to_string(), "services".to_string(), read.clone()),
            (
                "discovery.k8s.io".into(),
                "endpointslices".into(),
                read.clone()
            ),
            ("kanari.dev".into(), "canaryreleases".into(), read),
            (
                "kanari.dev".into(),
                "canaryreleases/status".into(),
                verbs(&["patch"])
            ),
        ],
        "least privilege"
    );
    let role = one(&kinds, "Role");
    assert_eq!(role["metadata"]["namespace"], "kanari");
    assert_eq!(
        granted(role),
        vec![(
            "coordination.k8s.io".to_string(),
            "leases".to_string(),
            verbs(&["create", "get", "list", "update"])
        )]
    );
    for (kind, bound) in [("ClusterRoleBinding", cluster_role), ("RoleBinding", role)] {
        let binding = one(&kinds, kind);
        assert_eq!(binding["roleRef"]["name"], bound["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["namespace"], "kanari");
    }
    let crd = one(&kinds, "CustomResourceDefinition");
    assert_eq!(crd["metadata"]["name"], "canaryreleases.kanari.dev");

    let ds = one(&kinds, "DaemonSet");
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["serviceAccountName"], account["metadata"]["name"]);
    assert_eq!(spec["automountServiceAccountToken"], true);
    assert_eq!(spec["hostNetwork"], true);
    assert!(
        spec["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "tolerates every taint: {}",
        spec["tolerations"]
    );
    // Its priority class is admitted in its namespace (a quota scoped to it).
    let quota = &one(&kinds, "ResourceQuota")["spec"]["scopeSelector"]["matchExpressions"][0];
    assert_eq!(quota["scopeName"], "PriorityClass");
    assert_eq!(
        strings(&quota["values"]),
        BTreeSet::from([spec["priorityClassName"]
            .as_str()
            .expect("a priority class")
            .to_string()])
    );
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1);

    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true, "never privileged");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        BTreeSet::from(["ALL".to_string()])
    );
    let want: BTreeSet<String> = CAPABILITIES.iter().map(|c| c.to_uppercase()).collect();
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        want,
        "the capabilities the agent runs with"
    );
    for r in ["requests", "limits"] {
        assert!(c["resources"][r]["memory"].is_string(), "a memory {r}");
    }

    // /healthz probes and the metrics port, by name.
    let port = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(port["containerPort"], 9477);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9477");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // Host paths: the bpf filesystem, the control socket, the state.
    let volumes = spec["volumes"].as_array().expect("volumes");
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let mounted = |path: &str| -> &Value {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"));
        volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume {}", m["name"]))
    };
    for path in ["/sys/fs/bpf", "/run/kanari", "/var/lib/kanari"] {
        assert_eq!(mounted(path)["hostPath"]["path"], path);
    }
    // The socket path attaches to the host's cgroup hierarchy, not to the
    // container's cgroup namespace.
    assert_eq!(
        mounted("/host/sys/fs/cgroup")["hostPath"]["path"],
        "/sys/fs/cgroup"
    );
    // The generated ConfigMap (its name has kustomize's hash) is the one mounted
    // where the agent reads its configuration.
    let config_map = one(&kinds, "ConfigMap");
    assert_eq!(
        mounted("/etc/kanari")["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    let agent_config: Value = serde_yaml_ng::from_str(
        config_map["data"]["kanari.yaml"]
            .as_str()
            .expect("kanari.yaml"),
    )
    .expect("kanari.yaml is YAML");
    assert_eq!(
        agent_config["socket_lb"]["cgroup"], "/host/sys/fs/cgroup",
        "the socket path's cgroup is the host's mount"
    );
    assert!(config_map["data"]["kanari.yaml"].is_string());
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/kanari/kanari.yaml"]);

    // The PodMonitor scrapes these pods' metrics port, as job "kanari".
    let monitor = one(&kinds, "PodMonitor");
    assert_eq!(
        monitor["metadata"]["namespace"],
        ds["metadata"]["namespace"]
    );
    let labels = pod["metadata"]["labels"].as_object().expect("pod labels");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the PodMonitor selects the pods by {k}"
        );
    }
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("a jobLabel");
    assert_eq!(
        labels[job_label], "kanari",
        "the job the rules and dashboard select"
    );
    let endpoints = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("endpoints");
    assert!(!endpoints.is_empty());
    for e in endpoints {
        assert_eq!(e["port"], "metrics");
        assert_eq!(e["path"], "/metrics");
    }
}

/// `kanari check-config` on a file, in a namespace with an `eth0` (the
/// interface the example configurations name).
#[test]
fn the_shipped_configurations_are_valid() {
    if !require_root() {
        return;
    }
    let ns = Netns::new(&unique_tag(), "cfg").expect("a namespace");
    // A veth pair: this kernel may have no dummy interfaces.
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])
    .expect("an eth0");
    for file in ["kubernetes/kanari.yaml", "examples/kanari.yaml"] {
        let path = deploy(file);
        let out = check(
            &format!("kanari check-config deploy/{file}"),
            ns.command(kanari_bin().to_str().expect("a UTF-8 path"))
                .arg("check-config")
                .arg(&path),
        );
        eprintln!("{}", out.trim());
    }
}

/// The Argo Rollouts template reads the agent's analysis endpoint and the
/// verdict field it serves; the Flagger template's query names kanari's
/// metrics and labels (both are also checked by yamllint with every file).
#[test]
fn the_argo_and_flagger_templates_read_what_the_agent_serves() {
    let argo = yaml_file(&deploy("argo/analysis-template.yaml"));
    assert_eq!(argo["kind"], "AnalysisTemplate");
    let web = &argo["spec"]["metrics"][0]["provider"]["web"];
    let url = web["url"].as_str().expect("a url");
    assert!(url.ends_with(":9477/analysis/{{args.service}}"), "{url}");
    assert_eq!(web["jsonPath"], "{$.verdict}");
    // The field and the values its conditions compare with.
    let report = kanari::status::AnalysisReport {
        service: "web".into(),
        verdict: "pass".into(),
        why: String::new(),
        phase: "progressing".into(),
        canary_weight_percent: 10.0,
        step: 0,
        judges: Vec::new(),
        critical: Vec::new(),
    };
    let json = serde_json::to_value(&report).expect("serializable");
    assert!(json.get("verdict").is_some());
    let m = &argo["spec"]["metrics"][0];
    assert_eq!(m["successCondition"], "result == \"pass\"");
    assert_eq!(m["failureCondition"], "result == \"fail\"");
    let flagger = yaml_file(&deploy("flagger/metric-template.yaml"));
    assert_eq!(flagger["kind"], "MetricTemplate");
    let q = flagger["spec"]["query"].as_str().expect("a query");
    for name in [
        "kanari_requests_total",
        "kanari_tcp_errors_total",
        "version=\"canary\"",
        "class=\"5xx\"",
    ] {
        assert!(q.contains(name), "{name} in {q}");
    }
    // The query, as Flagger renders it, computes the canary's failure share:
    // per minute 95 2xx, 3 5xx, 1 reset and 1 timeout (and stable's 5xx,
    // which must not count) is 5 % (rounded: this promtool compares exactly).
    let rendered = q
        .replace("{{ target }}", "web")
        .replace("{{ interval }}", "5m");
    let series = |labels: &str, per_minute: u32| {
        serde_json::json!({
            "series": labels,
            "values": format!("0+{per_minute}x20"),
        })
    };
    let web = r#"service="web",backend="10.0.0.1:80""#;
    let test = serde_json::json!({
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                series(&format!(r#"kanari_requests_total{{{web},version="canary",class="2xx"}}"#), 95),
                series(&format!(r#"kanari_requests_total{{{web},version="canary",class="5xx"}}"#), 3),
                series(&format!(r#"kanari_requests_total{{{web},version="stable",class="5xx"}}"#), 50),
                series(&format!(r#"kanari_tcp_errors_total{{{web},version="canary",kind="reset"}}"#), 1),
                series(&format!(r#"kanari_tcp_errors_total{{{web},version="canary",kind="timeout"}}"#), 1),
                series(&format!(r#"kanari_tcp_errors_total{{{web},version="canary",kind="unanswered"}}"#), 7),
            ],
            "promql_expr_test": [{
                "expr": format!("round({rendered}, 0.001)"),
                "eval_time": "10m",
                "exp_samples": [{"labels": "{}", "value": 5}],
            }],
        }],
    });
    let dir = TempDir::new("flagger");
    let path = dir.join("flagger.test.json");
    std::fs::write(&path, test.to_string()).expect("writing the test");
    let out = check(
        "promtool test rules (deploy/flagger/metric-template.yaml's query)",
        Command::new("promtool").args(["test", "rules"]).arg(&path),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_prometheus_configs_and_rules_pass_promtool() {
    let prometheus = deploy("prometheus");
    check(
        "promtool check config deploy/prometheus/prometheus.yml",
        Command::new("promtool")
            .args(["check", "config"])
            .arg(prometheus.join("prometheus.yml")),
    );
    check(
        "promtool check rules deploy/prometheus/rules.yml",
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(prometheus.join("rules.yml")),
    );
    // Every alert is quiet before its `for:` and firing after it, with its
    // labels and rendered annotations; every alert has such a test.
    let out = check(
        "promtool test rules deploy/prometheus/rules.test.yml",
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(prometheus.join("rules.test.yml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let unit = read(&prometheus.join("rules.test.yml"));
    for group in yaml_file(&prometheus.join("rules.yml"))["groups"]
        .as_array()
        .expect("groups")
    {
        for rule in group["rules"].as_array().expect("rules") {
            if let Some(alert) = rule["alert"].as_str() {
                assert!(
                    unit.contains(&format!(
                        "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
                    )),
                    "no unit test shows {alert} firing"
                );
            }
        }
    }
    // Debian's Prometheus is built without Kubernetes discovery: check the pod
    // scrape config with static targets in its place (relabelings, regexes and
    // the rules it loads are checked as they are).
    let dir = TempDir::new("promtool");
    let mut config = yaml_file(&prometheus.join("prometheus-kubernetes.yml"));
    let rules = config["rule_files"].as_array_mut().expect("rule_files");
    for r in rules.iter_mut() {
        *r = Value::from(
            prometheus
                .join(r.as_str().expect("a path"))
                .to_string_lossy()
                .into_owned(),
        );
    }
    let mut swapped = 0;
    for job in config["scrape_configs"]
        .as_array_mut()
        .expect("scrape_configs")
    {
        let job = job.as_object_mut().expect("a scrape config");
        if job.remove("kubernetes_sd_configs").is_some() {
            job.insert(
                "static_configs".into(),
                serde_json::json!([{"targets": [METRICS]}]),
            );
            swapped += 1;
        }
    }
    assert_eq!(swapped, 1, "one job discovers pods");
    let path = dir.join("prometheus-kubernetes.json");
    std::fs::write(&path, config.to_string()).expect("writing the config");
    check(
        "promtool check config deploy/prometheus/prometheus-kubernetes.yml",
        Command::new("promtool")
            .args(["check", "config"])
            .arg(&path),
    );
}

/// `KEY=VALUE` lines of a unit's section (continuation lines are not used).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
        .collect()
}

/// The unit with the installed binary's path replaced by the one under test.
fn unit_for_test(dir: &TempDir) -> PathBuf {
    let unit = read(&deploy("systemd/kanari.service"));
    assert!(unit.contains("ExecStart=/usr/local/bin/kanari run --config /etc/kanari/kanari.yaml"));
    let bin = kanari_bin().canonicalize().expect("the kanari binary");
    let path = dir.join("kanari.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/kanari", bin.to_str().expect("a UTF-8 path")),
    )
    .expect("writing the unit");
    path
}

#[test]
fn the_systemd_unit_passes_systemd_analyze() {
    let unit = read(&deploy("systemd/kanari.service"));
    assert_eq!(unit_values(&unit, "Type"), ["notify"]);
    let want: BTreeSet<String> = CAPABILITIES
        .iter()
        .map(|c| format!("CAP_{}", c.to_uppercase()))
        .collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let got: BTreeSet<String> = unit_values(&unit, key)
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect();
        assert_eq!(got, want, "{key}: the capabilities the agent runs with");
    }
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "kanari"),
        ("RuntimeDirectory", "kanari"),
        ("ConfigurationDirectory", "kanari"),
        ("Restart", "on-failure"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
    ] {
        assert_eq!(unit_values(&unit, key), [value], "{key}");
    }
    assert!(unit_values(&unit, "ExecReload").contains(&"/bin/kill -HUP $MAINPID".to_string()));

    // verify needs the binaries it names: check a copy that runs the one under test.
    let dir = TempDir::new("systemd");
    let path = unit_for_test(&dir);
    let out = check(
        "systemd-analyze verify kanari.service",
        Command::new("systemd-analyze").arg("verify").arg(&path),
    );
    assert!(
        out.trim().is_empty(),
        "systemd-analyze verify reported:\n{out}"
    );
    let out = check(
        &format!(
            "systemd-analyze security: exposure above {}.{}",
            MAX_EXPOSURE / 10,
            MAX_EXPOSURE % 10
        ),
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--threshold={MAX_EXPOSURE}"))
            .arg(&path),
    );
    let score = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .expect("an exposure level");
    eprintln!(
        "systemd-analyze security --offline=true: {}",
        score.trim_start_matches(['→', ' '])
    );
}

// ---- the agent with exactly its capabilities -----------------------------------------

/// `kanari run`, started by `setpriv` with exactly `caps` (inheritable, ambient
/// and bounding sets; as root, the permitted and effective sets follow the
/// bounding set), optionally under another program such as strace. Killed and
/// its directory removed when dropped.
struct CappedAgent {
    child: Option<Child>,
    wrapped: bool,
    dir: TempDir,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl CappedAgent {
    fn spawn(ns: &Netns, yaml: &str, caps: &[&str], under: &[&str]) -> Self {
        let dir = TempDir::new("agent");
        let config = dir.join("kanari.yaml");
        let socket = dir.join("kanari.sock");
        let log = dir.join("kanari.log");
        std::fs::write(&config, with_control_socket(yaml, &dir)).expect("writing the config");
        let set = std::iter::once("-all".to_string())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let setpriv = [
            "setpriv".to_string(),
            format!("--inh-caps={set}"),
            format!("--ambient-caps={set}"),
            format!("--bounding-set={set}"),
            "--".to_string(),
        ];
        let (program, rest) = match under.split_first() {
            Some((p, rest)) => (
                *p,
                rest.iter().map(|s| s.to_string()).chain(setpriv).collect(),
            ),
            None => ("setpriv", setpriv[1..].to_vec()),
        };
        let child = ns
            .command(program)
            .args(rest)
            .arg(kanari_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("KANARI_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("the log file"))
            .spawn()
            .expect("starting setpriv (util-linux) and kanari");
        CappedAgent {
            child: Some(child),
            wrapped: !under.is_empty(),
            dir,
            config,
            socket,
            log,
        }
    }

    /// The agent's PID: the child's, or under a wrapper such as strace, the
    /// wrapper's only child's.
    fn pid(&self) -> u32 {
        self.agent_pid().expect("kanari is running")
    }

    fn agent_pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?.id();
        if !self.wrapped {
            return Some(child);
        }
        let children =
            std::fs::read_to_string(format!("/proc/{child}/task/{child}/children")).ok()?;
        match children.split_whitespace().collect::<Vec<_>>()[..] {
            [pid] => pid.parse().ok(),
            _ => None,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("waiting for kanari"))
    }

    /// Polls /healthz until it answers 200; fails when the agent exits first.
    fn wait_ready(&mut self, ns: &Netns) -> Result<()> {
        let addr: SocketAddr = METRICS.parse().expect("an address");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "kanari exited ({status}) before it was ready:\n{}",
                    self.logs()
                );
            }
            let health = ns.run_in(|| runtime().block_on(http_get(addr, "/healthz")))?;
            if let Ok((200, body)) = &health {
                assert_eq!(body.trim(), "ready");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("/healthz never answered 200 ({health:?}):\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_exit(&mut self) -> Result<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("kanari did not exit within 30 s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by its PID.
        assert_eq!(
            unsafe { libc::kill(self.pid() as i32, sig) },
            0,
            "signal {sig}"
        );
    }

    fn wait_log(&self, needle: &str, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.logs().matches(needle).count() < n {
            if Instant::now() > deadline {
                bail!("kanari did not log {needle:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Writes a new configuration, sends SIGHUP, waits for the reload.
    fn reload(&self, yaml: &str) -> Result<()> {
        let before = self.logs().matches("config reloaded").count();
        let tmp = self.dir.join("kanari.yaml.tmp");
        std::fs::write(&tmp, with_control_socket(yaml, &self.dir))?;
        std::fs::rename(&tmp, &self.config)?;
        self.signal(libc::SIGHUP);
        self.wait_log("config reloaded", before + 1)
    }

    fn stop(mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }
}

impl Drop for CappedAgent {
    fn drop(&mut self) {
        // Under strace, the agent first: a killed tracer lets its tracee run on.
        if let Some(pid) = self.agent_pid().filter(|_| self.wrapped) {
            // SAFETY: killing the agent this test started, by its PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `yaml` with the control socket and the state directory in `dir`.
fn with_control_socket(yaml: &str, dir: &TempDir) -> String {
    format!(
        "{yaml}\ncontrol:\n  socket: {}\nstate:\n  dir: {}\n",
        dir.join("kanari.sock").display(),
        dir.join("state").display()
    )
}

/// Capability bit numbers (linux/capability.h).
fn capability_bit(name: &str) -> u32 {
    match name {
        "net_admin" => 12,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("no bit for {other}"),
    }
}

/// A process's capability sets from /proc/PID/status (`CapEff` etc.).
fn capability_sets(pid: u32) -> BTreeMap<String, u64> {
    read(Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.starts_with("Cap").then(|| {
                (
                    k.to_string(),
                    u64::from_str_radix(v.trim(), 16).expect("hex"),
                )
            })
        })
        .collect()
}

/// New connections from `n` fresh client addresses; the groups that answered.
fn groups_answering(topo: &Topology, first: u32, n: u32) -> BTreeMap<Group, usize> {
    let replies = topo
        .client
        .run_in(|| {
            runtime().block_on(run_bounded(
                (first..first + n).map(client_addr).collect(),
                16,
                |c| get_once(c, VIP),
            ))
        })
        .expect("the client namespace");
    let mut groups = BTreeMap::new();
    for r in replies {
        let r = r.expect("every request answered");
        assert_eq!(r.status, 200);
        *groups
            .entry(topo.group_of(r.backend).expect("a known backend"))
            .or_default() += 1;
    }
    groups
}

#[test]
fn the_agent_runs_with_exactly_its_three_capabilities() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 1,
        ..Default::default()
    })
    .expect("topology");
    // XDP in the driver, with TC ingress beside it and TC egress, and the
    // socket path's cgroup programs (on a test cgroup): every attach kind.
    let sock = SocketLbCgroup::new(&topo.tag).expect("a test cgroup");
    let socket_lb = sock.config().expect("its path");
    let cgroup = &sock.cgroup;
    let with_socket_lb = |percent: f64| format!("{}{socket_lb}", topo.config(percent, "", "xdp"));
    let yaml = with_socket_lb(50.0);

    // Without any one of them it stops at once, with the kernel's refusal. (These
    // run first: nothing of theirs is loaded, so nothing is left to adopt.)
    for missing in CAPABILITIES {
        let caps: Vec<&str> = CAPABILITIES.into_iter().filter(|c| *c != missing).collect();
        let mut agent = CappedAgent::spawn(&topo.node, &yaml, &caps, &[]);
        let status = agent.wait_exit().expect("kanari exits");
        let logs = agent.logs();
        assert!(
            !status.success(),
            "kanari ran without CAP_{}:\n{logs}",
            missing.to_uppercase()
        );
        let error = logs
            .lines()
            .find(|l| l.contains("ERROR"))
            .unwrap_or_else(|| panic!("no error logged without {missing}:\n{logs}"));
        assert!(
            error.contains("Operation not permitted") || error.contains("Permission denied"),
            "without CAP_{}: {error}",
            missing.to_uppercase()
        );
        // The verifier's reason, when it gave one, says more than the errno.
        let why = logs
            .lines()
            .find(|l| l.contains("prohibited"))
            .unwrap_or(error);
        let why: String = why.chars().take(200).collect();
        eprintln!("without CAP_{}: {why}", missing.to_uppercase());
        assert!(topo.attached_programs().expect("query").is_empty());
    }

    let mut agent = CappedAgent::spawn(&topo.node, &yaml, &CAPABILITIES, &[]);
    agent
        .wait_ready(&topo.node)
        .expect("kanari is ready with its three capabilities");
    let sets = capability_sets(agent.pid());
    let want = CAPABILITIES
        .iter()
        .fold(0u64, |m, c| m | 1 << capability_bit(c));
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(sets[set], want, "{set} of the running agent: {sets:?}");
    }
    assert_eq!(sets["CapEff"] & 1 << capability_bit("sys_admin"), 0);
    let attached = topo.attached_programs().expect("query");
    assert!(attached.iter().any(|p| p == "xdp"), "{attached:?}");
    assert_eq!(
        attached.iter().filter(|p| p.starts_with("tcx")).count(),
        2,
        "{attached:?}"
    );

    // A process in the cgroup dialling the VIP is steered at connect().
    let steered = tcp_requests(&topo.node, Some(cgroup), VIP, 20, 1).expect("the client runs");
    assert!(
        steered.len() == 20 && steered.iter().all(|l| l["ok"] == true),
        "requests through the socket path: {steered:?}"
    );

    // It steers, serves its control socket, and applies a reload (map writes).
    let before = groups_answering(&topo, 0, 200);
    assert!(
        before.get(&Group::Stable).is_some_and(|n| *n > 40)
            && before.get(&Group::Canary).is_some_and(|n| *n > 40),
        "a 50 % split: {before:?}"
    );
    let status = check(
        "kanari status",
        Command::new(kanari_bin())
            .arg("--socket")
            .arg(&agent.socket)
            .arg("status"),
    );
    assert!(
        status.contains("service web at 10.0.0.100:80: canary weight 50%"),
        "{status}"
    );
    agent.reload(&with_socket_lb(100.0)).expect("reloads");
    let after = groups_answering(&topo, 1000, 50);
    assert_eq!(
        after.get(&Group::Canary),
        Some(&50),
        "all new clients on the canary: {after:?}"
    );
    let status = agent.stop().expect("kanari stops");
    assert!(status.success(), "{status}");

    // As in a DaemonSet's rolling update or `systemctl restart`: the pinned data
    // path steers while no agent runs, and the next agent, with the same three
    // capabilities, adopts it.
    let alone = groups_answering(&topo, 2000, 50);
    assert_eq!(
        alone.get(&Group::Canary),
        Some(&50),
        "without an agent: {alone:?}"
    );
    let mut next = CappedAgent::spawn(&topo.node, &with_socket_lb(100.0), &CAPABILITIES, &[]);
    next.wait_ready(&topo.node)
        .expect("the next agent adopts the data path with its three capabilities");
    assert!(
        next.logs().contains("adopted the pinned attachment"),
        "{}",
        next.logs()
    );
    let adopted = groups_answering(&topo, 3000, 50);
    assert_eq!(
        adopted.get(&Group::Canary),
        Some(&50),
        "after adoption: {adopted:?}"
    );
    assert!(next.stop().expect("kanari stops").success());
    eprintln!(
        "kanari ran, steered, reloaded, and adopted its predecessor's pinned data path with exactly \
         CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (CapEff {want:#x})"
    );
}

/// The system calls the unit's `SystemCallFilter=` allows (one allow list, as
/// the unit writes it), expanded with `systemd-analyze syscall-filter`.
fn allowed_system_calls(unit: &str) -> BTreeSet<String> {
    fn expand(item: &str, out: &mut BTreeSet<String>) {
        if !item.starts_with('@') {
            out.insert(item.to_string());
            return;
        }
        let list = check(
            &format!("systemd-analyze syscall-filter {item}"),
            Command::new("systemd-analyze").args(["syscall-filter", "--no-pager", item]),
        );
        // The group's name, then its members; comments start with '#'.
        for member in list.lines().skip(1).map(str::trim) {
            if !member.is_empty() && !member.starts_with('#') {
                expand(member, out);
            }
        }
    }
    let filters = unit_values(unit, "SystemCallFilter");
    assert!(
        !filters.is_empty() && filters.iter().all(|f| !f.starts_with('~')),
        "one allow list: {filters:?}"
    );
    let mut allowed = BTreeSet::new();
    for item in filters.iter().flat_map(|f| f.split_whitespace()) {
        expand(item, &mut allowed);
    }
    allowed
}

/// The system calls in an strace log (`strace -f -o`) made after setpriv
/// exec'd kanari.
fn traced_calls(log: &Path) -> BTreeSet<String> {
    let bin = kanari_bin();
    let bin = bin.to_string_lossy();
    let text = read(log);
    let mut made = BTreeSet::new();
    let mut started = false;
    for line in text.lines() {
        // "PID name(args) = result", "PID <... name resumed>", "PID +++ exited", "PID --- SIG".
        let Some((_, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        if !started {
            started = call.starts_with(&format!("execve(\"{bin}\"")) && call.ends_with("= 0");
            continue;
        }
        let name: String = call
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && call[name.len()..].starts_with('(') {
            made.insert(name);
        }
    }
    assert!(
        started,
        "strace saw kanari start:\n{}",
        text.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    made
}

#[test]
fn the_unit_allows_every_system_call_the_agent_makes() {
    if !require_root() {
        return;
    }
    let unit = read(&deploy("systemd/kanari.service"));
    let allowed = allowed_system_calls(&unit);
    assert!(
        allowed.contains("bpf") && allowed.contains("openat"),
        "{allowed:?}"
    );

    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 1,
        ..Default::default()
    })
    .expect("topology");
    let trace = TempDir::new("strace");
    let yaml = topo.config(50.0, "", "xdp");

    // A first agent, in service: it steers, serves /metrics, answers on its
    // control socket, reloads, stops (its data path stays pinned).
    let first = trace.join("first.txt");
    let log = first.to_str().expect("a UTF-8 path");
    let under = ["strace", "-f", "-qq", "-o", log];
    let mut agent = CappedAgent::spawn(&topo.node, &yaml, &CAPABILITIES, &under);
    agent
        .wait_ready(&topo.node)
        .expect("kanari is ready under strace");
    groups_answering(&topo, 0, 50);
    let addr: SocketAddr = METRICS.parse().expect("an address");
    let metrics = topo
        .node
        .run_in(|| runtime().block_on(http_get(addr, "/metrics")))
        .expect("node namespace")
        .expect("GET /metrics");
    assert_eq!(metrics.0, 200);
    check(
        "kanari status",
        Command::new(kanari_bin())
            .arg("--socket")
            .arg(&agent.socket)
            .arg("status"),
    );
    let yaml = topo.config(20.0, "", "xdp");
    agent.reload(&yaml).expect("reloads");
    assert!(agent.stop().expect("kanari stops").success());
    // The next agent adopts the pinned data path.
    let second = trace.join("second.txt");
    let log = second.to_str().expect("a UTF-8 path");
    let under = ["strace", "-f", "-qq", "-o", log];
    let mut agent = CappedAgent::spawn(&topo.node, &yaml, &CAPABILITIES, &under);
    agent
        .wait_ready(&topo.node)
        .expect("kanari adopts the data path under strace");
    groups_answering(&topo, 100, 50);
    assert!(agent.stop().expect("kanari stops").success());

    let mut made = traced_calls(&first);
    made.extend(traced_calls(&second));
    assert!(made.contains("bpf"), "{made:?}");
    let forbidden: Vec<&String> = made.difference(&allowed).collect();
    assert!(
        forbidden.is_empty(),
        "kanari made system calls the unit's SystemCallFilter forbids: {forbidden:?}"
    );
    eprintln!(
        "kanari made {} distinct system calls, all allowed by the unit: {made:?}",
        made.len()
    );
}

// ---- every dashboard and alert expression against a real Prometheus ------------------

/// A real Prometheus in `ns` (the harness's), scraping the agent every second
/// as job "kanari" and evaluating `rules` every second.
struct TestPrometheus(Prometheus);

impl TestPrometheus {
    fn start(ns: &Netns, rules: &str) -> Result<Self> {
        Prometheus::start_with_rules(ns, &[METRICS], Some(rules)).map(TestPrometheus)
    }

    fn query(&self, ns: &Netns, promql: &str) -> Result<Vec<Value>> {
        self.0.samples(ns, promql)
    }

    /// Every rule Prometheus loaded, with its health and state.
    fn rules(&self, ns: &Netns) -> Result<Vec<LoadedRule>> {
        let data = self.0.api(ns, "/api/v1/rules")?;
        let mut out = Vec::new();
        for g in data["groups"].as_array().context("groups")? {
            for r in g["rules"].as_array().context("rules")? {
                out.push(LoadedRule {
                    name: r["name"].as_str().unwrap_or("?").to_string(),
                    alert: r["type"] == "alerting",
                    query: r["query"].as_str().unwrap_or_default().to_string(),
                    health: r["health"].as_str().unwrap_or_default().to_string(),
                    error: r["lastError"].as_str().unwrap_or_default().to_string(),
                    state: r["state"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
        Ok(out)
    }
}

#[derive(Debug)]
struct LoadedRule {
    name: String,
    alert: bool,
    query: String,
    health: String,
    error: String,
    state: String,
}

/// Grafana's variables as the test sets them: its service, every node, and a
/// one-minute window (several scrapes at the test's 1 s interval).
const VARIABLES: [(&str, &str); 6] = [
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__range", "5m"),
    ("service", "web"),
    ("instance", ".*"),
    ("job", "kanari"),
];

fn substitute(expr: &str) -> String {
    let mut out = expr.to_string();
    for (name, value) in VARIABLES {
        for form in [
            format!("${{{name}}}"),
            format!("[[{name}]]"),
            format!("${name}"),
        ] {
            out = out.replace(&form, value);
        }
    }
    assert!(!out.contains('$'), "an unknown variable in {expr:?}");
    out
}

/// Every panel query of the dashboard: (panel title, expression), nested rows included.
fn dashboard_expressions(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, out: &mut Vec<(String, String)>) {
        if let Some(panels) = v["panels"].as_array() {
            for p in panels {
                for t in p["targets"].as_array().into_iter().flatten() {
                    let expr = t["expr"]
                        .as_str()
                        .unwrap_or_else(|| panic!("a target without expr in {:?}", p["title"]));
                    out.push((
                        p["title"].as_str().unwrap_or("?").to_string(),
                        expr.to_string(),
                    ));
                }
                walk(p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The dashboard's `label_values(SELECTOR, LABEL)` variables: (name, selector, label).
fn dashboard_variables(dashboard: &Value) -> Vec<(String, String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .expect("a query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("not label_values(): {q}"));
            let (selector, label) = inner
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            (
                v["name"].as_str().expect("a name").to_string(),
                selector.trim().to_string(),
                label.trim().to_string(),
            )
        })
        .collect()
}

fn status_of(socket: &Path) -> (f64, RolloutStatus) {
    let body = runtime()
        .block_on(kanari::api::control_get(socket, "/v1/status"))
        .expect("status");
    let r: StatusReport = serde_json::from_slice(&body).expect("a status report");
    let s = &r.services[0];
    (
        s.canary_weight_percent,
        s.rollout.clone().expect("a rollout"),
    )
}

fn wait_rollout(
    socket: &Path,
    what: &str,
    done: impl Fn(f64, &RolloutStatus) -> bool,
) -> RolloutStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (w, r) = status_of(socket);
        if done(w, &r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached: weight {w}%, {r:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli(socket: &Path, args: &[&str]) {
    check(
        &format!("kanari {}", args.join(" ")),
        Command::new(kanari_bin())
            .arg("--socket")
            .arg(socket)
            .args(args),
    );
}

/// Evaluates `exprs` until each returns data or `secs` pass; the failures.
fn until_all_return_data(
    prom: &TestPrometheus,
    ns: &Netns,
    exprs: &[(String, String)],
    secs: u64,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let failures: Vec<String> = exprs
            .iter()
            .filter_map(|(what, q)| match prom.query(ns, q) {
                Ok(samples) if !samples.is_empty() => None,
                Ok(_) => Some(format!("{what}: no data for {q}")),
                Err(e) => Some(format!("{what}: {e:#}")),
            })
            .collect();
        if failures.is_empty() || Instant::now() > deadline {
            return failures;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until the expression of alert `name` returns data, then until the
/// alert is firing.
fn fires_alone(prom: &TestPrometheus, ns: &Netns, loaded: &[LoadedRule], name: &str) {
    let rule = loaded
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no rule {name}"));
    let failures = until_all_return_data(
        prom,
        ns,
        &[(format!("rule {name}"), rule.query.clone())],
        15,
    );
    assert!(failures.is_empty(), "{failures:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = prom
            .rules(ns)
            .expect("rules")
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| r.state)
            .unwrap_or_default();
        if state == "firing" {
            return;
        }
        assert!(Instant::now() < deadline, "{name} did not fire: {state}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn every_dashboard_and_alert_expression_returns_data() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let dashboard: Value = serde_json::from_str(&read(&deploy("grafana/kanari-dashboard.json")))
        .expect("dashboard JSON");
    let mut exprs: Vec<(String, String)> = dashboard_expressions(&dashboard)
        .into_iter()
        .map(|(panel, e)| (format!("panel {panel:?}"), substitute(&e)))
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    for (name, selector, label) in dashboard_variables(&dashboard) {
        exprs.push((
            format!("variable ${name} ({label})"),
            format!("count by ({label}) ({})", substitute(&selector)),
        ));
    }

    // A conntrack table of 1024 connections (2048 entries), which the load fills,
    // and a new-connection guard below the load, which sheds some SYNs (their
    // clients retry a second later): every alert has its cause.
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let base = topo.config(
        0.0,
        "    rollout: {steps: [10, 100], interval: 1s, checks_per_step: 1000, min_requests: 10, progress_deadline: 1h}\n",
        "tc",
    );
    assert!(base.contains("connections: 65536"));
    let yaml = base.replace(
        "connections: 65536",
        "connections: 1024\n  new_per_second: 150",
    );
    // The rules with a test-only `for: 1s`, so each alert reaches `firing`
    // here; promtool's unit tests hold their real durations.
    let rules: String = read(&deploy("prometheus/rules.yml"))
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 1s\n", &l[..l.len() - l.trim_start().len()]),
            None => format!("{l}\n"),
        })
        .collect();
    assert!(rules.contains("for: 1s"));
    let faults = std::env::temp_dir().join(format!("kanari-test-{}-faults", topo.tag));
    let _ = std::fs::remove_file(&faults);
    let _faults_cleanup = RemoveFile(faults.clone());

    let agent =
        Agent::start_env(&topo.node, &yaml, &[("KANARI_FAULTS", &faults)]).expect("kanari starts");
    let prom = TestPrometheus::start(&topo.node, &rules).expect("prometheus starts");
    let node = &topo.node;
    // Prometheus has scraped the counters at their start (the canary's requests,
    // the reload failures at 0) before anything happens: rates and increases
    // need a sample before the change.
    let scraped = until_all_return_data(
        &prom,
        node,
        &[(
            "the first scrapes".into(),
            "count_over_time(kanari_config_reload_failures_total[1m]) >= 2 and kanari_config_reload_failures_total == 0".into(),
        )],
        20,
    );
    assert!(scraped.is_empty(), "{scraped:?}");
    // A promotion (no traffic yet), an operator's rollback, then the rollout
    // again from its first step (a promoted canary is not started again).
    cli(&agent.socket, &["promote", "web"]);
    wait_rollout(&agent.socket, "promotion", |_, r| r.phase == "promoted");
    cli(&agent.socket, &["abort", "web"]);
    cli(&agent.socket, &["rollout", "start", "web"]);
    wait_rollout(&agent.socket, "a new rollout", |w, r| {
        r.phase == "progressing" && w == 10.0
    });
    // Healthy checks, so the judges have values and limits.
    let load = Load::start(&topo.client, VIP, 400.0, 64, 0).expect("load");
    wait_rollout(&agent.socket, "a passing check", |_, r| {
        !r.last_check.is_empty()
    });
    // The canary fails: the critical path rolls it back.
    topo.canary_server().behavior.set_error_rate(1.0);
    let r = wait_rollout(&agent.socket, "the rollback", |_, r| {
        r.phase == "rolled_back"
    });
    eprintln!("rolled back: {}", r.reason);
    // A reload that is rejected.
    agent
        .reload_rejected("services: [not a service]\n")
        .expect("the reload is rejected");

    // Every rule loads and evaluates; every panel, variable and rule returns data.
    let loaded = prom.rules(node).expect("rules");
    assert_eq!(
        loaded.len(),
        yaml_file(&deploy("prometheus/rules.yml"))["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .map(|g| g["rules"].as_array().map_or(0, Vec::len))
            .sum::<usize>(),
        "Prometheus loaded every rule: {loaded:?}"
    );
    let down = "KanariAgentDown";
    // Has its own scenario below: map writes failing.
    let sync = "KanariDatapathOutOfSync";
    for r in loaded.iter().filter(|r| r.name != down && r.name != sync) {
        exprs.push((format!("rule {}", r.name), r.query.clone()));
    }
    let failures = until_all_return_data(&prom, node, &exprs, 40);
    if !failures.is_empty() {
        // What the alerts compare, to tell a missing series from a threshold not reached.
        let seen: Vec<String> = [
            "kanari_conntrack_entries",
            "sum by (version, class) (kanari_requests_total{service=\"web\"})",
            "kanari_config_reload_failures_total",
            "kanari_rollout_phase == 1",
            "kanari_datapath_packets_total{action=\"shed\"}",
            "sum by (job, service) (rate(kanari_requests_total{class=\"5xx\",version=\"canary\"}[5m]))",
            "sum by (job, service) (rate(kanari_requests_total{version=\"canary\"}[5m]))",
            "kanari_requests_total{class=\"5xx\",version=\"canary\"}[1m]",
        ]
        .iter()
        .map(|q| format!("{q}: {:?}", prom.query(node, q)))
        .collect();
        panic!(
            "expressions without data:\n{}\nseries:\n{}",
            failures.join("\n"),
            seen.join("\n")
        );
    }
    // Every alert but the agent's own is firing, every rule healthy.
    let deadline = Instant::now() + Duration::from_secs(10);
    let quiet = loop {
        let loaded = prom.rules(node).expect("rules");
        for r in &loaded {
            assert_eq!(
                r.health, "ok",
                "rule {} fails to evaluate: {}",
                r.name, r.error
            );
        }
        let quiet: Vec<String> = loaded
            .iter()
            .filter(|r| r.alert && r.name != down && r.name != sync && r.state != "firing")
            .map(|r| format!("{} ({})", r.name, r.state))
            .collect();
        if quiet.is_empty() || Instant::now() > deadline {
            break quiet;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(quiet.is_empty(), "alerts that are not firing: {quiet:?}");

    // Map writes fail: the operator's weight does not reach the kernel, the
    // agent retries every tick, and KanariDatapathOutOfSync fires.
    std::fs::write(&faults, "map-writes\n").expect("switch the fault on");
    let (ok, out) = kanari_tests::control::cli(&agent.socket, &["set-weight", "web", "5"]);
    assert!(!ok && out.contains("does not hold it yet"), "{out}");
    fires_alone(&prom, node, &loaded, sync);
    std::fs::remove_file(&faults).expect("switch the fault off");
    eprintln!(
        "{} expressions returned data (dashboard panels, variables and rules); every alert fired",
        exprs.len()
    );

    // The agent stops: `up` is 0 and KanariAgentDown fires.
    drop(load);
    agent.stop().expect("kanari stops");
    fires_alone(&prom, node, &loaded, down);
    eprintln!(
        "{down} fired after the agent stopped; the test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
