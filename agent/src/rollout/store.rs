//! Where rollout states are kept across restarts: one JSON file per service
//! under `state.dir/rollouts/`, written atomically (a temporary file,
//! fsync, rename) by a thread of its own, so a slow disk never delays the
//! tick that decided. Writes of one service coalesce: only its newest state
//! is written.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::mpsc,
    thread::JoinHandle,
};

use anyhow::{Context as _, Result};
use tracing::warn;

use super::State;

enum Message {
    Save(String, Vec<u8>),
    /// Answered once everything sent before it is on disk.
    Flush(mpsc::Sender<()>),
}

pub struct Store {
    dir: Option<PathBuf>,
    tx: Option<mpsc::Sender<Message>>,
    writer: Option<JoinHandle<()>>,
}

impl Store {
    /// The states under `state_dir/rollouts`.
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("rollouts");
        let (tx, rx) = mpsc::channel();
        let at = dir.clone();
        let writer = std::thread::Builder::new()
            .name("kanari-store".into())
            .spawn(move || write_loop(&at, rx))
            .map_err(|e| warn!("starting the rollout state writer: {e}; states are not persisted"))
            .ok();
        Self {
            dir: Some(dir),
            tx: writer.as_ref().map(|_| tx),
            writer,
        }
    }

    /// A store that keeps nothing (simulations).
    pub fn none() -> Self {
        Self {
            dir: None,
            tx: None,
            writer: None,
        }
    }

    fn path(dir: &Path, service: &str) -> PathBuf {
        dir.join(format!("{service}.json"))
    }

    /// The state persisted for `service`, if there is a readable one.
    pub fn load(&self, service: &str) -> Option<State> {
        let path = Self::path(self.dir.as_ref()?, service);
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<State>(&text) {
            Ok(mut s) => {
                // Written before revisions had backends: the revision was the backends.
                if s.canary_backends.is_empty() && !s.revision_named {
                    s.canary_backends = s
                        .revision
                        .split(',')
                        .filter_map(|a| a.parse::<SocketAddrV4>().ok())
                        .collect();
                }
                if s.planned_weight == super::machine::PLANNED_UNSET {
                    s.planned_weight = s.weight;
                }
                Some(s)
            }
            Err(e) => {
                warn!(
                    service,
                    "ignoring the unreadable rollout state {}: {e}",
                    path.display()
                );
                None
            }
        }
    }

    /// Persists `state` (in the background).
    pub fn save(&self, service: &str, state: &State) {
        if let Some(tx) = &self.tx {
            let bytes = serde_json::to_vec_pretty(state).expect("a state serializes");
            let _ = tx.send(Message::Save(service.to_string(), bytes));
        }
    }

    /// Waits until every state saved so far is on disk.
    pub fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, wait) = mpsc::channel();
            if tx.send(Message::Flush(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn write_loop(dir: &Path, rx: mpsc::Receiver<Message>) {
    while let Ok(first) = rx.recv() {
        let mut pending = BTreeMap::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        // Take everything queued: a service's newest state wins.
        while let Some(m) = next {
            match m {
                Message::Save(service, bytes) => {
                    pending.insert(service, bytes);
                }
                Message::Flush(done) => flushes.push(done),
            }
            next = rx.try_recv().ok();
        }
        for (service, bytes) in pending {
            if let Err(e) = write_atomically(dir, &service, &bytes) {
                warn!(service, "persisting the rollout state: {e:#}");
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn write_atomically(dir: &Path, service: &str, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = Store::path(dir, service);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    // The rename itself is durable once the directory is.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
