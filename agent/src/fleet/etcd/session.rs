//! This agent's etcd lease: granted with the fleet's TTL, kept alive a
//! few times per TTL, and given up on *our* clock before etcd could
//! expire it — so this agent never believes it leads after the server
//! has let another lead. Lost (etcd away, a keep-alive unanswered), a new
//! lease is granted when etcd answers again. Stopping revokes it: the
//! leader's key and the report go at once, and another agent leads.

use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::CALL;

/// The lease in force (`None`: none yet, or lost).
pub fn spawn(
    client: Client,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Option<i64>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let every = ttl / 4;
        // Believed lost this long after the last answered keep-alive was
        // sent: etcd expires a lease no sooner than `ttl` after it.
        let give_up = ttl * 3 / 4;
        let mut failing = false;
        let mut backoff = Duration::from_millis(100);
        // Leases lost while etcd could not be told (no quorum, a cut
        // link): revoked once it answers, so a key of ours left under an
        // old lease (a leader's) does not hold the others back a TTL.
        let mut stale: Vec<i64> = Vec::new();
        loop {
            let mut c = client.clone();
            let granted =
                tokio::time::timeout(CALL, c.lease_grant(ttl.as_secs() as i64, None)).await;
            let id = match granted {
                Ok(Ok(g)) => g.id(),
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {CALL:?}"),
                    };
                    debug!("etcd: granting a lease: {why}");
                    if !failing {
                        warn!(
                            "etcd: granting a lease failed, retrying (every host keeps its weights meanwhile): {why}"
                        );
                    }
                    failing = true;
                    if pause(&mut stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let granted_at = Instant::now();
            if failing {
                info!("etcd answers again");
            }
            for old in std::mem::take(&mut stale) {
                let mut c = client.clone();
                match tokio::time::timeout(CALL, c.lease_revoke(old)).await {
                    Ok(Ok(_)) => info!(lease = old, "etcd: revoked the lease lost before"),
                    // Gone already (it lapsed): nothing to do.
                    Ok(Err(e)) if e.to_string().contains("not found") => {}
                    _ => stale.push(old),
                }
            }
            failing = false;
            backoff = Duration::from_millis(100);
            let _ = tx.send(Some(id));
            let kept = keep(&client, id, granted_at, every, give_up, &mut stop).await;
            let _ = tx.send(None);
            // Stopping, or lost: revoke (best effort), so nothing of this
            // lease outlives it by a TTL.
            let mut c = client.clone();
            let revoked = matches!(
                tokio::time::timeout(CALL, c.lease_revoke(id)).await,
                Ok(Ok(_))
            );
            if !revoked {
                stale.push(id);
            }
            match kept {
                Kept::Stopped => {
                    info!("etcd: revoked this agent's lease");
                    return;
                }
                Kept::Lost(why) => {
                    warn!("etcd: this agent's lease is lost ({why}); taking a new one");
                }
            }
        }
    });
    (rx, task)
}

enum Kept {
    Stopped,
    Lost(String),
}

/// Keeps lease `id` alive until it is lost or `stop`.
async fn keep(
    client: &Client,
    id: i64,
    granted_at: Instant,
    every: Duration,
    give_up: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Kept {
    let mut last_ok = granted_at;
    // Reopened after an unanswered keep-alive, so a late answer is never
    // taken for a newer one's.
    let mut open = None;
    loop {
        if pause(stop, every).await {
            return Kept::Stopped;
        }
        let sent = Instant::now();
        let left = give_up.saturating_sub(sent - last_ok);
        if left.is_zero() {
            return Kept::Lost(format!("no keep-alive answered for {give_up:?}"));
        }
        let answer = tokio::time::timeout(left.min(CALL), async {
            if open.is_none() {
                let mut c = client.clone();
                open = Some(c.lease_keep_alive(id).await?);
            }
            let (keeper, stream) = open.as_mut().expect("opened");
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = sent,
            Ok(Ok(Some(_))) => return Kept::Lost("etcd expired it".into()),
            // The stream ended or failed (etcd restarted, the link
            // reconnected), or no answer in time: reopen and try again
            // until `give_up`.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => open = None,
        }
    }
}

/// Sleeps `d`; true when told to stop.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        r = stop.changed() => r.is_err() || *stop.borrow(),
    }
}
