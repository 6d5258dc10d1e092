//! The in-process Kubernetes API server (`kanari_tests::kubeapi`), driven
//! by the real kubectl (the one `cargo xtask test` installs) and by bare
//! HTTP: what kubectl shows and refuses, and what a watch, a paginated list
//! and optimistic concurrency look like on the wire. No privileges needed.

#[path = "kubeapi/protocol.rs"]
mod protocol;
#[path = "kubeapi/wire.rs"]
mod wire;

use kanari_tests::kubeapi::{ApiServer, Config};
use kanari_tests::python::python_tool;
use serde_json::json;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

const CRD: &str = kanari_tests::kubeapi::CANARY_RELEASE_CRD;
const CR: &str = "kanari.dev/v1alpha1";
const CRS: &str = "/apis/kanari.dev/v1alpha1/namespaces/shop/canaryreleases";

fn server_with(config: Config) -> ApiServer {
    ApiServer::serve_with(TcpListener::bind("127.0.0.1:0").unwrap(), config).unwrap()
}

fn server() -> ApiServer {
    server_with(Config::default())
}

/// kubectl against one server, with its own discovery cache (removed on Drop).
struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn new(s: &ApiServer) -> Kubectl {
        let cache = std::env::temp_dir().join(format!(
            "kanari-kubectl-cache-{}-{}",
            std::process::id(),
            s.addr().port()
        ));
        Kubectl {
            kubeconfig: s.kubeconfig(),
            cache,
        }
    }

    fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write as _;
        let mut cmd = Command::new(python_tool("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl runs");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// `kubectl apply -f -` of `yaml`, asserting success; its stdout.
    fn apply(&self, yaml: &str) -> String {
        self.ok_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    /// Runs kubectl, asserting success; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_stdin(args, None)
    }

    fn ok_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run_stdin(args, stdin);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {stdout}{stderr}"
        );
        stdout.into_owned()
    }

    /// Runs kubectl, asserting failure; its stderr.
    fn fails_stdin(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run_stdin(args, Some(stdin));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.cache);
    }
}

fn namespace(s: &ApiServer, name: &str) {
    s.apply_json(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
        .unwrap();
}

fn release_yaml(name: &str, revision: &str) -> String {
    format!(
        "apiVersion: kanari.dev/v1alpha1\nkind: CanaryRelease\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  \
         service: web\n  stable: web-stable\n  canary: web-canary\n  revision: \"{revision}\"\n  \
         rollout: {{steps: [5, 25, 50, 100], interval: 30s}}\n"
    )
}

/// A server with the CRD applied by kubectl and namespace `shop`.
fn with_crd() -> (ApiServer, Kubectl) {
    let s = server();
    let k = Kubectl::new(&s);
    let out = k.ok(&["apply", "-f", CRD]);
    assert_eq!(
        out.trim(),
        "customresourcedefinition.apiextensions.k8s.io/canaryreleases.kanari.dev created"
    );
    namespace(&s, "shop");
    (s, k)
}

/// A CanaryRelease in `shop`, as stored.
fn release(s: &ApiServer, name: &str) -> Option<serde_json::Value> {
    s.get_json(CR, "CanaryRelease", Some("shop"), name)
}

/// The rows of `kubectl get` output, split on runs of spaces.
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn kubectl_applies_a_release_and_gets_it_with_its_printer_columns() {
    let (s, k) = with_crd();
    assert_eq!(
        k.apply(&release_yaml("web", "web:1.4.2")).trim(),
        "canaryrelease.kanari.dev/web created"
    );
    let status = json!({"status": {"phase": "Progressing", "canaryWeight": 25, "step": 1}});
    let r = wire::patch(
        s.addr(),
        &format!("{CRS}/web/status"),
        "application/merge-patch+json",
        &status,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let table = rows(&k.ok(&["get", "canaryreleases", "-n", "shop"]));
    assert_eq!(table[0], ["NAME", "PHASE", "WEIGHT", "STEP", "AGE"]);
    assert_eq!(table[1][..4], ["web", "Progressing", "25", "1"]);
    assert!(table[1][4].ends_with('s'), "an age: {:?}", table[1]);
    let wide = rows(&k.ok(&["get", "kcr", "-n", "shop", "-o", "wide"]));
    assert_eq!(
        wide[0],
        ["NAME", "PHASE", "WEIGHT", "STEP", "REVISION", "AGE"]
    );
    assert_eq!(wide[1][4], "web:1.4.2");
    let all = rows(&k.ok(&["get", "kcr", "-A"]));
    assert_eq!(all[1][..2], ["shop", "web"]);
}

#[test]
fn a_second_kubectl_apply_patches_the_change_and_raises_the_generation() {
    let (s, k) = with_crd();
    k.apply(&release_yaml("web", "web:1.4.2"));
    let before = release(&s, "web").unwrap();
    let out = k.apply(&release_yaml("web", "web:1.4.3"));
    assert_eq!(out.trim(), "canaryrelease.kanari.dev/web configured");
    let after = release(&s, "web").unwrap();
    assert_eq!(after["spec"]["revision"], "web:1.4.3");
    assert_eq!(
        after["metadata"]["generation"].as_i64(),
        before["metadata"]["generation"].as_i64().map(|g| g + 1)
    );
    let again = k.apply(&release_yaml("web", "web:1.4.3"));
    assert_eq!(again.trim(), "canaryrelease.kanari.dev/web unchanged");
    let same = release(&s, "web").unwrap();
    assert_eq!(
        same["metadata"]["resourceVersion"], after["metadata"]["resourceVersion"],
        "a no-op apply writes nothing"
    );
}

#[test]
fn kubectl_patch_merges_and_a_failing_json_patch_test_is_refused() {
    let (s, k) = with_crd();
    k.apply(&release_yaml("web", "r1"));
    let out = k.ok(&[
        "patch",
        "canaryrelease",
        "web",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]);
    assert_eq!(out.trim(), "canaryrelease.kanari.dev/web patched");
    let web = release(&s, "web").unwrap();
    assert_eq!(
        (
            web["spec"]["paused"].as_bool(),
            web["metadata"]["generation"].as_i64()
        ),
        (Some(true), Some(2))
    );
    assert_eq!(
        k.ok(&[
            "get",
            "kcr",
            "web",
            "-n",
            "shop",
            "-o",
            "jsonpath={.spec.paused}"
        ]),
        "true"
    );
    // A custom resource has no strategic merge patch, kubectl's default type.
    let smp = k.fails_stdin(
        &[
            "patch",
            "kcr",
            "web",
            "-n",
            "shop",
            "-p",
            r#"{"spec":{"paused":false}}"#,
        ],
        "",
    );
    assert!(
        smp.contains("UnsupportedMediaType") || smp.contains("is not supported"),
        "{smp}"
    );
    let json_patch = |p: &str| {
        let args = ["patch", "kcr", "web", "-n", "shop", "--type=json", "-p", p];
        k.run_stdin(&args, None)
    };
    let failed = json_patch(r#"[{"op":"test","path":"/spec/paused","value":false}]"#);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !failed.status.success() && stderr.contains("the server rejected our request"),
        "{stderr}"
    );
    let passed = json_patch(
        r#"[{"op":"test","path":"/spec/paused","value":true},{"op":"replace","path":"/spec/paused","value":false}]"#,
    );
    assert!(passed.status.success());
    assert_eq!(release(&s, "web").unwrap()["spec"]["paused"], false);
}

#[test]
fn kubectl_apply_refuses_a_schema_invalid_release_naming_each_field() {
    let (s, k) = with_crd();
    let bad = "apiVersion: kanari.dev/v1alpha1\nkind: CanaryRelease\nmetadata: {name: bad, namespace: shop}\nspec:\n  \
               service: web\n  stable: web-stable\n  affinity: sideways\n  rollout: {steps: [150]}\n";
    let err = k.fails_stdin(&["apply", "-f", "-"], bad);
    assert!(
        err.contains("The CanaryRelease \"bad\" is invalid"),
        "{err}"
    );
    assert!(err.contains("spec.canary: Required value"), "{err}");
    assert!(err.contains("spec.affinity: Unsupported value: \"sideways\": supported values: \"client\", \"connection\""), "{err}");
    assert!(
        err.contains("spec.rollout.steps[0]: Invalid value: 150"),
        "{err}"
    );
    assert!(release(&s, "bad").is_none());
    let bad_name = release_yaml("Web", "r1");
    let err = k.fails_stdin(&["apply", "-f", "-"], &bad_name);
    assert!(
        err.contains("metadata.name: Invalid value: \"Web\""),
        "{err}"
    );
}

#[test]
fn unknown_fields_are_refused_by_default_kubectl_and_pruned_when_not_validated() {
    let (s, k) = with_crd();
    let unknown = format!("{}  foo: 1\n", release_yaml("unk", "r1"));
    let err = k.fails_stdin(&["apply", "-f", "-"], &unknown);
    assert!(
        err.contains("strict decoding error: unknown field \"spec.foo\""),
        "{err}"
    );
    assert!(release(&s, "unk").is_none());
    let out = k.run_stdin(&["apply", "--validate=warn", "-f", "-"], Some(&unknown));
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field \"spec.foo\""),
        "a warning"
    );
    k.ok(&["delete", "kcr", "unk", "-n", "shop"]);
    k.ok_stdin(&["apply", "--validate=false", "-f", "-"], Some(&unknown));
    let stored = release(&s, "unk").unwrap();
    assert_eq!(stored["spec"].get("foo"), None, "pruned: {stored}");
    assert_eq!(stored["spec"]["service"], "web");
}

#[test]
fn kubectl_lists_endpointslices_by_label_and_deletes() {
    let (s, k) = with_crd();
    let slice = |name: &str, svc: &str| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    };
    s.apply_json(slice("web-stable-a", "web-stable")).unwrap();
    s.apply_json(slice("web-canary-a", "web-canary")).unwrap();
    let got = rows(&k.ok(&[
        "get",
        "endpointslices",
        "-n",
        "shop",
        "-l",
        "kubernetes.io/service-name=web-stable",
    ]));
    assert_eq!(
        got.iter()
            .skip(1)
            .map(|r| r[0].as_str())
            .collect::<Vec<_>>(),
        ["web-stable-a"]
    );
    let names = k.ok(&[
        "get",
        "endpointslices",
        "-n",
        "shop",
        "-l",
        "kubernetes.io/service-name in (web-stable,web-canary)",
        "-o",
        "name",
    ]);
    assert_eq!(names.lines().count(), 2, "{names}");
    k.apply(&release_yaml("web", "r1"));
    assert_eq!(
        k.ok(&["delete", "kcr", "web", "-n", "shop"]).trim(),
        "canaryrelease.kanari.dev \"web\" deleted from shop namespace"
    );
    assert!(release(&s, "web").is_none());
    let err = k.fails_stdin(&["delete", "kcr", "web", "-n", "shop"], "");
    assert!(
        err.contains("canaryreleases.kanari.dev \"web\" not found"),
        "{err}"
    );
    k.ok(&["delete", "endpointslice", "web-stable-a", "-n", "shop"]);
    assert_eq!(
        s.list_json("discovery.k8s.io/v1", "EndpointSlice", Some("shop"))
            .len(),
        1
    );
}

#[test]
fn kubectl_creates_from_protobuf_and_applies_server_side_with_conflicts() {
    let (s, k) = with_crd();
    assert_eq!(
        k.ok(&["create", "namespace", "team"]).trim(),
        "namespace/team created"
    );
    let ns = s.get_json("v1", "Namespace", None, "team").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "team"
    );
    k.ok(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "team",
        "--from-literal=a=b",
    ]);
    assert_eq!(
        s.get_json("v1", "ConfigMap", Some("team"), "cfg").unwrap()["data"],
        json!({"a": "b"})
    );
    let applied = k.ok_stdin(
        &["apply", "--server-side", "-f", "-"],
        Some(&release_yaml("web", "r1")),
    );
    assert_eq!(
        applied.trim(),
        "canaryrelease.kanari.dev/web serverside-applied"
    );
    k.ok(&[
        "patch",
        "kcr",
        "web",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"spec":{"revision":"r2"}}"#,
    ]);
    let err = k.fails_stdin(
        &["apply", "--server-side", "-f", "-"],
        &release_yaml("web", "r3"),
    );
    assert!(err.contains("Apply failed with 1 conflict: conflict with \"kubectl-patch\" using kanari.dev/v1alpha1: .spec.revision"), "{err}");
    k.ok_stdin(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&release_yaml("web", "r3")),
    );
    assert_eq!(release(&s, "web").unwrap()["spec"]["revision"], "r3");
}
