//! The Kubernetes Lease that elects the deciding agent (client-go's
//! leader election: read, then replace with the resourceVersion read, so
//! of two agents racing one gets `409 Conflict`).

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use super::LeaseSettings;
use crate::fleet::{
    Leadership,
    lease::{Elector, Record, Step},
};

fn record(l: &Lease) -> Record {
    let spec = l.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity,
        renew: spec.renew_time.map(|t| t.0.to_string()),
        duration_s: spec.lease_duration_seconds.unwrap_or(0).max(0) as u32,
        transitions: spec.lease_transitions.unwrap_or(0).max(0) as u32,
    }
}

/// Runs the election; its view is published on the returned channel.
/// When `stop` turns true (the agent stops) a lease this agent holds is
/// released, so another takes it at once instead of a duration later; the
/// returned task ends then.
pub fn elect(
    client: Client,
    s: LeaseSettings,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Leadership>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Leadership::default());
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    let origin = Instant::now();
    let now_ms = move || origin.elapsed().as_millis() as u64;
    let retry = (s.duration / 5).max(Duration::from_millis(200));
    let task = tokio::spawn(async move {
        let mut elector = Elector::new(s.identity.clone(), s.duration.as_millis() as u64);
        let mut failing = false;
        loop {
            let began = now_ms();
            let outcome = try_once(&api, &s, &mut elector, began).await;
            let holder = match outcome {
                Ok(holder) => {
                    if failing {
                        info!(lease = %s.name, "the lease is readable again");
                    }
                    failing = false;
                    holder
                }
                Err(e) => {
                    if !failing {
                        warn!(lease = %s.name, "the lease cannot be read or written: {e}");
                    }
                    failing = true;
                    None
                }
            };
            let now = Leadership {
                term: elector.leading(now_ms()),
                holder: holder.or_else(|| tx.borrow().holder.clone()),
            };
            if *tx.borrow() != now {
                match (now.term, tx.borrow().term) {
                    (Some(t), None) => info!(term = t, "leading: this agent decides"),
                    (None, Some(_)) => info!(holder = ?now.holder, "no longer leading"),
                    _ => {}
                }
                if tx.send(now).is_err() {
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.changed() => {
                    if elector.leading(now_ms()).is_some() {
                        match release(&api, &s).await {
                            Ok(()) => info!(lease = %s.name, "released the lease: another agent decides now"),
                            Err(e) => warn!(lease = %s.name, "releasing the lease failed (another agent takes it when it lapses): {e}"),
                        }
                    }
                    break;
                }
            }
        }
    });
    (rx, task)
}

/// Clears the holder of a lease this agent holds (client-go's release).
async fn release(api: &Api<Lease>, s: &LeaseSettings) -> Result<(), kube::Error> {
    let Some(mut l) = api.get_opt(&s.name).await? else {
        return Ok(());
    };
    let spec = l.spec.get_or_insert_default();
    if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&s.name, &PostParams::default(), &l)
        .await
        .map(|_| ())
}

/// One round: read the lease, then take, renew or follow. The holder.
async fn try_once(
    api: &Api<Lease>,
    s: &LeaseSettings,
    elector: &mut Elector,
    began: u64,
) -> Result<Option<String>, kube::Error> {
    let lease = api.get_opt(&s.name).await?;
    let step = elector.next(lease.as_ref().map(record).as_ref(), began);
    let (term, taking) = match step {
        Step::Follow { holder } => {
            elector.lost();
            return Ok(Some(holder));
        }
        Step::Take { term } => (term, true),
        Step::Renew { term } => (term, false),
    };
    let now = MicroTime(Timestamp::now());
    let mut l = lease.clone().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(s.name.clone()),
            namespace: Some(s.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    });
    let mut spec = l.spec.take().unwrap_or_else(LeaseSpec::default);
    spec.holder_identity = Some(s.identity.clone());
    spec.lease_duration_seconds = Some(s.duration.as_secs().max(1) as i32);
    spec.renew_time = Some(now.clone());
    spec.lease_transitions = Some(term as i32);
    if taking {
        spec.acquire_time = Some(now);
    }
    l.spec = Some(spec);
    let written = match lease {
        None => api.create(&PostParams::default(), &l).await,
        Some(_) => api.replace(&s.name, &PostParams::default(), &l).await,
    };
    match written {
        Ok(_) => {
            elector.wrote(term, began);
            Ok(Some(s.identity.clone()))
        }
        // Another agent wrote first: it leads.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            elector.lost();
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
