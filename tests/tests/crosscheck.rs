//! kanari's statistics against an independent computation in scipy.
//!
//! The judges' always-valid intervals ([`kanari::sequential`]) invert the
//! normal-mixture likelihood ratio of Johari et al. in closed form. Here
//! scipy computes that ratio the long way — `scipy.integrate.quad` over
//! the mixture of `scipy.stats.norm` likelihood ratios — at the ends of
//! kanari's intervals, for proportions and differences of proportions from
//! windows like the judges see: each end must be where the ratio reaches
//! exactly 1/α (to 1e-6, relative), and the centre must be Agresti-Caffo's
//! adjusted estimate (to 1e-12).
//!
//! It runs the Python tools `cargo xtask test` installs (`$KANARI_PYTHON_TOOLS`,
//! with numpy and scipy); it fails, never skips, when they are missing.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use kanari::sequential::{difference, proportion};
use kanari_tests::python::python_tool;
use serde_json::json;

const CHECK: &str = r#"
import json, math, sys
from scipy import integrate, stats

def adjusted(x, n):
    p = (x + 1) / (n + 2)
    return p, p * (1 - p) / (n + 2)

def log_ratio(est, theta0, v, tau):
    # ln of the integral over theta ~ N(theta0, tau^2) of
    # N(est; theta, v) / N(est; theta0, v), computed numerically.
    sd = math.sqrt(v)
    # The integrand is concentrated where the likelihood is: est +- 40 sd,
    # and where the mixing density is: theta0 +- 40 tau, whichever is narrower.
    lo = max(est - 40 * sd, theta0 - 40 * tau)
    hi = min(est + 40 * sd, theta0 + 40 * tau)
    base = stats.norm.logpdf(est, theta0, sd)
    f = lambda t: math.exp(stats.norm.logpdf(est, t, sd) - base) * stats.norm.pdf(t, theta0, tau)
    val, err = integrate.quad(f, lo, hi, points=[est], limit=500, epsabs=0, epsrel=1e-12)
    return math.log(val)

worst_ratio, worst_centre, n = 0.0, 0.0, 0
for line in sys.stdin:
    c = json.loads(line)
    if c["kind"] == "proportion":
        est, v = adjusted(c["x"], c["n"])
    else:
        pc, vc = adjusted(c["xc"], c["nc"])
        ps, vs = adjusted(c["xs"], c["ns"])
        est, v = pc - ps, vc + vs
    centre = (c["low"] + c["high"]) / 2
    half = (c["high"] - c["low"]) / 2
    worst_centre = max(worst_centre, abs(centre - est))
    want = math.log(1 / c["alpha"])
    for end in (est - half, est + half):
        got = log_ratio(est, end, v, c["tau"])
        worst_ratio = max(worst_ratio, abs(got - want) / want)
    n += 1
print(json.dumps({"cases": n, "worst_ratio": worst_ratio, "worst_centre": worst_centre}))
ok = n > 0 and worst_ratio <= 1e-6 and worst_centre <= 1e-12
sys.exit(0 if ok else 1)
"#;

#[test]
fn the_always_valid_intervals_agree_with_scipy() {
    // Windows as the judges see them: errors of a canary and of stable, and
    // the shares slower than a latency threshold, at the levels and mixing
    // scales the judges use.
    let mut cases = Vec::new();
    for (x, n) in [
        (0, 120),
        (3, 1000),
        (12, 800),
        (45, 3000),
        (250, 20_000),
        (9, 100),
        (80, 400),
        (500, 5000),
        (40, 10_000),
    ] {
        for (tau, alpha) in [(0.01, 0.002), (0.1, 0.01), (0.01, 1e-6), (0.5, 0.001)] {
            let i = proportion(x, n, tau, alpha);
            if i.low > 0.0 && i.high < 1.0 {
                cases.push(json!({"kind": "proportion", "x": x, "n": n, "tau": tau, "alpha": alpha, "low": i.low, "high": i.high}));
            }
        }
    }
    for (xc, nc, xs, ns) in [
        (3, 1000, 20, 9000),
        (30, 1000, 20, 9000),
        (0, 150, 5, 14_850),
        (60, 3000, 300, 27_000),
    ] {
        for (tau, alpha) in [(0.01, 0.002), (0.01, 1e-6), (0.05, 0.01)] {
            let i = difference(xc, nc, xs, ns, tau, alpha);
            if i.low > -1.0 && i.high < 1.0 {
                cases.push(json!({"kind": "difference", "xc": xc, "nc": nc, "xs": xs, "ns": ns, "tau": tau, "alpha": alpha, "low": i.low, "high": i.high}));
            }
        }
    }
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut child = Command::new(python_tool("python"))
        .args(["-c", CHECK])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    {
        let mut stdin = child.stdin.take().expect("piped");
        for c in &cases {
            writeln!(stdin, "{c}").expect("writing a case");
        }
    }
    let out = child.wait_with_output().expect("python ends");
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("scipy: {said}");
    assert!(
        out.status.success(),
        "kanari's intervals disagree with scipy's integral: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
