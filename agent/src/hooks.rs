//! Webhooks (`rollout.webhooks`), as Flagger calls them: `event` hooks are
//! told of every step, pause, promotion and rollback; gates
//! (`confirm-traffic-increase`, `confirm-promotion`) are asked before the
//! weight goes up or the canary is promoted, and a non-2xx answer holds it.
//!
//! Every call is made by tasks of the runtime, never on the loop's thread:
//! the loop only queues ([`Hooks::send`], which never waits) and takes gate
//! answers back as inputs. Each event webhook has its own queue, delivered
//! in order; each service's gates are asked in turn. An attempt has the
//! webhook's `timeout`; a failed one (no connection, timeout, non-2xx) is
//! tried again `retries` times, after 0.5 s, 1 s, 2 s ... (at most 5 s).
//! Every delivery is counted by outcome (`kanari_webhook_deliveries_total`).
//!
//! The payload is Flagger's: `{name, namespace, phase, checksum, metadata}`,
//! metadata holding the webhook's own keys and what happened.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{
    config::{Config, HookKind, Webhook},
    rollout::{Notice, Phase},
};

/// Deliveries by (service, webhook, type, outcome): `ok`, `failed` (after
/// its retries), `dropped` (its queue was full).
pub type DeliveryCounts = BTreeMap<(String, String, &'static str, &'static str), u64>;

/// Flagger's phase names, so receivers written for Flagger understand them.
pub fn flagger_phase(phase: Phase, awaiting: Option<HookKind>) -> &'static str {
    match (phase, awaiting) {
        (Phase::Idle, _) => "Initialized",
        (Phase::Progressing, Some(HookKind::ConfirmPromotion)) => "WaitingPromotion",
        (Phase::Progressing, _) => "Progressing",
        (Phase::Paused, _) => "Waiting",
        (Phase::Promoted, _) => "Succeeded",
        (Phase::RolledBack, _) => "Failed",
    }
}

/// FNV-1a of the revision, in hex: Flagger's `checksum` tells revisions apart.
fn checksum(revision: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in revision.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The JSON posted to `hook` for `n`.
pub fn payload(n: &Notice, hook: &Webhook) -> Value {
    let mut metadata: BTreeMap<String, String> = hook.metadata.clone();
    let mut put = |k: &str, v: String| {
        metadata.insert(k.to_string(), v);
    };
    put("type", hook.kind.name().to_string());
    if let Some(e) = n.event {
        put("event", e.to_string());
    }
    put("message", n.reason.clone());
    put("revision", n.revision.clone());
    put("weight", format!("{}", n.weight as f64 / 100.0));
    put("step", (n.step + 1).to_string());
    if let Some(c) = n.cause {
        put("cause", c.label().to_string());
    }
    json!({
        "name": n.service,
        // The Kubernetes namespace of a CanaryRelease; none for a file's service.
        "namespace": "",
        "phase": flagger_phase(n.phase, n.awaiting),
        "checksum": checksum(&n.revision),
        "metadata": metadata,
    })
}

/// A gate's answer, back to the loop.
#[derive(Clone, Debug, PartialEq)]
pub struct GateAnswer {
    pub service: String,
    pub revision: String,
    pub kind: HookKind,
    pub open: bool,
    pub why: String,
}

enum Job {
    /// Tell every `event` webhook of the service.
    Event(Notice, Vec<Webhook>),
    /// Ask every webhook of the notice's gate.
    Gate(Notice, Vec<Webhook>),
}

/// The loop's handle on the webhook tasks.
#[derive(Clone)]
pub struct Hooks {
    jobs: mpsc::Sender<Job>,
    counts: Arc<Mutex<DeliveryCounts>>,
}

/// Jobs waiting for the dispatcher, and deliveries waiting per webhook.
const QUEUE: usize = 256;

impl Hooks {
    /// Starts the dispatcher on the current runtime; gate answers go to `answers`.
    pub fn spawn(answers: mpsc::Sender<GateAnswer>) -> Hooks {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let counts = Arc::new(Mutex::new(DeliveryCounts::new()));
        tokio::spawn(dispatch(rx, counts.clone(), answers));
        Hooks { jobs, counts }
    }

    /// Queues what `notices` call for under `config`; never waits.
    pub fn send(&self, config: &Config, notices: Vec<Notice>) {
        for n in notices {
            let Some(spec) = config
                .services
                .iter()
                .find(|s| s.name == n.service)
                .and_then(|s| s.rollout.as_ref())
            else {
                continue;
            };
            let of = |kind: HookKind| -> Vec<Webhook> {
                spec.rollout
                    .webhooks
                    .iter()
                    .filter(|w| w.kind == kind)
                    .cloned()
                    .collect()
            };
            let (job, hooks) = match (n.event, n.gate) {
                (_, Some(kind)) => {
                    let hooks = of(kind);
                    (Job::Gate(n.clone(), hooks.clone()), hooks)
                }
                (Some(_), None) => {
                    let hooks = of(HookKind::Event);
                    (Job::Event(n.clone(), hooks.clone()), hooks)
                }
                (None, None) => continue,
            };
            if hooks.is_empty() {
                continue;
            }
            if self.jobs.try_send(job).is_err() {
                for h in &hooks {
                    count(&self.counts, &n.service, h, "dropped");
                }
                warn!(service = %n.service, "webhook queue full: a notice was dropped");
            }
        }
    }

    pub fn counts(&self) -> DeliveryCounts {
        self.counts.lock().expect("not poisoned").clone()
    }
}

fn count(counts: &Mutex<DeliveryCounts>, service: &str, hook: &Webhook, outcome: &'static str) {
    *counts
        .lock()
        .expect("not poisoned")
        .entry((
            service.to_string(),
            hook.name.clone(),
            hook.kind.name(),
            outcome,
        ))
        .or_default() += 1;
}

/// Hands each job to its queue: one per event webhook, one per service's gates.
async fn dispatch(
    mut jobs: mpsc::Receiver<Job>,
    counts: Arc<Mutex<DeliveryCounts>>,
    answers: mpsc::Sender<GateAnswer>,
) {
    let mut events: HashMap<(String, String), mpsc::Sender<(Notice, Webhook)>> = HashMap::new();
    let mut gates: HashMap<String, mpsc::Sender<(Notice, Vec<Webhook>)>> = HashMap::new();
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Event(n, hooks) => {
                for h in hooks {
                    let tx = events
                        .entry((n.service.clone(), h.name.clone()))
                        .or_insert_with(|| {
                            let (tx, mut rx) = mpsc::channel::<(Notice, Webhook)>(QUEUE);
                            let counts = counts.clone();
                            tokio::spawn(async move {
                                while let Some((n, h)) = rx.recv().await {
                                    let outcome = match deliver(&h, &payload(&n, &h)).await {
                                        Ok(()) => "ok",
                                        Err(_) => "failed",
                                    };
                                    count(&counts, &n.service, &h, outcome);
                                }
                            });
                            tx
                        });
                    if tx.try_send((n.clone(), h.clone())).is_err() {
                        count(&counts, &n.service, &h, "dropped");
                    }
                }
            }
            Job::Gate(n, hooks) => {
                let tx = gates.entry(n.service.clone()).or_insert_with(|| {
                    let (tx, mut rx) = mpsc::channel::<(Notice, Vec<Webhook>)>(QUEUE);
                    let (counts, answers) = (counts.clone(), answers.clone());
                    tokio::spawn(async move {
                        while let Some((n, hooks)) = rx.recv().await {
                            if answers.send(ask(&n, &hooks, &counts).await).await.is_err() {
                                break;
                            }
                        }
                    });
                    tx
                });
                if tx.try_send((n.clone(), hooks.clone())).is_err() {
                    for h in &hooks {
                        count(&counts, &n.service, h, "dropped");
                    }
                }
            }
        }
    }
}

/// Asks every webhook of a gate; open when each answered 2xx.
async fn ask(n: &Notice, hooks: &[Webhook], counts: &Mutex<DeliveryCounts>) -> GateAnswer {
    let kind = n.gate.expect("a gate notice");
    let mut refusals = Vec::new();
    for h in hooks {
        match deliver(h, &payload(n, h)).await {
            Ok(()) => count(counts, &n.service, h, "ok"),
            Err(e) => {
                count(counts, &n.service, h, "failed");
                refusals.push(format!("{}: {e:#}", h.name));
            }
        }
    }
    GateAnswer {
        service: n.service.clone(),
        revision: n.revision.clone(),
        kind,
        open: refusals.is_empty(),
        why: refusals.join("; "),
    }
}

/// Posts `body` to `hook`, with its timeout per attempt and its retries.
async fn deliver(hook: &Webhook, body: &Value) -> Result<()> {
    let body = Bytes::from(body.to_string());
    let mut last = anyhow!("not attempted");
    for attempt in 0..=hook.retries {
        if attempt > 0 {
            let backoff =
                Duration::from_millis(500 << (attempt - 1).min(4)).min(Duration::from_secs(5));
            tokio::time::sleep(backoff).await;
        }
        match tokio::time::timeout(hook.timeout, post(&hook.url, body.clone())).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = anyhow!(
                    "no answer within {}",
                    humantime::format_duration(hook.timeout)
                )
            }
        }
        debug!(webhook = %hook.name, attempt, "webhook attempt failed: {last:#}");
    }
    warn!(webhook = %hook.name, url = %hook.url, "webhook failed after {} attempt(s): {last:#}", hook.retries + 1);
    Err(last)
}

/// One POST; Ok on a 2xx answer.
async fn post(url: &str, body: Bytes) -> Result<()> {
    let (status, _) = crate::api::http_once(url, Some(body))
        .await
        .context("posting")?;
    if !(200..300).contains(&status) {
        bail!("answered {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::RollbackCause;

    #[test]
    fn the_payload_is_flagger_s() {
        let n = Notice {
            service: "web".into(),
            event: Some("rolled_back"),
            gate: None,
            phase: Phase::RolledBack,
            awaiting: None,
            weight: 0,
            step: 1,
            revision: "v2".into(),
            reason: "5xx".into(),
            cause: Some(RollbackCause::Operator),
        };
        let hook = Webhook {
            name: "chat".into(),
            kind: HookKind::Event,
            url: "http://x/".into(),
            timeout: Duration::from_secs(1),
            retries: 0,
            metadata: [("team".to_string(), "payments".to_string())].into(),
        };
        let p = payload(&n, &hook);
        assert_eq!(p["name"], "web");
        assert_eq!(p["namespace"], "");
        assert_eq!(p["phase"], "Failed");
        assert_eq!(p["checksum"], checksum("v2"));
        assert_ne!(checksum("v2"), checksum("v3"));
        let m = &p["metadata"];
        assert_eq!(m["team"], "payments");
        assert_eq!(m["event"], "rolled_back");
        assert_eq!(m["cause"], "operator");
        assert_eq!(m["type"], "event");
        assert_eq!(m["step"], "2");
        assert_eq!(
            flagger_phase(Phase::Progressing, Some(HookKind::ConfirmPromotion)),
            "WaitingPromotion"
        );
    }
}
