//! The configuration in force with Kubernetes: the file's services and the
//! CanaryReleases that validate beside them.
//!
//! Nothing is lost on bad input: a release whose newest reading is refused
//! (by the validator or by the release train) stays at the reading the
//! agent took last; a release never taken is left out and says why.

use std::{collections::BTreeMap, path::Path};

use tracing::warn;

use super::interface_exists;
use crate::{
    config::{self, Config, ConfigError, Release},
    discovery::releases::{Known, service_name},
    rollout::Engine,
};

/// A refused reading of `key` falls back to the one taken last, or leaves
/// the candidates; whether the candidates changed.
fn fall_back(candidates: &mut Vec<Release>, key: &str, known: &Known) -> bool {
    let Some(i) = candidates.iter().position(|c| c.key == key) else {
        return false;
    };
    match known.taken.get(key) {
        Some(old) if *old != candidates[i] => candidates[i] = old.clone(),
        _ => {
            candidates.remove(i);
        }
    }
    true
}

/// The file's text with the releases `known` holds; updates what `known`
/// has taken and why the others are not in force.
pub(super) fn compose(
    engine: &Engine,
    path: &Path,
    text: &str,
    known: &mut Known,
) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let mut candidates: Vec<Release> = known.newest.values().cloned().collect();
    // Releases that once validated but whose newest reading is not here
    // (refused earlier, or never complete since) keep their last.
    for (key, taken) in &known.taken {
        if !candidates.iter().any(|c| &c.key == key) {
            candidates.push(taken.clone());
        }
    }
    candidates.sort_by(|a, b| a.key.cmp(&b.key));
    let mut refusals: Vec<(String, String, String)> = Vec::new();
    let config = loop {
        let (config, refused) =
            config::parse_with_releases(&file, text, &interface_exists, &candidates)?;
        let mut again = false;
        for r in refused {
            again |= fall_back(&mut candidates, &r.key, known);
            refusals.push((r.key, r.field, r.message));
        }
        if again {
            continue;
        }
        // The release train: a release sending clients back to a version
        // promoted away from is refused like a bad file.
        match engine.admit(&config) {
            Ok(()) => break config,
            Err((field, message)) => {
                let index: Option<usize> = field
                    .strip_prefix("services[")
                    .and_then(|r| r.split_once(']'))
                    .and_then(|(i, _)| i.parse().ok());
                let service = index.and_then(|i| config.services.get(i));
                match service.filter(|s| s.discovered) {
                    None => {
                        return Err(ConfigError {
                            file,
                            field,
                            message,
                        });
                    }
                    Some(s) => {
                        // A release's other VIPs follow its ClusterIP's service.
                        let name = s.follows.as_deref().unwrap_or(&s.name);
                        let Some(c) = candidates.iter().find(|c| service_name(&c.key) == name)
                        else {
                            unreachable!("a discovered service comes from a candidate")
                        };
                        let key = c.key.clone();
                        fall_back(&mut candidates, &key, known);
                        refusals.push((key, "spec.stable".into(), message));
                    }
                }
            }
        }
    };
    known.taken = candidates
        .into_iter()
        .filter(|c| {
            config
                .services
                .iter()
                .any(|s| s.name == service_name(&c.key))
        })
        .map(|c| (c.key.clone(), c))
        .collect();
    let mut why: BTreeMap<String, (String, String)> = known.incomplete.clone();
    for (key, field, message) in refusals {
        why.insert(key, (field, message));
    }
    // Each reason is told once, when it is new.
    for (key, (field, message)) in &why {
        if known.why.get(key) != Some(&(field.clone(), message.clone())) {
            let kept = if known.taken.contains_key(key) {
                "its last valid reading stays in force"
            } else {
                "it is not steered"
            };
            warn!(release = %key, field = %field, "CanaryRelease refused, {kept}: {message}");
        }
    }
    known.why = why;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use serde_json::json;

    use super::*;
    use crate::{
        discovery::releases::Discovered,
        rollout::{Engine, Store},
    };

    /// The loopback exists in every namespace the tests run in.
    const FILE: &str = "interfaces: [{name: lo}]\n";

    fn reading(key: &str, vip: &str, steps: serde_json::Value) -> Discovered {
        Discovered {
            key: key.into(),
            generation: 1,
            paused: false,
            release: Ok(Release {
                key: key.into(),
                service: json!({
                    "name": service_name(key),
                    "vip": vip,
                    "stable": {"backends": ["10.1.0.1:8080"]},
                    "canary": {"backends": ["10.2.0.1:8080"], "revision": "v2"},
                    "rollout": {"steps": steps},
                }),
                extra_vips: Vec::new(),
            }),
            decision: None,
        }
    }

    fn names(c: &Config) -> Vec<(String, SocketAddrV4)> {
        c.services.iter().map(|s| (s.name.clone(), s.vip)).collect()
    }

    #[test]
    fn a_refused_edit_keeps_the_last_valid_reading_and_one_never_valid_is_left_out() {
        let engine = Engine::new(Store::none());
        let path = Path::new("k.yaml");
        let mut known = Known::default();
        known.read(vec![
            reading("shop/web", "10.96.0.10:80", json!([10, 100])),
            reading("shop/api", "10.96.0.11:80", json!([50, 10])),
        ]);
        let c = compose(&engine, path, FILE, &mut known).expect("the file is valid");
        assert_eq!(
            names(&c),
            [("shop.web".to_string(), "10.96.0.10:80".parse().unwrap())]
        );
        assert_eq!(known.why["shop/api"].0, "spec.rollout.steps[1]");
        assert!(!known.why.contains_key("shop/web"));

        // web edited badly: its last valid reading stays in force.
        known.read(vec![
            reading("shop/web", "10.96.0.10:80", json!([90, 10])),
            reading("shop/api", "10.96.0.11:80", json!([50, 10])),
        ]);
        let c = compose(&engine, path, FILE, &mut known).expect("valid");
        assert_eq!(names(&c).len(), 1);
        let steps = &c.services[0]
            .rollout
            .as_ref()
            .expect("a rollout")
            .rollout
            .steps;
        assert_eq!(steps, &[1000, 10_000], "the last valid steps");
        assert_eq!(known.why["shop/web"].0, "spec.rollout.steps[1]");

        // api fixed; web deleted: only api.
        known.read(vec![reading("shop/api", "10.96.0.11:80", json!([50, 100]))]);
        let c = compose(&engine, path, FILE, &mut known).expect("valid");
        assert_eq!(
            names(&c),
            [("shop.api".to_string(), "10.96.0.11:80".parse().unwrap())]
        );
        assert!(known.why.is_empty(), "{:?}", known.why);
    }

    #[test]
    fn of_two_releases_on_one_vip_the_first_by_key_is_steered_and_the_file_s_vips_win() {
        let engine = Engine::new(Store::none());
        let path = Path::new("k.yaml");
        let mut known = Known::default();
        known.read(vec![
            reading("a/web", "10.96.0.10:80", json!([10, 100])),
            reading("b/web", "10.96.0.10:80", json!([10, 100])),
        ]);
        let c = compose(&engine, path, FILE, &mut known).expect("valid");
        assert_eq!(
            names(&c),
            [("a.web".to_string(), "10.96.0.10:80".parse().unwrap())]
        );
        assert_eq!(known.why["b/web"].0, "spec.service");

        // A file service on that VIP: the file's stays, the release is refused.
        let file = format!(
            "{FILE}services:\n  - name: static\n    vip: 10.96.0.10:80\n    stable: {{backends: [10.3.0.1:80]}}\n"
        );
        let mut known = Known::default();
        known.read(vec![reading("a/web", "10.96.0.10:80", json!([10, 100]))]);
        let c = compose(&engine, path, &file, &mut known).expect("valid");
        assert_eq!(
            names(&c),
            [("static".to_string(), "10.96.0.10:80".parse().unwrap())]
        );
        assert_eq!(known.why["a/web"].0, "spec.service");
        // A broken file is the file's error, whatever the releases.
        let err = compose(&engine, path, "interfaces: []\n", &mut known).expect_err("broken");
        assert_eq!(err.field, "interfaces");
    }
}
