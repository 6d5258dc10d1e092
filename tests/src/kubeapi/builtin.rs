//! The built-in kinds this server serves, each with the schema its typed
//! decoder implies: enough to catch unknown top-level fields and wrong types
//! (a Lease's spec is complete; other specs keep what they hold).

use super::meta::NameRule;
use serde_json::{Value, json};

/// A structural schema whose nested objects keep whatever they hold.
fn open(ty: &str) -> Value {
    json!({"type": ty, "x-kubernetes-preserve-unknown-fields": true})
}

fn top(fields: &[(&str, Value)]) -> Value {
    let mut props = serde_json::Map::new();
    props.insert("apiVersion".into(), json!({"type": "string"}));
    props.insert("kind".into(), json!({"type": "string"}));
    props.insert("metadata".into(), json!({"type": "object"}));
    for (k, v) in fields {
        props.insert((*k).into(), v.clone());
    }
    json!({"type": "object", "properties": props})
}

pub(super) struct Builtin {
    pub(super) group: &'static str,
    pub(super) plural: &'static str,
    pub(super) kind: &'static str,
    pub(super) namespaced: bool,
    pub(super) short: &'static [&'static str],
    pub(super) status: bool,
    pub(super) generation: bool,
    pub(super) create_on_update: bool,
    pub(super) name_rule: NameRule,
    pub(super) schema: Value,
}

pub(super) fn builtins() -> Vec<Builtin> {
    let s = || json!({"type": "string"});
    let i = || json!({"type": "integer"});
    let time = || json!({"type": "string", "format": "date-time"});
    let b = |group, plural, kind, namespaced, short, schema| Builtin {
        group,
        plural,
        kind,
        namespaced,
        short,
        status: false,
        generation: false,
        create_on_update: false,
        name_rule: NameRule::Subdomain,
        schema,
    };
    let core_event = top(&[
        ("involvedObject", open("object")),
        ("reason", s()),
        ("message", s()),
        ("source", open("object")),
        ("firstTimestamp", time()),
        ("lastTimestamp", time()),
        ("count", i()),
        ("type", s()),
        ("eventTime", time()),
        ("series", open("object")),
        ("action", s()),
        ("related", open("object")),
        ("reportingComponent", s()),
        ("reportingInstance", s()),
    ]);
    let events_event = top(&[
        ("eventTime", time()),
        ("series", open("object")),
        ("reportingController", s()),
        ("reportingInstance", s()),
        ("action", s()),
        ("reason", s()),
        ("regarding", open("object")),
        ("related", open("object")),
        ("note", s()),
        ("type", s()),
        ("deprecatedSource", open("object")),
        ("deprecatedFirstTimestamp", time()),
        ("deprecatedLastTimestamp", time()),
        ("deprecatedCount", i()),
    ]);
    let lease_spec = json!({"type": "object", "properties": {"holderIdentity": s(), "leaseDurationSeconds": i(),
        "acquireTime": time(), "renewTime": time(), "leaseTransitions": i(), "strategy": s(), "preferredHolder": s()}});
    let spec_status = || top(&[("spec", open("object")), ("status", open("object"))]);
    vec![
        Builtin {
            status: true,
            name_rule: NameRule::Label1123,
            ..b("", "namespaces", "Namespace", false, &["ns"], spec_status())
        },
        Builtin {
            status: true,
            create_on_update: true,
            name_rule: NameRule::Label1035,
            ..b("", "services", "Service", true, &["svc"], spec_status())
        },
        Builtin {
            create_on_update: true,
            ..b("", "events", "Event", true, &["ev"], core_event)
        },
        Builtin {
            status: true,
            ..b("", "pods", "Pod", true, &["po"], spec_status())
        },
        b(
            "",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            top(&[
                (
                    "data",
                    json!({"type": "object", "additionalProperties": s()}),
                ),
                (
                    "binaryData",
                    json!({"type": "object", "additionalProperties": s()}),
                ),
                ("immutable", json!({"type": "boolean"})),
            ]),
        ),
        Builtin {
            generation: true,
            ..b(
                "discovery.k8s.io",
                "endpointslices",
                "EndpointSlice",
                true,
                &[],
                top(&[
                    ("addressType", s()),
                    (
                        "endpoints",
                        json!({"type": "array", "items": open("object")}),
                    ),
                    ("ports", json!({"type": "array", "items": open("object")})),
                ]),
            )
        },
        Builtin {
            create_on_update: true,
            ..b(
                "coordination.k8s.io",
                "leases",
                "Lease",
                true,
                &[],
                top(&[("spec", lease_spec)]),
            )
        },
        Builtin {
            create_on_update: true,
            ..b(
                "events.k8s.io",
                "events",
                "Event",
                true,
                &["ev"],
                events_event,
            )
        },
        Builtin {
            status: true,
            generation: true,
            ..b(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                &["crd", "crds"],
                spec_status(),
            )
        },
    ]
}
