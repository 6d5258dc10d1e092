//! `kanari-test-backend`: the HTTP test backend as its own process.
//!
//! Answers every request with `<version> <address>`; `--error-rate` answers
//! a seeded share with 500, `--delay-ms` waits before answering, `--udp` also
//! answers every UDP datagram on the same address with the same text. Prints
//! what it served when stopped (SIGTERM or SIGINT).

use std::{net::SocketAddrV4, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use kanari_tests::backend::{Behavior, Stats, serve, serve_udp};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
// No `version` here: `--version` is the label in every answer.
#[command(about = "The HTTP test backend of kanari's tests, demo and benchmarks.")]
struct Args {
    /// Address to listen on (IPv4:port).
    #[arg(long)]
    listen: SocketAddrV4,
    /// Version label in every answer.
    #[arg(long, default_value = "stable")]
    version: String,
    /// Share of requests answered with 500 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Milliseconds added before every answer.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Also answer UDP datagrams on the same address with `<version> <address>`.
    #[arg(long)]
    udp: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.error_rate),
        "--error-rate must be between 0 and 1"
    );
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let stats = Arc::new(Stats::default());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let behavior = Behavior::healthy(&a.version);
    behavior.set_error_rate(a.error_rate);
    behavior.set_delay(Duration::from_millis(a.delay_ms));
    let mut echo = None;
    if a.udp {
        let socket = tokio::net::UdpSocket::bind(a.listen)
            .await
            .with_context(|| format!("binding udp {}", a.listen))?;
        echo = Some(tokio::spawn(serve_udp(
            socket,
            behavior.clone(),
            stats.clone(),
            rx.clone(),
        )));
    }
    let server = tokio::spawn(serve(listener, behavior, stats.clone(), rx));
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = tx.send(true);
    server.await??;
    if let Some(echo) = echo {
        echo.await??;
    }
    println!(
        "connections={} requests={} errors={} datagrams={}",
        stats.connections(),
        stats.requests(),
        stats.errors(),
        stats.datagrams()
    );
    Ok(())
}
