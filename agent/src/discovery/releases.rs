//! CanaryReleases, Services and EndpointSlices as the watchers hold them →
//! each release's service as a `services:` entry of the file would write it
//! (pure: the validator of the file checks it next).
//!
//! - The VIP is the apex Service's ClusterIP and the port the release names
//!   (`spec.port`, by name or number), or its one TCP port; its external and
//!   LoadBalancer IPs (IPv4) at that port are VIPs too, each steered with the
//!   ClusterIP's weight.
//! - A group's backends are the ready endpoints of its Service's
//!   EndpointSlices (IPv4), at the slice port named like the apex port (or
//!   the slice's only port); without a ready one, the serving endpoints
//!   that are terminating, so a rollout of stable's pods never leaves the
//!   service with no backend while one still answers. A terminating
//!   endpoint leaves the set: its established connections drain.
//! - A canary without endpoints is a canary with no backends: its share
//!   goes to stable (the rollout holds, see `Service::discovered`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{config::Release, rollout::Decision};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A CanaryRelease's `spec`, as the CRD's schema admits it (fields the
/// schema left out are ignored here: the API server has pruned them).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseSpec {
    pub service: String,
    pub port: Option<IntOrString>,
    pub stable: String,
    pub canary: String,
    pub revision: Option<String>,
    pub stable_revision: Option<String>,
    #[serde(default)]
    pub paused: bool,
    pub affinity: Option<Value>,
    pub protocol: Option<Value>,
    pub segments: Option<Value>,
    pub rollout: Option<Value>,
    pub analysis: Option<Value>,
}

/// What the watchers hold, each by NAMESPACE/NAME.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// A release's spec as stored (JSON), its generation and its status.
    pub releases: BTreeMap<String, (Value, i64, Value)>,
    pub services: BTreeMap<String, Service>,
    pub slices: BTreeMap<String, EndpointSlice>,
}

/// One CanaryRelease, read.
#[derive(Clone, Debug, PartialEq)]
pub struct Discovered {
    /// NAMESPACE/NAME.
    pub key: String,
    pub generation: i64,
    pub paused: bool,
    /// Its service, or what is missing (a field and the fix).
    pub release: Result<Release, (String, String)>,
    /// The deciding agent's decision, as its status says.
    pub decision: Option<Decision>,
}

/// The kanari service name of a release: NAMESPACE.NAME (a namespace has
/// no dots, so the name reads back unambiguously).
pub fn service_name(key: &str) -> String {
    key.replacen('/', ".", 1)
}

/// Every release in `cluster`, by key.
pub fn discover(cluster: &Cluster) -> Vec<Discovered> {
    cluster
        .releases
        .iter()
        .map(|(key, (spec, generation, status))| {
            let parsed: Result<ReleaseSpec, _> = serde_json::from_value(spec.clone());
            let paused = parsed.as_ref().is_ok_and(|s| s.paused);
            let release = parsed
                .map_err(|e| ("spec".to_string(), e.to_string()))
                .and_then(|spec| release(cluster, key, &spec));
            Discovered {
                key: key.clone(),
                generation: *generation,
                paused,
                release,
                decision: crate::fleet::status::decision(status),
            }
        })
        .collect()
}

fn release(cluster: &Cluster, key: &str, spec: &ReleaseSpec) -> Result<Release, (String, String)> {
    let namespace = key.split_once('/').map_or("", |(ns, _)| ns);
    let apex = cluster
        .services
        .get(&format!("{namespace}/{}", spec.service))
        .ok_or_else(|| {
            (
                "spec.service".to_string(),
                format!(
                    "no Service `{}` in namespace `{namespace}`; create it (its ClusterIP is what clients dial) or name another",
                    spec.service
                ),
            )
        })?;
    let apex_spec = apex.spec.clone().unwrap_or_default();
    let ip: Ipv4Addr = apex_spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| {
            (
                "spec.service".to_string(),
                format!(
                    "Service `{}` has no IPv4 ClusterIP (headless, or IPv6 only); kanari steers an IPv4 ClusterIP",
                    spec.service
                ),
            )
        })?;
    let tcp: Vec<_> = apex_spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .collect();
    let port = match &spec.port {
        Some(IntOrString::Int(n)) => tcp.iter().find(|p| p.port == *n),
        Some(IntOrString::String(name)) => tcp.iter().find(|p| p.name.as_deref() == Some(name)),
        None if tcp.len() == 1 => tcp.first(),
        None => {
            return Err((
                "spec.port".into(),
                format!(
                    "Service `{}` has {} TCP ports; name the one to roll out (by name or number)",
                    spec.service,
                    tcp.len()
                ),
            ));
        }
    }
    .ok_or_else(|| {
        (
            "spec.port".to_string(),
            format!("Service `{}` has no such TCP port", spec.service),
        )
    })?;
    let port_name = port.name.clone().unwrap_or_default();
    let vip = SocketAddrV4::new(ip, u16::try_from(port.port).unwrap_or(0));
    let stable = backends(cluster, namespace, &spec.stable, &port_name);
    if stable.is_empty() {
        return Err((
            "spec.stable".into(),
            format!(
                "Service `{}` has no ready endpoints (EndpointSlices labelled {SERVICE_NAME_LABEL}={}); kanari keeps the backends it had",
                spec.stable, spec.stable
            ),
        ));
    }
    let canary = backends(cluster, namespace, &spec.canary, &port_name);
    let mut service = json!({
        "name": service_name(key),
        "vip": vip.to_string(),
        "stable": {"backends": strings(&stable)},
        "canary": {"backends": strings(&canary)},
        "rollout": spec.rollout.clone().unwrap_or_else(|| json!({})),
    });
    let fields = [
        ("affinity", &spec.affinity),
        ("protocol", &spec.protocol),
        ("segments", &spec.segments),
        ("analysis", &spec.analysis),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            service[name] = v.clone();
        }
    }
    if let Some(r) = &spec.revision {
        service["canary"]["revision"] = json!(r);
    }
    if let Some(r) = &spec.stable_revision {
        service["stable"]["revision"] = json!(r);
    }
    // The Service's external and LoadBalancer IPs (IPv4) at the same port.
    let mut extra: Vec<SocketAddrV4> = apex_spec
        .external_ips
        .unwrap_or_default()
        .iter()
        .chain(
            apex.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_ref()),
        )
        .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
        .filter(|ip| *ip != *vip.ip())
        .map(|ip| SocketAddrV4::new(ip, vip.port()))
        .collect();
    extra.sort();
    extra.dedup();
    Ok(Release {
        key: key.to_string(),
        service,
        extra_vips: extra,
    })
}

fn strings(list: &BTreeSet<SocketAddrV4>) -> Vec<String> {
    list.iter().map(|b| b.to_string()).collect()
}

/// The backends of Service `name`: its slices' ready endpoints, else the
/// serving ones that terminate.
fn backends(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    port_name: &str,
) -> BTreeSet<SocketAddrV4> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    let slices = cluster.slices.iter().filter(|(key, s)| {
        key.split_once('/').is_some_and(|(ns, _)| ns == namespace)
            && s.address_type == "IPv4"
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|n| n == name)
    });
    for (_, slice) in slices {
        let ports = slice.ports.clone().unwrap_or_default();
        let tcp: Vec<_> = ports
            .iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .collect();
        let port = tcp
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .or(if tcp.len() == 1 { tcp.first() } else { None })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        let Some(port) = port else { continue };
        for e in &slice.endpoints {
            let c = e.conditions.clone().unwrap_or_default();
            let (is_ready, serving, ending) = (
                c.ready.unwrap_or(true),
                c.serving.unwrap_or(true),
                c.terminating.unwrap_or(false),
            );
            let set = if is_ready && !ending {
                &mut ready
            } else if serving && ending {
                &mut terminating
            } else {
                continue;
            };
            for a in &e.addresses {
                if let Ok(ip) = a.parse::<Ipv4Addr>() {
                    set.insert(SocketAddrV4::new(ip, port));
                }
            }
        }
    }
    if ready.is_empty() { terminating } else { ready }
}

/// The releases in force, across readings: the API server may be away,
/// and a release may be incomplete for a while (its stable Service between
/// two rollouts of pods) or refused (an edit that does not validate).
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// Each release's newest complete reading.
    pub newest: BTreeMap<String, Release>,
    /// Each release's last reading the agent took in (validated).
    pub taken: BTreeMap<String, Release>,
    /// Releases whose newest reading is incomplete: the field and the fix.
    pub incomplete: BTreeMap<String, (String, String)>,
    /// Why a release's newest reading is not in force (field, message), as
    /// last reported.
    pub why: BTreeMap<String, (String, String)>,
    /// `spec.paused` as last read (every release listed has one).
    pub paused: BTreeMap<String, bool>,
    /// `metadata.generation` as last read.
    pub generation: BTreeMap<String, i64>,
    /// The leader's decision each status holds, as last read; a decision
    /// of a term older than one seen (a deposed leader's late write) is
    /// not taken.
    pub decisions: BTreeMap<String, Decision>,
    term: u32,
}

/// What a reading changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// Releases whose `spec.paused` changed (or is set when first seen).
    pub toggled: Vec<(String, bool)>,
    /// The releases (specs, Services, endpoints), not only decisions.
    pub releases_changed: bool,
}

impl Known {
    /// Decisions read from elsewhere than a CanaryRelease (etcd's keys),
    /// by the same rule: an older term's are not taken; keys no longer
    /// listed leave.
    pub fn take_decisions(&mut self, decisions: BTreeMap<String, Decision>) {
        self.decisions.retain(|k, _| decisions.contains_key(k));
        for (key, d) in decisions {
            if d.term >= self.term {
                self.term = d.term;
                self.decisions.insert(key, d);
            }
        }
    }

    /// Takes a reading: a complete release replaces its last, an
    /// incomplete one keeps it, a release no longer listed leaves.
    pub fn read(&mut self, readings: Vec<Discovered>) -> Read {
        let before = (self.newest.clone(), self.incomplete.clone());
        let listed: BTreeSet<String> = readings.iter().map(|d| d.key.clone()).collect();
        self.decisions.retain(|k, _| listed.contains(k));
        self.newest.retain(|k, _| listed.contains(k));
        self.taken.retain(|k, _| listed.contains(k));
        self.incomplete.retain(|k, _| listed.contains(k));
        self.why.retain(|k, _| listed.contains(k));
        self.paused.retain(|k, _| listed.contains(k));
        self.generation.retain(|k, _| listed.contains(k));
        let mut toggled = Vec::new();
        for d in readings {
            if let Some(decision) = d.decision.filter(|x| x.term >= self.term) {
                self.term = decision.term;
                self.decisions.insert(d.key.clone(), decision);
            }
            match d.release {
                Ok(r) => {
                    self.incomplete.remove(&d.key);
                    self.newest.insert(d.key.clone(), r);
                }
                Err(e) => {
                    self.incomplete.insert(d.key.clone(), e);
                }
            }
            self.generation.insert(d.key.clone(), d.generation);
            let before = self.paused.insert(d.key.clone(), d.paused);
            if before.unwrap_or(false) != d.paused {
                toggled.push((d.key, d.paused));
            }
        }
        Read {
            releases_changed: (self.newest.clone(), self.incomplete.clone()) != before,
            toggled,
        }
    }
}

#[cfg(test)]
mod tests;
