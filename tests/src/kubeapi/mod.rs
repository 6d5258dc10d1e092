//! An in-process Kubernetes API server for end-to-end tests: the real wire
//! protocol (discovery, list/watch with resourceVersions and bookmarks,
//! optimistic concurrency, merge and JSON patches, status subresources,
//! CRDs with structural-schema validation, Table output), faithful enough
//! for kube-rs and kubectl, and refusing what a real one refuses. JSON only,
//! plain HTTP, no authentication or admission webhooks.

mod admit;
mod builtin;
mod cluster;
mod controllers;
mod crd;
mod discovery;
mod handlers;
mod http;
mod list;
mod meta;
mod openapi;
mod ownership;
mod patch;
mod protobuf;
mod resources;
mod schema;
mod selector;
mod ssa;
mod status;
mod store;
mod table;
mod watch;

use admit::FieldValidation;
use anyhow::{Context, anyhow};
use cluster::{Cluster, WriteOptions};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use store::Part;

/// What the tests may tune.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often a watch that allows bookmarks gets one (a real server: about
    /// a minute; shorter here so tests see them).
    pub bookmark_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// What the connection tasks share: the state, and the current
/// resourceVersion, published after every write so watches wake.
pub(crate) struct Shared {
    cluster: Mutex<Cluster>,
    changes: tokio::sync::watch::Sender<u64>,
    bookmark_interval: Duration,
    addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read<T>(&self, f: impl FnOnce(&Cluster) -> T) -> T {
        f(&self.lock())
    }

    fn write<T>(&self, f: impl FnOnce(&mut Cluster) -> T) -> T {
        let mut c = self.lock();
        let out = f(&mut c);
        let rv = c.store.rv();
        drop(c);
        self.changes
            .send_if_modified(|cur| std::mem::replace(cur, rv) != rv);
        out
    }
}

/// Where `deploy/kubernetes` keeps the CanaryRelease CRD.
pub const CANARY_RELEASE_CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/canaryrelease-crd.yaml"
);

/// The CanaryRelease CRD as `deploy/kubernetes` installs it, as an object.
pub fn canary_release_crd() -> Value {
    let text = std::fs::read_to_string(CANARY_RELEASE_CRD).expect("the CanaryRelease CRD");
    serde_yaml_ng::from_str(&text).expect("the CRD is YAML")
}

/// The server: a thread running its own runtime. Drop stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    shutdown: tokio::sync::watch::Sender<bool>,
    paused: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

static SERVERS: AtomicU64 = AtomicU64::new(0);

fn to_anyhow(e: status::ApiError) -> anyhow::Error {
    anyhow!("{} ({}): {}", e.reason, e.code, e.message)
}

impl ApiServer {
    /// Serves on an already-bound listener (bound where the caller wants it,
    /// e.g. inside a network namespace).
    pub fn serve(listener: TcpListener) -> anyhow::Result<ApiServer> {
        ApiServer::serve_with(listener, Config::default())
    }

    pub fn serve_with(listener: TcpListener, config: Config) -> anyhow::Result<ApiServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let shared = Arc::new(Shared {
            cluster: Mutex::new(Cluster::new()),
            changes: tokio::sync::watch::channel(0).0,
            bookmark_interval: config.bookmark_interval,
            addr,
        });
        let rv = shared.read(|c| c.store.rv());
        shared.changes.send_replace(rv);
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let (paused, paused_rx) = tokio::sync::watch::channel(false);
        let dir = std::env::temp_dir().join(format!(
            "kanari-kubeapi-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(addr))?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kubeapi".into())
            .spawn(move || runtime.block_on(http::serve(listener, s, shutdown_rx, paused_rx)))?;
        Ok(ApiServer {
            shared,
            shutdown,
            paused,
            thread: Some(thread),
            dir,
            kubeconfig,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig pointing at `url()` (removed on Drop), for kubectl and
    /// kube-rs alike.
    pub fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig.clone()
    }

    /// An outage: connections, open ones (watches) included, are reset
    /// until `resume`. Objects are kept.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Creates or replaces (by apiVersion, kind, namespace, name) an object,
    /// status included, through the same rules as HTTP writes (strict field
    /// validation); returns the stored object. A namespaced object without a
    /// namespace goes to `default`.
    pub fn apply_json(&self, obj: Value) -> anyhow::Result<Value> {
        let (api_version, kind) = (
            obj["apiVersion"].as_str().unwrap_or(""),
            obj["kind"].as_str().unwrap_or(""),
        );
        let rt = self
            .shared
            .read(|c| c.registry.find_kind(api_version, kind))
            .ok_or_else(|| anyhow!("no kind {kind} in {api_version} is served"))?;
        let ns = rt.namespaced.then(|| {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        });
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let opts = WriteOptions {
            field_validation: FieldValidation::Strict,
            dry_run: false,
            manager: Some("kanari-tests".into()),
        };
        self.shared.write(|c| {
            let current = c.get(&rt, ns.as_deref(), &name).ok();
            let with_rv = |mut o: Value, from: &Value| {
                o["metadata"]["resourceVersion"] = from["metadata"]["resourceVersion"].clone();
                o
            };
            let mut stored = match &current {
                Some(cur) => c.update(
                    &rt,
                    ns.as_deref(),
                    &name,
                    with_rv(obj.clone(), cur),
                    Part::Main,
                    &opts,
                ),
                None => c.create(&rt, ns.as_deref(), obj.clone(), &opts),
            }
            .map_err(to_anyhow)?
            .object;
            if rt.rules.status_subresource && obj.get("status").is_some() {
                let body = with_rv(obj.clone(), &stored);
                stored = c
                    .update(&rt, ns.as_deref(), &name, body, Part::Status, &opts)
                    .map_err(to_anyhow)?
                    .object;
            }
            Ok(stored)
        })
    }

    pub fn get_json(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.shared.read(|c| {
            let rt = c.registry.find_kind(api_version, kind)?;
            c.get(&rt, namespace.filter(|_| rt.namespaced), name).ok()
        })
    }

    pub fn delete_json(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<()> {
        self.shared.write(|c| {
            let rt = c
                .registry
                .find_kind(api_version, kind)
                .ok_or_else(|| anyhow!("no kind {kind} in {api_version} is served"))?;
            c.delete(&rt, namespace.filter(|_| rt.namespaced), name, None, false)
                .map(drop)
                .map_err(to_anyhow)
        })
    }

    /// Objects of a kind, in one namespace or all, in key order.
    pub fn list_json(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        self.shared.read(|c| {
            let Some(rt) = c.registry.find_kind(api_version, kind) else {
                return Vec::new();
            };
            c.store
                .list(&rt.group_resource(), namespace)
                .into_iter()
                .map(|o| cluster::present(&rt, o.clone()))
                .collect()
        })
    }

    /// Forgets the history before the current resourceVersion, as etcd
    /// compaction does: older watches and continue tokens get 410.
    pub fn compact(&self) {
        self.shared.write(|c| c.store.compact());
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.read(|c| c.store.rv())
    }
}

fn kubeconfig_text(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kanari-test\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: test\n  user:\n    token: test\ncontexts:\n- name: kanari-test\n  context:\n    \
         cluster: kanari-test\n    user: test\n    namespace: default\ncurrent-context: kanari-test\n"
    )
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
