//! Steady HTTP load from the client namespace: workers send one request per
//! new connection, each from the next client address, at a target rate, and
//! record every outcome with its time, until stopped.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::Result;

use crate::{
    client::{get_once, runtime},
    netns::Netns,
    topology::client_addr,
};

/// One request's fate.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// When it was sent (Unix ms).
    pub sent_ms: u64,
    /// The backend that answered and its status, or the error.
    pub result: Result<(SocketAddrV4, u16), String>,
}

/// A load generator's thread and what it records, until stopped (or dropped).
pub struct Recorder<T> {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<T>>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

/// New connections at a target rate: see [`Load::start`].
pub type Load = Recorder<Outcome>;

impl<T: Clone> Recorder<T> {
    /// Everything recorded so far.
    pub fn outcomes(&self) -> Vec<T> {
        self.outcomes.lock().expect("outcomes").clone()
    }

    /// Stops the workers and returns every outcome.
    pub fn stop(mut self) -> Vec<T> {
        self.halt();
        self.outcomes()
    }
}

impl<T> Recorder<T> {
    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<T> Drop for Recorder<T> {
    fn drop(&mut self) {
        self.halt();
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Load {
    /// Starts `workers` workers sending `rate` requests/s in total to `vip`
    /// from client addresses numbered from `first_client` on.
    pub fn start(
        client: &Netns,
        vip: SocketAddrV4,
        rate: f64,
        workers: u32,
        first_client: u32,
    ) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (s, o) = (stop.clone(), outcomes.clone());
        let next = Arc::new(AtomicU32::new(first_client));
        let thread = client.spawn(move || {
            runtime().block_on(async move {
                let local = tokio::task::LocalSet::new();
                let period = Duration::from_secs_f64(workers as f64 / rate);
                for _ in 0..workers {
                    let (s, o, next) = (s.clone(), o.clone(), next.clone());
                    local.spawn_local(async move {
                        let mut tick = tokio::time::interval(period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        while !s.load(Ordering::SeqCst) {
                            tick.tick().await;
                            let src = client_addr(next.fetch_add(1, Ordering::SeqCst));
                            let sent_ms = unix_ms();
                            let result = get_once(src, vip)
                                .await
                                .map(|r| (r.backend, r.status))
                                .map_err(|e| format!("{e:#}"));
                            o.lock()
                                .expect("outcomes")
                                .push(Outcome { sent_ms, result });
                        }
                    });
                }
                local.await;
            })
        })?;
        Ok(Load {
            stop,
            outcomes,
            thread: Some(thread),
        })
    }
}

/// One request on a keep-alive connection.
#[derive(Clone, Debug)]
pub struct KeptOutcome {
    /// Which connection (0-based).
    pub conn: usize,
    pub sent_ms: u64,
    pub result: Result<(SocketAddrV4, u16), String>,
}

/// Keep-alive connections, each sending a request every `pause`, until
/// stopped; a connection that fails is not reopened (its failure is the result).
pub type KeepAlive = Recorder<KeptOutcome>;

impl KeepAlive {
    /// Opens `n` connections from client addresses numbered from `first_client` on.
    pub fn start(
        client: &Netns,
        vip: SocketAddrV4,
        n: usize,
        pause: Duration,
        first_client: u32,
    ) -> Result<KeepAlive> {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (s, o) = (stop.clone(), outcomes.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = client.spawn(move || {
            runtime().block_on(async move {
                let mut conns = Vec::new();
                for i in 0..n {
                    match crate::client::Conn::open(client_addr(first_client + i as u32), vip).await
                    {
                        Ok(c) => conns.push(c),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("opening connection {i}: {e:#}")));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                let local = tokio::task::LocalSet::new();
                for (i, mut c) in conns.into_iter().enumerate() {
                    let (s, o) = (s.clone(), o.clone());
                    local.spawn_local(async move {
                        while !s.load(Ordering::SeqCst) {
                            let sent_ms = unix_ms();
                            let result = c
                                .get()
                                .await
                                .map(|r| (r.backend, r.status))
                                .map_err(|e| format!("{e:#}"));
                            let failed = result.is_err();
                            o.lock().expect("outcomes").push(KeptOutcome {
                                conn: i,
                                sent_ms,
                                result,
                            });
                            if failed {
                                return;
                            }
                            tokio::time::sleep(pause).await;
                        }
                    });
                }
                local.await;
            })
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(anyhow::Error::msg)?;
        Ok(KeepAlive {
            stop,
            outcomes,
            thread: Some(thread),
        })
    }
}
