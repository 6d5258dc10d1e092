//! The `footprint` suite: what the agent costs the node. Agent memory (RSS)
//! and CPU share idle and under keep-alive load at 10,000 requests/s and at
//! the highest rate the machine sustains, and the kernel memory of its maps at
//! the default sizes.
//!
//! A release agent runs in the harness topology with the defaults
//! (`conntrack.connections` 262,144, `limits.backends` 1,024, a 250 ms
//! telemetry tick) and a rollout in progress at 10 % (the critical path every
//! tick, a check every 10 s): what an agent does during a canary. Load comes
//! from `oha` in the client namespace.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{
    Ctx, SuiteReport, Target,
    report::{median, table},
    tools,
};
use crate::{
    agent::Agent,
    topology::{Topology, TopologyOptions, VIP},
};

const RSS_TARGET_MIB: f64 = 40.0;
const CPU_TARGET_PERCENT: f64 = 5.0;
const FIXED_RATE: u32 = 10_000;
/// Keep-alive connections oha holds open.
const CONNECTIONS: u32 = 64;

/// How long each load window runs (oha's `-z`).
fn load_secs(ctx: &Ctx) -> u64 {
    ctx.pick(15, 5)
}

fn fixed_label() -> String {
    format!("{},{:03} requests/s", FIXED_RATE / 1000, FIXED_RATE % 1000)
}

/// The service: connection affinity, so oha's connections (one client
/// address) split between the groups; a rollout held at 10 % for the run.
const SERVICE: &str = "    affinity: connection
    rollout:
      steps: [10, 100]
      interval: 10s
      checks_per_step: 1000
      min_requests: 50
      progress_deadline: 4h
    analysis:
      compare_to_stable: {max_latency_increase: 1000}
";

/// CPU time (user + system, clock ticks) from the text of `/proc/PID/stat`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the man page, so utime (14) and stime (15)
    // are at indices 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` field (`VmRSS`, `VmHWM`, `RssAnon`, ...) of `/proc/PID/status`, in KiB.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Time on CPU (ns) from the text of `/proc/PID/task/TID/schedstat`
/// (`run_ns wait_ns timeslices`).
pub fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// How many CPUs the kernel sizes per-CPU maps for (`/sys/devices/system/cpu/possible`, e.g. `0-3`).
pub fn parse_cpu_list(text: &str) -> Option<usize> {
    let mut n = 0;
    for part in text.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => (b.trim().parse::<usize>().ok()? + 1)
                .checked_sub(a.trim().parse::<usize>().ok()?)?,
            None => {
                part.trim().parse::<usize>().ok()?;
                1
            }
        };
    }
    Some(n)
}

/// A share of one core from a CPU-time delta (clock ticks) over a wall time.
pub fn cpu_percent(ticks: u64, clk_tck: u64, wall: Duration) -> f64 {
    if wall.is_zero() || clk_tck == 0 {
        return f64::NAN;
    }
    ticks as f64 / clk_tck as f64 / wall.as_secs_f64() * 100.0
}

/// The fields of an eBPF map's `/proc/PID/fdinfo/FD`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFdInfo {
    pub map_id: u32,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub memlock: u64,
}

/// An fdinfo's map fields; None for anything that is not a map.
pub fn parse_map_fdinfo(text: &str) -> Option<MapFdInfo> {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().parse().ok())?
        })
    };
    Some(MapFdInfo {
        map_id: field("map_id")? as u32,
        map_type: field("map_type")? as u32,
        key_size: field("key_size").unwrap_or(0) as u32,
        value_size: field("value_size").unwrap_or(0) as u32,
        max_entries: field("max_entries").unwrap_or(0) as u32,
        memlock: field("memlock")?,
    })
}

/// An eBPF program's `prog_id` and `memlock` from its fdinfo.
pub fn parse_prog_fdinfo(text: &str) -> Option<(u32, u64)> {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().parse().ok())?
        })
    };
    Some((field("prog_id")? as u32, field("memlock")?))
}

/// The kernel's map type names (`enum bpf_map_type`) for the types kanari uses and a few more.
pub fn map_type_name(t: u32) -> String {
    match t {
        1 => "hash",
        2 => "array",
        3 => "prog_array",
        4 => "perf_event_array",
        5 => "percpu_hash",
        6 => "percpu_array",
        9 => "lru_hash",
        10 => "lru_percpu_hash",
        11 => "lpm_trie",
        12 => "array_of_maps",
        13 => "hash_of_maps",
        27 => "ringbuf",
        _ => return format!("type {t}"),
    }
    .to_string()
}

fn is_percpu(t: u32) -> bool {
    matches!(t, 5 | 6 | 10)
}

/// What oha reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OhaSummary {
    pub requests_per_sec: f64,
    pub success_rate: f64,
    pub requests: u64,
}

/// oha's `--output-format json` summary.
pub fn parse_oha(json_text: &str) -> Result<OhaSummary> {
    let v: Value = serde_json::from_str(json_text).context("oha's JSON output")?;
    let s = &v["summary"];
    let requests_per_sec = s["requestsPerSec"]
        .as_f64()
        .context("no summary.requestsPerSec in oha's output")?;
    let requests = v["statusCodeDistribution"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    Ok(OhaSummary {
        requests_per_sec,
        success_rate: s["successRate"].as_f64().unwrap_or(f64::NAN),
        requests,
    })
}

/// Clock ticks per second, the unit of `/proc/PID/stat` CPU times.
fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
}

/// Maps with their names.
type Maps = Vec<(MapFdInfo, String)>;

/// The agent process as seen in /proc.
struct Proc {
    pid: u32,
    clk_tck: u64,
}

#[derive(Clone, Copy, Debug)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
}

impl Proc {
    fn ticks(&self) -> Result<u64> {
        let path = format!("/proc/{}/stat", self.pid);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_stat_ticks(&text).with_context(|| format!("parsing {path}"))
    }

    /// CPU time of the live threads (ns), from their schedstat.
    fn thread_ns(&self) -> Result<u64> {
        let dir = format!("/proc/{}/task", self.pid);
        let mut sum = 0;
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let path = e?.path().join("schedstat");
            if let Some(ns) = std::fs::read_to_string(&path)
                .ok()
                .as_deref()
                .and_then(parse_schedstat_ns)
            {
                sum += ns;
            }
        }
        Ok(sum)
    }

    fn mem(&self) -> Result<Mem> {
        let path = format!("/proc/{}/status", self.pid);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let f = |k| parse_status_kib(&text, k).with_context(|| format!("no {k} in {path}"));
        Ok(Mem {
            rss_kib: f("VmRSS")?,
            hwm_kib: f("VmHWM")?,
            anon_kib: f("RssAnon").unwrap_or(0),
        })
    }

    /// The maps and programs behind the agent's file descriptors.
    fn bpf_objects(&self) -> Result<(Maps, Vec<(u32, u64)>)> {
        let dir = format!("/proc/{}/fdinfo", self.pid);
        let mut maps = BTreeMap::new();
        let mut progs = BTreeMap::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let Ok(text) = std::fs::read_to_string(e?.path()) else {
                continue;
            };
            if let Some(m) = parse_map_fdinfo(&text) {
                maps.entry(m.map_id).or_insert(m);
            } else if let Some((id, memlock)) = parse_prog_fdinfo(&text) {
                progs.entry(id).or_insert(memlock);
            }
        }
        let maps = maps
            .into_values()
            .map(|m| {
                let name = aya::maps::MapInfo::from_id(m.map_id)
                    .ok()
                    .and_then(|i| i.name_as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("id {}", m.map_id));
                (m, name)
            })
            .collect();
        Ok((maps, progs.into_iter().collect()))
    }
}

/// CPU share and memory over one window.
#[derive(Clone, Debug)]
struct Window {
    phase: String,
    seconds: f64,
    cpu_percent: f64,
    /// The same from the threads' schedstat (ns resolution).
    cpu_percent_ns: f64,
    rss_mib_max: f64,
    rss_mib_median: f64,
    requests_per_sec: Option<f64>,
    success_rate: Option<f64>,
}

fn window_json(w: &Window) -> Value {
    json!({
        "phase": w.phase, "seconds": w.seconds, "cpu_percent_of_one_core": w.cpu_percent,
        "cpu_percent_of_one_core_schedstat": w.cpu_percent_ns,
        "rss_mib_max": w.rss_mib_max, "rss_mib_median": w.rss_mib_median,
        "requests_per_sec": w.requests_per_sec, "success_rate": w.success_rate,
    })
}

fn window(phase: &str, m: &Measured) -> Window {
    Window {
        phase: phase.to_string(),
        seconds: m.elapsed.as_secs_f64(),
        cpu_percent: m.cpu,
        cpu_percent_ns: m.cpu_ns,
        rss_mib_max: m.rss.iter().copied().fold(0.0, f64::max),
        rss_mib_median: median(&m.rss),
        requests_per_sec: None,
        success_rate: None,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The agent's CPU share (from stat, from schedstat), RSS samples and the
/// exact window.
struct Measured {
    cpu: f64,
    cpu_ns: f64,
    rss: Vec<f64>,
    elapsed: Duration,
}

/// Samples the agent's CPU and RSS over `wall`, between `skip` from now and
/// `skip + wall`.
fn measure(p: &Proc, skip: Duration, wall: Duration) -> Result<Measured> {
    std::thread::sleep(skip);
    let (t0, c0, n0) = (Instant::now(), p.ticks()?, p.thread_ns()?);
    let mut rss = vec![mib(p.mem()?.rss_kib)];
    while t0.elapsed() < wall {
        std::thread::sleep(Duration::from_millis(250).min(wall.saturating_sub(t0.elapsed())));
        rss.push(mib(p.mem()?.rss_kib));
    }
    let (c1, n1, elapsed) = (p.ticks()?, p.thread_ns()?, t0.elapsed());
    Ok(Measured {
        cpu: cpu_percent(c1.saturating_sub(c0), p.clk_tck, elapsed),
        cpu_ns: n1.saturating_sub(n0) as f64 / elapsed.as_nanos().max(1) as f64 * 100.0,
        rss,
        elapsed,
    })
}

/// Kills a child we started (by its PID) if it is still running when dropped.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs oha in the client namespace for `secs` (at `rate`, or as fast as it
/// can) and measures the agent meanwhile, leaving a second at each end.
fn load_window(
    topo: &Topology,
    oha: &Path,
    p: &Proc,
    phase: &str,
    rate: Option<u32>,
    secs: u64,
) -> Result<Window> {
    let url = format!("http://{VIP}/");
    let mut cmd = topo.client.command(oha.to_str().context("oha's path")?);
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "-z",
        &format!("{secs}s"),
        "-c",
        &CONNECTIONS.to_string(),
    ]);
    if let Some(r) = rate {
        cmd.args(["-q", &r.to_string()]);
    }
    cmd.arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop(Some(cmd.spawn().context("starting oha")?));
    let m = measure(
        p,
        Duration::from_secs(1),
        Duration::from_secs(secs.saturating_sub(2).max(1)),
    )?;
    // oha stops itself after `secs`; give it a margin, then kill it.
    let deadline = Instant::now() + Duration::from_secs(secs + 15);
    let c = child.0.as_mut().expect("running");
    loop {
        if c.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("oha did not finish within {secs} + 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.0.take().expect("running").wait_with_output()?;
    if !out.status.success() {
        bail!(
            "oha failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let s = parse_oha(&String::from_utf8_lossy(&out.stdout))?;
    Ok(Window {
        requests_per_sec: Some(s.requests_per_sec),
        success_rate: Some(s.success_rate),
        ..window(phase, &m)
    })
}

pub fn run(ctx: &Ctx) -> Result<SuiteReport> {
    let oha = tools::require("oha")?;
    let started = Instant::now();
    let idle_secs = ctx.pick(15, 3);
    let load_secs = load_secs(ctx);
    let rounds = ctx.pick(3, 1);

    let topo = Topology::new(&TopologyOptions {
        complete_client_checksums: true,
        ..Default::default()
    })
    .context("building the topology")?;
    // The harness's configuration with the default conntrack size.
    let yaml = topo
        .config(0.0, SERVICE, "auto")
        .replace("conntrack:\n  connections: 65536\n", "");
    let agent = Agent::start(&topo.node, &yaml).context("starting kanari")?;
    let attached = topo.attached_programs().unwrap_or_default();
    let pid = agent.pid().context("the agent is not running")?;
    let p = Proc {
        pid,
        clk_tck: clk_tck(),
    };
    let at_start = p.mem()?;

    let (maps, progs) = p.bpf_objects()?;
    let mut windows = Vec::new();
    let m = measure(&p, Duration::from_secs(1), Duration::from_secs(idle_secs))?;
    windows.push(window("idle", &m));
    eprintln!(
        "bench: footprint: idle: agent {:.2} % CPU ({:.3} % from schedstat)",
        m.cpu, m.cpu_ns
    );
    for round in 0..rounds {
        for (phase, rate) in [
            (fixed_label(), Some(FIXED_RATE)),
            ("highest rate".to_string(), None),
        ] {
            let w = load_window(&topo, &oha, &p, &phase, rate, load_secs)
                .with_context(|| format!("round {} at {phase}", round + 1))?;
            eprintln!(
                "bench: footprint: {phase}: {:.0} requests/s, agent {:.2} % CPU ({:.3} % from schedstat), RSS {:.1} MiB",
                w.requests_per_sec.unwrap_or(0.0),
                w.cpu_percent,
                w.cpu_percent_ns,
                w.rss_mib_max
            );
            windows.push(w);
        }
    }
    let at_end = p.mem()?;
    let (maps_end, _) = p.bpf_objects()?;
    let phase_status = crate::client::runtime()
        .block_on(kanari::api::control_get(&agent.socket, "/v1/status"))
        .ok()
        .and_then(|b| serde_json::from_slice::<kanari::status::StatusReport>(&b).ok())
        .and_then(|r| r.services.first()?.rollout.clone())
        .map(|r| (r.phase, r.reason));
    let _ = agent.stop();
    let seconds = started.elapsed().as_secs_f64();
    report(
        ctx,
        &windows,
        &maps,
        &maps_end,
        &progs,
        (at_start, at_end),
        attached,
        phase_status,
        seconds,
    )
}

#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &Ctx,
    windows: &[Window],
    maps: &[(MapFdInfo, String)],
    maps_end: &[(MapFdInfo, String)],
    progs: &[(u32, u64)],
    (at_start, at_end): (Mem, Mem),
    attached: Vec<String>,
    phase_status: Option<(String, String)>,
    seconds: f64,
) -> Result<SuiteReport> {
    let of =
        |phase: &str| -> Vec<&Window> { windows.iter().filter(|w| w.phase == phase).collect() };
    let fixed = fixed_label();
    let mut rows = Vec::new();
    let mut summary = BTreeMap::new();
    for phase in ["idle", fixed.as_str(), "highest rate"] {
        let ws = of(phase);
        if ws.is_empty() {
            continue;
        }
        let cpu: Vec<f64> = ws.iter().map(|w| w.cpu_percent).collect();
        let cpu_ns: Vec<f64> = ws.iter().map(|w| w.cpu_percent_ns).collect();
        let rps: Vec<f64> = ws.iter().filter_map(|w| w.requests_per_sec).collect();
        let rss_max = ws.iter().map(|w| w.rss_mib_max).fold(0.0, f64::max);
        let ok: Vec<f64> = ws.iter().filter_map(|w| w.success_rate).collect();
        rows.push(vec![
            phase.to_string(),
            if rps.is_empty() {
                "—".into()
            } else {
                format!("{:.0}", median(&rps))
            },
            ws.len().to_string(),
            format!(
                "**{:.3} %** ({:.3}–{:.3})",
                median(&cpu_ns),
                cpu_ns.iter().copied().fold(f64::INFINITY, f64::min),
                cpu_ns.iter().copied().fold(0.0, f64::max)
            ),
            format!("{:.2} %", median(&cpu)),
            format!("{rss_max:.1} MiB"),
            if ok.is_empty() {
                "—".into()
            } else {
                format!("{:.2} %", median(&ok) * 100.0)
            },
        ]);
        summary.insert(
            phase.to_string(),
            json!({"cpu_percent_median": median(&cpu), "cpu_percent_schedstat_median": median(&cpu_ns), "cpu_percent": cpu, "cpu_percent_schedstat": cpu_ns, "requests_per_sec_median": median(&rps), "rss_mib_max": rss_max}),
        );
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "**Agent CPU and memory** (release build; CPU as a share of one core from the time on CPU in \
         each thread's `/proc/PID/task/TID/schedstat` (ns resolution) over each window, and, as a cross-check, \
         from `/proc/PID/stat` utime + stime (clock ticks: 10 ms granularity, so short bursts round to 0); \
         RSS sampled every 250 ms; median (min–max) over windows):\n"
    );
    md.push_str(&table(
        &[
            "load (keep-alive, 64 connections)",
            "requests/s achieved",
            "windows",
            "agent CPU (% of one core, schedstat)",
            "same, from stat ticks",
            "agent RSS (max)",
            "oha success rate",
        ],
        &rows,
    ));
    let _ = writeln!(
        md,
        "\nAgent memory: {:.1} MiB RSS once ready ({:.1} MiB anonymous), {:.1} MiB at the end, peak (VmHWM) \
         {:.1} MiB.\n",
        mib(at_start.rss_kib),
        mib(at_start.anon_kib),
        mib(at_end.rss_kib),
        mib(at_end.hwm_kib.max(at_start.hwm_kib)),
    );

    let total_memlock: u64 = maps.iter().map(|(m, _)| m.memlock).sum();
    let prog_memlock: u64 = progs.iter().map(|(_, m)| *m).sum();
    let mut map_rows: Vec<Vec<String>> = maps
        .iter()
        .map(|(m, name)| {
            vec![
                format!("`{name}`"),
                map_type_name(m.map_type),
                m.max_entries.to_string(),
                format!("{} / {}", m.key_size, m.value_size),
                format!("{:.2} MiB", m.memlock as f64 / 1048576.0),
            ]
        })
        .collect();
    map_rows.sort_by(|a, b| a[0].cmp(&b[0]));
    map_rows.push(vec![
        format!("**all {} maps**", maps.len()),
        String::new(),
        String::new(),
        String::new(),
        format!("**{:.2} MiB**", total_memlock as f64 / 1048576.0),
    ]);
    let percpu: u64 = maps
        .iter()
        .filter(|(m, _)| is_percpu(m.map_type))
        .map(|(m, _)| m.memlock)
        .sum();
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .as_deref()
        .and_then(parse_cpu_list)
        .unwrap_or(1);
    let _ = writeln!(
        md,
        "**Kernel map memory at the default sizes** (`conntrack.connections` 262,144, `limits.backends` \
         1,024; the `memlock:` of each map the agent holds a descriptor to, from `/proc/PID/fdinfo`, \
         deduplicated by map id, named through the kernel's map info):\n"
    );
    md.push_str(&table(
        &["map", "type", "max entries", "key / value bytes", "memlock"],
        &map_rows,
    ));
    let _ = writeln!(
        md,
        "\nPer-CPU maps hold {:.2} MiB of that for the {cpus} possible CPUs here (about {:.2} MiB per \
         possible CPU: {:.0} MiB for all maps with 64). The {} programs add {:.2} MiB (`memlock` of their descriptors). Map memory at the end \
         of the run: {:.2} MiB (LRU and hash maps may allocate as they fill, depending on the kernel).\n",
        percpu as f64 / 1048576.0,
        percpu as f64 / 1048576.0 / cpus as f64,
        (total_memlock - percpu) as f64 / 1048576.0
            + percpu as f64 / 1048576.0 / cpus as f64 * 64.0,
        progs.len(),
        prog_memlock as f64 / 1048576.0,
        maps_end.iter().map(|(m, _)| m.memlock).sum::<u64>() as f64 / 1048576.0,
    );
    let _ = writeln!(
        md,
        "**Method.** The agent runs in the harness topology (client, node, two stable and one canary \
         backend in network namespaces; attached: {}) with one service, `affinity: connection` so that \
         oha's {CONNECTIONS} keep-alive connections from one client address split between the groups, and a \
         rollout held at 10 % (`interval: 10s`: the critical path every 250 ms tick and a check every 10 s \
         run throughout{}). `oha -c {CONNECTIONS} -z {}s` ran in the client namespace, with `-q \
         {FIXED_RATE}` for the fixed rate and without for the highest rate; the agent was measured from 1 s \
         after oha started to 1 s before it stopped. Idle is the same agent with no traffic. The \
         backends are the harness's HTTP test backends (threads of the benchmark process), so the \
         highest rate is this machine's, not kanari's. This suite took {seconds:.0} s.\n",
        if attached.is_empty() {
            "unknown".to_string()
        } else {
            attached.join(", ")
        },
        match &phase_status {
            Some((phase, reason)) if phase != "progressing" => {
                format!("; the rollout ended {phase} during the run: {reason}")
            }
            _ => String::new(),
        },
        load_secs(ctx),
    );
    let _ = writeln!(
        md,
        "**Caveats.** CPU time has clock-tick resolution (1/{} s), so short idle windows read 0 or one tick. \
         The machine (2 cores) is shared with oha, the backends and other benchmark runs; the agent's own \
         work does not depend on the packet rate (it reads per-CPU counters each tick), which is why its \
         share barely moves with load. The eBPF programs' per-packet cost is charged to the kernel's \
         softirq time, not the agent: see the perpacket and datapath suites.",
        clk_tck(),
    );

    let mut targets = Vec::new();
    let peak = windows
        .iter()
        .map(|w| w.rss_mib_max)
        .fold(mib(at_end.hwm_kib.max(at_start.hwm_kib)), f64::max);
    targets.push(Target {
        name: "footprint: agent RSS".into(),
        goal: format!("≤ {RSS_TARGET_MIB:.0} MiB"),
        measured: format!("{peak:.1} MiB peak"),
        met: peak <= RSS_TARGET_MIB,
    });
    let fixed_ws = of(&fixed);
    if !fixed_ws.is_empty() {
        let cpu = median(&fixed_ws.iter().map(|w| w.cpu_percent).collect::<Vec<_>>());
        let cpu_ns = median(
            &fixed_ws
                .iter()
                .map(|w| w.cpu_percent_ns)
                .collect::<Vec<_>>(),
        );
        let rps = median(
            &fixed_ws
                .iter()
                .filter_map(|w| w.requests_per_sec)
                .collect::<Vec<_>>(),
        );
        targets.push(Target {
            name: format!("footprint: agent CPU at {}", fixed_label()),
            goal: format!("≤ {CPU_TARGET_PERCENT:.0} % of one core"),
            measured: format!(
                "{cpu_ns:.2} % from schedstat ({cpu:.2} % from stat ticks; at {rps:.0} requests/s achieved)"
            ),
            met: cpu_ns.max(cpu) <= CPU_TARGET_PERCENT,
        });
    }

    let map_json = |ms: &[(MapFdInfo, String)]| -> Vec<Value> {
        ms.iter()
            .map(|(m, name)| {
                json!({
                    "name": name, "map_id": m.map_id, "type": map_type_name(m.map_type),
                    "max_entries": m.max_entries, "key_size": m.key_size, "value_size": m.value_size,
                    "memlock_bytes": m.memlock,
                })
            })
            .collect()
    };
    Ok(SuiteReport {
        name: "footprint".into(),
        title: "Footprint: agent memory and CPU, kernel map memory".into(),
        markdown: md,
        json: json!({
            "quick": ctx.quick,
            "seconds": seconds,
            "service_yaml": SERVICE,
            "attached": attached,
            "summary": summary,
            "windows": windows.iter().map(window_json).collect::<Vec<_>>(),
            "agent_memory_kib": {
                "rss_at_start": at_start.rss_kib, "anon_at_start": at_start.anon_kib,
                "rss_at_end": at_end.rss_kib, "hwm": at_end.hwm_kib.max(at_start.hwm_kib),
            },
            "maps": map_json(maps),
            "maps_at_end": map_json(maps_end),
            "map_memlock_bytes": total_memlock,
            "percpu_map_memlock_bytes": percpu,
            "possible_cpus": cpus,
            "programs": progs.iter().map(|(id, m)| json!({"prog_id": id, "memlock_bytes": m})).collect::<Vec<_>>(),
            "rollout_at_end": phase_status.map(|(p, r)| json!({"phase": p, "reason": r})),
        }),
        charts: Vec::new(),
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_from_stat_with_a_strange_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        let stat = "1234 (kan ari) (x)) S 1 1234 1234 0 -1 4194560 500 0 0 0 150 75 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_stat_ticks(stat), Some(225));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_fields_in_kib() {
        let status =
            "Name:\tkanari\nVmHWM:\t   20480 kB\nVmRSS:\t   18000 kB\nRssAnon:\t    6000 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(18000));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(parse_status_kib(status, "RssAnon"), Some(6000));
        assert_eq!(parse_status_kib(status, "Vm"), None);
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn schedstat_and_cpu_lists() {
        assert_eq!(parse_schedstat_ns("123456789 2000 17\n"), Some(123_456_789));
        assert_eq!(parse_schedstat_ns(""), None);
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn cpu_share_of_one_core() {
        // 100 ticks/s: 50 ticks over 10 s is 5 %.
        assert_eq!(cpu_percent(50, 100, Duration::from_secs(10)), 5.0);
        assert!(cpu_percent(1, 100, Duration::ZERO).is_nan());
    }

    #[test]
    fn map_and_program_fdinfo() {
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t9\nkey_size:\t16\n\
                   value_size:\t64\nmax_entries:\t262144\nmap_flags:\t0x0\nmap_extra:\t0x0\n\
                   memlock:\t25165824\nmap_id:\t42\nfrozen:\t0\n";
        assert_eq!(
            parse_map_fdinfo(map),
            Some(MapFdInfo {
                map_id: 42,
                map_type: 9,
                key_size: 16,
                value_size: 64,
                max_entries: 262144,
                memlock: 25165824,
            })
        );
        assert_eq!(parse_prog_fdinfo(map), None);
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t6\nprog_jited:\t1\n\
                    prog_tag:\tabcdef0123456789\nmemlock:\t8192\nprog_id:\t77\nrun_time_ns:\t0\n";
        assert_eq!(parse_prog_fdinfo(prog), Some((77, 8192)));
        assert_eq!(parse_map_fdinfo(prog), None);
        assert_eq!(parse_map_fdinfo("pos:\t0\nflags:\t0\n"), None);
        assert_eq!(map_type_name(10), "lru_percpu_hash");
        assert_eq!(map_type_name(99), "type 99");
    }

    #[test]
    fn oha_json_summary() {
        let text = r#"{"summary":{"successRate":1.0,"total":5.0,"slowest":0.01,"fastest":0.0001,
            "average":0.001,"requestsPerSec":9998.7,"totalData":100,"sizePerRequest":20,"sizePerSec":1.0},
            "statusCodeDistribution":{"200":49990,"500":3}}"#;
        let s = parse_oha(text).unwrap();
        assert_eq!(s.requests_per_sec, 9998.7);
        assert_eq!(s.success_rate, 1.0);
        assert_eq!(s.requests, 49993);
        assert!(parse_oha("{}").is_err());
        assert!(parse_oha("not json").is_err());
    }
}
