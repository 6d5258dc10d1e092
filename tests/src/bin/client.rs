//! `kanari-test-client`: a client that runs in a cgroup and a network
//! namespace of the test's choosing, for socket-level load balancing (BPF
//! programs attached to a cgroup steer the sockets of processes inside it).
//!
//! Setup, in order: `--cgroup DIR` moves the process into the cgroup v2
//! directory DIR (its PID into DIR/cgroup.procs), then `--netns NAME` enters
//! the network namespace NAME (/run/netns/NAME, or a path). Then the mode
//! runs, before any socket exists: every socket is the cgroup's. Results are
//! JSON lines on stdout, one per request; the exit status is 0 whatever the
//! requests' outcome, non-zero (with a message on stderr) when setup fails.
//!
//! Use `--netns` rather than `ip netns exec`: that one remounts /sys, and
//! the cgroup mounts under it vanish from the program's view.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kanari_tests::client::Conn;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    version,
    about = "The socket-level client of kanari's tests: joins a cgroup and a network \
             namespace, then makes requests and prints one JSON line per request.",
    after_help = "Lines: tcp and hold print {\"ok\":true,\"status\":200,\"backend\":\"10.2.1.1:8080\",\
                  \"version\":\"stable\",\"local\":\"..\",\"peer\":\"..\"} (peer: getpeername(2) of the \
                  connected socket), udp prints {\"ok\":true,\"from\":\"..\",\"reply\":\"..\",\
                  \"backend\":\"..\",\"version\":\"..\"} (from: what recv_from(2) reports); a failed \
                  request prints {\"ok\":false,\"error\":\"..\"}."
)]
struct Args {
    /// Cgroup v2 directory to move into first (its cgroup.procs is written).
    #[arg(long, global = true)]
    cgroup: Option<PathBuf>,
    /// Network namespace to enter next: a name under /run/netns, or a path.
    /// (Not `ip netns exec`: it remounts /sys, hiding the cgroup mounts.)
    #[arg(long, global = true)]
    netns: Option<String>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// COUNT HTTP `GET /` requests, each on a new TCP connection.
    Tcp {
        /// The address to dial (a VIP or a backend).
        #[arg(long)]
        to: SocketAddrV4,
        /// Requests to make.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Source address (the port is the kernel's choice).
        #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
        bind: Ipv4Addr,
    },
    /// One keep-alive connection, a `GET /` on it every MS ms for T ms
    /// (the first at once).
    Hold {
        /// The address to dial (a VIP or a backend).
        #[arg(long)]
        to: SocketAddrV4,
        /// Milliseconds between requests.
        #[arg(long, value_name = "MS")]
        requests_every_ms: u64,
        /// Milliseconds to keep making requests.
        #[arg(long, value_name = "T")]
        for_ms: u64,
        /// Source address (the port is the kernel's choice).
        #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
        bind: Ipv4Addr,
    },
    /// COUNT connect() calls, timed (the socket path's cost per call).
    Connect {
        /// The address to dial.
        #[arg(long)]
        to: SocketAddrV4,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// COUNT datagrams from one unconnected UDP socket (`send_to`), each
    /// followed by a `recv_from` that waits up to 1 s.
    Udp {
        /// The address to send to (a VIP or a backend).
        #[arg(long)]
        to: SocketAddrV4,
        /// Datagrams to send.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Source address (the port is the kernel's choice).
        #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
        bind: Ipv4Addr,
        /// A new socket for each datagram (else one socket sends them all).
        #[arg(long)]
        new_socket_each: bool,
        /// Milliseconds between datagrams.
        #[arg(long, value_name = "MS", default_value_t = 0)]
        every_ms: u64,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Still one thread: the cgroup takes the whole process, setns this thread,
    // and every thread started later inherits both.
    if let Some(dir) = &args.cgroup {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining the cgroup: writing {}", procs.display()))?;
    }
    if let Some(ns) = &args.netns {
        let path = if ns.contains('/') {
            ns.clone()
        } else {
            format!("/run/netns/{ns}")
        };
        kanari_tests::netns::enter_netns(&path)?;
    }
    match args.mode {
        Mode::Tcp {
            to,
            count,
            concurrency,
            bind,
        } => kanari_tests::client::runtime().block_on(tcp(bind, to, count, concurrency.max(1))),
        Mode::Hold {
            to,
            requests_every_ms,
            for_ms,
            bind,
        } => kanari_tests::client::runtime().block_on(hold(
            bind,
            to,
            Duration::from_millis(requests_every_ms.max(1)),
            Duration::from_millis(for_ms),
        )),
        Mode::Udp {
            to,
            count,
            bind,
            new_socket_each,
            every_ms,
        } => udp(
            bind,
            to,
            count,
            new_socket_each,
            Duration::from_millis(every_ms),
        )?,
        Mode::Connect { to, count } => connects(to, count),
    }
    Ok(())
}

/// COUNT blocking connect() calls, each closed at once with a RST (no
/// TIME_WAIT to run the ports out); one line: the median and the mean time
/// of a connect() call, in ns. The median is the call's cost: a SYN the
/// server's full accept queue dropped costs one call a second, and the mean.
fn connects(to: SocketAddrV4, count: usize) {
    let mut failed = 0usize;
    let mut took: Vec<u64> = Vec::with_capacity(count);
    for _ in 0..count {
        let t = std::time::Instant::now();
        match std::net::TcpStream::connect(to) {
            Ok(c) => {
                took.push(t.elapsed().as_nanos() as u64);
                let l = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid socket and a linger value of the size given.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&c),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&l as *const libc::linger).cast(),
                        size_of::<libc::linger>() as u32,
                    );
                }
            }
            Err(_) => failed += 1,
        }
    }
    let ok = took.len();
    let mean = if ok > 0 {
        took.iter().sum::<u64>() as f64 / ok as f64
    } else {
        0.0
    };
    took.sort_unstable();
    print(json!({
        "ok": failed == 0,
        "connects": ok,
        "failed": failed,
        "ns_per_connect": mean,
        "median_ns": took.get(ok / 2).copied().unwrap_or(0),
    }));
}

/// Rust's stdout is line-buffered: a reader sees each line as it is printed.
fn print(line: Value) {
    println!("{line}");
}

fn failed(e: anyhow::Error) -> Value {
    json!({"ok": false, "error": format!("{e:#}")})
}

/// One `GET /` on `conn` as a line.
async fn request(conn: &mut Conn) -> Value {
    match conn.get().await {
        Ok(r) => json!({
            "ok": true,
            "status": r.status,
            "backend": r.backend.to_string(),
            "version": r.version,
            "local": r.local.to_string(),
            "peer": conn.peer.to_string(),
        }),
        Err(e) => failed(e),
    }
}

async fn tcp(bind: Ipv4Addr, to: SocketAddrV4, count: usize, concurrency: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut jobs = tokio::task::JoinSet::new();
    for _ in 0..count {
        let slots = slots.clone();
        jobs.spawn(async move {
            let _slot = slots.acquire_owned().await.expect("semaphore open");
            match Conn::open(bind, to).await {
                Ok(mut conn) => request(&mut conn).await,
                Err(e) => failed(e),
            }
        });
    }
    while let Some(line) = jobs.join_next().await {
        print(line.unwrap_or_else(|e| failed(anyhow::anyhow!("request task: {e}"))));
    }
}

async fn hold(bind: Ipv4Addr, to: SocketAddrV4, every: Duration, total: Duration) {
    let mut conn = match Conn::open(bind, to).await {
        Ok(c) => c,
        Err(e) => return print(failed(e)),
    };
    let start = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if start.elapsed() >= total {
            return;
        }
        print(request(&mut conn).await);
    }
}

fn udp(
    bind: Ipv4Addr,
    to: SocketAddrV4,
    count: usize,
    new_socket_each: bool,
    every: Duration,
) -> Result<()> {
    let open = || -> Result<UdpSocket> {
        let socket = UdpSocket::bind(SocketAddrV4::new(bind, 0))
            .with_context(|| format!("binding udp {bind}"))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(socket)
    };
    let mut socket = open()?;
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(every);
            if new_socket_each {
                socket = open()?;
            }
        }
        print(match exchange(&socket, to, i) {
            Ok((from, reply)) => {
                let (version, backend) = reply.split_once(' ').unwrap_or_default();
                json!({
                    "ok": true,
                    "from": from.to_string(),
                    "reply": reply,
                    "backend": backend,
                    "version": version,
                })
            }
            Err(e) => failed(e),
        });
    }
    Ok(())
}

/// Datagram `i` to `to`, and what comes back (from where).
fn exchange(socket: &UdpSocket, to: SocketAddrV4, i: usize) -> Result<(SocketAddr, String)> {
    socket
        .send_to(format!("kanari-test-client {i}\n").as_bytes(), to)
        .with_context(|| format!("send_to {to}"))?;
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).with_context(|| {
        format!(
            "recv_from after sending to {to} (waited {:?})",
            started.elapsed()
        )
    })?;
    Ok((from, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
}
