//! The watchers: kube-rs watchers of CanaryReleases, Services and
//! EndpointSlices over all namespaces fill one [`Cluster`]; once all three
//! have listed, every change (coalesced over [`SETTLE`]) reads the releases
//! again and hands them on when they differ from what was handed last.
//!
//! The watcher does the protocol's hard parts (list then watch from its
//! resourceVersion, bookmarks, a new list after `410 Gone`); a stream that
//! fails is retried with a backoff capped at [`MAX_BACKOFF`], so a returning
//! API server is followed within seconds. Nothing here decides: while the
//! API server is away the last releases handed on stay in force.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, utils::Backoff, watcher},
};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use super::releases::{Cluster, Discovered, SERVICE_NAME_LABEL, discover};
use crate::config::Kubernetes;

/// How long changes are gathered before the releases are read again: a
/// rollout of pods changes many slices at once.
pub const SETTLE: Duration = Duration::from_millis(50);
/// The longest wait before a failed watch is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The CanaryRelease resource (`deploy/kubernetes/canaryrelease-crd.yaml`).
pub fn canary_release() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kanari.dev", "v1alpha1", "CanaryRelease"),
        "canaryreleases",
    )
}

/// A client for `k`: its kubeconfig, else the pod's service account.
pub async fn client(k: &Kubernetes) -> Result<Client> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("kubernetes.kubeconfig: reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubernetes.kubeconfig: {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "kubernetes: no kubeconfig given and not in a pod (KUBERNETES_SERVICE_HOST unset); set kubernetes.kubeconfig",
        )?,
    };
    Client::try_from(config).context("kubernetes: making the client")
}

/// What the three watchers share.
#[derive(Default)]
struct Shared {
    cluster: Cluster,
    /// Which watchers have listed once.
    listed: [bool; 3],
}

type Slot<V> = fn(&mut Cluster) -> &mut BTreeMap<String, V>;

/// Starts the watchers; every new reading of the releases is sent on `out`
/// (the first once all three have listed).
pub fn spawn(client: Client, out: mpsc::Sender<Vec<Discovered>>) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let changed = Arc::new(Notify::new());
    follow(
        Api::<DynamicObject>::all_with(client.clone(), &canary_release()),
        watcher::Config::default(),
        (0, |c| &mut c.releases),
        |o| {
            let generation = o.metadata.generation.unwrap_or_default();
            let status = o.data.get("status").cloned().unwrap_or_default();
            (
                o.data.get("spec").cloned().unwrap_or_default(),
                generation,
                status,
            )
        },
        &shared,
        &changed,
    );
    follow(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        (1, |c| &mut c.services),
        |o| o,
        &shared,
        &changed,
    );
    follow(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
        (2, |c| &mut c.slices),
        |o| o,
        &shared,
        &changed,
    );
    tokio::spawn(async move {
        let mut last: Option<Vec<Discovered>> = None;
        loop {
            changed.notified().await;
            tokio::time::sleep(SETTLE).await;
            let now = {
                let s = shared.lock().expect("not poisoned");
                if !s.listed.iter().all(|l| *l) {
                    continue;
                }
                discover(&s.cluster)
            };
            if last.as_ref() != Some(&now) {
                last = Some(now.clone());
                if out.send(now).await.is_err() {
                    break;
                }
            }
        }
    });
}

/// One watcher: its objects, turned into `V` by `value`, kept in its slot
/// of the cluster by NAMESPACE/NAME.
fn follow<K, V>(
    api: Api<K>,
    config: watcher::Config,
    (index, slot): (usize, Slot<V>),
    value: fn(K) -> V,
    shared: &Arc<Mutex<Shared>>,
    changed: &Arc<Notify>,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    V: Send + 'static,
{
    let (shared, changed) = (shared.clone(), changed.clone());
    let kind = std::any::type_name::<K>()
        .rsplit("::")
        .next()
        .unwrap_or("?");
    tokio::spawn(async move {
        let mut stream = watcher(api, config).backoff(Capped::default()).boxed();
        let mut listing: Option<BTreeMap<String, V>> = None;
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    if !failing {
                        warn!(kind, "watching the Kubernetes API failed, retrying: {e}");
                    }
                    failing = true;
                    continue;
                }
            };
            if failing {
                info!(kind, "watching the Kubernetes API again");
                failing = false;
            }
            let key = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
            let mut s = shared.lock().expect("not poisoned");
            match event {
                watcher::Event::Init => listing = Some(BTreeMap::new()),
                watcher::Event::InitApply(o) => {
                    listing.get_or_insert_default().insert(key(&o), value(o));
                }
                watcher::Event::InitDone => {
                    *slot(&mut s.cluster) = listing.take().unwrap_or_default();
                    s.listed[index] = true;
                    changed.notify_one();
                }
                watcher::Event::Apply(o) => {
                    slot(&mut s.cluster).insert(key(&o), value(o));
                    changed.notify_one();
                }
                watcher::Event::Delete(o) => {
                    slot(&mut s.cluster).remove(&key(&o));
                    changed.notify_one();
                }
            }
        }
    });
}

/// Exponential from 100 ms, capped at [`MAX_BACKOFF`].
struct Capped(Duration);

impl Default for Capped {
    fn default() -> Self {
        Capped(Duration::from_millis(100))
    }
}

impl Iterator for Capped {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        Some(now)
    }
}

impl Backoff for Capped {
    fn reset(&mut self) {
        *self = Capped::default();
    }
}
