//! What a suite reports, and the files a run writes from it.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// One of the targets and what this run measured for it.
#[derive(Clone, Debug)]
pub struct Target {
    /// e.g. "established flow, XDP".
    pub name: String,
    /// e.g. "≤ 100 ns/packet".
    pub goal: String,
    /// e.g. "112 ns/packet".
    pub measured: String,
    pub met: bool,
}

/// A chart, written as `<file>` next to latest.md.
#[derive(Clone, Debug)]
pub struct Chart {
    /// File name, e.g. "datapath-throughput.svg".
    pub file: String,
    pub title: String,
    pub svg: String,
}

/// One suite's results.
#[derive(Clone, Debug)]
pub struct SuiteReport {
    /// Short name, as given to `--suite`: "datapath", "perpacket", …
    pub name: String,
    /// Section heading.
    pub title: String,
    /// Markdown body: tables, then notes on method and caveats.
    pub markdown: String,
    /// Every figure (raw runs included), machine-readable.
    pub json: Value,
    pub charts: Vec<Chart>,
    pub targets: Vec<Target>,
}

/// Where and how the run happened.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub command: String,
    pub commit: String,
    pub started_unix: u64,
    pub seconds: f64,
    pub quick: bool,
    pub seed: u64,
}

/// The machine: CPU model and count, memory, kernel.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({
        "cpu_model": model,
        "cpus": cpus,
        "memory_mib": mem_kib / 1024,
        "kernel": kernel,
    })
}

/// Writes latest.md, latest.json and the charts into `dir`.
pub fn write(
    dir: &Path,
    run: &RunInfo,
    suites: &[SuiteReport],
    failed: &[(String, String)],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let machine = machine();
    for s in suites {
        for c in &s.charts {
            let path = dir.join(&c.file);
            std::fs::write(&path, &c.svg).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let json = json!({
        "command": run.command,
        "commit": run.commit,
        "started_unix": run.started_unix,
        "seconds": run.seconds,
        "quick": run.quick,
        "seed": run.seed,
        "machine": machine,
        "targets": suites.iter().flat_map(|s| s.targets.iter().map(|t| json!({
            "suite": s.name, "name": t.name, "goal": t.goal, "measured": t.measured, "met": t.met,
        }))).collect::<Vec<_>>(),
        "suites": suites.iter().map(|s| (s.name.clone(), s.json.clone())).collect::<serde_json::Map<_, _>>(),
        "failed": failed.iter().map(|(n, e)| json!({"suite": n, "error": e})).collect::<Vec<_>>(),
    });
    let path = dir.join("latest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    let path = dir.join("latest.md");
    std::fs::write(&path, markdown(run, &machine, suites, failed))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn markdown(
    run: &RunInfo,
    machine: &Value,
    suites: &[SuiteReport],
    failed: &[(String, String)],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# kanari benchmarks\n");
    let _ = writeln!(
        md,
        "Made by `{}` at commit `{}`{}, in {:.0} s, seed {:#x}.\n",
        run.command,
        run.commit,
        if run.quick {
            " (--quick: fewer rounds, shorter runs)"
        } else {
            ""
        },
        run.seconds,
        run.seed
    );
    let _ = writeln!(
        md,
        "Machine: {} × {}, {} MiB, Linux {}. Every contender ran on this machine in this run, \
         alternated; figures are medians over rounds and ratios are against peers of the same run. \
         The machine is small and shared: read ratios, not absolute numbers.\n",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["memory_mib"],
        machine["kernel"].as_str().unwrap_or("?"),
    );
    if !failed.is_empty() {
        let _ = writeln!(md, "**Suites that failed in this run:**\n");
        for (name, err) in failed {
            let _ = writeln!(md, "- `{name}`: {}", err.replace('\n', " "));
        }
        md.push('\n');
    }
    let targets: Vec<_> = suites.iter().flat_map(|s| s.targets.iter()).collect();
    if !targets.is_empty() {
        let _ = writeln!(
            md,
            "## Targets\n\n| target | goal | measured | met |\n|---|---|---|---|"
        );
        for t in targets {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                t.name,
                t.goal,
                t.measured,
                if t.met { "yes" } else { "**no**" }
            );
        }
        md.push('\n');
    }
    for s in suites {
        let _ = writeln!(md, "## {}\n", s.title);
        md.push_str(s.markdown.trim_end());
        md.push_str("\n\n");
        for c in &s.charts {
            let _ = writeln!(md, "![{}]({})\n", c.title, c.file);
        }
    }
    md
}

/// The median of `xs` (mean of the middle two for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A markdown table from a header and rows.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut md = format!(
        "| {} |\n|{}|\n",
        header.join(" | "),
        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        let _ = writeln!(md, "| {} |", r.join(" | "));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn markdown_lists_targets_and_failures() {
        let run = RunInfo {
            command: "cargo xtask bench".into(),
            commit: "abc".into(),
            started_unix: 0,
            seconds: 1.0,
            quick: true,
            seed: 1,
        };
        let s = SuiteReport {
            name: "x".into(),
            title: "X".into(),
            markdown: "body".into(),
            json: json!({}),
            charts: vec![Chart {
                file: "x.svg".into(),
                title: "x chart".into(),
                svg: String::new(),
            }],
            targets: vec![Target {
                name: "t".into(),
                goal: "≤ 1".into(),
                measured: "2".into(),
                met: false,
            }],
        };
        let md = markdown(&run, &machine(), &[s], &[("y".into(), "boom".into())]);
        assert!(md.contains("| t | ≤ 1 | 2 | **no** |"), "{md}");
        assert!(md.contains("`y`: boom"), "{md}");
        assert!(md.contains("![x chart](x.svg)"), "{md}");
        assert!(md.contains("`cargo xtask bench` at commit `abc`"), "{md}");
    }
}
