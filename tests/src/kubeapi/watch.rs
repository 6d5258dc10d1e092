//! Watches: a chunked stream of one JSON event per line, started from a
//! resourceVersion (or from the current state, sent as ADDED), with
//! bookmarks, `sendInitialEvents` streaming lists, `timeoutSeconds`, a
//! selector watch that sees an object leave as DELETED, and the 410 ERROR
//! event a watch from compacted history gets.

use super::Shared;
use super::cluster::present;
use super::http::{Body, Shape};
use super::list::{ListQuery, wait_for_rv};
use super::resources::ResourceType;
use super::status::ApiError;
use super::store::{ChangeType, StoreError};
use super::table::{Include, render};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// A response body fed line by line from a task.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Everything one watch needs to write its events.
struct Watch {
    shared: Arc<Shared>,
    rt: Arc<ResourceType>,
    ns: Option<String>,
    q: ListQuery,
    shape: Shape,
    tx: mpsc::Sender<Bytes>,
}

impl Watch {
    fn shaped(&self, obj: Value) -> Value {
        let obj = present(&self.rt, obj);
        match self.shape {
            Shape::Object => obj,
            Shape::Metadata => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
            }
            Shape::Table => render(
                &self.rt.columns,
                &[obj],
                Include::Metadata,
                Map::new(),
                SystemTime::now(),
            ),
        }
    }

    /// Sends one event; false once the client has gone.
    async fn send(&self, ty: &str, object: Value) -> bool {
        let mut line =
            serde_json::to_vec(&json!({"type": ty, "object": object})).expect("JSON serializes");
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }

    async fn bookmark(&self, rv: u64, initial_end: bool) -> bool {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj =
            json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": meta});
        self.send("BOOKMARK", obj).await
    }

    async fn expired(&self, rv: u64, oldest: u64) {
        let e = ApiError::expired(format!("too old resource version: {rv} ({oldest})"));
        self.send("ERROR", e.to_status()).await;
    }

    fn in_scope(&self, obj: &Value) -> bool {
        self.ns
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"] == ns)
            && self.q.matches(obj)
    }

    async fn run(self) {
        let deadline =
            tokio::time::Instant::now() + self.q.timeout.unwrap_or(Duration::from_secs(1800));
        let mut changes = self.shared.changes.subscribe();
        let gr = self.rt.group_resource();
        let requested: u64 = self.q.rv.parse().unwrap_or(0);
        let from_state = self.q.send_initial_events || requested == 0;
        if self.q.send_initial_events
            && requested > 0
            && wait_for_rv(&self.shared, requested).await.is_err()
        {
            return;
        }
        let mut last = requested;
        if from_state {
            let (rv, objs) = self.shared.read(|c| {
                (
                    c.store.rv(),
                    c.store
                        .list(&gr, self.ns.as_deref())
                        .into_iter()
                        .cloned()
                        .collect::<Vec<_>>(),
                )
            });
            for o in objs.into_iter().filter(|o| self.in_scope(o)) {
                if !self.send("ADDED", self.shaped(o)).await {
                    return;
                }
            }
            last = rv;
            if self.q.send_initial_events && !self.bookmark(rv, true).await {
                return;
            }
        }
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.shared.bookmark_interval,
            self.shared.bookmark_interval,
        );
        loop {
            let batch = self
                .shared
                .read(|c| c.store.changes_since(last, &gr).map(|b| (b, c.store.rv())));
            let (batch, now_rv) = match batch {
                Ok(b) => b,
                Err(StoreError::Gone { oldest }) => return self.expired(last, oldest).await,
                Err(_) => return,
            };
            for c in batch {
                let was = c.prev.as_ref().is_some_and(|p| self.in_scope(p));
                let is = c.kind != ChangeType::Deleted && self.in_scope(&c.object);
                let ty = match (was, is) {
                    (_, true) if c.kind == ChangeType::Added || !was => "ADDED",
                    (true, true) => "MODIFIED",
                    (true, false) => "DELETED",
                    _ => continue,
                };
                // One that stopped matching leaves as its last matching
                // state, at this change's resourceVersion (as the cacher does).
                let obj = match (c.kind, ty, c.prev) {
                    (ChangeType::Modified, "DELETED", Some(mut prev)) => {
                        prev["metadata"]["resourceVersion"] = c.rv.to_string().into();
                        prev
                    }
                    _ => c.object,
                };
                if !self.send(ty, self.shaped(obj)).await {
                    return;
                }
            }
            last = now_rv;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tick.tick(), if self.q.bookmarks => if !self.bookmark(last, false).await { return },
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.tx.closed() => return,
            }
        }
    }
}

/// Starts a watch; the response streams until it ends.
pub fn start(
    shared: Arc<Shared>,
    rt: Arc<ResourceType>,
    ns: Option<&str>,
    q: ListQuery,
    shape: Shape,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel(256);
    let w = Watch {
        shared,
        rt,
        ns: ns.map(str::to_string),
        q,
        shape,
        tx,
    };
    tokio::spawn(w.run());
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("Cache-Control", "no-cache, private")
        .body(ChannelBody(rx).boxed())
        .expect("a valid response")
}
