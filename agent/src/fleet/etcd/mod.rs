//! The etcd side of the fleet, for hosts outside Kubernetes (`fleet:`).
//!
//! Keys, under `/kanari/FLEET/`:
//! - `leader`: etcd's election (v3election) over each agent's lease; the
//!   leader's key's create revision is its term, and every write of the
//!   leader is a transaction on it (fencing: a deposed leader's write
//!   fails).
//! - `services/NAME`: the leader's status of a service (the same document
//!   as a CanaryRelease's status: phase, canaryWeight, step,
//!   weightGeneration, verdicts, leader), watched by every agent.
//! - `agents/NODE`: each agent's report (telemetry URL, generation and
//!   weight held), bound to its lease: a host that stops renewing leaves.
//!
//! [`session`] keeps the lease, [`election`] campaigns on it,
//! [`decisions`] watches the services' keys.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp,
};
use serde_json::Value;
use tokio::sync::watch;
use tracing::info;

use super::{Coordination, Peer, Peers};

pub mod decisions;
pub mod election;
pub mod session;

/// A unary call to etcd gives up after this long (the caller retries).
pub const CALL: Duration = Duration::from_secs(1);

/// `fleet:`, resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub keys: Keys,
    /// This host's name in the fleet.
    pub node: String,
    pub ttl: Duration,
}

/// The fleet's keys.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(fleet: &str) -> Keys {
        Keys {
            prefix: format!("/kanari/{fleet}/"),
        }
    }
    pub fn election(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn agents(&self) -> String {
        format!("{}agents/", self.prefix)
    }
    pub fn services(&self) -> String {
        format!("{}services/", self.prefix)
    }
}

pub fn settings(f: &crate::config::Fleet) -> Settings {
    Settings {
        keys: Keys::new(&f.name),
        node: f.node.clone().unwrap_or_else(super::host_name),
        ttl: f.ttl,
    }
}

/// A client of `f`'s endpoints. It connects lazily: an etcd that is not
/// up yet (or away) is retried by each call, not refused here; TLS files
/// that cannot be read are.
pub async fn connect(f: &crate::config::Fleet) -> Result<Client> {
    // HTTP/2 pings find a dead connection (a cut link) within seconds, so
    // the channel reconnects when the path returns.
    let mut o = ConnectOptions::new()
        .with_connect_timeout(CALL)
        .with_keep_alive(Duration::from_secs(1), CALL)
        .with_keep_alive_while_idle(true);
    if let Some(t) = &f.tls {
        let read = |field: &str, p: &std::path::Path| {
            std::fs::read(p)
                .with_context(|| format!("fleet.etcd.tls.{field}: reading {}", p.display()))
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca", &t.ca)?));
        if let Some((cert, key)) = &t.identity {
            tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        }
        o = o.with_tls(tls);
    }
    let client = Client::connect(&f.endpoints, Some(o))
        .await
        .with_context(|| format!("fleet.etcd.endpoints: {}", f.endpoints.join(", ")))?;
    info!(endpoints = %f.endpoints.join(", "), fleet = %f.name, "coordinating the fleet through etcd");
    Ok(client)
}

/// The leader's key while this agent leads, and its term.
#[derive(Clone, Debug)]
pub struct Leading {
    pub key: Vec<u8>,
    pub revision: i64,
    pub term: u32,
}

/// A term from the leader key's create revision (etcd's revisions only
/// grow; past 2³² writes the term saturates and decisions still order by
/// the fencing transaction).
pub fn term(revision: i64) -> u32 {
    u32::try_from(revision.max(1)).unwrap_or(u32::MAX)
}

/// The fleet's reports and the leader's writes, through etcd.
pub struct Board {
    client: Client,
    keys: Keys,
    session: watch::Receiver<Option<i64>>,
    leading: Arc<Mutex<Option<Leading>>>,
}

impl Board {
    pub fn new(
        client: Client,
        keys: Keys,
        session: watch::Receiver<Option<i64>>,
        leading: Arc<Mutex<Option<Leading>>>,
    ) -> Board {
        Board {
            client,
            keys,
            session,
            leading,
        }
    }
}

async fn timed<T>(what: &str, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    tokio::time::timeout(CALL, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: etcd did not answer within {CALL:?}"))?
        .with_context(|| what.to_string())
}

impl Coordination for Board {
    async fn report(&self, me: &Peer) -> Result<()> {
        let lease = (*self.session.borrow()).context("no etcd lease yet")?;
        let key = format!("{}{}", self.keys.agents(), me.node);
        let mut c = self.client.clone();
        let put = c.put(
            key,
            serde_json::to_vec(me)?,
            Some(PutOptions::new().with_lease(lease)),
        );
        timed("writing this agent's report", put).await.map(drop)
    }

    async fn peers(&self) -> Result<Peers> {
        let mut c = self.client.clone();
        let get = c.get(self.keys.agents(), Some(GetOptions::new().with_prefix()));
        let r = timed("listing the agents' reports", get).await?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Peer>(kv.value()).ok())
            .map(|p| (p.node.clone(), p))
            .collect())
    }

    async fn publish(&self, key: &str, status: &Value, term: u32) -> Result<()> {
        let leading = self.leading.lock().expect("not poisoned").clone();
        let l = leading
            .filter(|l| l.term == term)
            .context("this agent no longer leads")?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                l.key.clone(),
                CompareOp::Equal,
                l.revision,
            )])
            .and_then([TxnOp::put(
                format!("{}{key}", self.keys.services()),
                serde_json::to_vec(status)?,
                None,
            )]);
        let mut c = self.client.clone();
        let r = timed("writing the service's state", c.txn(txn)).await?;
        anyhow::ensure!(
            r.succeeded(),
            "the leader's key changed: this agent no longer leads (term {term})"
        );
        Ok(())
    }

    async fn event(&self, key: &str, kind: &str, reason: &str, message: &str) {
        // etcd keeps no events: the journal does.
        info!(service = %key, kind, reason, "{message}");
    }
}
