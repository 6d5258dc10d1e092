//! The HTTP test backend: answers every request with its version name and
//! address, optionally fails a seeded share of requests with 500 and adds a
//! delay, and counts what it served, so tests can compare the kernel's view
//! with the truth.
//!
//! It runs either on a thread inside a namespace ([`BackendHandle`], used by
//! tests and the demo) or as its own process (`kanari-test-backend`).
//!
//! Optionally it also answers UDP on the same address ([`serve_udp`]): every
//! datagram gets one back naming the backend, the same text as an HTTP answer.
//! Off by default.

use std::{
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::watch,
};

use crate::{netns::Netns, rng::splitmix64};

/// How a backend behaves; every knob can change while it serves.
#[derive(Debug)]
pub struct Behavior {
    /// The version label in every answer (`stable`, `canary`, ...).
    pub version: String,
    /// Share of requests answered with 500, in millionths.
    error_ppm: AtomicU32,
    /// Added before every answer, in microseconds.
    delay_us: AtomicU64,
    /// Reset every connection (RST) after reading its first request.
    reset: AtomicBool,
    /// Accept every connection and read its request, never answer (a
    /// deadlocked worker); the connection closes when the client gives up.
    hang: AtomicBool,
    /// Seed of the error decisions.
    pub seed: u64,
}

impl Behavior {
    pub fn healthy(version: &str) -> Arc<Self> {
        Arc::new(Self {
            version: version.to_string(),
            error_ppm: AtomicU32::new(0),
            delay_us: AtomicU64::new(0),
            reset: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            seed: 1,
        })
    }

    /// Answers a seeded share `rate` (0 to 1) of requests with 500.
    pub fn set_error_rate(&self, rate: f64) {
        self.error_ppm.store(
            (rate.clamp(0.0, 1.0) * 1e6).round() as u32,
            Ordering::SeqCst,
        );
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Resets every new connection after its first request instead of answering.
    pub fn set_reset(&self, on: bool) {
        self.reset.store(on, Ordering::SeqCst);
    }

    /// Accepts every new connection and never answers it.
    pub fn set_hang(&self, on: bool) {
        self.hang.store(on, Ordering::SeqCst);
    }

    fn error_rate(&self) -> f64 {
        self.error_ppm.load(Ordering::SeqCst) as f64 / 1e6
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::SeqCst))
    }
}

/// What a backend served.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    /// Requests answered (200 or 500).
    pub requests: AtomicU64,
    /// Of those, answered with 500.
    pub errors: AtomicU64,
    /// Connections reset instead of answered.
    pub resets: AtomicU64,
    /// UDP datagrams answered.
    pub datagrams: AtomicU64,
}

impl Stats {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::SeqCst)
    }
    pub fn datagrams(&self) -> u64 {
        self.datagrams.load(Ordering::SeqCst)
    }
}

/// The answer body: `<version> <address>\n`.
pub fn body(version: &str, addr: SocketAddrV4) -> String {
    format!("{version} {addr}\n")
}

/// Serves HTTP/1.1 (keep-alive) on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    behavior: Arc<Behavior>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let addr = match listener.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => anyhow::bail!("the test backend serves IPv4 only, not {a}"),
    };
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r.context("accepting")?,
            _ = shutdown.changed() => return Ok(()),
        };
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let (behavior, stats) = (behavior.clone(), stats.clone());
        let mut conn_shutdown = shutdown.clone();
        if behavior.reset.load(Ordering::SeqCst) {
            tokio::spawn(reset_after_request(stream, stats));
            continue;
        }
        if behavior.hang.load(Ordering::SeqCst) {
            tokio::spawn(hang(stream, shutdown.clone()));
            continue;
        }
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (b, stats) = (behavior.clone(), stats.clone());
                // `/bytes/N`: a body of N bytes (at most 16 MiB), for transfers.
                let size = req
                    .uri()
                    .path()
                    .strip_prefix("/bytes/")
                    .and_then(|n| n.parse::<usize>().ok())
                    .map(|n| n.min(16 << 20));
                // `/delay/MS`: answered after MS milliseconds (at most a
                // minute), as a long poll is.
                let hold = req
                    .uri()
                    .path()
                    .strip_prefix("/delay/")
                    .and_then(|n| n.parse::<u64>().ok())
                    .map(|ms| Duration::from_millis(ms.min(60_000)));
                async move {
                    if let Some(hold) = hold {
                        tokio::time::sleep(hold).await;
                    }
                    let n = stats.requests.fetch_add(1, Ordering::SeqCst);
                    let delay = b.delay();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let rate = b.error_rate();
                    let fail = rate > 0.0
                        && (splitmix64(b.seed ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d)) as f64
                            / u64::MAX as f64)
                            < rate;
                    if fail {
                        stats.errors.fetch_add(1, Ordering::SeqCst);
                    }
                    let resp = Response::builder()
                        .status(if fail { 500 } else { 200 })
                        .header("x-kanari-version", b.version.as_str())
                        .header("x-kanari-backend", addr.to_string())
                        .body(Full::new(match size {
                            Some(n) => Bytes::from(vec![b'x'; n]),
                            None => Bytes::from(body(&b.version, addr)),
                        }))
                        .expect("a valid response");
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = conn_shutdown.changed() => {}
            }
        });
    }
}

/// Answers every datagram on `socket` with [`body`] (sent from `socket`'s own
/// address) until `shutdown` turns true.
pub async fn serve_udp(
    socket: UdpSocket,
    behavior: Arc<Behavior>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let addr = match socket.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => anyhow::bail!("the test backend serves IPv4 only, not {a}"),
    };
    let answer = body(&behavior.version, addr);
    let mut buf = [0u8; 2048];
    loop {
        let (_, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => r.with_context(|| format!("receiving on udp {addr}"))?,
            _ = shutdown.changed() => return Ok(()),
        };
        // A client that went away (ICMP errors) must not stop the echo.
        if socket.send_to(answer.as_bytes(), from).await.is_ok() {
            stats.datagrams.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Reads a request's head, then closes with RST (SO_LINGER 0).
async fn reset_after_request(mut stream: tokio::net::TcpStream, stats: Arc<Stats>) {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    });
    let _ = read.await;
    if stream.set_zero_linger().is_ok() {
        stats.resets.fetch_add(1, Ordering::SeqCst);
    }
    drop(stream);
}

/// Reads whatever comes and never answers, until the client closes, a
/// minute passes, or the backend stops.
async fn hang(mut stream: tokio::net::TcpStream, mut shutdown: watch::Receiver<bool>) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 1024];
    let read = async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    };
    tokio::select! {
        _ = read => {}
        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        _ = shutdown.changed() => {}
    }
}

/// A backend serving on a thread inside a namespace; stops when dropped.
pub struct BackendHandle {
    pub addr: SocketAddrV4,
    pub stats: Arc<Stats>,
    pub behavior: Arc<Behavior>,
    shutdown: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<Result<()>>>>,
}

impl BackendHandle {
    /// Binds `addr` inside `ns` and serves; returns once the socket listens.
    pub fn start(ns: &Netns, addr: SocketAddrV4, behavior: Arc<Behavior>) -> Result<Self> {
        Self::start_with(ns, addr, behavior, false)
    }

    /// [`BackendHandle::start`], and with `udp_echo` also answers UDP on the
    /// same address ([`serve_udp`]).
    pub fn start_with(
        ns: &Netns,
        addr: SocketAddrV4,
        behavior: Arc<Behavior>,
        udp_echo: bool,
    ) -> Result<Self> {
        let stats = Arc::new(Stats::default());
        let (shutdown, rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread_stats = stats.clone();
        let thread_behavior = behavior.clone();
        let thread = ns.spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let bound = async {
                    let listener = TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the test backend to {addr}"))?;
                    let mut udp = None;
                    if udp_echo {
                        udp = Some(UdpSocket::bind(addr).await.with_context(|| {
                            format!("binding the test backend's UDP echo to {addr}")
                        })?);
                    }
                    anyhow::Ok((listener, udp))
                };
                let (listener, udp) = match bound.await {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok(()));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let echo = async {
                    match udp {
                        Some(socket) => {
                            serve_udp(
                                socket,
                                thread_behavior.clone(),
                                thread_stats.clone(),
                                rx.clone(),
                            )
                            .await
                        }
                        None => Ok(()),
                    }
                };
                tokio::try_join!(
                    serve(
                        listener,
                        thread_behavior.clone(),
                        thread_stats.clone(),
                        rx.clone()
                    ),
                    echo
                )
                .map(|_| ())
            })
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the test backend did not start")??;
        Ok(Self {
            addr,
            stats,
            behavior,
            shutdown,
            thread: Some(thread),
        })
    }

    /// Stops serving: the listener closes (new connections are refused) and
    /// open connections are dropped.
    pub fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e)) | Err(e)) => eprintln!("test backend {}: {e:#}", self.addr),
                Err(_) => eprintln!("test backend {} panicked", self.addr),
            }
        }
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
