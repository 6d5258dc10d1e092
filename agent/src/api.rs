//! The agent's HTTP surfaces: `/metrics` (and `/healthz`) on a TCP listener
//! for Prometheus, and the control API on a unix socket (mode 0600) for the
//! CLI. Both only read the shared [`View`].

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
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
use tokio::sync::{mpsc, oneshot};

use crate::{engine::Command, metrics, status, view::View};

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

/// An operator command on its way to the agent's loop, with where to answer.
pub struct CommandRequest {
    pub service: String,
    pub command: Command,
    pub reply: oneshot::Sender<Result<String, String>>,
}

#[derive(Clone)]
struct Control {
    view: Shared,
    commands: mpsc::Sender<CommandRequest>,
}

/// The body of `POST /v1/services/{name}/weight`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightBody {
    pub percent: f64,
}

/// What the control API answers to a command.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub message: String,
}

fn answer(code: StatusCode, ok: bool, message: String) -> axum::response::Response {
    (code, Json(Answer { ok, message })).into_response()
}

async fn send(c: &Control, service: String, command: Command) -> axum::response::Response {
    let (reply, rx) = oneshot::channel();
    if c.commands
        .send(CommandRequest {
            service,
            command,
            reply,
        })
        .await
        .is_err()
    {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "the agent is stopping".into(),
        );
    }
    match rx.await {
        Ok(Ok(msg)) => answer(StatusCode::OK, true, msg),
        Ok(Err(msg)) => answer(StatusCode::CONFLICT, false, msg),
        Err(_) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "the agent is stopping".into(),
        ),
    }
}

/// Bodies larger than this are refused (413): commands are tiny.
const MAX_BODY: usize = 4096;

pub fn control_router(view: Shared, commands: mpsc::Sender<CommandRequest>) -> Router {
    Router::new()
        .route(
            "/v1/status",
            get(|State(c): State<Control>| async move {
                Json(status::report(&c.view.lock().expect("view lock"), unix_ms()))
            }),
        )
        .route(
            "/v1/services/{name}/{verb}",
            post(|State(c): State<Control>, AxPath((name, verb)): AxPath<(String, String)>, body: Bytes| async move {
                let command = match verb.as_str() {
                    "pause" => Command::Pause,
                    "resume" => Command::Resume,
                    "promote" => Command::Promote,
                    "abort" => Command::Abort,
                    "start" => Command::Start,
                    "weight" => match serde_json::from_slice::<WeightBody>(&body) {
                        Ok(w) => match crate::config::percent_to_basis_points(w.percent) {
                            Ok(bp) => Command::SetWeight(bp),
                            Err(e) => return answer(StatusCode::BAD_REQUEST, false, format!("percent: {e}")),
                        },
                        Err(e) => {
                            return answer(StatusCode::BAD_REQUEST, false, format!("expected {{\"percent\": 0 to 100}}: {e}"));
                        }
                    },
                    other => {
                        return answer(
                            StatusCode::NOT_FOUND,
                            false,
                            format!("unknown command `{other}`; one of pause, resume, promote, abort, start, weight"),
                        );
                    }
                };
                send(&c, name, command).await
            }),
        )
        .fallback(|| async {
            answer(
                StatusCode::NOT_FOUND,
                false,
                "unknown request; the API has GET /v1/status and POST /v1/services/NAME/{pause,resume,promote,abort,start,weight}".into(),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(Control { view, commands })
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
