//! Campaigning for the fleet's leadership on this agent's lease (etcd's
//! election service: the lowest create revision under the election's
//! name leads; the others' campaigns wait until its key goes, with its
//! lease). Leading ends when the lease is lost (on our clock, before
//! etcd's) or the agent stops (it resigns: another leads at once).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, LeaderKey, ResignOptions};
use tokio::sync::watch;
use tracing::{debug, info};

use super::{CALL, Leading, Settings, term};
use crate::fleet::Leadership;

/// Runs the election; its view is published on the returned channel, and
/// the leader's key (for fenced writes) in `leading`.
pub fn elect(
    client: Client,
    s: Settings,
    mut session: watch::Receiver<Option<i64>>,
    leading: Arc<Mutex<Option<Leading>>>,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Leadership>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Leadership::default());
    let set = move |l: Leadership| {
        tx.send_if_modified(|now| {
            let changed = *now != l;
            match (l.term, now.term) {
                (Some(t), None) => info!(term = t, "leading: this agent decides for the fleet"),
                (None, Some(_)) => info!(leader = ?l.holder, "no longer leading"),
                _ => {}
            }
            *now = l;
            changed
        });
    };
    let task = tokio::spawn(async move {
        let name = s.keys.election();
        let mut holder: Option<String> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            let Some(lease) = *session.borrow_and_update() else {
                *leading.lock().expect("not poisoned") = None;
                set(Leadership {
                    term: None,
                    holder: holder.clone(),
                });
                tokio::select! {
                    r = session.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
                continue;
            };
            // Campaign, learning who leads meanwhile.
            let mut c = client.clone();
            let campaign = c.campaign(name.clone(), s.node.clone(), lease);
            tokio::pin!(campaign);
            let mut poll = tokio::time::interval(Duration::from_secs(1));
            let won: Option<LeaderKey> = loop {
                tokio::select! {
                    r = &mut campaign => match r {
                        Ok(mut r) => break r.take_leader(),
                        Err(e) => {
                            debug!("etcd: campaigning: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break None;
                        }
                    },
                    _ = poll.tick() => {
                        let mut c = client.clone();
                        if let Ok(Ok(r)) = tokio::time::timeout(CALL, c.leader(name.clone())).await {
                            holder = r.kv().and_then(|kv| kv.value_str().ok()).map(str::to_string);
                        }
                        set(Leadership { term: None, holder: holder.clone() });
                    }
                    r = session.changed() => {
                        if r.is_err() { return }
                        break None;
                    }
                    _ = stop.changed() => return,
                }
            };
            let Some(key) = won else { continue };
            // Our lease may have been lost while the answer travelled.
            if *session.borrow_and_update() != Some(lease) {
                continue;
            }
            let t = term(key.rev());
            *leading.lock().expect("not poisoned") = Some(Leading {
                key: key.key().to_vec(),
                revision: key.rev(),
                term: t,
            });
            holder = Some(s.node.clone());
            set(Leadership {
                term: Some(t),
                holder: holder.clone(),
            });
            // Lead until the lease goes or we stop.
            tokio::select! {
                _ = session.changed() => {}
                _ = stop.changed() => {}
            }
            // Stopping revokes the lease too (the session's task): either
            // hands the leadership on at once.
            let stopping = *stop.borrow();
            *leading.lock().expect("not poisoned") = None;
            set(Leadership {
                term: None,
                holder: None,
            });
            if stopping {
                let mut c = client.clone();
                let resign = c.resign(Some(ResignOptions::new().with_leader(key)));
                match tokio::time::timeout(CALL, resign).await {
                    Ok(Ok(_)) => info!("resigned: another agent decides now"),
                    _ => info!(
                        "resigning failed: another agent decides when this agent's lease is revoked or lapses"
                    ),
                }
                return;
            }
            holder = None;
        }
    });
    (rx, task)
}
