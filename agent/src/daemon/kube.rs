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
        // A refused newest reading falls back to the one taken last.
        let mut again = false;
        for r in refused {
            let fallback = known.taken.get(&r.key).cloned();
            let at = candidates.iter().position(|c| c.key == r.key);
            match (fallback, at) {
                (Some(old), Some(i)) if candidates[i] != old => {
                    candidates[i] = old;
                    again = true;
                }
                (_, Some(i)) => {
                    candidates.remove(i);
                    again = true;
                }
                _ => {}
            }
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
                        let Some(i) = candidates
                            .iter()
                            .position(|c| service_name(&c.key) == s.name)
                        else {
                            unreachable!("a discovered service comes from a candidate")
                        };
                        let key = candidates[i].key.clone();
                        match known.taken.get(&key) {
                            Some(old) if *old != candidates[i] => candidates[i] = old.clone(),
                            _ => {
                                candidates.remove(i);
                            }
                        }
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
