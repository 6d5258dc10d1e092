//! A real Prometheus server (Debian's `prometheus`), started by a test inside
//! a namespace on its loopback, scraping targets there. Killed by its PID and
//! its data directory removed when dropped.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    client::{http_get, runtime},
    netns::Netns,
};

pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus in `ns` on 127.0.0.1:9090, scraping `targets`
    /// (host:port in `ns`) every second as job "kanari", and waits until it is ready.
    pub fn start(ns: &Netns, targets: &[&str]) -> Result<Self> {
        Self::start_with_rules(ns, targets, None)
    }

    /// [`Prometheus::start`], also evaluating the rule file `rules` every second.
    pub fn start_with_rules(ns: &Netns, targets: &[&str], rules: Option<&str>) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("kanari-prometheus-{}", ns.name()));
        std::fs::create_dir_all(&dir)?;
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let rule_files = match rules {
            Some(rules) => {
                let path = dir.join("rules.yml");
                std::fs::write(&path, rules)?;
                format!("rule_files:\n  - {}\n", path.display())
            }
            None => String::new(),
        };
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n  - job_name: kanari\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )?;
        let addr: SocketAddr = "127.0.0.1:9090".parse().expect("an address");
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting prometheus (Debian package `prometheus`; `cargo xtask test` installs it)",
            )?;
        let p = Prometheus { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = ns.run_in(|| runtime().block_on(http_get(addr, "/-/ready")))?;
            if matches!(ready, Ok((200, _))) {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus was not ready within 30 s: {ready:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `data` of a successful answer to an API call (`/api/v1/...`).
    pub fn api(&self, ns: &Netns, path: &str) -> Result<serde_json::Value> {
        let (status, body) = ns.run_in(|| runtime().block_on(http_get(self.addr, path)))??;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            bail!("{path} answered {status}: {body}");
        }
        Ok(v["data"].clone())
    }

    /// An instant query's samples (a scalar counts as one); an error for a
    /// query Prometheus refuses.
    pub fn samples(&self, ns: &Netns, promql: &str) -> Result<Vec<serde_json::Value>> {
        let data = self.api(ns, &format!("/api/v1/query?query={}", encode(promql)))?;
        Ok(match data["resultType"].as_str() {
            Some("vector" | "matrix") => data["result"].as_array().cloned().unwrap_or_default(),
            _ => vec![data["result"].clone()],
        })
    }

    /// Evaluates an instant PromQL query; the value of its single sample, or
    /// `None` when the result is empty.
    pub fn query(&self, ns: &Netns, promql: &str) -> Result<Option<f64>> {
        let path = format!("/api/v1/query?query={}", encode(promql));
        let (status, body) = ns.run_in(|| runtime().block_on(http_get(self.addr, &path)))??;
        if status != 200 {
            bail!("query {promql:?} answered {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("a JSON answer")?;
        let result = &v["data"]["result"];
        let Some(samples) = result.as_array() else {
            bail!("unexpected answer to {promql:?}: {body}");
        };
        match samples.as_slice() {
            [] => Ok(None),
            [one] => {
                let text = one["value"][1].as_str().context("a sample value")?;
                Ok(Some(text.parse().context("a number")?))
            }
            many => bail!("{} series for {promql:?}, expected one: {body}", many.len()),
        }
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
