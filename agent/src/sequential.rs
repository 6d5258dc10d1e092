//! Always-valid confidence intervals: intervals that hold at every look at
//! once, however often the data are looked at and whenever the looking
//! stops — so a check every interval (and a critical path every tick) may
//! decide as soon as the evidence is there, without the false decisions that
//! repeating a fixed-horizon test accumulates.
//!
//! The method is the normal-mixture sequential probability ratio test
//! (mSPRT) of Johari, Koomen, Pekelis and Walsh, *Always Valid Inference:
//! Continuous Monitoring of A/B Tests* (Operations Research 70(3), 2022;
//! arXiv:1512.04922), the test behind Optimizely's stats engine. For an
//! estimate θ̂ of θ with variance V, mixing the alternatives with a normal of
//! variance τ² around the null gives the likelihood ratio
//!
//! ```text
//! Λ = sqrt(V / (V + τ²)) · exp(τ² (θ̂ − θ₀)² / (2 V (V + τ²)))
//! ```
//!
//! and P(Λ ever exceeds 1/α | θ = θ₀) ≤ α (Ville's inequality). Inverting it,
//! the θ₀ never rejected form the interval θ̂ ± h with
//!
//! ```text
//! h = sqrt( V (V + τ²) / τ² · (ln((V + τ²) / V) + 2 ln(1/α)) )
//! ```
//!
//! which covers θ at all times with probability ≥ 1 − α (asymptotically: V
//! is the normal approximation's, with Agresti-Caffo's added success and
//! failure so that 0 of n is not certainty). τ is the size of effect the test
//! is tuned to find: the judges set it to their margin.

/// Half-width of the always-valid (1 − `alpha`) interval around an estimate
/// of variance `variance`, mixing scale `tau`.
pub fn half_width(variance: f64, tau: f64, alpha: f64) -> f64 {
    let tau2 = (tau * tau).max(1e-12);
    let v = variance.max(1e-18);
    let alpha = alpha.clamp(1e-15, 0.5);
    (v * (v + tau2) / tau2 * (((v + tau2) / v).ln() + 2.0 * (1.0 / alpha).ln())).sqrt()
}

/// A proportion's estimate and variance with one success and one failure
/// added (Agresti-Caffo): `x` of `n`.
fn adjusted(x: u64, n: u64) -> (f64, f64) {
    let p = (x as f64 + 1.0) / (n as f64 + 2.0);
    (p, p * (1.0 - p) / (n as f64 + 2.0))
}

/// An always-valid interval (estimate, low, high).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

impl Interval {
    pub fn half(&self) -> f64 {
        (self.high - self.low) / 2.0
    }
}

/// The proportion behind `x` of `n`, at level 1 − `alpha`.
pub fn proportion(x: u64, n: u64, tau: f64, alpha: f64) -> Interval {
    let (p, v) = adjusted(x, n);
    let h = half_width(v, tau, alpha);
    Interval {
        estimate: x as f64 / n.max(1) as f64,
        low: (p - h).max(0.0),
        high: (p + h).min(1.0),
    }
}

/// The difference of two proportions, canary minus stable (`xc` of `nc`
/// against `xs` of `ns`), at level 1 − `alpha`.
pub fn difference(xc: u64, nc: u64, xs: u64, ns: u64, tau: f64, alpha: f64) -> Interval {
    let (pc, vc) = adjusted(xc, nc);
    let (ps, vs) = adjusted(xs, ns);
    let h = half_width(vc + vs, tau, alpha);
    let d = pc - ps;
    Interval {
        estimate: xc as f64 / nc.max(1) as f64 - xs as f64 / ns.max(1) as f64,
        low: (d - h).max(-1.0),
        high: (d + h).min(1.0),
    }
}

/// About how many samples in all an interval now `half` wide from `n`
/// samples needs to be `target` wide (the width shrinks as 1/√n; the
/// mixture's slow growth is ignored, so this is a lower estimate).
pub fn samples_needed(n: u64, half: f64, target: f64) -> u64 {
    if target <= 0.0 || !target.is_finite() {
        return u64::MAX;
    }
    let ratio = (half / target).max(1.0);
    ((n.max(1) as f64) * ratio * ratio).ceil() as u64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SplitMix64, for seeded draws (the judges' simulations use it too).
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn unit(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn the_half_width_shrinks_with_data_and_grows_with_confidence() {
        let a = half_width(1e-4, 0.01, 0.01);
        assert!(half_width(1e-5, 0.01, 0.01) < a);
        assert!(half_width(1e-4, 0.01, 0.001) > a);
        // Wider than a fixed-horizon interval at the same level (z 2.576 for
        // 99 % two-sided): the price of looking as often as one likes.
        assert!(a > 2.576 * 1e-2, "{a}");
        // By hand: V = 1e-4, τ² = 1e-4: sqrt(1e-4 · 2 · (ln 2 + 2 ln 100)).
        let by_hand = (2e-4f64 * (2f64.ln() + 2.0 * 100f64.ln())).sqrt();
        assert!((a - by_hand).abs() < 1e-12, "{a} vs {by_hand}");
    }

    #[test]
    fn zero_of_a_few_is_not_certainty() {
        let i = proportion(0, 20, 0.01, 0.01);
        assert!(i.high > 0.1, "{i:?}");
        let i = proportion(0, 100_000, 0.01, 0.01);
        assert!(i.high < 0.001, "{i:?}");
    }

    /// How many of `runs` sequences of Bernoulli(`p`) draws, each watched
    /// after every draw from the 20th to the 5,000th (as the judges look),
    /// ever saw `misses(x, n)` say the interval missed `p`.
    fn ever_missed(runs: u32, p: f64, misses: impl Fn(u64, u64) -> bool) -> u32 {
        let mut rng = Rng(7);
        (0..runs)
            .filter(|_| {
                let mut x = 0u64;
                (1..=5000u64).any(|n| {
                    x += (rng.unit() < p) as u64;
                    n >= 20 && misses(x, n)
                })
            })
            .count() as u32
    }

    /// The interval holds at every look: over many sequences watched after
    /// every sample up to 5,000, the share that ever miss the truth stays
    /// below alpha (bound at 99.9 %).
    #[test]
    fn the_interval_holds_under_continuous_monitoring() {
        let (alpha, runs, p) = (0.05, 400u32, 0.1);
        let missed = ever_missed(runs, p, |x, n| {
            let i = proportion(x, n, 0.05, alpha);
            p < i.low || p > i.high
        });
        let share = missed as f64 / runs as f64;
        let bound = alpha + 3.29 * (alpha * (1.0 - alpha) / runs as f64).sqrt();
        assert!(
            share <= bound,
            "{missed} of {runs} sequences left the interval"
        );
        // A fixed-horizon 95 % interval, looked at as often, misses far more.
        let fixed_missed = ever_missed(runs, p, |x, n| {
            let est = x as f64 / n as f64;
            (est - p).abs() > 1.96 * (est * (1.0 - est) / n as f64).sqrt()
        });
        assert!(
            fixed_missed > 3 * missed.max(1),
            "peeking at a fixed-horizon test: {fixed_missed} of {runs}"
        );
    }

    #[test]
    fn a_difference_is_decided_once_the_data_say_so() {
        // 2 % against 1 % over 10,000 each: the canary is worse.
        let i = difference(200, 10_000, 100, 10_000, 0.01, 0.01);
        assert!(i.low > 0.0 && (i.estimate - 0.01).abs() < 1e-12, "{i:?}");
        // Equal over 100 each: nothing is known yet.
        let i = difference(1, 100, 1, 100, 0.01, 0.01);
        assert!(i.low < 0.0 && i.high > 0.01, "{i:?}");
        assert!(samples_needed(100, i.half(), 0.005) > 100);
    }
}
