//! HTTP: the accept loop (with pause, which resets connections, and
//! shutdown), path routing onto discovery, OpenAPI and resource handlers,
//! query parsing, Accept negotiation, and JSON/Status responses.

use super::Shared;
use super::status::ApiError;
use super::{discovery, handlers, openapi};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::sync::Arc;
use tokio::sync::watch;

pub type Body = BoxBody<Bytes, Infallible>;

/// Makes the kernel answer a close with RST, as a crashed server's peer sees.
fn reset_on_close(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by the caller for this call; the
    // option value is a valid `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Serves until `shutdown` turns true. While `paused` is true, every
/// connection (new or open, watches included) is reset.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    paused: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let fd = stream.as_raw_fd();
        if *paused.borrow() {
            reset_on_close(fd);
            continue;
        }
        let (shared, mut paused) = (shared.clone(), paused.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(shared, req).await) }
            });
            let mut conn = pin!(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
            );
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = paused.wait_for(|p| *p) => reset_on_close(fd),
            }
        });
    }
}

/// A request, read whole, with what the handlers need of it.
pub struct Req {
    pub method: hyper::Method,
    pub segments: Vec<String>,
    pub query: HashMap<String, String>,
    pub accept: String,
    pub content_type: String,
    pub user_agent: String,
    pub body: Bytes,
}

impl Req {
    pub fn param(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let header = |h: hyper::header::HeaderName| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(&ApiError::bad_request("could not read the request body")),
    };
    let req = Req {
        method: parts.method.clone(),
        segments: parts
            .uri
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect(),
        query: parse_query(parts.uri.query().unwrap_or("")),
        accept: header(hyper::header::ACCEPT),
        content_type: header(hyper::header::CONTENT_TYPE),
        user_agent: header(hyper::header::USER_AGENT),
        body,
    };
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let result = match segs.as_slice() {
        ["version"] => Ok(json(StatusCode::OK, &discovery::version())),
        ["healthz" | "livez" | "readyz"] => Ok(text(StatusCode::OK, "ok")),
        ["api"] => Ok(json(StatusCode::OK, &discovery::api_versions(shared.addr))),
        ["apis"] => Ok(json(
            StatusCode::OK,
            &shared.read(|c| discovery::group_list(&c.registry)),
        )),
        ["apis", g] => shared
            .read(|c| discovery::group(&c.registry, g))
            .map(|v| json(StatusCode::OK, &v)),
        ["api", v] => shared
            .read(|c| discovery::resource_list(&c.registry, "", v))
            .map(|v| json(StatusCode::OK, &v)),
        ["apis", g, v] => shared
            .read(|c| discovery::resource_list(&c.registry, g, v))
            .map(|v| json(StatusCode::OK, &v)),
        ["openapi", "v3"] => Ok(json(
            StatusCode::OK,
            &shared.read(|c| openapi::root(&c.registry)),
        )),
        ["openapi", "v3", rest @ ..] => shared
            .read(|c| openapi::group_version(&c.registry, &rest.join("/")))
            .map(|v| json(StatusCode::OK, &v)),
        ["api", v, rest @ ..] => handlers::resource(&shared, "", v, rest, &req).await,
        ["apis", g, v, rest @ ..] => handlers::resource(&shared, g, v, rest, &req).await,
        _ => Err(ApiError::path_not_found()),
    };
    let resp = result.unwrap_or_else(|e| error(&e));
    if std::env::var_os("KANARI_KUBEAPI_LOG").is_some() {
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        eprintln!(
            "kubeapi: {} {}{query} {} -> {}",
            req.method,
            parts.uri.path(),
            String::from_utf8_lossy(&req.body),
            resp.status()
        );
    }
    resp
}

pub fn full(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header("Cache-Control", "no-cache, private")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a valid response")
}

pub fn json(status: StatusCode, v: &Value) -> Response<Body> {
    full(
        status,
        "application/json",
        serde_json::to_vec(v).expect("JSON serializes"),
    )
}

fn text(status: StatusCode, s: &str) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", s.as_bytes().to_vec())
}

pub fn error(e: &ApiError) -> Response<Body> {
    json(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
    )
}

/// What shape of answer the client accepts, from its Accept header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The objects themselves.
    Object,
    /// `as=Table;g=meta.k8s.io;v=v1` (what kubectl get asks for).
    Table,
    /// `as=PartialObjectMetadata[List]` (kube-rs's metadata-only API).
    Metadata,
}

/// Picks the first media range this server can answer: JSON only, no
/// protobuf, no aggregated discovery (so clients fall back to the legacy one).
pub fn negotiate(accept: &str) -> Result<Shape, ApiError> {
    if accept.trim().is_empty() {
        return Ok(Shape::Object);
    }
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let params: HashMap<&str, &str> = parts.filter_map(|p| p.split_once('=')).collect();
        if !matches!(media, "application/json" | "*/*" | "application/*" | "") {
            continue;
        }
        match (params.get("as").copied(), params.get("g").copied()) {
            (None, _) => return Ok(Shape::Object),
            (Some("Table"), Some("meta.k8s.io")) => return Ok(Shape::Table),
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("meta.k8s.io")) => {
                return Ok(Shape::Metadata);
            }
            _ => continue,
        }
    }
    Err(ApiError::not_acceptable())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_json_over_protobuf_and_aggregated_discovery() {
        let kubectl_get = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(kubectl_get).unwrap(), Shape::Table);
        assert_eq!(
            negotiate("application/vnd.kubernetes.protobuf,application/json").unwrap(),
            Shape::Object
        );
        let discovery =
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
        assert_eq!(negotiate(discovery).unwrap(), Shape::Object);
        assert_eq!(
            negotiate("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1").unwrap(),
            Shape::Metadata
        );
        assert!(negotiate("application/vnd.kubernetes.protobuf").is_err());
    }

    #[test]
    fn queries_are_percent_decoded() {
        let q = parse_query(
            "labelSelector=app%20in%20(a%2Cb)&watch=1&fieldSelector=metadata.name%3Dweb&x",
        );
        assert_eq!(q["labelSelector"], "app in (a,b)");
        assert_eq!(q["fieldSelector"], "metadata.name=web");
        assert_eq!(q["x"], "");
    }
}
