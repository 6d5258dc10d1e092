//! From the file as written to a [`Config`]: every rule across fields and
//! services, each failure naming the field and the fix.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use kanari_common::maps::{
    BASIS_POINTS, Group, MAX_BACKENDS_PER_GROUP, MAX_SEGMENTS, MAX_SERVICES,
};

use super::{
    Cidr, Config, ConntrackTimeouts, DEFAULT_CONTROL_SOCKET, DEFAULT_ETCD_TTL,
    DEFAULT_LEASE_DURATION, DEFAULT_LEASE_NAME, DEFAULT_RECORD_MAX_MB, DEFAULT_STATE_DIR,
    FieldError, Interface, MAX_CONNTRACK_CONNECTIONS, MAX_CONNTRACK_TIMEOUT, MAX_ETCD_TTL,
    MAX_LEASE_DURATION, MAX_LIMIT_BACKENDS, MAX_RECORD_MAX_MB, MAX_TICK, MIN_CONNTRACK_CONNECTIONS,
    MIN_CONNTRACK_TIMEOUT, MIN_ETCD_TTL, MIN_LEASE_DURATION, MIN_TICK, Protocol, RecordTo,
    RolloutSpec, SegmentRule, Service, err, raw::RawConfig, rollout,
};

/// The salt of a service without one in the file: FNV-1a of its name, so a
/// restart or a reload keeps every client in its group.
pub fn default_salt(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// A Kubernetes DNS label (RFC 1123): a namespace's or a Lease's name.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A revision as written: a short printable name, e.g. an image tag.
fn revision(r: &str) -> Result<(), String> {
    if r.is_empty() || r.len() > 128 || r.chars().any(|c| c.is_control()) {
        return Err(format!(
            "`{}` is not a revision: 1 to 128 printable characters, e.g. an image tag like v1.4.2",
            r.escape_default()
        ));
    }
    Ok(())
}

pub(super) fn validate(
    raw: RawConfig,
    interface_exists: &dyn Fn(&str) -> bool,
) -> Result<Config, FieldError> {
    let has_kubernetes = raw.kubernetes.is_some();
    let socket_lb_on = raw.socket_lb.as_ref().is_some_and(|s| s.enabled);
    if raw.interfaces.is_empty() {
        return err(
            "interfaces",
            "at least one interface is required: the one where client traffic enters, e.g. `- name: eth0`",
        );
    }
    let mut names = BTreeSet::new();
    let mut interfaces = Vec::new();
    for (i, it) in raw.interfaces.into_iter().enumerate() {
        let field = format!("interfaces[{i}].name");
        if it.name.is_empty()
            || it.name.len() > 15
            || it.name.contains('/')
            || it.name.contains(char::is_whitespace)
        {
            return err(
                field,
                format!(
                    "`{}` is not an interface name (1 to 15 characters, no `/` or spaces)",
                    it.name
                ),
            );
        }
        if !names.insert(it.name.clone()) {
            return err(
                field,
                format!(
                    "interface `{}` is listed twice; list each interface once",
                    it.name
                ),
            );
        }
        if !interface_exists(&it.name) {
            return err(
                field,
                format!(
                    "interface `{}` does not exist on this host; `ip link` lists the interfaces",
                    it.name
                ),
            );
        }
        interfaces.push(Interface {
            name: it.name,
            mode: it.mode,
        });
    }

    let connections = raw.conntrack.connections;
    let new_connections_per_second = raw.conntrack.new_per_second.unwrap_or(connections / 16);
    if !(MIN_CONNTRACK_CONNECTIONS..=MAX_CONNTRACK_CONNECTIONS).contains(&connections) {
        return err(
            "conntrack.connections",
            format!(
                "{connections} is outside {MIN_CONNTRACK_CONNECTIONS} to {MAX_CONNTRACK_CONNECTIONS}"
            ),
        );
    }

    let defaults = ConntrackTimeouts::default();
    let t = &raw.conntrack.timeouts;
    let mut conntrack_timeouts = defaults;
    for (name, field, slot) in [
        ("syn_sent", &t.syn_sent, &mut conntrack_timeouts.syn_sent),
        (
            "established",
            &t.established,
            &mut conntrack_timeouts.established,
        ),
        ("closing", &t.closing, &mut conntrack_timeouts.closing),
        ("closed", &t.closed, &mut conntrack_timeouts.closed),
    ] {
        if let Some(d) = field {
            if !(MIN_CONNTRACK_TIMEOUT..=MAX_CONNTRACK_TIMEOUT).contains(&d.0) {
                return err(
                    format!("conntrack.timeouts.{name}"),
                    format!(
                        "{} is outside 1s to 7days (whole seconds; default {})",
                        humantime::format_duration(d.0),
                        humantime::format_duration(*slot)
                    ),
                );
            }
            *slot = Duration::from_secs(d.0.as_secs());
        }
    }

    let max_backends = raw.limits.backends;
    if !(1..=MAX_LIMIT_BACKENDS).contains(&max_backends) {
        return err(
            "limits.backends",
            format!("{max_backends} is outside 1 to {MAX_LIMIT_BACKENDS}"),
        );
    }
    let max_mb = raw.telemetry.record_max_mb.unwrap_or(DEFAULT_RECORD_MAX_MB);
    if !(1..=MAX_RECORD_MAX_MB).contains(&max_mb) {
        return err(
            "telemetry.record_max_mb",
            format!("{max_mb} is outside 1 to {MAX_RECORD_MAX_MB}"),
        );
    }
    let record = match raw.telemetry.record {
        Some(path) if !path.is_absolute() => {
            return err(
                "telemetry.record",
                format!(
                    "{} is not an absolute path (e.g. /var/lib/kanari/telemetry.jsonl)",
                    path.display()
                ),
            );
        }
        Some(path) => Some(RecordTo {
            path,
            max_bytes: max_mb * 1024 * 1024,
        }),
        None => None,
    };
    let tick = raw.telemetry.tick.0;
    if !(MIN_TICK..=MAX_TICK).contains(&tick) {
        return err(
            "telemetry.tick",
            format!(
                "{} is outside {} to {}",
                humantime::format_duration(tick),
                humantime::format_duration(MIN_TICK),
                humantime::format_duration(MAX_TICK)
            ),
        );
    }
    let pin_dir = raw.bpf.pin_dir;
    if !pin_dir.is_absolute() || pin_dir.parent().is_none() {
        return err(
            "bpf.pin_dir",
            format!(
                "`{}` is not an absolute directory below a bpf filesystem, e.g. {}",
                pin_dir.display(),
                crate::pins::PIN_ROOT
            ),
        );
    }
    let state_dir = raw.state.dir;
    if !state_dir.is_absolute() {
        return err(
            "state.dir",
            format!(
                "`{}` is not an absolute path, e.g. {DEFAULT_STATE_DIR}",
                state_dir.display()
            ),
        );
    }
    let control_socket = raw.control.socket;
    if !control_socket.is_absolute() {
        return err(
            "control.socket",
            format!(
                "`{}` is not an absolute path, e.g. {DEFAULT_CONTROL_SOCKET}",
                control_socket.display()
            ),
        );
    }

    if raw.services.len() > MAX_SERVICES as usize {
        return err(
            "services",
            format!(
                "{} services; at most {MAX_SERVICES} are supported",
                raw.services.len()
            ),
        );
    }
    let mut service_names = BTreeMap::new();
    let mut vips = BTreeMap::new();
    let mut services = Vec::new();
    let mut segments_total = 0usize;
    // Which group each client CIDR is pinned to, and by which service.
    let mut pinned: BTreeMap<Cidr, (Group, usize)> = BTreeMap::new();
    let mut backends_total = 0usize;
    for (i, s) in raw.services.into_iter().enumerate() {
        let at = |f: &str| format!("services[{i}].{f}");
        // A discovered service is named NAMESPACE.NAME of its CanaryRelease.
        let longest = if s.discovered { 253 } else { 63 };
        if s.name.is_empty()
            || s.name.len() > longest
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return err(
                at("name"),
                format!(
                    "`{}` is not a service name: 1 to {longest} of a-z, A-Z, 0-9, `-`, `_`, `.`",
                    s.name
                ),
            );
        }
        if let Some(j) = service_names.insert(s.name.clone(), i) {
            return err(
                at("name"),
                format!(
                    "`{}` is also the name of services[{j}]; names must be unique",
                    s.name
                ),
            );
        }
        let vip = s.vip.0;
        let udp = s.protocol == Protocol::Udp;
        if let Some(j) = vips.insert((vip, udp), i) {
            return err(
                at("vip"),
                format!(
                    "{vip} is also the VIP of services[{j}]; each VIP:port is one service (one for TCP, one for UDP)"
                ),
            );
        }
        if udp && !socket_lb_on {
            return err(
                at("protocol"),
                "a udp service is steered by the socket path only (the packet path passes UDP untouched): set `socket_lb: {enabled: true}`, or use tcp",
            );
        }
        let stable: Vec<_> = s.stable.backends.iter().map(|e| e.0).collect();
        let canary: Vec<_> = s.canary.backends.iter().map(|e| e.0).collect();
        for (group, r) in [
            ("stable", &s.stable.revision),
            ("canary", &s.canary.revision),
        ] {
            if let Some(r) = r {
                revision(r).or_else(|m| err(at(&format!("{group}.revision")), m))?;
            }
        }
        if let (Some(a), Some(b)) = (&s.stable.revision, &s.canary.revision)
            && a == b
        {
            return err(
                at("canary.revision"),
                format!(
                    "`{b}` is also stable's revision: a canary runs something stable does not (a new image tag, a build id)"
                ),
            );
        }
        if stable.is_empty() {
            return err(
                at("stable.backends"),
                "at least one stable backend is required",
            );
        }
        for (group, list) in [("stable", &stable), ("canary", &canary)] {
            if list.len() > MAX_BACKENDS_PER_GROUP {
                return err(
                    at(&format!("{group}.backends")),
                    format!(
                        "{} backends; at most {MAX_BACKENDS_PER_GROUP} per group",
                        list.len()
                    ),
                );
            }
            let mut seen = BTreeSet::new();
            for (k, b) in list.iter().enumerate() {
                if !seen.insert(*b) {
                    return err(
                        at(&format!("{group}.backends[{k}]")),
                        format!("{b} is listed twice"),
                    );
                }
                if *b == vip {
                    return err(
                        at(&format!("{group}.backends[{k}]")),
                        format!(
                            "{b} is the service's own VIP; a backend must be a different address or port"
                        ),
                    );
                }
            }
        }
        if let Some(k) = canary.iter().position(|b| stable.contains(b)) {
            return err(
                at(&format!("canary.backends[{k}]")),
                format!(
                    "{} is also a stable backend; a backend belongs to one group",
                    canary[k]
                ),
            );
        }
        if s.rollout.is_some() && s.canary_weight.is_some_and(|w| w.0 > 0) {
            return err(
                at("canary_weight"),
                "the rollout drives this service's weight; remove canary_weight (or the rollout, for a fixed split)",
            );
        }
        if s.analysis.is_some() && s.rollout.is_none() {
            return err(
                at("analysis"),
                "analysis judges a rollout: add a rollout section (or remove analysis)",
            );
        }
        let weight = s.canary_weight.map_or(0, |w| w.0);
        if weight > 0 && canary.is_empty() {
            return err(
                at("canary_weight"),
                format!(
                    "{}% for the canary, but canary.backends is empty; add canary backends or set 0",
                    weight as f64 / 100.0
                ),
            );
        }
        let mut segments: Vec<SegmentRule> = Vec::new();
        for (k, seg) in s.segments.iter().enumerate() {
            let rule = SegmentRule {
                cidr: seg.cidr.0,
                group: seg.group.0,
            };
            if let Some(j) = segments.iter().position(|r| r.cidr == rule.cidr) {
                return err(
                    at(&format!("segments[{k}].cidr")),
                    format!("{} is also segments[{j}]", rule.cidr),
                );
            }
            if rule.group == Group::Canary && canary.is_empty() {
                return err(
                    at(&format!("segments[{k}].group")),
                    format!(
                        "{} is pinned to the canary, but canary.backends is empty",
                        rule.cidr
                    ),
                );
            }
            segments.push(rule);
        }
        backends_total += stable.len() + canary.len();
        if backends_total > max_backends as usize {
            return err(
                "limits.backends",
                format!(
                    "the services list more than {max_backends} backends; raise limits.backends (about 2 KiB of kernel memory per backend per CPU)"
                ),
            );
        }
        for (k, r) in segments.iter().enumerate() {
            match pinned.get(&r.cidr) {
                Some((g, j)) if *g != r.group => {
                    return err(
                        at(&format!("segments[{k}].group")),
                        format!(
                            "{} is pinned to {} here and to {} by services[{j}]: one group of clients sees one version; pin it to the same group in both",
                            r.cidr,
                            r.group.name(),
                            g.name()
                        ),
                    );
                }
                _ => {
                    pinned.insert(r.cidr, (r.group, i));
                }
            }
        }
        segments_total += segments.len();
        if segments_total > MAX_SEGMENTS as usize {
            return err(
                at("segments"),
                format!("more than {MAX_SEGMENTS} segments over all services"),
            );
        }
        debug_assert!(weight <= BASIS_POINTS);
        let rollout = match s.rollout {
            None => None,
            Some(r) => {
                let facts = rollout::ServiceFacts {
                    // A CanaryRelease's canary may have no endpoints yet.
                    has_canary_backends: !canary.is_empty() || s.discovered,
                    canary_segments: segments.iter().filter(|r| r.group == Group::Canary).count(),
                };
                let (rollout, analysis) =
                    rollout::validate(r, s.analysis.unwrap_or_default(), &facts, &at)?;
                Some(RolloutSpec { rollout, analysis })
            }
        };
        services.push(Service {
            salt: s.salt.unwrap_or_else(|| default_salt(&s.name)),
            name: s.name,
            vip,
            affinity: s.affinity,
            protocol: s.protocol,
            canary_weight: weight,
            stable,
            canary,
            stable_revision: s.stable.revision,
            canary_revision: s.canary.revision,
            segments,
            rollout,
            discovered: s.discovered,
            follows: s.follows,
        });
    }
    // A backend that is another service's VIP would be translated twice
    // (once to it, once again to one of its backends) and its replies once.
    for (i, s) in services.iter().enumerate() {
        let udp = s.protocol == Protocol::Udp;
        for (group, list) in [("stable", &s.stable), ("canary", &s.canary)] {
            for (k, b) in list.iter().enumerate() {
                if let Some(&j) = vips.get(&(*b, udp)) {
                    return err(
                        format!("services[{i}].{group}.backends[{k}]"),
                        format!(
                            "{b} is the VIP of services[{j}] ({}); a backend cannot be another service's VIP: list that service's backends here instead",
                            services[j].name
                        ),
                    );
                }
            }
        }
    }
    Ok(Config {
        interfaces,
        conntrack_connections: connections,
        conntrack_timeouts,
        new_connections_per_second,
        max_backends,
        metrics_listen: raw.metrics.listen.0,
        control_socket,
        state_dir,
        pin_dir,
        tick,
        record,
        kubernetes: match raw.kubernetes {
            None => None,
            Some(k) => {
                if let Some(path) = k.kubeconfig.as_ref().filter(|p| !p.is_absolute()) {
                    return err(
                        "kubernetes.kubeconfig",
                        format!(
                            "`{}` is not an absolute path (e.g. /etc/kanari/kubeconfig); leave it out in a pod, which uses its service account",
                            path.display()
                        ),
                    );
                }
                if let Some(n) = k.node.as_ref().filter(|n| n.is_empty() || n.len() > 253) {
                    return err(
                        "kubernetes.node",
                        format!("`{n}` is not a node name: 1 to 253 characters"),
                    );
                }
                let lease_duration = k.lease.duration.map_or(DEFAULT_LEASE_DURATION, |d| d.0);
                if !(MIN_LEASE_DURATION..=MAX_LEASE_DURATION).contains(&lease_duration) {
                    return err(
                        "kubernetes.lease.duration",
                        format!(
                            "{} is outside {} to {}",
                            humantime::format_duration(lease_duration),
                            humantime::format_duration(MIN_LEASE_DURATION),
                            humantime::format_duration(MAX_LEASE_DURATION)
                        ),
                    );
                }
                for (field, v) in [
                    ("kubernetes.lease.namespace", &k.lease.namespace),
                    ("kubernetes.lease.name", &k.lease.name),
                ] {
                    if let Some(v) = v.as_ref().filter(|v| !dns_label(v)) {
                        return err(
                            field,
                            format!(
                                "`{v}` is not a Kubernetes name: 1 to 63 of a-z, 0-9 and `-`, starting and ending with a letter or digit"
                            ),
                        );
                    }
                }
                Some(super::Kubernetes {
                    kubeconfig: k.kubeconfig,
                    node: k.node,
                    lease_namespace: k.lease.namespace,
                    lease_name: k.lease.name.unwrap_or_else(|| DEFAULT_LEASE_NAME.into()),
                    lease_duration,
                    advertise: k.advertise.map(|e| e.0),
                })
            }
        },
        socket_lb: match raw.socket_lb {
            Some(s) if s.enabled => {
                if let Some(c) = s.cgroup.as_ref().filter(|c| !c.is_absolute()) {
                    return err(
                        "socket_lb.cgroup",
                        format!(
                            "`{}` is not an absolute path: name a cgroup v2 directory, e.g. /sys/fs/cgroup/kubepods.slice",
                            c.display()
                        ),
                    );
                }
                Some(super::SocketLb { cgroup: s.cgroup })
            }
            _ => None,
        },
        fleet: match raw.fleet {
            None => None,
            Some(_) if has_kubernetes => {
                return err(
                    "fleet",
                    "`kubernetes:` coordinates the fleet through the API server already; `fleet:` (etcd) is for hosts outside Kubernetes: keep one of them",
                );
            }
            Some(f) => Some(fleet(f)?),
        },
        services,
    })
}

/// `fleet:`, validated.
fn fleet(f: super::raw::RawFleet) -> Result<super::Fleet, FieldError> {
    if !dns_label(&f.name) {
        return err(
            "fleet.name",
            format!(
                "`{}` is not a fleet name: 1 to 63 of a-z, 0-9 and `-`, starting and ending with a letter or digit (its keys live under /kanari/NAME/)",
                f.name
            ),
        );
    }
    if let Some(n) = f.node.as_ref().filter(|n| {
        n.is_empty() || n.len() > 253 || n.contains('/') || n.chars().any(char::is_whitespace)
    }) {
        return err(
            "fleet.node",
            format!("`{n}` is not a host name: 1 to 253 characters, no `/` or spaces"),
        );
    }
    let e = f.etcd;
    if e.endpoints.is_empty() {
        return err(
            "fleet.etcd.endpoints",
            "list at least one of etcd's client URLs, e.g. [http://10.0.0.5:2379]",
        );
    }
    for (i, url) in e.endpoints.iter().enumerate() {
        let field = format!("fleet.etcd.endpoints[{i}]");
        let Some((scheme, rest)) = url.split_once("://") else {
            return err(
                &field,
                format!(
                    "`{url}` is not a URL: write http://HOST:PORT (https:// with fleet.etcd.tls)"
                ),
            );
        };
        let port = rest.rsplit_once(':').map(|(_, p)| p.trim_end_matches('/'));
        if port.is_none_or(|p| p.parse::<u16>().is_err()) || rest.starts_with(':') {
            return err(
                &field,
                format!("`{url}` names no HOST:PORT: write e.g. {scheme}://10.0.0.5:2379"),
            );
        }
        match (scheme, e.tls.is_some()) {
            ("http", false) | ("https", true) => {}
            ("https", false) => {
                return err(
                    &field,
                    format!(
                        "`{url}` is https: give fleet.etcd.tls.ca (and cert and key when etcd asks for a client certificate)"
                    ),
                );
            }
            ("http", true) => {
                return err(
                    &field,
                    format!("`{url}` is plain http while fleet.etcd.tls is set: write https://"),
                );
            }
            _ => {
                return err(&field, format!("`{url}`: the scheme is http or https"));
            }
        }
    }
    let tls = match e.tls {
        None => None,
        Some(t) => {
            for (field, p) in [
                ("fleet.etcd.tls.ca", Some(&t.ca)),
                ("fleet.etcd.tls.cert", t.cert.as_ref()),
                ("fleet.etcd.tls.key", t.key.as_ref()),
            ] {
                if let Some(p) = p.filter(|p| !p.is_absolute()) {
                    return err(
                        field,
                        format!(
                            "`{}` is not an absolute path (e.g. /etc/kanari/etcd/ca.pem)",
                            p.display()
                        ),
                    );
                }
            }
            let identity = match (t.cert, t.key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                (Some(_), None) => {
                    return err(
                        "fleet.etcd.tls.key",
                        "a client certificate needs its key: give both cert and key, or neither",
                    );
                }
                (None, Some(_)) => {
                    return err(
                        "fleet.etcd.tls.cert",
                        "a client key needs its certificate: give both cert and key, or neither",
                    );
                }
            };
            Some(super::EtcdTls { ca: t.ca, identity })
        }
    };
    let ttl = e.ttl.map_or(DEFAULT_ETCD_TTL, |d| d.0);
    if !(MIN_ETCD_TTL..=MAX_ETCD_TTL).contains(&ttl) || ttl.subsec_nanos() != 0 {
        return err(
            "fleet.etcd.ttl",
            format!(
                "{} is not whole seconds from {} to {} (etcd's leases count seconds)",
                humantime::format_duration(ttl),
                humantime::format_duration(MIN_ETCD_TTL),
                humantime::format_duration(MAX_ETCD_TTL)
            ),
        );
    }
    Ok(super::Fleet {
        name: f.name,
        node: f.node,
        advertise: f.advertise.map(|a| a.0),
        endpoints: e.endpoints,
        tls,
        ttl,
    })
}
