//! An operator's command for one service: the one type the CLI builds, the
//! control API carries and the rollout engine acts on.
//!
//! On the wire a verb is the last segment of `POST /v1/services/NAME/VERB`,
//! with a JSON body for the verbs that take arguments (`weight`: `{"percent":
//! 30}`, `start`: `{"revision": "v2"}` or empty).

use serde::{Deserialize, Serialize};

use crate::config::percent_to_basis_points;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verb {
    /// Hold the rollout at its step.
    Pause,
    /// Continue a paused rollout from its step.
    Resume,
    /// Send the canary 100 % now.
    Promote,
    /// Roll the canary back now.
    Abort,
    /// Start the rollout again from its first step; with a revision, as a new
    /// release (a new build on the same backends).
    Start { revision: Option<String> },
    /// Hold the rollout with this canary weight (basis points).
    SetWeight { basis_points: u32 },
}

/// The body of `POST /v1/services/{name}/weight`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    percent: f64,
}

/// The body of `POST /v1/services/{name}/start` (may be empty).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    revision: Option<String>,
}

/// The verbs the API knows, for error messages.
pub const NAMES: &str = "pause, resume, promote, abort, start, weight";

impl Verb {
    /// The path segment that names the verb.
    pub fn segment(&self) -> &'static str {
        match self {
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Promote => "promote",
            Verb::Abort => "abort",
            Verb::Start { .. } => "start",
            Verb::SetWeight { .. } => "weight",
        }
    }

    /// The request body that carries the verb's arguments.
    pub fn body(&self) -> String {
        match self {
            Verb::Start { revision } => serde_json::to_string(&StartBody {
                revision: revision.clone(),
            })
            .expect("serializable"),
            Verb::SetWeight { basis_points } => serde_json::to_string(&WeightBody {
                percent: *basis_points as f64 / 100.0,
            })
            .expect("serializable"),
            _ => String::new(),
        }
    }

    /// The verb a request names; `Err` says what is wrong with it, and
    /// whether the verb is unknown (`true`) or its body is bad (`false`).
    pub fn parse(segment: &str, body: &[u8]) -> Result<Verb, (bool, String)> {
        let empty = body.iter().all(u8::is_ascii_whitespace);
        Ok(match segment {
            "pause" => Verb::Pause,
            "resume" => Verb::Resume,
            "promote" => Verb::Promote,
            "abort" => Verb::Abort,
            "start" => {
                let b: StartBody = if empty {
                    StartBody::default()
                } else {
                    serde_json::from_slice(body).map_err(|e| {
                        (
                            false,
                            format!("expected {{\"revision\": \"NAME\"}} or nothing: {e}"),
                        )
                    })?
                };
                if let Some(r) = &b.revision
                    && (r.is_empty() || r.len() > 128 || r.chars().any(char::is_control))
                {
                    return Err((
                        false,
                        "revision: 1 to 128 printable characters, e.g. an image tag".into(),
                    ));
                }
                Verb::Start {
                    revision: b.revision,
                }
            }
            "weight" => {
                let b: WeightBody = serde_json::from_slice(body)
                    .map_err(|e| (false, format!("expected {{\"percent\": 0 to 100}}: {e}")))?;
                let basis_points = percent_to_basis_points(b.percent)
                    .map_err(|e| (false, format!("percent: {e}")))?;
                Verb::SetWeight { basis_points }
            }
            other => {
                return Err((true, format!("unknown command `{other}`; one of {NAMES}")));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verb_goes_over_the_wire_and_back() {
        for v in [
            Verb::Pause,
            Verb::Resume,
            Verb::Promote,
            Verb::Abort,
            Verb::Start { revision: None },
            Verb::Start {
                revision: Some("v2.1".into()),
            },
            Verb::SetWeight { basis_points: 3050 },
        ] {
            assert_eq!(Verb::parse(v.segment(), v.body().as_bytes()), Ok(v));
        }
        assert!(matches!(Verb::parse("explode", b""), Err((true, _))));
        assert!(matches!(
            Verb::parse("weight", br#"{"percent": "x"}"#),
            Err((false, _))
        ));
        assert!(matches!(
            Verb::parse("weight", br#"{"percent": 101}"#),
            Err((false, m)) if m.contains("outside 0 to 100")
        ));
        assert!(matches!(
            Verb::parse("start", br#"{"revision": ""}"#),
            Err((false, _))
        ));
    }
}
