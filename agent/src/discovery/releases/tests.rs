use serde_json::json;

use super::*;

fn service(ns: &str, name: &str, ip: &str, ports: Value) -> (String, Service) {
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "ports": ports},
    }))
    .expect("a Service");
    (format!("{ns}/{name}"), s)
}

/// An endpoint: address, ready, serving, terminating.
type Endpoint<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

/// A slice of `service` with `endpoints`.
fn slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: Value,
    endpoints: &[Endpoint],
) -> (String, EndpointSlice) {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(a, r, s, t)| {
            json!({"addresses": [a], "conditions": {"ready": r, "serving": s, "terminating": t}})
        })
        .collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("an EndpointSlice");
    (format!("{ns}/{name}"), s)
}

const READY: (Option<bool>, Option<bool>, Option<bool>) = (Some(true), Some(true), Some(false));

fn shop() -> Cluster {
    let mut c = Cluster::default();
    c.releases.insert(
        "shop/web".into(),
        (
            json!({"service": "web", "stable": "web-stable", "canary": "web-canary",
                   "revision": "web:2", "rollout": {"steps": [10, 50, 100]}}),
            3,
            Value::Null,
        ),
    );
    let http = json!([{"name": "http", "port": 80, "targetPort": 8080}]);
    c.services
        .extend([service("shop", "web", "10.96.0.10", http.clone())]);
    let port = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    let (r, s, t) = READY;
    c.slices.extend([
        slice(
            "shop",
            "web-stable-abc",
            "web-stable",
            port.clone(),
            &[("10.1.0.1", r, s, t), ("10.1.0.2", r, s, t)],
        ),
        slice(
            "shop",
            "web-canary-xyz",
            "web-canary",
            port,
            &[("10.2.0.1", r, s, t)],
        ),
    ]);
    c
}

fn only(c: &Cluster) -> Discovered {
    let mut d = discover(c);
    assert_eq!(d.len(), 1, "{d:#?}");
    d.remove(0)
}

#[test]
fn a_release_becomes_a_service_at_the_cluster_ip_with_its_groups_endpoints() {
    let d = only(&shop());
    assert_eq!(d.generation, 3);
    let r = d.release.expect("complete");
    assert_eq!(r.key, "shop/web");
    assert_eq!(
        r.service,
        json!({
            "name": "shop.web",
            "vip": "10.96.0.10:80",
            "stable": {"backends": ["10.1.0.1:8080", "10.1.0.2:8080"]},
            "canary": {"backends": ["10.2.0.1:8080"], "revision": "web:2"},
            "rollout": {"steps": [10, 50, 100]},
        })
    );
}

#[test]
fn not_ready_endpoints_are_left_out_and_terminating_ones_only_when_nothing_is_ready() {
    let mut c = shop();
    let port = json!([{"name": "http", "port": 8080}]);
    c.slices.insert(
        "shop/web-stable-abc".into(),
        slice(
            "shop",
            "web-stable-abc",
            "web-stable",
            port.clone(),
            &[
                ("10.1.0.1", Some(true), Some(true), Some(false)),
                // Not ready yet: no traffic.
                ("10.1.0.2", Some(false), Some(false), Some(false)),
                // Terminating: drains, gets no new connection.
                ("10.1.0.3", Some(false), Some(true), Some(true)),
                // Conditions not said: ready (the API's rule).
                ("10.1.0.4", None, None, None),
            ],
        )
        .1,
    );
    let r = only(&c).release.expect("complete");
    assert_eq!(
        r.service["stable"]["backends"],
        json!(["10.1.0.1:8080", "10.1.0.4:8080"])
    );

    // Every stable pod terminating, still serving: they keep the service up.
    c.slices.insert(
        "shop/web-stable-abc".into(),
        slice(
            "shop",
            "web-stable-abc",
            "web-stable",
            port,
            &[
                ("10.1.0.3", Some(false), Some(true), Some(true)),
                ("10.1.0.5", Some(false), Some(false), Some(true)),
            ],
        )
        .1,
    );
    let r = only(&c).release.expect("complete");
    assert_eq!(r.service["stable"]["backends"], json!(["10.1.0.3:8080"]));
}

#[test]
fn a_canary_without_endpoints_has_no_backends_and_a_stable_without_is_refused() {
    let mut c = shop();
    c.slices.remove("shop/web-canary-xyz");
    let r = only(&c).release.expect("complete");
    assert_eq!(r.service["canary"]["backends"], json!([]));

    c.slices.remove("shop/web-stable-abc");
    let (field, message) = only(&c).release.expect_err("no stable backend");
    assert_eq!(field, "spec.stable");
    assert!(message.contains("no ready endpoints"), "{message}");
}

#[test]
fn slices_of_other_services_namespaces_or_families_are_not_backends() {
    let mut c = shop();
    let port = json!([{"name": "http", "port": 8080}]);
    let (r, s, t) = READY;
    c.slices.extend([
        slice(
            "other",
            "web-stable-1",
            "web-stable",
            port.clone(),
            &[("10.9.0.1", r, s, t)],
        ),
        slice(
            "shop",
            "api-1",
            "api",
            port.clone(),
            &[("10.9.0.2", r, s, t)],
        ),
    ]);
    let mut v6 = slice(
        "shop",
        "web-stable-v6",
        "web-stable",
        port,
        &[("fd00::1", r, s, t)],
    );
    v6.1.address_type = "IPv6".into();
    c.slices.extend([v6]);
    let r = only(&c).release.expect("complete");
    assert_eq!(
        r.service["stable"]["backends"],
        json!(["10.1.0.1:8080", "10.1.0.2:8080"])
    );
}

#[test]
fn the_port_is_chosen_by_name_or_number_and_must_be_named_among_several() {
    let mut c = shop();
    let two = json!([{"name": "http", "port": 80}, {"name": "admin", "port": 9000}]);
    c.services
        .extend([service("shop", "web", "10.96.0.10", two)]);
    let (field, message) = only(&c).release.expect_err("ambiguous");
    assert_eq!(field, "spec.port");
    assert!(message.contains("2 TCP ports"), "{message}");

    let spec = &mut c.releases.get_mut("shop/web").expect("there").0;
    spec["port"] = json!("admin");
    // The slices name their ports like the apex: admin has no endpoint port,
    // the slice's only port is taken.
    let r = only(&c).release.expect("complete");
    assert_eq!(r.service["vip"], json!("10.96.0.10:9000"));
    let spec = &mut c.releases.get_mut("shop/web").expect("there").0;
    spec["port"] = json!(80);
    assert_eq!(
        only(&c).release.expect("complete").service["vip"],
        json!("10.96.0.10:80")
    );
    let spec = &mut c.releases.get_mut("shop/web").expect("there").0;
    spec["port"] = json!(81);
    assert_eq!(only(&c).release.expect_err("no port").0, "spec.port");
}

#[test]
fn a_missing_or_headless_apex_service_is_named() {
    let mut c = shop();
    c.services
        .extend([service("shop", "web", "None", json!([{"port": 80}]))]);
    let (field, message) = only(&c).release.expect_err("headless");
    assert_eq!(field, "spec.service");
    assert!(message.contains("no IPv4 ClusterIP"), "{message}");
    c.services.clear();
    let (field, message) = only(&c).release.expect_err("absent");
    assert_eq!(field, "spec.service");
    assert!(
        message.contains("no Service `web` in namespace `shop`"),
        "{message}"
    );
}

#[test]
fn the_release_s_sections_pass_to_the_file_s_validator_and_its_errors_name_the_spec() {
    let mut c = shop();
    let spec = &mut c.releases.get_mut("shop/web").expect("there").0;
    spec["paused"] = json!(true);
    spec["affinity"] = json!("connection");
    spec["analysis"] = json!({"limits": {"max_error_rate": 1}});
    let d = only(&c);
    assert!(d.paused);
    let release = d.release.expect("complete");
    assert_eq!(release.service["affinity"], json!("connection"));

    let file = "interfaces: [{name: eth0}]\n";
    let (config, refused) = crate::config::parse_with_releases(
        "k.yaml",
        file,
        &|_| true,
        std::slice::from_ref(&release),
    )
    .expect("the file is valid");
    assert!(refused.is_empty(), "{refused:?}");
    let s = &config.services[0];
    assert_eq!(s.name, "shop.web");
    assert!(s.discovered);
    assert_eq!(s.canary_revision.as_deref(), Some("web:2"));
    assert_eq!(s.salt, crate::config::default_salt("shop.web"));

    // An error of the rollout names the CanaryRelease's field.
    let mut bad = release.clone();
    bad.service["rollout"]["steps"] = json!([50, 10, 100]);
    let (config, refused) =
        crate::config::parse_with_releases("k.yaml", file, &|_| true, &[bad]).expect("valid file");
    assert!(config.services.is_empty());
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0].field.starts_with("spec.rollout.steps"),
        "{refused:?}"
    );

    // Two releases on one VIP: the first (by key) keeps it.
    let mut twin = release.clone();
    twin.key = "shop/web2".into();
    twin.service["name"] = json!("shop.web2");
    let (config, refused) =
        crate::config::parse_with_releases("k.yaml", file, &|_| true, &[release.clone(), twin])
            .expect("valid file");
    assert_eq!(config.services.len(), 1);
    assert_eq!(refused[0].key, "shop/web2");
    assert_eq!(refused[0].field, "spec.service");

    // A canary without endpoints is a rollout still (it holds).
    let mut empty = release;
    empty.service["canary"]["backends"] = json!([]);
    let (config, refused) =
        crate::config::parse_with_releases("k.yaml", file, &|_| true, &[empty]).expect("valid");
    assert!(refused.is_empty(), "{refused:?}");
    assert!(config.services[0].rollout.is_some());
}

#[test]
fn decisions_read_from_etcd_keep_the_newest_term() {
    let d = |term: u32, weight: u32| Decision {
        revision: "r".into(),
        phase: crate::rollout::Phase::Progressing,
        weight,
        step: 0,
        generation: 1,
        term,
    };
    let mut k = Known::default();
    k.take_decisions([("web".to_string(), d(9, 1000))].into());
    // A deposed leader's late write is not taken; a newer term's is.
    k.take_decisions([("web".to_string(), d(5, 5000))].into());
    assert_eq!(k.decisions["web"].weight, 1000);
    k.take_decisions([("web".to_string(), d(12, 2500))].into());
    assert_eq!(k.decisions["web"].weight, 2500);
    // A key no longer listed leaves.
    k.take_decisions(Default::default());
    assert!(k.decisions.is_empty());
}
