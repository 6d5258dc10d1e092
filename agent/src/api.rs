//! The agent's HTTP surfaces: `/metrics` (and `/healthz`) on a TCP listener
//! for Prometheus, and the control API on a unix socket (mode 0600) for the
//! CLI. Both only read the shared [`View`].

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::{metrics, status, view::View};

pub type Shared = Arc<Mutex<View>>;

/// The text-format content type Prometheus expects.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn metrics_router(view: Shared) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(v): State<Shared>| async move {
                let text = metrics::render(&v.lock().expect("view lock"));
                (
                    [(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                    text,
                )
            }),
        )
        .route(
            "/healthz",
            get(|State(v): State<Shared>| async move {
                if v.lock().expect("view lock").ready {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }),
        )
        .with_state(view)
}

pub fn control_router(view: Shared) -> Router {
    Router::new()
        .route(
            "/v1/status",
            get(|State(v): State<Shared>| async move {
                Json(status::report(&v.lock().expect("view lock")))
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "unknown request; the API has GET /v1/status\n",
            )
                .into_response()
        })
        .with_state(view)
}

/// Binds the metrics listener.
pub async fn bind_metrics(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for /metrics on {addr} (metrics.listen in the config)"))
}

/// Binds the control socket: creates its directory, replaces a stale socket
/// left by a previous run, and restricts it to its owner (0600).
pub fn bind_control(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use by another running agent (control.socket in the config)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; choose another control.socket",
            path.display()
        ),
        Err(_) => {}
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("listening on {} (control.socket)", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(l)
}

/// Removes the control socket on drop.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `GET path` on the control socket; the body when the answer is 200.
pub async fn control_get(socket: &Path, path: &str) -> Result<Vec<u8>> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to {} — is `kanari run` running, and is this its control.socket?",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header("host", "kanari")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await.context("asking the agent")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    driver.abort();
    if !status.is_success() {
        bail!(
            "the agent answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}
