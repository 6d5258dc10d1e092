//! `telemetry.record: FILE`: what the judges saw, tick by tick, so that
//! `kanari replay` can show what another configuration would have decided
//! on the same traffic.
//!
//! JSON lines. Each file opens with a [`Header`] (the configuration's text,
//! so a replay needs nothing else); then one [`Tick`] per telemetry tick with,
//! per service with a rollout, what each version added since the tick before
//! (zero counts and empty buckets left out: an idle tick is a few bytes) and
//! the weight in force. Written by a thread of its own, never waited on; past
//! `telemetry.record_max_mb` the file is renamed to `FILE.1` (replacing the
//! one before) and a new one begun.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::mpsc::{self, SyncSender, TrySendError},
};

use anyhow::{Context as _, Result, bail};
use kanari_common::{
    http::CLASSES,
    maps::{BackendStats, Group},
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::telemetry::{Histogram, Telemetry, Totals};

/// The first line of every file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// `kanari-telemetry`, and the format's version.
    pub format: String,
    pub version: u32,
    /// The configuration file the agent ran with, and its text.
    pub config_path: String,
    pub config: String,
    pub started_unix_ms: u64,
}

pub const FORMAT: &str = "kanari-telemetry";
pub const VERSION: u32 = 1;

/// One tick: when (the agent's clock, ms) and what each service saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tick {
    pub t_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceTick>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceTick {
    pub name: String,
    /// Canary weight in force, basis points.
    pub weight: u32,
    /// What stable and canary added since the tick before.
    pub stable: Sample,
    pub canary: Sample,
}

fn zero(x: &u64) -> bool {
    *x == 0
}

/// A version's increase over one tick; zeros are left out of the file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    #[serde(default, skip_serializing_if = "zero")]
    pub connections: u64,
    #[serde(default, skip_serializing_if = "zero")]
    pub connects: u64,
    #[serde(default, skip_serializing_if = "zero")]
    pub connect_sum_ns: u64,
    #[serde(default, skip_serializing_if = "zero")]
    pub resets: u64,
    #[serde(default, skip_serializing_if = "zero")]
    pub refused: u64,
    #[serde(default, skip_serializing_if = "zero")]
    pub unanswered: u64,
    #[serde(default, skip_serializing_if = "zero")]
    pub timeouts: u64,
    #[serde(default, skip_serializing_if = "zero")]
    pub connect_timeouts: u64,
    /// By class (`kanari_common::http::CLASS_*`), when any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<u64>,
    #[serde(default, skip_serializing_if = "zero")]
    pub ttfb_sum_ns: u64,
    /// (bucket, count) of the buckets that grew.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ttfb: Vec<(u16, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect: Vec<(u16, u64)>,
}

fn sparse<const N: usize>(h: &Histogram<N>) -> Vec<(u16, u64)> {
    h.0.iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| (i as u16, *c))
        .collect()
}

fn dense<const N: usize>(v: &[(u16, u64)]) -> Histogram<N> {
    let mut h = Histogram::<N>::default();
    for (i, c) in v {
        if let Some(b) = h.0.get_mut(*i as usize) {
            *b += c;
        }
    }
    h
}

impl Sample {
    pub fn of(d: &Totals) -> Sample {
        Sample {
            connections: d.connections,
            connects: d.connects,
            connect_sum_ns: d.connect_sum_ns,
            resets: d.resets,
            refused: d.refused,
            unanswered: d.unanswered,
            timeouts: d.timeouts,
            connect_timeouts: d.connect_timeouts,
            requests: if d.requests.iter().any(|r| *r > 0) {
                d.requests.to_vec()
            } else {
                Vec::new()
            },
            ttfb_sum_ns: d.ttfb_sum_ns,
            ttfb: sparse(&d.ttfb),
            connect: sparse(&d.connect),
        }
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            connections: self.connections,
            connects: self.connects,
            connect_sum_ns: self.connect_sum_ns,
            resets: self.resets,
            refused: self.refused,
            unanswered: self.unanswered,
            timeouts: self.timeouts,
            connect_timeouts: self.connect_timeouts,
            ttfb_sum_ns: self.ttfb_sum_ns,
            ttfb: dense(&self.ttfb),
            connect: dense(&self.connect),
            ..Totals::default()
        };
        for (i, r) in self.requests.iter().take(CLASSES).enumerate() {
            t.requests[i] = *r;
        }
        t
    }
}

/// Cumulative totals as the kernel would hold them for one backend: what a
/// replay feeds its [`Telemetry`] (histograms wrap as the kernel's do).
pub fn as_stats(t: &Totals) -> BackendStats {
    let mut s = BackendStats::ZERO;
    s.connections = t.connections;
    s.connects = t.connects;
    s.connect_sum_ns = t.connect_sum_ns;
    s.resets = t.resets;
    s.refused = t.refused;
    s.unanswered = t.unanswered;
    s.requests = t.requests;
    s.ttfb_sum_ns = t.ttfb_sum_ns;
    for (k, v) in s.ttfb_hist.iter_mut().zip(t.ttfb.0.iter()) {
        *k = *v as u32;
    }
    for (k, v) in s.connect_hist.iter_mut().zip(t.connect.0.iter()) {
        *k = *v as u32;
    }
    s
}

/// The group totals a tick records from, per service: what they were at the
/// tick before, to take differences.
#[derive(Default)]
pub struct Differ {
    last: std::collections::BTreeMap<String, [Totals; 2]>,
}

impl Differ {
    /// The tick of `telemetry` at `t_ms` for `services` (name, weight).
    pub fn tick(&mut self, t_ms: u64, telemetry: &Telemetry, services: &[(String, u32)]) -> Tick {
        let mut tick = Tick {
            t_ms,
            services: Vec::new(),
        };
        for (name, weight) in services {
            let now = [Group::Stable, Group::Canary]
                .map(|g| telemetry.group(name, g).cloned().unwrap_or_default());
            let before = self.last.entry(name.clone()).or_default();
            let d = [&now[0] - &before[0], &now[1] - &before[1]];
            *before = now;
            if d.iter().all(|d| *d == Totals::default()) && *weight == 0 {
                continue;
            }
            tick.services.push(ServiceTick {
                name: name.clone(),
                weight: *weight,
                stable: Sample::of(&d[0]),
                canary: Sample::of(&d[1]),
            });
        }
        tick
    }
}

/// The writer's handle: lines go to its thread through a bounded queue.
pub struct Recorder {
    lines: SyncSender<String>,
    pub dropped: u64,
}

/// Lines waiting for the writer (about a minute of ticks).
const QUEUE: usize = 256;

impl Recorder {
    /// Starts writing to `path` (appending), with `header` at the top of
    /// each file; rotates past `max_bytes`.
    pub fn start(path: PathBuf, max_bytes: u64, header: Header) -> Result<Recorder> {
        let file = open(&path)?;
        let (lines, rx) = mpsc::sync_channel::<String>(QUEUE);
        let header = serde_json::to_string(&header).expect("serializable");
        std::thread::Builder::new()
            .name("kanari-record".into())
            .spawn(move || {
                if let Err(e) = write_all(&path, file, max_bytes, &header, rx) {
                    warn!(path = %path.display(), "telemetry.record stopped: {e:#}");
                }
            })
            .context("starting the telemetry recorder")?;
        Ok(Recorder { lines, dropped: 0 })
    }

    /// Queues one tick; never waits (a full queue drops it, counted).
    pub fn record(&mut self, tick: &Tick) {
        let line = serde_json::to_string(tick).expect("serializable");
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped += 1,
        }
    }
}

fn open(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening telemetry.record {}", path.display()))
}

fn write_all(
    path: &Path,
    file: File,
    max_bytes: u64,
    header: &str,
    rx: mpsc::Receiver<String>,
) -> Result<()> {
    let mut size = file.metadata()?.len();
    let mut out = BufWriter::new(file);
    if size == 0 {
        writeln!(out, "{header}")?;
        size += header.len() as u64 + 1;
    }
    // Each wake-up writes what is queued, then flushes: whole lines on disk,
    // so a reader never sees a torn tick.
    while let Ok(first) = rx.recv() {
        for line in std::iter::once(first).chain(rx.try_iter()) {
            if size + line.len() as u64 + 1 > max_bytes {
                out.flush()?;
                let old = PathBuf::from(format!("{}.1", path.display()));
                std::fs::rename(path, &old)
                    .with_context(|| format!("renaming {} to {}", path.display(), old.display()))?;
                out = BufWriter::new(open(path)?);
                writeln!(out, "{header}")?;
                size = header.len() as u64 + 1;
            }
            writeln!(out, "{line}")?;
            size += line.len() as u64 + 1;
        }
        out.flush()?;
    }
    out.flush()?;
    Ok(())
}

/// A recording, read back: its header and ticks (a file of several
/// configurations — an agent restarted with another — keeps the first header
/// and every tick).
pub fn read(path: &Path) -> Result<(Header, Vec<Tick>)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut header: Option<Header> = None;
    let mut ticks = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        if line.contains("\"format\"") {
            let h: Header = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a header", path.display(), i + 1))?;
            if h.format != FORMAT || h.version != VERSION {
                bail!(
                    "{}:{}: format {} version {}, this kanari reads {FORMAT} version {VERSION}",
                    path.display(),
                    i + 1,
                    h.format,
                    h.version
                );
            }
            header.get_or_insert(h);
            continue;
        }
        let t: Tick = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a telemetry tick", path.display(), i + 1))?;
        ticks.push(t);
    }
    let header = header.with_context(|| {
        format!(
            "{} has no header line: is it a telemetry.record file?",
            path.display()
        )
    })?;
    Ok((header, ticks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kanari_common::http::{CLASS_2XX, CLASS_5XX};

    #[test]
    fn a_sample_round_trips_and_leaves_zeros_out() {
        let mut t = Totals {
            resets: 2,
            timeouts: 1,
            ..Totals::default()
        };
        t.requests[CLASS_2XX] = 90;
        t.requests[CLASS_5XX] = 10;
        t.ttfb.record(2_000_000);
        t.ttfb.record(2_000_000);
        t.connect.record(50_000);
        let s = Sample::of(&t);
        assert_eq!(s.totals(), t);
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            !json.contains("refused") && !json.contains("connections"),
            "{json}"
        );
        let idle = serde_json::to_string(&Tick {
            t_ms: 250,
            services: Vec::new(),
        })
        .unwrap();
        assert_eq!(idle, r#"{"t_ms":250}"#);
    }

    #[test]
    fn the_recorder_rotates_and_every_file_has_the_header() {
        let dir = std::env::temp_dir().join(format!("kanari-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("t.jsonl");
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            config_path: "k.yaml".into(),
            config: "services: []".into(),
            started_unix_ms: 1,
        };
        let mut r = Recorder::start(path.clone(), 2_000, header.clone()).unwrap();
        for t in 0..200 {
            r.record(&Tick {
                t_ms: t * 250,
                services: Vec::new(),
            });
        }
        assert_eq!(r.dropped, 0);
        drop(r);
        let old = PathBuf::from(format!("{}.1", path.display()));
        let ok = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() > 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !(ok(&old)
            && read(&path).is_ok_and(|(_, t)| t.last().is_some_and(|t| t.t_ms == 199 * 250)))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer did not finish"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for p in [&path, &old] {
            let (h, ticks) = read(p).unwrap();
            assert_eq!(h, header);
            assert!(!ticks.is_empty());
            assert!(std::fs::metadata(p).unwrap().len() <= 2_000);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
