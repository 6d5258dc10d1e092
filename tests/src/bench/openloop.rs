//! Open-loop HTTP load for the rollback suite: requests leave at fixed times
//! (`rate` per second) whatever the answers do, one new connection each, each
//! from the next client address, and every request is recorded with when it
//! left, how long it took and who answered. A slow backend therefore does not
//! slow the load down (no coordinated omission), which the harness's
//! closed-loop [`crate::load::Load`] would.
//!
//! The client is a minimal HTTP/1.1 exchange on a raw socket
//! (`Connection: close`, read to EOF) so two client threads sustain several
//! thousand new connections per second on a small machine.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpSocket,
    time::timeout,
};

use crate::{client::runtime, netns::Netns, topology::client_addr};

/// How long one request may take in all (connect, send, read to EOF).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Requests in flight per client thread beyond which new ones are skipped
/// (counted, never silently dropped).
const MAX_IN_FLIGHT: u64 = 4096;

/// One request's fate.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// When it left (Unix µs).
    pub sent_us: u64,
    /// From connect to the last byte, µs.
    pub latency_us: u64,
    /// The backend that answered and the HTTP status, or what went wrong.
    pub result: Result<(SocketAddrV4, u16), String>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        matches!(self.result, Ok((_, 200)))
    }
}

/// What a finished load did.
#[derive(Clone, Debug, Default)]
pub struct Finished {
    pub samples: Vec<Sample>,
    /// Requests not sent because too many were in flight.
    pub skipped: u64,
    /// Unix µs when the load started and stopped sending.
    pub started_us: u64,
    pub stopped_us: u64,
}

impl Finished {
    /// Requests sent per second over the time the load ran.
    pub fn achieved_rate(&self) -> f64 {
        let secs = self.stopped_us.saturating_sub(self.started_us) as f64 / 1e6;
        if secs > 0.0 {
            self.samples.len() as f64 / secs
        } else {
            0.0
        }
    }
}

pub struct OpenLoop {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    skipped: Arc<AtomicU64>,
    started_us: u64,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl OpenLoop {
    /// Starts sending `rate` requests/s to `vip` from `client`, spread over
    /// `threads` client threads, from client addresses numbered from
    /// `first_client` on.
    pub fn start(
        client: &Netns,
        vip: SocketAddrV4,
        rate: f64,
        threads: u32,
        first_client: u32,
    ) -> Result<OpenLoop> {
        anyhow::ensure!(
            rate > 0.0 && threads > 0,
            "a positive rate and thread count"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let skipped = Arc::new(AtomicU64::new(0));
        let start = Instant::now() + Duration::from_millis(20);
        let started_us = unix_us() + 20_000;
        let period = Duration::from_secs_f64(threads as f64 / rate);
        let mut handles = Vec::new();
        for k in 0..threads {
            let (stop, samples, skipped) = (stop.clone(), samples.clone(), skipped.clone());
            // Thread k sends requests k, k + threads, k + 2·threads, ...
            let offset = Duration::from_secs_f64(k as f64 / rate);
            handles.push(client.spawn(move || {
                runtime().block_on(async move {
                    let local = tokio::task::LocalSet::new();
                    local
                        .run_until(async move {
                            let in_flight = std::rc::Rc::new(std::cell::Cell::new(0u64));
                            let mut i: u64 = 0;
                            while !stop.load(Ordering::Relaxed) {
                                let due = start + offset + period.mul_f64(i as f64);
                                tokio::time::sleep_until(due.into()).await;
                                let n = first_client
                                    .wrapping_add((i * threads as u64 + k as u64) as u32);
                                i += 1;
                                if in_flight.get() >= MAX_IN_FLIGHT {
                                    skipped.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                in_flight.set(in_flight.get() + 1);
                                let (samples, in_flight) = (samples.clone(), in_flight.clone());
                                tokio::task::spawn_local(async move {
                                    let sent_us = unix_us();
                                    let t = Instant::now();
                                    let result = request(client_addr(n), vip).await;
                                    let latency_us = t.elapsed().as_micros() as u64;
                                    samples.lock().expect("samples").push(Sample {
                                        sent_us,
                                        latency_us,
                                        result,
                                    });
                                    in_flight.set(in_flight.get() - 1);
                                });
                            }
                            // Let what is in flight finish (each has a deadline).
                            let deadline =
                                Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1);
                            while in_flight.get() > 0 && Instant::now() < deadline {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        })
                        .await;
                })
            })?);
        }
        Ok(OpenLoop {
            stop,
            samples,
            skipped,
            started_us,
            threads: handles,
        })
    }

    /// Everything recorded so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// Stops sending, waits for what is in flight, returns every sample.
    pub fn stop(mut self) -> Finished {
        let stopped_us = unix_us();
        self.halt();
        let mut samples = std::mem::take(&mut *self.samples.lock().expect("samples"));
        samples.sort_by_key(|s| s.sent_us);
        Finished {
            samples,
            skipped: self.skipped.load(Ordering::Relaxed),
            started_us: self.started_us,
            stopped_us,
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for OpenLoop {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One `GET /` on a new connection from `src`, read to EOF.
async fn request(src: Ipv4Addr, vip: SocketAddrV4) -> Result<(SocketAddrV4, u16), String> {
    let exchange = async {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
            .map_err(|e| format!("bind {src}: {e}"))?;
        let mut stream = socket
            .connect(SocketAddr::V4(vip))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: kanari-bench\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) if buf.len() + n <= 16 * 1024 => buf.extend_from_slice(&chunk[..n]),
                Ok(_) => return Err("answer too long".to_string()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        parse_answer(&buf)
    };
    timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

/// The status and the answering backend from a test backend's whole answer
/// (`HTTP/1.1 NNN ...`, headers, body `<version> <address>`).
pub fn parse_answer(buf: &[u8]) -> Result<(SocketAddrV4, u16), String> {
    let text = std::str::from_utf8(buf).map_err(|_| "a non-UTF-8 answer".to_string())?;
    let status: u16 = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            if text.is_empty() {
                "closed without an answer".to_string()
            } else {
                format!("not an HTTP answer: {:?}", &text[..text.len().min(40)])
            }
        })?;
    let (_, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "an answer without a body".to_string())?;
    let backend = body
        .trim()
        .split_once(' ')
        .and_then(|(_, a)| a.parse().ok())
        .ok_or_else(|| format!("not a test backend answer: {:?}", body.trim()))?;
    Ok((backend, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_test_backend_answer() {
        let a = b"HTTP/1.1 500 Internal Server Error\r\nx-kanari-version: canary\r\ncontent-length: 25\r\n\r\ncanary 10.2.3.1:8080\n";
        assert_eq!(parse_answer(a), Ok(("10.2.3.1:8080".parse().unwrap(), 500)));
        let b = b"HTTP/1.1 200 OK\r\n\r\nstable 10.2.1.1:8080\n";
        assert_eq!(parse_answer(b), Ok(("10.2.1.1:8080".parse().unwrap(), 200)));
        assert!(parse_answer(b"").unwrap_err().contains("closed"));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\nhello").is_err());
        assert!(parse_answer(b"SSH-2.0").is_err());
    }

    #[test]
    fn achieved_rate_is_samples_over_time() {
        let f = Finished {
            samples: vec![
                Sample {
                    sent_us: 0,
                    latency_us: 1,
                    result: Err("x".into()),
                };
                50
            ],
            skipped: 0,
            started_us: 1_000_000,
            stopped_us: 1_500_000,
        };
        assert_eq!(f.achieved_rate(), 100.0);
    }
}
