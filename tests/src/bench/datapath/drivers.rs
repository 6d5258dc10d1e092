//! The load generators: wrk at saturation (closed loop), oha at a fixed
//! rate (open loop, corrected for coordinated omission), and their output.

use std::{collections::BTreeMap, net::SocketAddrV4, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::sys::run_bounded;
use crate::netns::Netns;

/// Concurrent connections, both workloads, both tools.
pub const CONNECTIONS: u32 = 64;
/// wrk threads.
pub const WRK_THREADS: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 64 keep-alive connections, many requests each.
    KeepAlive,
    /// One connection per request (`Connection: close`).
    Close,
}

impl Workload {
    pub const ALL: [Workload; 2] = [Workload::KeepAlive, Workload::Close];

    pub fn label(self) -> &'static str {
        match self {
            Workload::KeepAlive => "keep-alive",
            Workload::Close => "close",
        }
    }
}

/// One load run as the client saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadResult {
    /// Responses received (any status).
    pub requests: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Failures by kind (`connect`, `read`, `write`, `timeout`, `non-2xx`, oha's messages).
    pub errors: BTreeMap<String, u64>,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            f64::NAN
        }
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "seconds": self.seconds,
            "requests_per_s": self.rps(),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "p99_9_ms": self.p999_ms,
            "errors": self.errors,
        })
    }
}

/// wrk's `done` hook: one machine-readable line with exact counts and percentiles.
pub const WRK_SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "KANARI_WRK requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// Parses the line [`WRK_SCRIPT`] prints.
pub fn parse_wrk(stdout: &str) -> Result<LoadResult> {
    let line = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("KANARI_WRK "))
        .with_context(|| format!("no KANARI_WRK line in wrk's output:\n{stdout}"))?;
    let kv: BTreeMap<&str, u64> = line
        .split_whitespace()
        .map(|f| {
            let (k, v) = f
                .split_once('=')
                .with_context(|| format!("bad field {f:?}"))?;
            Ok((
                k,
                v.parse().with_context(|| format!("bad number in {f:?}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    let get = |k: &str| {
        kv.get(k)
            .copied()
            .with_context(|| format!("wrk's line lacks {k}: {line}"))
    };
    let mut errors = BTreeMap::new();
    for (k, name) in [
        ("connect", "connect"),
        ("read", "read"),
        ("write", "write"),
        ("timeout", "timeout"),
        ("status", "non-2xx"),
    ] {
        errors.insert(name.to_string(), get(k)?);
    }
    Ok(LoadResult {
        requests: get("requests")?,
        seconds: get("duration_us")? as f64 / 1e6,
        p50_ms: get("p50_us")? as f64 / 1e3,
        p99_ms: get("p99_us")? as f64 / 1e3,
        p999_ms: get("p999_us")? as f64 / 1e3,
        errors,
    })
}

/// wrk at saturation: `CONNECTIONS` connections on `WRK_THREADS` threads for `secs`.
pub fn wrk(
    client: &Netns,
    dir: &Path,
    target: SocketAddrV4,
    workload: Workload,
    secs: f64,
) -> Result<LoadResult> {
    let script = dir.join("report.lua");
    if !script.exists() {
        std::fs::write(&script, WRK_SCRIPT)?;
    }
    let mut cmd = client.command("wrk");
    cmd.arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{CONNECTIONS}"))
        // wrk takes whole seconds.
        .arg(format!("-d{}s", secs.round().max(1.0) as u64))
        .args(["--timeout", "5s", "-s"])
        .arg(&script);
    if workload == Workload::Close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{target}/"));
    let out = run_bounded(&mut cmd, Duration::from_secs_f64(secs + 20.0))?;
    parse_wrk(&out.stdout)
}

/// oha's error for requests cut by `-z` (not the server's fault).
const OHA_DEADLINE: &str = "aborted due to deadline";

/// Parses `oha --output-format json`.
pub fn parse_oha(stdout: &str) -> Result<LoadResult> {
    let v: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "oha's output is not JSON:\n{}",
            super::sys::tail(stdout, 2000)
        )
    })?;
    let seconds = v["summary"]["total"]
        .as_f64()
        .context("oha: no summary.total")?;
    let mut requests = 0;
    let mut errors = BTreeMap::new();
    for (status, n) in v["statusCodeDistribution"]
        .as_object()
        .context("oha: no statusCodeDistribution")?
    {
        let n = n.as_u64().context("oha: a status count")?;
        requests += n;
        if !status.starts_with('2') {
            *errors.entry("non-2xx".to_string()).or_insert(0) += n;
        }
    }
    if let Some(errs) = v["errorDistribution"].as_object() {
        for (msg, n) in errs {
            if msg != OHA_DEADLINE {
                *errors.entry(msg.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
            }
        }
    }
    let pct = |k: &str| -> Result<f64> {
        let s = v["latencyPercentiles"][k]
            .as_f64()
            .with_context(|| format!("oha: no latencyPercentiles.{k}"))?;
        Ok(s * 1e3)
    };
    if requests == 0 {
        bail!(
            "oha got no response at all; errors: {}",
            v["errorDistribution"]
        );
    }
    Ok(LoadResult {
        requests,
        seconds,
        p50_ms: pct("p50")?,
        p99_ms: pct("p99")?,
        p999_ms: pct("p99.9")?,
        errors,
    })
}

/// oha at `rate` requests/s for `secs`, open loop with latency correction.
pub fn oha(
    client: &Netns,
    target: SocketAddrV4,
    workload: Workload,
    rate: f64,
    secs: f64,
) -> Result<LoadResult> {
    let mut cmd = client.command("oha");
    cmd.arg("-z")
        .arg(format!("{}ms", (secs * 1000.0).round() as u64))
        .arg("-q")
        .arg(format!("{rate:.0}"))
        .args([
            "--latency-correction",
            "--no-tui",
            "--output-format",
            "json",
        ])
        .args(["--wait-ongoing-requests-after-deadline", "-t", "5s"])
        .arg("-c")
        .arg(CONNECTIONS.to_string());
    if workload == Workload::Close {
        // Also sends `Connection: close`.
        cmd.arg("--disable-keepalive");
    }
    cmd.arg(format!("http://{target}/"));
    let out = run_bounded(&mut cmd, Duration::from_secs_f64(secs + 25.0))?;
    parse_oha(&out.stdout)
}

/// Keep-alive load for `secs` (oha, closed loop), to warm a contender up:
/// caches, neighbours, NGINX's upstream pool. Nothing is recorded.
pub fn warm_up(client: &Netns, target: SocketAddrV4, secs: f64) -> Result<()> {
    let mut cmd = client.command("oha");
    cmd.arg("-z")
        .arg(format!("{}ms", (secs * 1000.0).round() as u64))
        .args(["--no-tui", "--output-format", "json", "-t", "5s", "-c"])
        .arg(CONNECTIONS.to_string())
        .arg(format!("http://{target}/"));
    run_bounded(&mut cmd, Duration::from_secs_f64(secs + 25.0)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_line_is_parsed() {
        let out = "Running 2s test @ http://10.0.0.100:80/\n  2 threads and 64 connections\n\
                   KANARI_WRK requests=50000 duration_us=2000000 connect=0 read=3 write=0 status=2 timeout=1 p50_us=1200 p99_us=4500 p999_us=9000\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 50000);
        assert_eq!(r.rps(), 25000.0);
        assert_eq!((r.p50_ms, r.p99_ms, r.p999_ms), (1.2, 4.5, 9.0));
        assert_eq!(r.errors["read"], 3);
        assert_eq!(r.errors["non-2xx"], 2);
        assert_eq!(r.errors_total(), 6);
        assert!(parse_wrk("Running 2s test").is_err());
        assert!(parse_wrk("KANARI_WRK requests=1").is_err());
    }

    #[test]
    fn oha_json_is_parsed_without_deadline_aborts() {
        let out = r#"{"summary":{"successRate":1.0,"total":2.0,"requestsPerSec":5000.0},
            "latencyPercentiles":{"p10":0.0001,"p50":0.0005,"p99":0.002,"p99.9":0.004,"p99.99":0.01},
            "statusCodeDistribution":{"200":9990,"502":10},
            "errorDistribution":{"aborted due to deadline":7,"connection refused":3}}"#;
        let r = parse_oha(out).unwrap();
        assert_eq!(r.requests, 10000);
        assert_eq!(r.rps(), 5000.0);
        assert_eq!((r.p50_ms, r.p99_ms, r.p999_ms), (0.5, 2.0, 4.0));
        assert_eq!(r.errors["non-2xx"], 10);
        assert_eq!(r.errors["connection refused"], 3);
        assert!(!r.errors.contains_key(OHA_DEADLINE));
        assert_eq!(r.errors_total(), 13);
        assert!(parse_oha("not json").is_err());
        let none = r#"{"summary":{"total":2.0},"latencyPercentiles":{},"statusCodeDistribution":{},
            "errorDistribution":{"connection refused":64}}"#;
        assert!(parse_oha(none).is_err());
    }
}
