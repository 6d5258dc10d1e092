//! The agent's HTTP surfaces: `/metrics` (and `/healthz`) on a TCP listener
//! for Prometheus, and the control API on a unix socket (mode 0600) for the
//! CLI. Both read the snapshot the agent's loop publishes; verbs go to the
//! loop and are answered once the kernel holds their result.

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use axum::{
    Json, Router,
    extract::{Path as AxPath, State},
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{metrics, snapshot::Snapshot, status, verb::Verb};

/// What the loop publishes.
pub type Snapshots = watch::Receiver<Arc<Snapshot>>;

/// The text-format content type Prometheus expects.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn metrics_router(snapshots: Snapshots) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Snapshots>| async move {
                let snapshot = s.borrow().clone();
                (
                    [(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                    metrics::render(&snapshot),
                )
            }),
        )
        .route(
            "/analysis/{service}",
            get(
                |State(s): State<Snapshots>, AxPath(service): AxPath<String>| async move {
                    let snapshot = s.borrow().clone();
                    match status::analysis(&snapshot, &service) {
                        Some(a) => (StatusCode::OK, Json(a)).into_response(),
                        None => answer(
                            StatusCode::NOT_FOUND,
                            false,
                            format!("no rollout named {service}"),
                        ),
                    }
                },
            ),
        )
        .route(
            "/telemetry",
            // Read-only: this node's cumulative counters of the services
            // from CanaryReleases, for the agent that decides for the fleet.
            get(|State(s): State<Snapshots>| async move {
                let snapshot = s.borrow().clone();
                Json(crate::fleet::merge::Report {
                    node: snapshot.node.clone().unwrap_or_default(),
                    layout: crate::fleet::merge::LAYOUT.to_vec(),
                    backends: snapshot.served.to_vec(),
                })
            }),
        )
        .route(
            "/healthz",
            get(|State(s): State<Snapshots>| async move {
                let snapshot = s.borrow().clone();
                match snapshot.health(std::time::Instant::now()) {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                }
            }),
        )
        .with_state(snapshots)
}

/// How a verb ended: `Refused` when it does not apply (409), `Unapplied`
/// when the state took it but the kernel has not (503; the loop retries).
#[derive(Debug)]
pub enum VerbError {
    Refused(String),
    Unapplied(String),
}

/// An operator's verb on its way to the agent's loop, with where to answer.
pub struct VerbRequest {
    pub service: String,
    pub verb: Verb,
    pub reply: oneshot::Sender<Result<String, VerbError>>,
}

#[derive(Clone)]
struct Control {
    snapshots: Snapshots,
    verbs: mpsc::Sender<VerbRequest>,
}

/// What the control API answers to a verb.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub message: String,
}

fn answer(code: StatusCode, ok: bool, message: String) -> axum::response::Response {
    (code, Json(Answer { ok, message })).into_response()
}

async fn send(c: &Control, service: String, verb: Verb) -> axum::response::Response {
    let stopping = || {
        answer(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "the agent is stopping".into(),
        )
    };
    let (reply, rx) = oneshot::channel();
    let request = VerbRequest {
        service,
        verb,
        reply,
    };
    if c.verbs.send(request).await.is_err() {
        return stopping();
    }
    match rx.await {
        Ok(Ok(msg)) => answer(StatusCode::OK, true, msg),
        Ok(Err(VerbError::Refused(msg))) => answer(StatusCode::CONFLICT, false, msg),
        Ok(Err(VerbError::Unapplied(msg))) => answer(StatusCode::SERVICE_UNAVAILABLE, false, msg),
        Err(_) => stopping(),
    }
}

/// Bodies larger than this are refused (413): verbs are tiny.
const MAX_BODY: usize = 4096;

pub fn control_router(snapshots: Snapshots, verbs: mpsc::Sender<VerbRequest>) -> Router {
    Router::new()
        .route(
            "/v1/status",
            get(|State(c): State<Control>| async move {
                let snapshot = c.snapshots.borrow().clone();
                Json(status::report(&snapshot))
            }),
        )
        .route(
            "/v1/services/{name}/{verb}",
            post(
                |State(c): State<Control>,
                 AxPath((name, verb)): AxPath<(String, String)>,
                 body: Bytes| async move {
                    match Verb::parse(&verb, &body) {
                        Ok(v) => send(&c, name, v).await,
                        Err((true, msg)) => answer(StatusCode::NOT_FOUND, false, msg),
                        Err((false, msg)) => answer(StatusCode::BAD_REQUEST, false, msg),
                    }
                },
            ),
        )
        .fallback(|| async {
            answer(
                StatusCode::NOT_FOUND,
                false,
                format!(
                    "unknown request; the API has GET /v1/status and POST /v1/services/NAME/VERB ({})",
                    crate::verb::NAMES
                ),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(Control { snapshots, verbs })
}

/// The wall clock in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// A request on the control socket: `GET path` without a body, `POST path`
/// with one. Returns the status and the body.
pub async fn control_request(
    socket: &Path,
    path: &str,
    body: Option<String>,
) -> Result<(u16, Vec<u8>)> {
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
    let builder = match &body {
        None => Request::get(path),
        Some(_) => Request::post(path).header("content-type", "application/json"),
    };
    let req = builder
        .header("host", "kanari")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = sender.send_request(req).await.context("asking the agent")?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    driver.abort();
    Ok((status, body))
}

/// One HTTP/1.1 request to `url` (http://) on a connection of its own:
/// `GET` without a body, `POST` of JSON with one. The status and the body.
pub async fn http_once(url: &str, body: Option<Bytes>) -> Result<(u16, Bytes)> {
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("`{url}` is not a URL"))?;
    let host = uri.host().context("the URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let builder = match &body {
        None => Request::get(path),
        Some(_) => Request::post(path).header("content-type", "application/json"),
    };
    let req = builder
        .header("host", uri.authority().map_or(host, |a| a.as_str()))
        .header("user-agent", concat!("kanari/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body.unwrap_or_default()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, body))
}

/// `GET path` on the control socket; the body when the answer is 200.
pub async fn control_get(socket: &Path, path: &str) -> Result<Vec<u8>> {
    let (status, body) = control_request(socket, path, None).await?;
    if status != 200 {
        bail!(
            "the agent answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}
