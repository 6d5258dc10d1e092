//! Telemetry merged over the fleet (pure): each agent serves its own
//! cumulative per-backend counters (`GET /telemetry`); the deciding agent
//! pulls every peer's and adds what each peer counted *since it first
//! pulled it* to its own, so the judges see the whole fleet's traffic.
//!
//! A counter is a flat list of the kernel's per-backend statistics (every
//! field of [`BackendStats`] in a fixed order, with the layout beside it).
//! Contributions only grow: a peer whose counters went down (its data path
//! made anew) has its new values counted from zero; a peer that stops
//! answering keeps its last contribution, so no window sees a drop.

use std::{collections::BTreeMap, net::SocketAddrV4};

use kanari_common::{
    hist::{CONNECT_BUCKETS, TTFB_BUCKETS},
    http::CLASSES,
    maps::BackendStats,
};
use serde::{Deserialize, Serialize};

/// How a counters list is laid out: classes, TTFB and connect buckets.
pub const LAYOUT: [usize; 3] = [CLASSES, TTFB_BUCKETS, CONNECT_BUCKETS];

/// One backend's counters as served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    pub service: String,
    /// `stable` or `canary`.
    pub group: String,
    pub addr: SocketAddrV4,
    pub counters: Vec<u64>,
}

/// `GET /telemetry`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub layout: Vec<usize>,
    pub backends: Vec<Served>,
}

/// The u64 counters at the head of a flattened list (the buckets follow).
const COUNTERS: usize = 11 + CLASSES;

/// Which backend a contribution is for.
pub type Key = (String, String, SocketAddrV4);

/// Adds `s`'s counters to the flat list `sum` (empty: none yet); buckets
/// wrap, as the kernel's.
pub fn accumulate(sum: &mut Vec<u64>, s: &BackendStats) {
    let v = flatten(s);
    if sum.is_empty() {
        *sum = v;
        return;
    }
    for (i, (p, q)) in sum.iter_mut().zip(&v).enumerate() {
        *p = if i < COUNTERS {
            p.wrapping_add(*q)
        } else {
            (*p as u32).wrapping_add(*q as u32) as u64
        };
    }
}

/// The statistics as a flat list.
pub fn flatten(s: &BackendStats) -> Vec<u64> {
    let mut v = vec![
        s.connections,
        s.connects,
        s.connect_sum_ns,
        s.resets,
        s.refused,
        s.unanswered,
        s.ttfb_sum_ns,
        s.bytes[0],
        s.bytes[1],
        s.packets[0],
        s.packets[1],
    ];
    v.extend_from_slice(&s.requests);
    v.extend(s.ttfb_hist.iter().map(|&n| n as u64));
    v.extend(s.connect_hist.iter().map(|&n| n as u64));
    v
}

/// The list back into statistics; `None` when its length is not this layout's.
pub fn unflatten(v: &[u64]) -> Option<BackendStats> {
    if v.len() != COUNTERS + TTFB_BUCKETS + CONNECT_BUCKETS {
        return None;
    }
    let mut s = BackendStats::ZERO;
    [
        s.connections,
        s.connects,
        s.connect_sum_ns,
        s.resets,
        s.refused,
        s.unanswered,
        s.ttfb_sum_ns,
        s.bytes[0],
        s.bytes[1],
        s.packets[0],
        s.packets[1],
    ] = v[..11].try_into().ok()?;
    s.requests.copy_from_slice(&v[11..COUNTERS]);
    let (ttfb, connect) = v[COUNTERS..].split_at(TTFB_BUCKETS);
    // Buckets are u32 that wrap, in the kernel and here alike.
    for (d, n) in s.ttfb_hist.iter_mut().zip(ttfb) {
        *d = *n as u32;
    }
    for (d, n) in s.connect_hist.iter_mut().zip(connect) {
        *d = *n as u32;
    }
    Some(s)
}

/// What one peer's backend has added since first pulled.
#[derive(Clone, Debug)]
struct Contribution {
    last: Vec<u64>,
    sum: Vec<u64>,
}

/// Every peer's contributions, by peer and backend.
#[derive(Clone, Debug, Default)]
pub struct Merged {
    peers: BTreeMap<String, BTreeMap<Key, Contribution>>,
    /// Peers in the order first heard from: each keeps its place among the
    /// telemetry's "CPUs", which are diffed by position.
    order: Vec<String>,
}

impl Merged {
    /// Takes a peer's report; a report of another layout is left out
    /// (the peer runs another version). Whether it was taken.
    pub fn take(&mut self, report: &Report) -> bool {
        if report.layout != LAYOUT {
            return false;
        }
        if !self.order.contains(&report.node) {
            self.order.push(report.node.clone());
        }
        let peer = self.peers.entry(report.node.clone()).or_default();
        for b in &report.backends {
            if unflatten(&b.counters).is_none() {
                continue;
            }
            let key = (b.service.clone(), b.group.clone(), b.addr);
            match peer.get_mut(&key) {
                None => {
                    peer.insert(
                        key,
                        Contribution {
                            last: b.counters.clone(),
                            sum: vec![0; b.counters.len()],
                        },
                    );
                }
                Some(c) => {
                    // The u64 counters tell a restart; buckets (u32) wrap.
                    let restarted = b.counters[..COUNTERS]
                        .iter()
                        .zip(&c.last)
                        .any(|(n, l)| n < l);
                    for (i, ((s, n), l)) in
                        c.sum.iter_mut().zip(&b.counters).zip(&c.last).enumerate()
                    {
                        let delta = match (restarted, i < COUNTERS) {
                            (true, _) => *n,
                            (false, true) => n - l,
                            (false, false) => (*n as u32).wrapping_sub(*l as u32) as u64,
                        };
                        *s = s.wrapping_add(delta);
                    }
                    c.last = b.counters.clone();
                }
            }
        }
        true
    }

    /// The peers' contributions to `key`, each one's as a "CPU" of its own
    /// (the telemetry sums them with the local CPUs'), one for every peer
    /// heard from, in the order first heard.
    pub fn contributions(&self, key: &Key) -> Vec<BackendStats> {
        self.order
            .iter()
            .map(|p| {
                self.peers
                    .get(p)
                    .and_then(|p| p.get(key))
                    .and_then(|c| unflatten(&c.sum))
                    .unwrap_or(BackendStats::ZERO)
            })
            .collect()
    }

    /// The peers heard from, in the order first heard.
    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(requests: u64, bucket: usize) -> BackendStats {
        let mut s = BackendStats::ZERO;
        s.connections = requests;
        s.requests[2] = requests;
        s.ttfb_hist[bucket] = requests as u32;
        s
    }

    fn report(node: &str, s: &BackendStats) -> Report {
        Report {
            node: node.into(),
            layout: LAYOUT.to_vec(),
            backends: vec![Served {
                service: "shop.web".into(),
                group: "canary".into(),
                addr: "10.2.3.1:8080".parse().expect("an address"),
                counters: flatten(s),
            }],
        }
    }

    fn key() -> Key {
        (
            "shop.web".into(),
            "canary".into(),
            "10.2.3.1:8080".parse().expect("an address"),
        )
    }

    #[test]
    fn flatten_and_unflatten_are_inverse() {
        let mut s = stats(7, TTFB_BUCKETS - 1);
        s.connect_hist[CONNECT_BUCKETS - 1] = 3;
        s.bytes = [1, 2];
        s.unanswered = 9;
        assert_eq!(unflatten(&flatten(&s)), Some(s));
        assert_eq!(unflatten(&flatten(&s)[1..]), None);
    }

    #[test]
    fn a_peer_counts_from_when_it_was_first_pulled_and_never_goes_down() {
        let mut m = Merged::default();
        assert!(m.take(&report("b", &stats(1000, 5))));
        // History before the first pull is not this window's.
        assert_eq!(m.contributions(&key())[0].requests[2], 0);
        m.take(&report("b", &stats(1030, 5)));
        assert_eq!(m.contributions(&key())[0].requests[2], 30);
        // Its data path made anew: counted from zero again, never negative.
        m.take(&report("b", &stats(4, 5)));
        assert_eq!(m.contributions(&key())[0].requests[2], 34);
        assert_eq!(m.contributions(&key())[0].ttfb_hist[5], 34);
        // Two peers: one contribution each.
        m.take(&report("c", &stats(50, 5)));
        m.take(&report("c", &stats(60, 5)));
        let all: u64 = m.contributions(&key()).iter().map(|s| s.requests[2]).sum();
        assert_eq!(all, 44);
        assert_eq!(m.peers().collect::<Vec<_>>(), ["b", "c"]);
        // A peer first heard later takes the next place, whatever its name.
        m.take(&report("a", &stats(5, 5)));
        assert_eq!(m.peers().collect::<Vec<_>>(), ["b", "c", "a"]);
        assert_eq!(m.contributions(&key()).len(), 3);
    }

    #[test]
    fn accumulating_cpus_sums_counters_and_wraps_buckets() {
        let mut a = stats(3, 7);
        a.ttfb_hist[7] = u32::MAX;
        let b = stats(4, 7);
        let mut sum = Vec::new();
        accumulate(&mut sum, &a);
        accumulate(&mut sum, &b);
        let s = unflatten(&sum).expect("the layout");
        assert_eq!((s.connections, s.requests[2]), (7, 7));
        assert_eq!(
            s.ttfb_hist[7], 3,
            "u32::MAX + 4 wraps to 3, as the kernel's"
        );
    }

    #[test]
    fn a_report_of_another_layout_is_left_out() {
        let mut m = Merged::default();
        let mut r = report("b", &stats(1, 0));
        r.layout = vec![CLASSES, TTFB_BUCKETS / 4, CONNECT_BUCKETS];
        assert!(!m.take(&r));
        assert!(m.contributions(&key()).is_empty());
        assert_eq!(m.peers().count(), 0);
    }
}
