//! The statistics the judges use: the normal distribution, a test of two
//! proportions, and the Mann-Whitney U test on two histograms. Pure math,
//! checked against known values.

use crate::telemetry::Histogram;

/// P(Z <= z) for a standard normal Z.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

/// erfc, with a maximal relative error of 1.2e-7 (Numerical Recipes' erfcc).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The z with P(Z <= z) = p (Acklam's rational approximation, relative
/// error below 1.2e-9), for 0 < p < 1.
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let p_low = 0.024_25;
    if p < p_low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - p_low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// How far the canary's share exceeds stable's by more than `delta`, in
/// standard errors: z = (p_c - p_s - delta) / SE, with SE from both samples
/// (not pooled: the null hypothesis is a difference of `delta`, not equality).
/// A large positive z means the canary is worse than stable by more than
/// `delta` with confidence `normal_cdf(z)`.
pub fn proportion_excess_z(canary: (u64, u64), stable: (u64, u64), delta: f64) -> f64 {
    let (xc, nc) = canary;
    let (xs, ns) = stable;
    if nc == 0 || ns == 0 {
        return f64::NEG_INFINITY;
    }
    let pc = xc as f64 / nc as f64;
    let ps = xs as f64 / ns as f64;
    let diff = pc - ps - delta;
    // A continuity floor so that 0 % vs 0 % or 100 % vs 100 % still has a spread.
    let var = |p: f64, n: u64| (p * (1.0 - p)).max(0.25 / n as f64) / n as f64;
    diff / (var(pc, nc) + var(ps, ns)).sqrt()
}

/// The Mann-Whitney U test of "canary is slower than stable" on two
/// histograms with the same buckets. Samples in one bucket are ties.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MannWhitney {
    /// U for the canary: pairs where the canary sample is larger, ties half.
    pub u: f64,
    /// (U - mean) / sd, tie-corrected; positive when the canary is slower.
    pub z: f64,
    /// U / (n_c n_s): the probability a canary sample is slower than a
    /// stable one (0.5 when they are alike).
    pub effect: f64,
}

pub fn mann_whitney(canary: &Histogram, stable: &Histogram) -> Option<MannWhitney> {
    let nc = canary.count() as f64;
    let ns = stable.count() as f64;
    if nc == 0.0 || ns == 0.0 {
        return None;
    }
    let mut u = 0.0;
    let mut stable_below = 0.0;
    let mut ties = 0.0;
    for (c, s) in canary.0.iter().zip(stable.0.iter()) {
        let (c, s) = (*c as f64, *s as f64);
        u += c * (stable_below + 0.5 * s);
        stable_below += s;
        let t = c + s;
        ties += t * t * t - t;
    }
    let n = nc + ns;
    let mean = nc * ns / 2.0;
    let var = nc * ns / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)).max(1.0));
    let z = if var > 0.0 {
        (u - mean) / var.sqrt()
    } else {
        0.0
    };
    Some(MannWhitney {
        u,
        z,
        effect: u / (nc * ns),
    })
}

#[cfg(test)]
mod tests {
    use kanari_common::hist;

    use super::*;

    #[test]
    fn normal_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.959_963_985) - 0.975).abs() < 1e-6);
        assert!((normal_cdf(-2.326_347_874) - 0.01).abs() < 1e-6);
        assert!((normal_quantile(0.99) - 2.326_347_874).abs() < 1e-6);
        assert!((normal_quantile(0.975) - 1.959_963_985).abs() < 1e-6);
        assert!((normal_quantile(0.5)).abs() < 1e-9);
        assert!((normal_quantile(0.001) + 3.090_232_306).abs() < 1e-6);
        for p in [0.0001, 0.01, 0.3, 0.7, 0.999] {
            assert!((normal_cdf(normal_quantile(p)) - p).abs() < 1e-6, "{p}");
        }
    }

    #[test]
    fn proportion_excess() {
        // 10 % vs 1 %, 1,000 each, against a 1-point allowance: far beyond.
        assert!(proportion_excess_z((100, 1000), (10, 1000), 0.01) > 5.0);
        // Equal shares: well below the allowance.
        assert!(proportion_excess_z((10, 1000), (10, 1000), 0.01) < -2.0);
        // No data: never significant.
        assert_eq!(
            proportion_excess_z((0, 0), (10, 1000), 0.01),
            f64::NEG_INFINITY
        );
        // All failing on both sides is still finite.
        assert!(proportion_excess_z((50, 50), (50, 50), 0.01).is_finite());
    }

    fn hist_of(samples_ns: &[u64]) -> Histogram {
        let mut h = Histogram::default();
        for s in samples_ns {
            h.0[hist::bucket_index(*s) as usize] += 1;
        }
        h
    }

    #[test]
    fn mann_whitney_separated_equal_and_textbook() {
        // Every canary sample slower: U = n_c n_s, effect 1.
        let slow = hist_of(&[10_000_000; 50]);
        let fast = hist_of(&[1_000_000; 50]);
        let mw = mann_whitney(&slow, &fast).unwrap();
        assert_eq!(mw.u, 2500.0);
        assert_eq!(mw.effect, 1.0);
        assert!(mw.z > 8.0, "{}", mw.z);
        // Same samples: U at its mean.
        let mw = mann_whitney(&fast, &fast).unwrap();
        assert_eq!(mw.effect, 0.5);
        assert!(mw.z.abs() < 1e-9);
        // Textbook, no ties: canary {3,4,6} vs stable {1,2,5} (in well-separated buckets):
        // U_canary = 2 + 2 + 3 = 7.
        let b = |k: u32| hist::bucket_lower_ns(10 + 4 * k);
        let mw =
            mann_whitney(&hist_of(&[b(3), b(4), b(6)]), &hist_of(&[b(1), b(2), b(5)])).unwrap();
        assert_eq!(mw.u, 7.0);
        assert!(mann_whitney(&Histogram::default(), &fast).is_none());
    }
}
