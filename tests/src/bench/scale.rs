//! The `scale` suite: kanari at sizes a node meets in production.
//!
//! 1. **Conntrack, filled** (the object alone, `BPF_PROG_TEST_RUN`): the table
//!    configured for `N` connections (1,000,000; `--quick` 100,000), the
//!    rate guard off, then filled by SYNs of distinct clients run one per
//!    call through the real XDP program (each inserts the forward and the
//!    reverse entry). Reported: the insert rate (wall clock of the test-run
//!    loop, frames built beforehand), the SYN's kernel cost as the table
//!    fills, the entries held after, the map's memory (`memlock` of its fd),
//!    and the established-packet cost with the table nearly empty and full.
//! 2. **Services** (the real agent, in a namespace of ours with a veth
//!    pair): 1,000 services × 16 backends (8 stable + 8 canary; `--quick`
//!    100), each with a rollout (so the control API can set its weight).
//!    Load time = `kanari run` spawned → "ready" logged. Weight-update
//!    latency = `POST /v1/services/NAME/weight` sent → the new value read
//!    back from the pinned `KN_SERVICES_V1` map (polled every ~20 µs), and
//!    → the API's answer.
//! 3. **Weight change → new split** (a live topology: client, node, one
//!    stable and one canary backend answering with their version): client
//!    threads open new connections back to back; the service is at 0 %;
//!    `set-weight 100` at T0; the time to the first canary answer on a
//!    connection that started after T0, client-side timestamps.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use kanari::pins::Pins;
use kanari_common::{
    maps::{Service, ServiceKey, names},
    wire,
};
use serde_json::{Value, json};

use super::{
    Chart, Ctx, SuiteReport, chart,
    perpacket::{PinCpu, VIP, kanari_fd, mean, open, time_calls, web_config},
    report,
};
use crate::{
    agent::Agent,
    client::{get_once, runtime},
    frames::{HTTP_GET, Hook, Loaded, Tcp4, many_clients, request},
    netns::{BpfFs, Netns, unique_tag},
    topology::{self, Topology, TopologyOptions},
};

/// Established connections measured before and after the fill.
const POOL: u32 = 256;
/// SYN frames built (untimed) and run (timed) per chunk of the fill.
const CHUNK: usize = 10_000;
const ROLLOUT: &str = "{steps: [10, 100], interval: 1h, progress_deadline: 2h}";

pub fn run(ctx: &Ctx) -> Result<SuiteReport> {
    let started = Instant::now();
    let ct = conntrack(ctx).context("conntrack fill")?;
    let svc = services(ctx).context("1,000 services")?;
    let split = first_connection(ctx).context("weight change to new split")?;
    let mut md = String::new();
    md.push_str(&ct.markdown);
    md.push_str(&svc.markdown);
    md.push_str(&split.markdown);
    Ok(SuiteReport {
        name: "scale".into(),
        title: "Scale: a full conntrack, many services, weight changes".into(),
        markdown: md,
        json: json!({
            "seconds": started.elapsed().as_secs_f64(),
            "conntrack": ct.json,
            "services": svc.json,
            "weight_to_new_split": split.json,
        }),
        charts: ct.charts,
        targets: Vec::new(),
    })
}

struct Part {
    markdown: String,
    json: Value,
    charts: Vec<Chart>,
}

// ---- 1. Conntrack -----------------------------------------------------------------------------

/// `memlock:` of a BPF object's fd, from /proc/self/fdinfo.
pub fn memlock(fd: i32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    parse_memlock(&text).context("no memlock in fdinfo")
}

fn parse_memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Median over `rounds` of the mean kernel ns of `calls` established
/// packets through XDP, rotating over `pool`'s connections.
fn established_ns(
    k: &mut Loaded,
    pool: &[SocketAddrV4],
    calls: usize,
    rounds: usize,
) -> Result<f64> {
    let frames: Vec<Vec<u8>> = pool.iter().map(|c| request(*c, VIP, HTTP_GET)).collect();
    let fd = kanari_fd(&mut k.dp, Hook::Xdp)?;
    let mut out = vec![0u8; 4096];
    let mut means = Vec::new();
    for _ in 0..rounds {
        means.push(mean(&time_calls(fd, &frames, calls, None, &mut out)?));
    }
    Ok(report::median(&means))
}

fn conntrack(ctx: &Ctx) -> Result<Part> {
    let n: u32 = ctx.pick(1_000_000, 100_000);
    let (calls, rounds) = (ctx.pick(50_000, 20_000), ctx.pick(5, 3));
    let t = Instant::now();
    let mut k = Loaded::load(web_config(n, ""))?;
    let load_s = t.elapsed().as_secs_f64();
    let fd = match k.dp.ebpf_mut().map(names::CONNTRACK) {
        Some(Map::LruHashMap(d)) => d.fd().as_fd().as_raw_fd(),
        _ => bail!("no LRU map {}", names::CONNTRACK),
    };
    let mem = memlock(fd)?;
    let _pin = PinCpu::last();
    // Pool A: the oldest entries; measured on a nearly empty table.
    let pool_a: Vec<SocketAddrV4> = (0..POOL).map(many_clients).collect();
    for c in &pool_a {
        open(&mut k, Hook::Xdp, *c)?;
    }
    let empty_ns = established_ns(&mut k, &pool_a, calls, rounds)?;
    // The fill: room is left for the two pools.
    let fill = n - 2 * POOL;
    let xdp = kanari_fd(&mut k.dp, Hook::Xdp)?;
    let mut out = vec![0u8; 4096];
    let mut wall = Duration::ZERO;
    let mut chunks: Vec<(u32, f64)> = Vec::new();
    let mut kernel_ns = 0u64;
    let mut next = POOL;
    while next < POOL + fill {
        let end = (next + CHUNK as u32).min(POOL + fill);
        let frames: Vec<Vec<u8>> = (next..end)
            .map(|i| Tcp4::syn(many_clients(i), VIP).build())
            .collect();
        let t = Instant::now();
        let ns = time_calls(xdp, &frames, frames.len(), None, &mut out)?;
        wall += t.elapsed();
        kernel_ns += ns.iter().map(|&x| x as u64).sum::<u64>();
        chunks.push((end - POOL, mean(&ns)));
        next = end;
    }
    let t = Instant::now();
    let entries = k.dp.conntrack_entries()?;
    let scan_s = t.elapsed().as_secs_f64();
    // Pool A survived the fill? (the LRU evicts the least recently used)
    let svc = k.config.services[0].clone();
    let ct: BpfHashMap<&MapData, kanari_common::maps::FlowKey, kanari_common::maps::CtEntry> =
        BpfHashMap::try_from(k.dp.ebpf_mut().map(names::CONNTRACK).context("conntrack")?)?;
    let a_kept = pool_a
        .iter()
        .filter(|c| {
            ct.get(
                &kanari_common::maps::FlowKey::new(
                    wire::addr(*c.ip()),
                    wire::addr(*svc.vip.ip()),
                    wire::port(c.port()),
                    wire::port(svc.vip.port()),
                ),
                0,
            )
            .is_ok()
        })
        .count();
    // Pool B: the newest entries, in the full table.
    let pool_b: Vec<SocketAddrV4> = (POOL + fill..2 * POOL + fill).map(many_clients).collect();
    for c in &pool_b {
        open(&mut k, Hook::Xdp, *c)?;
    }
    let full_b_ns = established_ns(&mut k, &pool_b, calls, rounds)?;
    let full_a_ns = established_ns(&mut k, &pool_a, calls, rounds)?;
    let entries_end = k.dp.conntrack_entries()?;
    drop(_pin);
    let rate = fill as f64 / wall.as_secs_f64();
    let tenth = (chunks.len() / 10).max(1);
    let first_ns = chunks[..tenth].iter().map(|c| c.1).sum::<f64>() / tenth as f64;
    let last_ns = chunks[chunks.len() - tenth..]
        .iter()
        .map(|c| c.1)
        .sum::<f64>()
        / tenth as f64;
    let mib = mem as f64 / (1024.0 * 1024.0);
    let mut md = format!(
        "### Conntrack filled to {n} connections\n\n\
         The object alone (`BPF_PROG_TEST_RUN`), `conntrack.connections: {n}` ({} map entries: \
         forward and reverse), `new_per_second: 0`. Filled with {fill} SYNs of distinct clients, \
         one test run each, through the real XDP program (each SYN inserts both entries); frames \
         built beforehand in chunks of {CHUNK}, the insert rate is the wall clock of the test-run \
         loop (system call included). One CPU.\n\n",
        2 * n as u64
    );
    md.push_str(&report::table(
        &["figure", "value"],
        &[
            vec![
                "insert rate (connections/s, 2 entries each)".into(),
                format!("{rate:.0} ({:.0} entries/s)", 2.0 * rate),
            ],
            vec![
                "SYN, kernel ns/packet (first 10 % of the fill → last 10 %)".into(),
                format!("{first_ns:.0} → {last_ns:.0}"),
            ],
            vec![
                "entries after the fill (scan time)".into(),
                format!("{entries} ({scan_s:.2} s, BPF_MAP_LOOKUP_BATCH)"),
            ],
            vec![
                "established packet, nearly empty table (XDP, kernel ns)".into(),
                format!("{empty_ns:.0}"),
            ],
            vec![
                "established packet, full table: newest entries / oldest".into(),
                format!("{full_b_ns:.0} / {full_a_ns:.0} ({a_kept} of {POOL} oldest kept)"),
            ],
            vec![
                "conntrack map memory (memlock)".into(),
                format!(
                    "{mib:.0} MiB ({:.0} bytes per connection)",
                    mem as f64 / n as f64
                ),
            ],
            vec![
                "loading the object with this table".into(),
                format!("{load_s:.2} s"),
            ],
        ],
    ));
    md.push_str(
        "\nThe established figures are raw per-call test-run times (the empty program costs \
         ~50 ns of them, see the per-packet suite). The oldest connections are looked up after \
         the newest; an oldest entry the LRU evicted is recreated by its packet (same hash).\n\n",
    );
    let svg = chart::lines(
        "SYN cost while filling the conntrack",
        "connections in the table",
        "kernel ns per SYN (chunk mean)",
        &[(
            "XDP SYN".into(),
            chunks.iter().map(|(x, y)| (*x as f64, *y)).collect(),
        )],
    )?;
    Ok(Part {
        markdown: md,
        json: json!({
            "connections": n,
            "map_entries": 2 * n as u64,
            "filled_with_syns": fill,
            "insert_rate_connections_per_s": rate,
            "insert_rate_entries_per_s": 2.0 * rate,
            "fill_wall_s": wall.as_secs_f64(),
            "fill_kernel_ns_total": kernel_ns,
            "syn_ns_first_tenth": first_ns,
            "syn_ns_last_tenth": last_ns,
            "chunks": chunks.iter().map(|(x, y)| json!([x, y])).collect::<Vec<_>>(),
            "entries_after_fill": entries,
            "entries_at_end": entries_end,
            "scan_s": scan_s,
            "established_ns_empty_table": empty_ns,
            "established_ns_full_table_newest": full_b_ns,
            "established_ns_full_table_oldest": full_a_ns,
            "oldest_kept": a_kept,
            "memlock_bytes": mem,
            "bytes_per_connection": mem as f64 / n as f64,
            "load_s": load_s,
            "calls": calls,
            "rounds": rounds,
        }),
        charts: vec![Chart {
            file: "scale-conntrack-fill.svg".into(),
            title: "SYN cost while filling the conntrack".into(),
            svg,
        }],
    })
}

// ---- 2. Many services -------------------------------------------------------------------------

/// The VIP of service `i`: 10.100.0.0/16, port 80.
fn vip_of(i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8),
        80,
    )
}

/// Backend `j` of service `i`: distinct over all services, in 10.128.0.0/10.
fn backend_of(i: u32, j: u32, per_service: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(0x0a80_0000 + i * per_service + j + 1), 8080)
}

/// A configuration of `n` services with `per_group` stable and `per_group`
/// canary backends each, every one with a rollout, on `iface`.
pub fn services_yaml(n: u32, per_group: u32, iface: &str, pin_dir: &Path) -> String {
    let per = 2 * per_group;
    let mut y = format!(
        "interfaces:\n  - name: {iface}\n    mode: auto\nlimits:\n  backends: {}\nbpf:\n  pin_dir: {}\nservices:\n",
        n * per,
        pin_dir.display()
    );
    let list = |i, r: std::ops::Range<u32>| {
        r.map(|j| backend_of(i, j, per).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for i in 0..n {
        y.push_str(&format!(
            "  - name: svc-{i}\n    vip: {}\n    stable:\n      backends: [{}]\n    canary:\n      backends: [{}]\n    rollout: {ROLLOUT}\n",
            vip_of(i),
            list(i, 0..per_group),
            list(i, per_group..per),
        ));
    }
    y
}

/// Sends control requests from its own thread and runtime: (status, sent, answered).
struct ControlClient {
    tx: mpsc::Sender<(String, String)>,
    rx: mpsc::Receiver<Result<(u16, Instant)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlClient {
    fn new(socket: PathBuf) -> Self {
        let (tx, jobs) = mpsc::channel::<(String, String)>();
        let (done, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = runtime();
            for (path, body) in jobs {
                let r = rt.block_on(kanari::api::control_request(&socket, &path, Some(body)));
                let _ = done.send(r.map(|(status, _)| (status, Instant::now())));
            }
        });
        Self {
            tx,
            rx,
            thread: Some(thread),
        }
    }

    fn send_weight(&self, service: &str, percent: f64) -> Result<()> {
        self.tx
            .send((
                format!("/v1/services/{service}/weight"),
                format!("{{\"percent\": {percent}}}"),
            ))
            .context("the control thread stopped")
    }

    fn answer(&self) -> Result<(u16, Instant)> {
        self.rx
            .recv_timeout(Duration::from_secs(10))
            .context("no answer from the control API")?
    }

    fn set_weight(&self, service: &str, percent: f64) -> Result<()> {
        self.send_weight(service, percent)?;
        let (status, _) = self.answer()?;
        if status != 200 {
            bail!("set-weight {service} {percent}: HTTP {status}");
        }
        Ok(())
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Median and max of `xs` (ms).
fn med_max(xs: &[f64]) -> (f64, f64) {
    (
        report::median(xs),
        xs.iter().copied().fold(f64::NAN, f64::max),
    )
}

/// The agent's tick durations from its histogram: the mean, and the bucket
/// bounds the median and the 99th percentile fall under.
struct TickFigures {
    count: u64,
    mean_ms: f64,
    median_le_ms: String,
    p99_le_ms: String,
}

impl TickFigures {
    fn of(metrics: &str) -> TickFigures {
        let sum = crate::control::sum(metrics, "kanari_tick_duration_seconds_sum", &[]);
        let count = crate::control::sum(metrics, "kanari_tick_duration_seconds_count", &[]);
        let buckets: Vec<(String, f64)> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("kanari_tick_duration_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (le, rest) = l.split_once('"')?;
                Some((le.to_string(), rest.rsplit(' ').next()?.parse().ok()?))
            })
            .collect();
        let under = |q: f64| {
            buckets.iter().find(|(_, n)| *n >= q * count).map_or(
                "?".to_string(),
                |(le, _)| match le.parse::<f64>() {
                    Ok(s) => format!("{}", s * 1e3),
                    Err(_) => le.clone(),
                },
            )
        };
        TickFigures {
            count: count as u64,
            mean_ms: if count > 0.0 { sum / count * 1e3 } else { 0.0 },
            median_le_ms: under(0.5),
            p99_le_ms: under(0.99),
        }
    }
}

fn services(ctx: &Ctx) -> Result<Part> {
    let n: u32 = ctx.pick(1000, 100);
    let per_group = 8;
    let updates: usize = ctx.pick(50, 10);
    let tag = unique_tag();
    let ns = Netns::new(&tag, "sc")?;
    ns.ip(&["link", "add", "s0", "type", "veth", "peer", "name", "s1"])?;
    ns.ip(&["link", "set", "s1", "up"])?;
    ns.ip(&["link", "set", "s0", "up"])?;
    let bpffs = BpfFs::mount(&tag)?;
    let pin_dir = bpffs.dir.join("kanari");
    let yaml = services_yaml(n, per_group, "s0", &pin_dir);
    let t = Instant::now();
    let agent = Agent::start(&ns, &yaml)?;
    let load_s = t.elapsed().as_secs_f64();
    let rss = agent.pid().and_then(rss_kib);
    let attached = agent
        .logs()
        .iter()
        .rev()
        .find(|l| l.contains("attached"))
        .cloned()
        .unwrap_or_default();
    let pins = Pins::new(&pin_dir);
    let map = Map::HashMap(
        MapData::from_pin(pins.map(names::SERVICES)).context("opening the pinned services map")?,
    );
    let services: BpfHashMap<MapData, ServiceKey, Service> = BpfHashMap::try_from(map)?;
    let map_mem: BTreeMap<&str, u64> = [
        names::SERVICES,
        names::BACKENDS,
        names::STATS,
        names::CONNTRACK,
    ]
    .into_iter()
    .filter_map(|m| {
        let d = MapData::from_pin(pins.map(m)).ok()?;
        Some((m, memlock(d.fd().as_fd().as_raw_fd()).ok()?))
    })
    .collect();
    let control = ControlClient::new(agent.socket.clone());
    let mut current: BTreeMap<u32, u32> = BTreeMap::new();
    let mut x = ctx.seed | 1;
    let (mut to_map, mut to_ack) = (Vec::new(), Vec::new());
    for r in 0..updates {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % n as u64) as u32;
        let was = *current.entry(i).or_insert(1000);
        let mut bp = [2500, 5000, 7500, 10000, 0][r % 5];
        if bp == was {
            bp = (bp + 1000) % 10_000;
        }
        let vip = vip_of(i);
        let key = ServiceKey::tcp(wire::addr(*vip.ip()), wire::port(vip.port()));
        let t0 = Instant::now();
        control.send_weight(&format!("svc-{i}"), bp as f64 / 100.0)?;
        let seen = loop {
            let v = services.get(&key, 0).context("reading the service")?;
            if v.canary_weight == bp {
                break t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("svc-{i}: weight {bp} not in the map after 10 s");
            }
            std::thread::sleep(Duration::from_micros(20));
        };
        let (status, answered) = control.answer()?;
        if status != 200 {
            bail!("set-weight svc-{i}: HTTP {status}");
        }
        current.insert(i, bp);
        to_map.push(seen.as_secs_f64() * 1e3);
        to_ack.push((answered - t0).as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(control);
    // The agent's own tick durations over the whole run (kanari_tick_duration_seconds).
    let metrics = crate::control::scrape(&ns);
    let tick = TickFigures::of(&metrics);
    let stopped = agent.stop()?;
    if !stopped.status.success() {
        bail!("the agent exited with {}", stopped.status);
    }
    drop(bpffs);
    drop(ns);
    let (map_med, map_max) = med_max(&to_map);
    let (ack_med, ack_max) = med_max(&to_ack);
    let mut md = format!(
        "### {n} services × {} backends\n\n\
         The real agent (`kanari run`) in a namespace of ours, attached to one end of a veth \
         pair (`mode: auto`), {n} services of {per_group} stable and {per_group} canary backends \
         ({} backends, `limits.backends` as many), each with a rollout (`{ROLLOUT}`) so its \
         weight can be set from the control API. Load time: `kanari run` spawned → its \
         \"ready\" log line (polled every 10 ms). Weight updates: {updates} \
         `POST /v1/services/svc-N/weight` on the control socket to random services, each timed \
         from the request to the new value in the pinned `{}` map (read back every ~20 µs) and \
         to the API's answer (the agent writes the map before it answers).\n\n",
        2 * per_group,
        n * 2 * per_group,
        names::SERVICES,
    );
    md.push_str(&report::table(
        &["figure", "value"],
        &[
            vec!["load time (spawn → ready)".into(), format!("{load_s:.2} s")],
            vec![
                "agent RSS after ready".into(),
                rss.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            ],
            vec![
                "weight update → in the kernel map, median / max".into(),
                format!("{map_med:.2} / {map_max:.2} ms"),
            ],
            vec![
                "weight update → API answer, median / max".into(),
                format!("{ack_med:.2} / {ack_max:.2} ms"),
            ],
            vec![
                "agent tick (kanari_tick_duration_seconds): mean; median and p99 at most".into(),
                format!(
                    "{:.1} ms over {} ticks; ≤ {} / ≤ {} ms",
                    tick.mean_ms, tick.count, tick.median_le_ms, tick.p99_le_ms
                ),
            ],
            vec![
                "map memory (memlock)".into(),
                map_mem
                    .iter()
                    .map(|(m, b)| format!("{m} {:.1} MiB", *b as f64 / 1048576.0))
                    .collect::<Vec<_>>()
                    .join(", "),
            ],
        ],
    ));
    md.push('\n');
    Ok(Part {
        markdown: md,
        json: json!({
            "services": n,
            "backends_per_service": 2 * per_group,
            "load_s": load_s,
            "agent_rss_kib": rss,
            "attached_log": attached,
            "updates": updates,
            "update_to_map_ms": to_map,
            "update_to_answer_ms": to_ack,
            "update_to_map_ms_median": map_med,
            "update_to_map_ms_max": map_max,
            "update_to_answer_ms_median": ack_med,
            "update_to_answer_ms_max": ack_max,
            "tick_mean_ms": tick.mean_ms,
            "ticks": tick.count,
            "tick_median_le_ms": tick.median_le_ms,
            "tick_p99_le_ms": tick.p99_le_ms,
            "map_memlock_bytes": map_mem,
        }),
        charts: Vec::new(),
    })
}

// ---- 3. Weight change → first new connection on the new split ---------------------------------

/// One connection of the client loop.
#[derive(Clone, Debug)]
struct Conn {
    start: Instant,
    end: Instant,
    /// The version that answered; `None`: it failed.
    version: Option<String>,
}

/// What one trial saw, relative to T0 (ms).
#[derive(Clone, Debug, PartialEq)]
pub struct Trial {
    /// The first canary answer on a connection started after T0.
    pub first_canary_answer: f64,
    /// When that connection started.
    pub first_canary_start: f64,
    /// Connections started after T0 that still went to stable, and the last one's start.
    pub stable_after: usize,
    pub last_stable_start: Option<f64>,
}

/// The trial's figures from the connections seen; `None` until a canary
/// answer on a connection started after `t0` is among them.
fn judge(conns: &[Conn], t0: Instant, canary: &str) -> Option<Trial> {
    let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
    let after = conns.iter().filter(|c| c.start >= t0);
    let first = after
        .clone()
        .filter(|c| c.version.as_deref() == Some(canary))
        .min_by_key(|c| c.end)?;
    let stable: Vec<&Conn> = after
        .filter(|c| c.version.as_deref().is_some_and(|v| v != canary))
        .collect();
    Some(Trial {
        first_canary_answer: ms(first.end),
        first_canary_start: ms(first.start),
        stable_after: stable.len(),
        last_stable_start: stable.iter().map(|c| ms(c.start)).reduce(f64::max),
    })
}

fn first_connection(ctx: &Ctx) -> Result<Part> {
    let trials: usize = ctx.pick(20, 5);
    let threads = 3;
    let topo = Topology::new(&TopologyOptions {
        stable: 1,
        canary: 1,
        ..Default::default()
    })?;
    // The clients open more new connections per second than the default
    // rate guard admits (a sixteenth of the table): it would shed SYNs
    // (clients retry after 1 s) and measure the guard, not the weight change.
    let yaml = topo
        .config(0.0, &format!("    rollout: {ROLLOUT}\n"), "auto")
        .replacen(
            "conntrack:\n  connections: 65536\n",
            "conntrack:\n  connections: 65536\n  new_per_second: 0\n",
            1,
        );
    if !yaml.contains("new_per_second: 0") {
        bail!("the topology's configuration changed: cannot turn the rate guard off");
    }
    let agent = Agent::start(&topo.node, &yaml)?;
    let control = ControlClient::new(agent.socket.clone());
    control.set_weight("web", 0.0)?;
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU32::new(0));
    let conns: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (stop, next, conns) = (stop.clone(), next.clone(), conns.clone());
        handles.push(topo.client.spawn(move || {
            let rt = runtime();
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let start = Instant::now();
                let r = rt.block_on(get_once(topology::client_addr(i), topology::VIP));
                let end = Instant::now();
                conns.lock().expect("lock").push(Conn {
                    start,
                    end,
                    version: r.ok().map(|r| r.version),
                });
            }
        })?);
    }
    // Stops the clients on every exit path.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let guard = StopOnDrop(stop.clone());
    let mut results = Vec::new();
    let mut acks = Vec::new();
    let loop_started = Instant::now();
    let result = (|| -> Result<()> {
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..trials {
            control.set_weight("web", 0.0)?;
            std::thread::sleep(Duration::from_millis(200));
            let t0 = Instant::now();
            control.send_weight("web", 100.0)?;
            let (status, answered) = control.answer()?;
            if status != 200 {
                bail!("set-weight web 100: HTTP {status}");
            }
            acks.push((answered - t0).as_secs_f64() * 1e3);
            let deadline = t0 + Duration::from_secs(5);
            let trial = loop {
                let seen = conns.lock().expect("lock").clone();
                if let Some(t) = judge(&seen, t0, "canary") {
                    // Let connections started before the first canary one finish.
                    break t;
                }
                if Instant::now() > deadline {
                    bail!("no canary answer within 5 s of set-weight 100");
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            std::thread::sleep(Duration::from_millis(20));
            let seen = conns.lock().expect("lock").clone();
            results.push(judge(&seen, t0, "canary").unwrap_or(trial));
        }
        Ok(())
    })();
    drop(guard);
    for h in handles {
        let _ = h.join();
    }
    let elapsed = loop_started.elapsed().as_secs_f64();
    drop(control);
    let shed = agent
        .stop()
        .ok()
        .and_then(|s| s.counters.get("shed").copied());
    drop(topo);
    result?;
    let all = conns.lock().expect("lock").clone();
    let failed = all.iter().filter(|c| c.version.is_none()).count();
    let rate = all.len() as f64 / elapsed;
    let answer: Vec<f64> = results.iter().map(|t| t.first_canary_answer).collect();
    let start: Vec<f64> = results.iter().map(|t| t.first_canary_start).collect();
    let last_stable: Vec<f64> = results.iter().filter_map(|t| t.last_stable_start).collect();
    let (a_med, a_max) = med_max(&answer);
    let (s_med, s_max) = med_max(&start);
    let (k_med, k_max) = med_max(&acks);
    let (l_med, l_max) = med_max(&last_stable);
    let mut md = format!(
        "### Weight change → first new connection on the new split\n\n\
         A live topology (client, node with kanari `mode: auto`, one stable and one canary \
         backend; backends answer with their version). {threads} client threads open new \
         connections back to back (one request each, {rate:.0} connections/s: the resolution), \
         the service is at 0 %; T0 is taken just before `POST …/weight {{\"percent\": 100}}` is \
         sent; the figure is the first canary answer on a connection that *started* after T0 \
         (client-side timestamps). {trials} trials, weight back to 0 % and 200 ms between them. \
         {failed} of {} requests failed; the rate guard is off (`new_per_second: 0`: at this \
         rate the default guard sheds SYNs, which then wait 1 s for their retransmission), \
         SYNs shed: {}.\n\n",
        all.len(),
        shed.map_or("?".into(), |n| n.to_string()),
    );
    md.push_str(&report::table(
        &["figure (ms after T0)", "median", "max"],
        &[
            vec![
                "first canary answer (connection started after T0)".into(),
                format!("{a_med:.2}"),
                format!("{a_max:.2}"),
            ],
            vec![
                "… that connection's start".into(),
                format!("{s_med:.2}"),
                format!("{s_max:.2}"),
            ],
            vec![
                "API answer (map written)".into(),
                format!("{k_med:.2}"),
                format!("{k_max:.2}"),
            ],
            vec![
                "last connection started after T0 that still went to stable".into(),
                format!("{l_med:.2}"),
                format!("{l_max:.2}"),
            ],
        ],
    ));
    md.push('\n');
    Ok(Part {
        markdown: md,
        json: json!({
            "trials": results.iter().map(|t| json!({
                "first_canary_answer_ms": t.first_canary_answer,
                "first_canary_start_ms": t.first_canary_start,
                "stable_after_t0": t.stable_after,
                "last_stable_start_ms": t.last_stable_start,
            })).collect::<Vec<_>>(),
            "api_answer_ms": acks,
            "first_canary_answer_ms_median": a_med,
            "first_canary_answer_ms_max": a_max,
            "first_canary_start_ms_median": s_med,
            "first_canary_start_ms_max": s_max,
            "connections": all.len(),
            "failed": failed,
            "shed": shed,
            "connections_per_s": rate,
            "client_threads": threads,
        }),
        charts: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_configuration_is_valid_and_complete() {
        let y = services_yaml(1000, 8, "s0", Path::new("/sys/fs/bpf/x"));
        let c = kanari::config::parse("scale.yaml", &y, &|_| true).expect("valid");
        assert_eq!(c.services.len(), 1000);
        assert!(
            c.services
                .iter()
                .all(|s| s.stable.len() == 8 && s.canary.len() == 8)
        );
        assert_eq!(c.max_backends, 16_000);
        assert!(c.services.iter().all(|s| s.rollout.is_some()));
        let vips: std::collections::HashSet<_> = c.services.iter().map(|s| s.vip).collect();
        assert_eq!(vips.len(), 1000);
    }

    #[test]
    fn memlock_is_read_from_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmap_type:\t9\nmemlock:\t123456\nmap_id:\t5\n";
        assert_eq!(parse_memlock(text), Some(123456));
        assert_eq!(parse_memlock("pos: 0\n"), None);
    }

    #[test]
    fn a_trial_counts_only_connections_started_after_t0() {
        let t0 = Instant::now() + Duration::from_millis(100);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let before = t0 - Duration::from_millis(50);
        let c = |start, end, v: &str| Conn {
            start,
            end,
            version: Some(v.into()),
        };
        let conns = vec![
            // Started before T0: ignored even though canary and early.
            c(before, at(1), "canary"),
            c(at(0), at(2), "stable"),
            c(at(3), at(9), "canary"),
            c(at(4), at(6), "canary"),
            c(at(5), at(7), "stable"),
        ];
        let t = judge(&conns, t0, "canary").unwrap();
        assert_eq!(t.first_canary_answer, 6.0);
        assert_eq!(t.first_canary_start, 4.0);
        assert_eq!(t.stable_after, 2);
        assert_eq!(t.last_stable_start, Some(5.0));
        assert!(judge(&conns[..2], t0, "canary").is_none());
    }

    #[test]
    fn addresses_are_distinct() {
        assert_ne!(vip_of(0), vip_of(250));
        assert_eq!(vip_of(999).ip().octets(), [10, 100, 3, 250]);
        assert_ne!(backend_of(0, 15, 16), backend_of(1, 0, 16));
        assert_eq!(crate::topology::VIP, VIP);
    }
}
