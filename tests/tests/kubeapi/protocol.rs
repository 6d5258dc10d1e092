//! The kubeapi server on the wire, as kube-rs will see it: list then watch
//! from the list's resourceVersion, bookmarks, 410 after compaction,
//! streaming lists, selector watches, pagination, optimistic concurrency,
//! the status subresource, field validation, and an outage.

use super::wire::{self, Watch};
use super::{CR, CRD, CRS, namespace, server, server_with};
use kanari_tests::kubeapi::{ApiServer, Config};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/shop/leases";
const WAIT: Duration = Duration::from_secs(10);

fn lease(name: &str, holder: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": "2026-12-04T01:02:03.123456Z"}})
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a resourceVersion")
}

fn created(s: &ApiServer, path: &str, body: &Value) -> Value {
    let r = wire::post(s.addr(), path, body);
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

/// The next event that is not a bookmark.
fn next_change(w: &mut Watch) -> Value {
    loop {
        let e = w.next(WAIT).expect("an event");
        if e["type"] != "BOOKMARK" {
            return e;
        }
    }
}

fn crd_with_release(s: &ApiServer) {
    let crd: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(CRD).unwrap()).unwrap();
    s.apply_json(crd).unwrap();
    namespace(s, "shop");
}

fn release() -> Value {
    json!({"apiVersion": CR, "kind": "CanaryRelease", "metadata": {"name": "web"},
        "spec": {"service": "web", "stable": "web-stable", "canary": "web-canary", "revision": "r1"}})
}

#[test]
fn a_watch_from_a_lists_resource_version_sees_every_change_in_order_then_bookmarks() {
    let s = server_with(Config {
        bookmark_interval: Duration::from_millis(200),
    });
    namespace(&s, "shop");
    created(&s, LEASES, &lease("a", "x"));
    let list = wire::get(s.addr(), LEASES);
    assert_eq!(
        (
            list.body["kind"].as_str(),
            list.body["items"].as_array().map(Vec::len)
        ),
        (Some("LeaseList"), Some(1))
    );
    let from = rv(&list.body);
    let mut w = Watch::open(
        s.addr(),
        &format!("{LEASES}?watch=true&resourceVersion={from}&allowWatchBookmarks=true"),
    );
    assert_eq!(w.status, 200);
    created(&s, LEASES, &lease("b", "y"));
    let mut a = wire::get(s.addr(), &format!("{LEASES}/a")).body;
    a["spec"]["holderIdentity"] = json!("z");
    assert_eq!(wire::put(s.addr(), &format!("{LEASES}/a"), &a).status, 200);
    assert_eq!(
        wire::request(
            s.addr(),
            "DELETE",
            &format!("{LEASES}/b"),
            "application/json",
            None
        )
        .status,
        200
    );
    let events: Vec<Value> = (0..3).map(|_| next_change(&mut w)).collect();
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]);
    let rvs: Vec<u64> = events.iter().map(|e| rv(&e["object"])).collect();
    assert!(
        rvs.windows(2).all(|p| p[0] < p[1]) && rvs[0] > from,
        "{rvs:?}"
    );
    assert_eq!(events[1]["object"]["spec"]["holderIdentity"], "z");
    let bookmark = w.next(WAIT).expect("a bookmark");
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Lease");
    assert_eq!(rv(&bookmark["object"]), s.resource_version());
    let mut short = Watch::open(
        s.addr(),
        &format!("{LEASES}?watch=1&resourceVersion={from}&timeoutSeconds=1"),
    );
    assert!(short.ends_within(WAIT), "timeoutSeconds ends the stream");
}

#[test]
fn a_watch_or_continue_from_compacted_history_gets_410() {
    let s = server();
    namespace(&s, "shop");
    let old = rv(&created(&s, LEASES, &lease("a", "x")));
    created(&s, LEASES, &lease("b", "x"));
    let page = wire::get(s.addr(), &format!("{LEASES}?limit=1"));
    let token = page.body["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    assert_eq!(page.body["metadata"]["remainingItemCount"], 1);
    created(&s, LEASES, &lease("c", "x"));
    let rest = wire::get(s.addr(), &format!("{LEASES}?limit=5&continue={token}"));
    let names: Vec<&str> = rest.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["b"],
        "a continued list is the first page's snapshot"
    );
    assert_eq!(
        rest.body["metadata"]["resourceVersion"],
        page.body["metadata"]["resourceVersion"]
    );
    s.compact();
    let mut w = Watch::open(
        s.addr(),
        &format!("{LEASES}?watch=true&resourceVersion={old}"),
    );
    let e = w.next(WAIT).expect("an ERROR event");
    assert_eq!(
        (
            e["type"].as_str(),
            e["object"]["code"].as_i64(),
            e["object"]["reason"].as_str()
        ),
        (Some("ERROR"), Some(410), Some("Expired"))
    );
    assert!(w.ends_within(WAIT));
    let gone = wire::get(s.addr(), &format!("{LEASES}?limit=5&continue={token}"));
    assert_eq!(
        (gone.status, gone.body["reason"].as_str()),
        (410, Some("Expired"))
    );
    let mut now = Watch::open(
        s.addr(),
        &format!(
            "{LEASES}?watch=true&resourceVersion={}",
            s.resource_version()
        ),
    );
    created(&s, LEASES, &lease("d", "x"));
    assert_eq!(next_change(&mut now)["object"]["metadata"]["name"], "d");
}

#[test]
fn a_streaming_list_and_a_selector_watch_behave_as_a_real_server() {
    let s = server();
    namespace(&s, "shop");
    created(&s, LEASES, &lease("a", "x"));
    created(&s, LEASES, &lease("b", "x"));
    let q = "watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&labelSelector=app%3Dweb";
    let mut w = Watch::open(s.addr(), &format!("{LEASES}?{q}"));
    let initial: Vec<Value> = (0..3).map(|_| w.next(WAIT).unwrap()).collect();
    assert_eq!(
        initial
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["ADDED", "ADDED", "BOOKMARK"]
    );
    assert_eq!(
        initial[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let mut a = wire::get(s.addr(), &format!("{LEASES}/a")).body;
    a["metadata"]["labels"]["app"] = json!("db");
    assert_eq!(wire::put(s.addr(), &format!("{LEASES}/a"), &a).status, 200);
    let left = next_change(&mut w);
    assert_eq!(
        (
            left["type"].as_str(),
            left["object"]["metadata"]["name"].as_str()
        ),
        (Some("DELETED"), Some("a"))
    );
    let bad = wire::get(
        s.addr(),
        &format!("{LEASES}?watch=true&sendInitialEvents=true"),
    );
    assert_eq!(
        (bad.status, bad.body["reason"].as_str()),
        (422, Some("Invalid"))
    );
}

#[test]
fn two_puts_with_the_same_resource_version_give_one_200_and_one_409() {
    let s = server();
    namespace(&s, "shop");
    let base = created(&s, LEASES, &lease("leader", "nobody"));
    let barrier = Arc::new(Barrier::new(2));
    let addr = s.addr();
    let handles: Vec<_> = ["agent-1", "agent-2"]
        .into_iter()
        .map(|who| {
            let (mut body, barrier) = (base.clone(), barrier.clone());
            body["spec"]["holderIdentity"] = json!(who);
            std::thread::spawn(move || {
                barrier.wait();
                wire::put(addr, &format!("{LEASES}/leader"), &body)
            })
        })
        .collect();
    let mut results: Vec<wire::Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.sort_by_key(|r| r.status);
    assert_eq!(
        results.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 409]
    );
    assert_eq!(
        results[1].body["message"],
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"leader\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
    assert_eq!(results[1].body["reason"], "Conflict");
    let winner = results[0].body["spec"]["holderIdentity"].clone();
    assert_eq!(
        s.get_json("coordination.k8s.io/v1", "Lease", Some("shop"), "leader")
            .unwrap()["spec"]["holderIdentity"],
        winner
    );
}

#[test]
fn the_status_subresource_owns_status_and_the_main_resource_the_rest() {
    let s = server();
    crd_with_release(&s);
    let mut body = release();
    body["status"] = json!({"phase": "Hacked"});
    let web = created(&s, CRS, &body);
    assert_eq!(
        (web.get("status"), web["metadata"]["generation"].as_i64()),
        (None, Some(1)),
        "create drops status"
    );
    let mut st = web.clone();
    st["status"] = json!({"phase": "Progressing", "canaryWeight": 5});
    st["spec"]["revision"] = json!("ignored");
    let r = wire::put(s.addr(), &format!("{CRS}/web/status"), &st);
    assert_eq!(
        (
            r.status,
            r.body["spec"]["revision"].as_str(),
            r.body["status"]["phase"].as_str()
        ),
        (200, Some("r1"), Some("Progressing"))
    );
    let mut main = r.body.clone();
    main["status"] = json!({"phase": "Hacked"});
    main["spec"]["revision"] = json!("r2");
    let r = wire::put(s.addr(), &format!("{CRS}/web"), &main);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (
            r.body["status"]["phase"].as_str(),
            r.body["spec"]["revision"].as_str()
        ),
        (Some("Progressing"), Some("r2"))
    );
    assert_eq!(r.body["metadata"]["generation"], 2);
    let mut stale = r.body.clone();
    stale["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let r = wire::put(s.addr(), &format!("{CRS}/web"), &stale);
    assert_eq!(
        r.status, 422,
        "a custom resource's PUT must carry its resourceVersion"
    );
    assert!(
        r.body["message"].as_str().unwrap().contains(
            "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
        )
    );
    let smp = wire::patch(
        s.addr(),
        &format!("{CRS}/web"),
        "application/strategic-merge-patch+json",
        &json!({"spec": {}}),
    );
    assert_eq!(smp.status, 415);
}

#[test]
fn writes_are_refused_as_a_real_server_refuses_them() {
    let s = server();
    crd_with_release(&s);
    let nowhere = wire::post(
        s.addr(),
        "/apis/coordination.k8s.io/v1/namespaces/nowhere/leases",
        &lease("a", "x"),
    );
    assert_eq!(
        (nowhere.status, nowhere.body["message"].as_str()),
        (404, Some("namespaces \"nowhere\" not found"))
    );
    let mut other = lease("a", "x");
    other["metadata"]["namespace"] = json!("default");
    assert_eq!(wire::post(s.addr(), LEASES, &other).status, 400);
    created(&s, LEASES, &lease("a", "x"));
    let again = wire::post(s.addr(), LEASES, &lease("a", "x"));
    assert_eq!(
        (again.status, again.body["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
    let generated = created(
        &s,
        LEASES,
        &json!({"metadata": {"generateName": "lock-"}, "spec": {}}),
    );
    assert!(
        generated["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("lock-")
    );
    let mut typo = release();
    typo["spec"]["foo"] = json!(1);
    let strict = wire::post(s.addr(), &format!("{CRS}?fieldValidation=Strict"), &typo);
    assert_eq!(strict.status, 400);
    assert!(
        strict.body["message"]
            .as_str()
            .unwrap()
            .ends_with("strict decoding error: unknown field \"spec.foo\"")
    );
    let warned = wire::post(s.addr(), CRS, &typo);
    assert_eq!(warned.status, 201);
    assert_eq!(
        warned.header("Warning"),
        ["299 - \"unknown field \\\"spec.foo\\\"\""]
    );
    assert_eq!(warned.body["spec"].get("foo"), None);
    let mut wrong_type = lease("t", "x");
    wrong_type["spec"]["leaseDurationSeconds"] = json!("15");
    let r = wire::post(s.addr(), LEASES, &wrong_type);
    assert_eq!(
        r.status, 400,
        "a built-in's typed decoding refuses a string for an int: {}",
        r.body
    );
    let discovery = wire::get(s.addr(), "/apis/kanari.dev/v1alpha1");
    let names: Vec<&str> = discovery.body["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["canaryreleases", "canaryreleases/status"]);
    assert_eq!(discovery.body["resources"][0]["shortNames"], json!(["kcr"]));
}

/// Whether a plain GET gets an HTTP answer (not a reset or a close).
fn answers(s: &ApiServer) -> bool {
    let Ok(mut c) = std::net::TcpStream::connect(s.addr()) else {
        return false;
    };
    c.set_read_timeout(Some(WAIT)).unwrap();
    let _ = c.write_all(
        format!(
            "GET /version HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.addr()
        )
        .as_bytes(),
    );
    let mut buf = [0u8; 12];
    matches!(c.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
}

#[test]
fn a_paused_server_resets_connections_and_keeps_its_objects() {
    let s = server();
    namespace(&s, "shop");
    created(&s, LEASES, &lease("a", "x"));
    let mut w = Watch::open(
        s.addr(),
        &format!(
            "{LEASES}?watch=true&resourceVersion={}",
            s.resource_version()
        ),
    );
    s.pause();
    assert!(w.ends_within(WAIT), "an open watch is cut");
    assert!(!answers(&s));
    s.resume();
    assert!(answers(&s));
    assert_eq!(wire::get(s.addr(), &format!("{LEASES}/a")).status, 200);
}

#[test]
fn server_side_apply_shares_agreeing_fields_and_refuses_to_take_anothers_unforced() {
    let s = server();
    namespace(&s, "shop");
    let lock = format!("{LEASES}/lock");
    let apply = |manager: &str, holder: &str, extra: &str| {
        // No metadata.name: the URL names it, as kube-lease-manager sends it.
        let body = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"holderIdentity": holder}});
        wire::patch(
            s.addr(),
            &format!("{lock}?fieldManager={manager}{extra}"),
            "application/apply-patch+yaml",
            &body,
        )
    };
    let created = apply("mgr-a", "a", "");
    assert_eq!(
        (
            created.status,
            created.body["spec"]["holderIdentity"].as_str()
        ),
        (201, Some("a")),
        "{}",
        created.body
    );
    let managed = &created.body["metadata"]["managedFields"][0];
    assert_eq!(
        (managed["manager"].as_str(), managed["operation"].as_str()),
        (Some("mgr-a"), Some("Apply"))
    );
    let taken = apply("mgr-b", "b", "");
    assert_eq!(taken.status, 409);
    assert_eq!(
        taken.body["message"],
        "Apply failed with 1 conflict: conflict with \"mgr-a\": .spec.holderIdentity"
    );
    assert_eq!(
        taken.body["details"]["causes"][0]["field"],
        ".spec.holderIdentity"
    );
    assert_eq!(
        apply("mgr-b", "a", "").status,
        200,
        "agreeing on a value is no conflict"
    );
    let release = wire::patch(
        s.addr(),
        &format!("{lock}?fieldManager=mgr-a"),
        "application/strategic-merge-patch+json",
        &json!({"spec": {"holderIdentity": null}}),
    );
    assert_eq!(release.status, 200);
    assert_eq!(release.body["spec"].get("holderIdentity"), None);
    let acquired = apply("mgr-b", "b", "");
    assert_eq!(
        (
            acquired.status,
            acquired.body["spec"]["holderIdentity"].as_str()
        ),
        (200, Some("b")),
        "a released field is no one's"
    );
    assert_eq!(apply("mgr-a", "a", "").status, 409);
    let forced = apply("mgr-a", "a", "&force=true");
    assert_eq!(
        (
            forced.status,
            forced.body["spec"]["holderIdentity"].as_str()
        ),
        (200, Some("a"))
    );
    let anonymous = wire::patch(
        s.addr(),
        &lock,
        "application/apply-patch+yaml",
        &json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease"}),
    );
    assert_eq!(
        (anonymous.status, anonymous.body["reason"].as_str()),
        (422, Some("Invalid")),
        "apply needs a field manager"
    );
}
