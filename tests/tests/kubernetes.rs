//! End to end: backends from Kubernetes. The agent watches CanaryReleases,
//! Services and EndpointSlices on an API server (the tests' in-process one,
//! `kanari_tests::kubeapi`, speaking the real wire protocol), with no
//! service in its file; the test publishes the backend namespaces'
//! addresses as EndpointSlices and changes them under load, as the
//! EndpointSlice controller does when pods come and go.
//!
//! They need root (without it they fail; `KANARI_SKIP_PRIVILEGED=1` skips
//! them explicitly outside CI).

use std::{
    net::{SocketAddrV4, TcpListener},
    time::{Duration, Instant},
};

use kanari_common::maps::Group;
use kanari_tests::{
    agent::Agent,
    cgroup::SocketLbCgroup,
    control::{cli, report, scrape, sum, until},
    kubeapi::{ApiServer, canary_release_crd},
    load::{Load, unix_ms},
    netns::require_root,
    python::python_tool,
    socket_client::tcp_requests,
    topology::{NODE_IFACE, Topology, TopologyOptions, VIP},
};
use serde_json::{Value, json};

const NS: &str = "shop";
const SERVICE: &str = "shop.web";

fn service(name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"clusterIP": cluster_ip,
                 "ports": [{"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"}]},
    })
}

/// An endpoint's conditions as the EndpointSlice controller writes them.
#[derive(Clone, Copy)]
enum Pod {
    Ready,
    Terminating,
}

/// Service `service`'s one EndpointSlice with `endpoints`.
fn slice(service: &str, endpoints: &[(SocketAddrV4, Pod)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(a, pod)| {
            let (ready, terminating) = match pod {
                Pod::Ready => (true, false),
                Pod::Terminating => (false, true),
            };
            json!({"addresses": [a.ip().to_string()],
                   "conditions": {"ready": ready, "serving": true, "terminating": terminating}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": NS,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Two ready stable pods, one ready canary pod, and the release with `rollout`.
fn pods_and_release(api: &ApiServer, topo: &Topology, rollout: Value) {
    let (stable, canary) = (
        topo.backends_of(Group::Stable),
        topo.backends_of(Group::Canary),
    );
    api.apply_json(slice(
        "web-stable",
        &[(stable[0], Pod::Ready), (stable[1], Pod::Ready)],
    ))
    .expect("stable's slice");
    api.apply_json(slice("web-canary", &[(canary[0], Pod::Ready)]))
        .expect("canary's slice");
    api.apply_json(release(rollout)).expect("the CanaryRelease");
}

fn release(rollout: Value) -> Value {
    json!({
        "apiVersion": "kanari.dev/v1alpha1", "kind": "CanaryRelease",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"service": "web", "stable": "web-stable", "canary": "web-canary",
                 "revision": "web:2", "rollout": rollout},
    })
}

/// An API server on the node's loopback with the CRD, the namespace and
/// the three Services; the agent's configuration names it and nothing else.
fn cluster(topo: &Topology) -> (ApiServer, String) {
    let listener = topo
        .node
        .run_in(|| TcpListener::bind("127.0.0.1:0"))
        .expect("node namespace")
        .expect("a port");
    let api = ApiServer::serve(listener).expect("the API server");
    api.apply_json(canary_release_crd()).expect("the CRD");
    api.apply_json(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
        .expect("the namespace");
    for s in [
        service("web", &VIP.ip().to_string(), VIP.port()),
        service("web-stable", "10.96.0.11", 8080),
        service("web-canary", "10.96.0.12", 8080),
    ] {
        api.apply_json(s).expect("a Service");
    }
    let config = format!(
        "interfaces:\n  - name: {NODE_IFACE}\n    mode: tc\nconntrack:\n  connections: 65536\nbpf:\n  pin_dir: {}\nkubernetes:\n  kubeconfig: {}\n",
        topo.pin_dir().display(),
        api.kubeconfig().display()
    );
    (api, config)
}

/// [`cluster`] with the pods and a release held at its first step, 10 %.
fn cluster_at_10(topo: &Topology) -> (ApiServer, String) {
    let (api, config) = cluster(topo);
    pods_and_release(
        &api,
        topo,
        json!({"steps": [10, 100], "interval": "1h", "progress_deadline": "2h"}),
    );
    (api, config)
}

/// Milliseconds from `since_ms` until the first request sent after it that
/// `backend` answered, polling the load's outcomes for `secs`.
fn first_answer_from(load: &Load, backend: SocketAddrV4, since_ms: u64, secs: u64) -> u64 {
    until(secs, &format!("a request answered by {backend}"), || {
        load.outcomes()
            .iter()
            .filter(|o| o.sent_ms >= since_ms)
            .find(|o| o.result.as_ref().is_ok_and(|(b, _)| *b == backend))
            .map(|o| o.sent_ms - since_ms)
            .ok_or_else(|| "none yet".to_string())
    })
}

#[test]
fn endpoints_added_and_removed_under_load_reach_the_kernel_within_a_second_without_a_failed_request()
 {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions {
        stable: 3,
        canary: 1,
        ..Default::default()
    })
    .expect("topology");
    let stable = topo.backends_of(Group::Stable);
    let canary = topo.backends_of(Group::Canary);
    let (api, config) = cluster_at_10(&topo);

    let agent = Agent::start(&topo.node, &config).expect("kanari starts");
    let s = until(10, "the release steered at 10 %", || {
        let r = report(&agent.socket);
        r.services
            .into_iter()
            .find(|s| s.name == SERVICE && s.canary_weight_percent == 10.0)
            .ok_or_else(|| "not yet".to_string())
    });
    assert_eq!(s.vip, VIP.to_string());
    assert_eq!(s.versions[0].backends, 2, "{s:?}");
    assert_eq!(s.versions[1].backends, 1, "{s:?}");
    assert_eq!(
        s.rollout.as_ref().map(|r| r.revision.as_str()),
        Some("web:2")
    );

    let load = Load::start(&topo.client, VIP, 300.0, 30, 0).expect("load");
    std::thread::sleep(Duration::from_millis(500));

    // A pod added: its endpoint takes new connections.
    let added_ms = unix_ms();
    api.apply_json(slice(
        "web-stable",
        &[
            (stable[0], Pod::Ready),
            (stable[1], Pod::Ready),
            (stable[2], Pod::Ready),
        ],
    ))
    .expect("a stable pod added");
    let to_added = first_answer_from(&load, stable[2], added_ms, 5);

    // A pod terminating: no new connection reaches it.
    let removed_ms = unix_ms();
    api.apply_json(slice(
        "web-stable",
        &[
            (stable[0], Pod::Terminating),
            (stable[1], Pod::Ready),
            (stable[2], Pod::Ready),
        ],
    ))
    .expect("a stable pod terminating");
    std::thread::sleep(Duration::from_millis(1500));
    let last_to_removed = load
        .outcomes()
        .iter()
        .filter(|o| o.result.as_ref().is_ok_and(|(b, _)| *b == stable[0]))
        .map(|o| o.sent_ms)
        .max()
        .expect("it served before");
    let to_removed = last_to_removed.saturating_sub(removed_ms);

    // The canary's pods all gone (a restart): its share goes to stable and
    // the rollout holds at its step.
    let gone_ms = unix_ms();
    api.apply_json(slice("web-canary", &[]))
        .expect("the canary without endpoints");
    std::thread::sleep(Duration::from_millis(1500));
    let r = report(&agent.socket);
    let s = r
        .services
        .iter()
        .find(|s| s.name == SERVICE)
        .expect("steered");
    assert_eq!(s.versions[1].backends, 0, "{s:?}");
    let phase = s.rollout.as_ref().map(|r| r.phase.clone());
    assert_eq!(phase.as_deref(), Some("progressing"), "{s:?}");
    let outcomes = load.stop();
    let late_canary = outcomes
        .iter()
        .filter(|o| o.sent_ms > gone_ms + 1000)
        .filter(|o| o.result.as_ref().is_ok_and(|(b, _)| *b == canary[0]))
        .count();
    assert_eq!(late_canary, 0, "the canary without endpoints still served");

    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 200))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "endpoint added -> first request at it: {to_added} ms; terminating -> last new request at it: {to_removed} ms ({} requests, 0 failed)",
        outcomes.len()
    );
    assert!(to_added < 1000, "the added endpoint took {to_added} ms");
    assert!(
        to_removed < 1000,
        "the terminating endpoint took {to_removed} ms"
    );
    drop(agent);
}

#[test]
fn a_release_that_does_not_validate_names_its_field_and_an_edit_keeps_the_last_valid_one() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let (api, config) = cluster(&topo);
    // Valid for the CRD's schema, refused by kanari's validator: steps
    // must rise.
    pods_and_release(
        &api,
        &topo,
        json!({"steps": [50, 10, 100], "interval": "1h", "progress_deadline": "2h"}),
    );
    let agent = Agent::start(&topo.node, &config).expect("kanari starts");
    agent
        .wait_for("CanaryRelease refused", 1)
        .expect("the refusal is logged");
    let line = agent
        .logs()
        .into_iter()
        .find(|l| l.contains("CanaryRelease refused"))
        .expect("logged");
    assert!(line.contains("spec.rollout.steps"), "{line}");
    assert!(line.contains("shop/web"), "{line}");
    assert!(report(&agent.socket).services.is_empty());

    // Fixed: steered.
    api.apply_json(release(
        json!({"steps": [20, 100], "interval": "1h", "progress_deadline": "2h"}),
    ))
    .expect("fixed");
    until(10, "steered at 20 %", || {
        report(&agent.socket)
            .services
            .iter()
            .find(|s| s.name == SERVICE && s.canary_weight_percent == 20.0)
            .map(|_| ())
            .ok_or_else(|| "not yet".to_string())
    });
    // Broken again: the last valid reading stays in force.
    let started = Instant::now();
    api.apply_json(release(
        json!({"steps": [90, 10], "interval": "1h", "progress_deadline": "2h"}),
    ))
    .expect("broken again");
    agent
        .wait_for("CanaryRelease refused", 2)
        .expect("refused again");
    let s = report(&agent.socket);
    let s = s
        .services
        .iter()
        .find(|s| s.name == SERVICE)
        .expect("still steered");
    assert_eq!(s.canary_weight_percent, 20.0, "{s:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The release deleted: its service leaves.
    api.delete_json("kanari.dev/v1alpha1", "CanaryRelease", Some(NS), "web")
        .expect("deleted");
    until(10, "the service gone", || {
        if report(&agent.socket).services.is_empty() {
            Ok(())
        } else {
            Err("still there".to_string())
        }
    });
}

/// `kubectl` (the Python tools' one) run in the node's namespace, where the
/// API server listens, with its kubeconfig; stdout, or the failure.
fn kubectl(topo: &Topology, api: &ApiServer, args: &[&str]) -> Result<String, String> {
    let tool = python_tool("kubectl");
    let out = topo
        .node
        .command(tool.to_str().expect("a UTF-8 path"))
        .arg("--kubeconfig")
        .arg(api.kubeconfig())
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn release_status(api: &ApiServer) -> Value {
    api.get_json("kanari.dev/v1alpha1", "CanaryRelease", Some(NS), "web")
        .and_then(|r| r.get("status").cloned())
        .unwrap_or_default()
}

#[test]
fn the_leader_writes_the_status_kubectl_shows_and_a_patch_pauses_the_release() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let (api, config) = cluster(&topo);
    api.apply_json(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kanari"}}),
    )
    .expect("kanari's namespace");
    pods_and_release(
        &api,
        &topo,
        json!({"steps": [10, 100], "interval": "1h", "progress_deadline": "2h"}),
    );
    let config =
        format!("{config}  node: node-a\n  lease:\n    namespace: kanari\n    duration: 3s\n");
    let _agent = Agent::start(&topo.node, &config).expect("kanari starts");

    let status = until(10, "the status written", || {
        let s = release_status(&api);
        if s["phase"] == "Progressing" && s["canaryWeight"] == 10.0 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(status["leader"]["agent"], "node-a", "{status}");
    assert_eq!(status["step"], 0, "{status}");
    assert_eq!(status["observedGeneration"], 1, "{status}");
    assert_eq!(status["conditions"][0]["type"], "Ready", "{status}");
    assert_eq!(status["conditions"][0]["status"], "True", "{status}");
    let lease = api
        .get_json("coordination.k8s.io/v1", "Lease", Some("kanari"), "kanari")
        .expect("the lease");
    assert_eq!(lease["spec"]["holderIdentity"], "node-a", "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 3, "{lease}");

    // What an operator sees.
    let table = kubectl(&topo, &api, &["get", "canaryreleases", "-n", NS]).expect("kubectl get");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "WEIGHT", "STEP", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], ["web", "Progressing", "10", "0"], "{table}");

    // Paused by kubectl: the rollout holds, the status and an Event say so.
    kubectl(
        &topo,
        &api,
        &[
            "patch",
            "canaryrelease",
            "web",
            "-n",
            NS,
            "--type=merge",
            "-p",
            r#"{"spec":{"paused":true}}"#,
        ],
    )
    .expect("kubectl patch");
    let status = until(10, "paused", || {
        let s = release_status(&api);
        if s["phase"] == "Paused" {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(status["observedGeneration"], 2, "{status}");
    let event = until(10, "an Event", || {
        api.list_json("v1", "Event", Some(NS))
            .into_iter()
            .find(|e| e["reason"] == "Paused")
            .ok_or_else(|| "none yet".to_string())
    });
    assert_eq!(event["involvedObject"]["name"], "web", "{event}");
    assert_eq!(event["involvedObject"]["kind"], "CanaryRelease", "{event}");
    assert_eq!(event["source"]["host"], "node-a", "{event}");
}

/// Against a real cluster, `#[ignore]`d: the CRD and RBAC install, a
/// CanaryRelease is admitted (and a bad one refused, naming its fields),
/// the agent's watchers read it with the Services' real ClusterIPs and the
/// EndpointSlices' addresses, and kubectl shows the status. Everything it
/// creates is in a namespace of its own, deleted at the end. Run it with
///
/// ```sh
/// KANARI_KUBECONFIG=~/.kube/config cargo xtask test -- -p kanari-tests --test kubernetes -- --ignored real_cluster
/// ```
///
/// (kind, k3d or any cluster where you may create a CRD and a namespace).
#[test]
#[ignore = "needs a real cluster: KANARI_KUBECONFIG"]
fn real_cluster_admits_the_crd_and_a_release_and_the_watchers_read_it() {
    let kubeconfig = std::env::var("KANARI_KUBECONFIG")
        .expect("KANARI_KUBECONFIG: the kubeconfig of the cluster to test against");
    against(&kubeconfig, true);
}

/// The real-cluster test, run against the in-process API server on the
/// loopback (it allocates no ClusterIP: the test gives one), so the test
/// itself is known to work.
#[test]
fn the_real_cluster_test_passes_against_the_in_process_api_server() {
    let api = ApiServer::serve(TcpListener::bind("127.0.0.1:0").expect("a port")).expect("served");
    against(&api.kubeconfig().display().to_string(), false);
}

fn against(kubeconfig: &str, allocates_cluster_ips: bool) {
    let ns = format!("kanari-test-{}", std::process::id());
    let kubectl = |args: &[&str], stdin: Option<&str>| -> Result<String, String> {
        use std::io::Write as _;
        let mut child = std::process::Command::new(python_tool("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    struct Cleanup<'a>(&'a dyn Fn());
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let delete = || {
        let _ = kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
    };
    let _cleanup = Cleanup(&delete);
    let crd = kanari_tests::kubeapi::CANARY_RELEASE_CRD;
    kubectl(&["apply", "-f", crd], None).expect("the CRD installs");
    kubectl(
        &[
            "wait",
            "--for=condition=established",
            "crd/canaryreleases.kanari.dev",
            "--timeout=60s",
        ],
        None,
    )
    .expect("the CRD is established");
    kubectl(&["create", "namespace", &ns], None).expect("a namespace");
    let objects = [
        service("web", "10.96.0.10", 80),
        service("web-stable", "10.96.0.11", 8080),
        service("web-canary", "10.96.0.12", 8080),
        slice(
            "web-stable",
            &[("10.250.0.1:8080".parse().expect("addr"), Pod::Ready)],
        ),
        slice(
            "web-canary",
            &[("10.250.0.2:8080".parse().expect("addr"), Pod::Ready)],
        ),
        release(json!({"steps": [10, 100], "interval": "1h", "progress_deadline": "2h"})),
    ];
    for mut o in objects {
        o["metadata"]["namespace"] = json!(ns);
        if o["kind"] == "Service" && allocates_cluster_ips {
            o["spec"]
                .as_object_mut()
                .expect("a spec")
                .remove("clusterIP");
        }
        if o["kind"] == "EndpointSlice" {
            o["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] =
                json!("kanari-tests");
        }
        kubectl(&["apply", "-f", "-"], Some(&o.to_string())).expect("applied");
    }
    let mut bad = release(json!({"steps": [150]}));
    bad["metadata"]["namespace"] = json!(ns);
    bad["metadata"]["name"] = json!("bad");
    bad["spec"]["affinity"] = json!("sideways");
    let refused = kubectl(&["apply", "-f", "-"], Some(&bad.to_string())).expect_err("refused");
    assert!(refused.contains("spec.affinity"), "{refused}");
    assert!(refused.contains("spec.rollout.steps[0]"), "{refused}");

    // The agent's own watchers, on this cluster.
    let ip = kubectl(
        &[
            "get",
            "service",
            "web",
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    )
    .expect("the ClusterIP");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let found = rt.block_on(async {
        let k = kanari::config::Kubernetes {
            kubeconfig: Some(std::path::PathBuf::from(kubeconfig)),
            node: Some("kanari-test".into()),
            lease_namespace: Some(ns.clone()),
            lease_name: "kanari".into(),
            lease_duration: Duration::from_secs(15),
            advertise: None,
        };
        let client = kanari::discovery::watch::client(&k)
            .await
            .expect("a client");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        kanari::discovery::watch::spawn(client, tx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let reading = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("a reading within 30 s")
                .expect("the watchers run");
            if let Some(d) = reading.into_iter().find(|d| d.key == format!("{ns}/web")) {
                break d;
            }
        }
    });
    let r = found.release.expect("complete");
    assert_eq!(r.service["vip"], json!(format!("{ip}:80")));
    assert_eq!(r.service["stable"]["backends"], json!(["10.250.0.1:8080"]));
    assert_eq!(r.service["canary"]["backends"], json!(["10.250.0.2:8080"]));

    // The status, as the leader writes it, and what kubectl shows.
    kubectl(
        &[
            "patch",
            "canaryrelease",
            "web",
            "-n",
            &ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Progressing","canaryWeight":10,"step":0}}"#,
        ],
        None,
    )
    .expect("the status subresource");
    let table = kubectl(&["get", "canaryreleases", "-n", &ns], None).expect("get");
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], ["web", "Progressing", "10", "0"], "{table}");
}

#[test]
fn an_external_ip_of_the_service_takes_the_cluster_ip_s_weight() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let canary = topo.backends_of(Group::Canary);
    let (api, config) = cluster(&topo);
    let external: SocketAddrV4 = "10.0.0.200:80".parse().expect("an address");
    topo.node
        .ip(&["addr", "add", &format!("{}/32", external.ip()), "dev", "lo"])
        .expect("the external IP on the node");
    let mut web = service("web", &VIP.ip().to_string(), VIP.port());
    web["spec"]["externalIPs"] = json!([external.ip().to_string()]);
    api.apply_json(web).expect("web with an external IP");
    pods_and_release(
        &api,
        &topo,
        json!({"steps": [10, 100], "interval": "1h", "progress_deadline": "2h"}),
    );
    let agent = Agent::start(&topo.node, &config).expect("kanari starts");
    let at = |percent: f64| {
        until(10, &format!("both VIPs at {percent} %"), || {
            let r = report(&agent.socket);
            let w: Vec<(String, String, f64)> = r
                .services
                .iter()
                .map(|s| (s.name.clone(), s.vip.clone(), s.canary_weight_percent))
                .collect();
            let both = w.len() == 2 && w.iter().all(|(_, _, p)| *p == percent);
            if both { Ok(w) } else { Err(format!("{w:?}")) }
        })
    };
    let w = at(10.0);
    assert!(
        w.iter()
            .any(|(n, v, _)| n == "shop.web.vip-10-0-0-200-80" && *v == external.to_string()),
        "{w:?}"
    );
    // The rollout's weight is the external IP's too.
    let (ok, out) = cli(&agent.socket, &["set-weight", SERVICE, "40"]);
    assert!(ok, "{out}");
    at(40.0);
    // Clients of the external IP are split like the ClusterIP's.
    let load = Load::start(&topo.client, external, 300.0, 30, 0).expect("load");
    std::thread::sleep(Duration::from_secs(4));
    let outcomes = load.stop();
    let n = outcomes.len() as f64;
    let on_canary = outcomes
        .iter()
        .filter(|o| o.result.as_ref().is_ok_and(|(b, _)| *b == canary[0]))
        .count() as f64;
    assert!(outcomes.iter().all(|o| matches!(o.result, Ok((_, 200)))));
    let bound = 3.29 * (0.4 * 0.6 / n).sqrt();
    assert!(
        (on_canary / n - 0.4).abs() <= bound,
        "{on_canary} of {n} at the canary through the external IP"
    );
}

#[test]
fn a_process_on_the_node_dialling_the_cluster_ip_follows_the_release_through_the_socket_path() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let (_api, config) = cluster_at_10(&topo);
    // A pod's (or a host process's) connect() to the ClusterIP, as the
    // DaemonSet's socket_lb sees it: from a cgroup under the one configured.
    let sock = SocketLbCgroup::new(&topo.tag).expect("a test cgroup");
    let config = format!("{config}{}", sock.config().expect("its path"));
    let cgroup = &sock.cgroup;
    let agent = Agent::start(&topo.node, &config).expect("kanari starts");
    let groups_at = |percent: &str| {
        let (ok, out) = cli(&agent.socket, &["set-weight", SERVICE, percent]);
        assert!(ok, "{out}");
        let lines = tcp_requests(&topo.node, Some(cgroup), VIP, 50, 1).expect("the client runs");
        assert!(
            lines
                .iter()
                .all(|l| l["ok"] == true && l["peer"] == VIP.to_string()),
            "{lines:?}"
        );
        lines
            .iter()
            .map(|l| {
                let b: SocketAddrV4 = l["backend"]
                    .as_str()
                    .expect("backend")
                    .parse()
                    .expect("an address");
                topo.group_of(b).expect("one of the release's pods")
            })
            .collect::<std::collections::BTreeSet<Group>>()
    };
    assert_eq!(groups_at("100"), [Group::Canary].into());
    assert_eq!(groups_at("0"), [Group::Stable].into());
    // Counted by the socket path (read on the agent's next tick).
    until(5, "the release's requests on the socket path", || {
        let counted = sum(
            &scrape(&topo.node),
            "kanari_requests_total",
            &[("service", SERVICE), ("path", "socket")],
        );
        (counted == 100.0)
            .then_some(())
            .ok_or(format!("{counted} of 100"))
    });
}
