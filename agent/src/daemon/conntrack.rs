//! Walks the conntrack table on a thread of its own, for
//! `kanari_conntrack_entries`, for the backend ids entries still carry (a
//! freed id is given out again only once no entry carries it), and for the
//! requests and connection attempts left unanswered past their timeout —
//! failures the kernel's counters cannot see, found while they hang — and
//! to remove the connections idle past their state's timeout
//! (`conntrack.timeouts`), so closed and abandoned connections free their
//! entries and live ones are not pushed out by the LRU. A walk
//! visits every entry (`BPF_MAP_LOOKUP_BATCH`, ~0.3 µs each): on the tick it
//! would delay the critical path by as much (0.64 s for a full
//! million-connection table) and compete with the data path's own work.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

use super::{Clock, Input};
use crate::{config::ConntrackTimeouts, datapath::ConntrackReader};

/// How often the conntrack table is walked, at most: a hung request is
/// seen within this of its timeout.
const EVERY: Duration = Duration::from_millis(500);
/// The thread waits this many times its last walk's duration, at least: its
/// share of a core stays under 1 / (1 + this), about 2 %.
const PAUSE_FACTOR: u32 = 50;

/// The pause before the next walk, after one that took `walk`: 0.5 s for a
/// small table, 32 s for a full 1,000,000-connection one (0.64 s).
fn pause(walk: Duration) -> Duration {
    EVERY.max(walk.saturating_mul(PAUSE_FACTOR))
}

/// Starts the walks; each result goes to the loop as an [`Input::Conntrack`].
/// `walk` is how long the last walk took; `pending_ns`, the shortest request
/// timeout of the services (the loop sets it): older unanswered requests and
/// attempts are reported.
pub(super) fn spawn(
    reader: ConntrackReader,
    clock: Clock,
    inputs: mpsc::Sender<Input>,
    mut walk: Duration,
    pending_ns: Arc<AtomicU64>,
    timeouts: ConntrackTimeouts,
) -> Result<()> {
    std::thread::Builder::new()
        .name("kanari-ct-walk".into())
        .spawn(move || {
            loop {
                std::thread::sleep(pause(walk));
                let started_ms = clock.now_ms();
                let t = Instant::now();
                let scan = reader
                    .scan(pending_ns.load(Ordering::Relaxed), &timeouts)
                    .map_err(|e| format!("{e:#}"));
                walk = t.elapsed();
                if inputs
                    .blocking_send(Input::Conntrack { started_ms, scan })
                    .is_err()
                {
                    return;
                }
            }
        })
        .context("starting the conntrack walking thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_back_off_with_their_duration() {
        // A small table: every 0.5 s.
        assert_eq!(pause(Duration::from_millis(3)), Duration::from_millis(500));
        // A full million-connection table (0.64 s a walk): every 32 s, so
        // walking takes under 2 % of a core.
        let walk = Duration::from_millis(640);
        let p = pause(walk);
        assert_eq!(p, Duration::from_secs(32));
        assert!(walk.as_secs_f64() / (walk + p).as_secs_f64() < 0.02);
    }
}
