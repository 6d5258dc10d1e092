//! The latency histograms' buckets: log-linear, `2^sub_bits` sub-buckets per
//! power of two from 1.024 µs to about 17 s, plus one bucket below and one
//! above.
//!
//! Two layouts: time to first byte, which the judges compare between
//! versions, has 16 sub-buckets per power of two (each at most 6.25 % wide:
//! a 10 % shift of a median or p99 reads within ±3 points, see the agent's
//! telemetry tests); connect time, judged only against a fixed limit, has 4
//! (at most 25 % wide).
//!
//! The kernel only computes [`Layout::index`]; the agent turns bucket counts
//! into quantiles and Prometheus `le` buckets with [`Layout::upper_ns`].

/// Bucket 1 starts at 2^10 ns (1.024 µs).
pub const MIN_SHIFT: u32 = 10;
/// Powers of two covered: 2^10 .. 2^34 ns (17.2 s).
pub const OCTAVES: u32 = 24;

/// A log-linear bucket layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the sub-buckets per power of two.
    pub sub_bits: u32,
}

/// Time to first byte: 16 buckets per power of two.
pub const TTFB: Layout = Layout { sub_bits: 4 };
/// Connect time: 4 buckets per power of two.
pub const CONNECT: Layout = Layout { sub_bits: 2 };
/// Buckets of [`TTFB`].
pub const TTFB_BUCKETS: usize = TTFB.buckets();
/// Buckets of [`CONNECT`].
pub const CONNECT_BUCKETS: usize = CONNECT.buckets();

impl Layout {
    /// The layout of a histogram with `buckets` buckets.
    pub const fn of(buckets: usize) -> Layout {
        let subs = (buckets as u32 - 2) / OCTAVES;
        Layout {
            sub_bits: subs.trailing_zeros(),
        }
    }

    pub const fn subs(self) -> u32 {
        1 << self.sub_bits
    }

    /// Underflow, `OCTAVES * subs` log-linear buckets, overflow.
    pub const fn buckets(self) -> usize {
        (1 + OCTAVES * self.subs() + 1) as usize
    }

    /// Index of the overflow bucket (>= 2^34 ns).
    pub const fn overflow(self) -> u32 {
        self.buckets() as u32 - 1
    }

    /// The bucket of a duration in nanoseconds.
    #[inline(always)]
    pub const fn index(self, ns: u64) -> u32 {
        if ns < (1 << MIN_SHIFT) {
            return 0;
        }
        let log2 = 63 - ns.leading_zeros();
        if log2 >= MIN_SHIFT + OCTAVES {
            return self.overflow();
        }
        let sub = ((ns >> (log2 - self.sub_bits)) & (self.subs() as u64 - 1)) as u32;
        1 + (log2 - MIN_SHIFT) * self.subs() + sub
    }

    /// The smallest duration in bucket `i` (ns).
    pub const fn lower_ns(self, i: u32) -> u64 {
        if i == 0 {
            return 0;
        }
        if i >= self.overflow() {
            return 1 << (MIN_SHIFT + OCTAVES);
        }
        let log2 = MIN_SHIFT + (i - 1) / self.subs();
        let sub = ((i - 1) % self.subs()) as u64;
        (1 << log2) + sub * (1 << (log2 - self.sub_bits))
    }

    /// The first duration past bucket `i` (ns); `u64::MAX` for the overflow bucket.
    pub const fn upper_ns(self, i: u32) -> u64 {
        if i >= self.overflow() {
            u64::MAX
        } else {
            self.lower_ns(i + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_1us_to_16s() {
        assert_eq!(CONNECT_BUCKETS, 98);
        assert_eq!(TTFB_BUCKETS, 386);
        assert_eq!(Layout::of(TTFB_BUCKETS), TTFB);
        assert_eq!(Layout::of(CONNECT_BUCKETS), CONNECT);
        let c = CONNECT;
        assert_eq!(c.index(0), 0);
        assert_eq!(c.index(1023), 0);
        assert_eq!(c.index(1024), 1);
        assert_eq!(c.index(1024 + 255), 1);
        assert_eq!(c.index(1024 + 256), 2);
        assert_eq!(c.index(2047), 4);
        assert_eq!(c.index(2048), 5);
        assert_eq!(TTFB.index(1024 + 63), 1);
        assert_eq!(TTFB.index(1024 + 64), 2);
        assert_eq!(TTFB.index(2048), 17);
        for l in [TTFB, CONNECT] {
            assert!(l.upper_ns(l.overflow() - 1) > 16_000_000_000);
            assert_eq!(l.index(u64::MAX), l.overflow());
        }
    }

    #[test]
    fn every_bucket_index_round_trips_through_its_bounds() {
        for l in [TTFB, CONNECT] {
            for i in 0..l.buckets() as u32 {
                let lo = l.lower_ns(i);
                assert_eq!(l.index(lo), i, "lower bound of {i}");
                if i < l.overflow() {
                    let hi = l.upper_ns(i);
                    assert!(hi > lo);
                    assert_eq!(l.index(hi - 1), i, "last value of {i}");
                    assert_eq!(l.index(hi), i + 1, "upper bound of {i}");
                }
            }
        }
    }

    #[test]
    fn relative_width_is_at_most_one_sub_bucket() {
        for (l, width) in [(TTFB, 0.0625), (CONNECT, 0.25)] {
            for i in 1..l.overflow() {
                let (lo, hi) = (l.lower_ns(i), l.upper_ns(i));
                assert!((hi - lo) as f64 / lo as f64 <= width + 1e-12, "bucket {i}");
            }
        }
    }

    /// Every bound of the connect layout is a bound of the finer one, so the
    /// two export the same Prometheus `le` buckets.
    #[test]
    fn the_coarse_bounds_are_fine_bounds() {
        for i in 0..CONNECT.buckets() as u32 {
            let lo = CONNECT.lower_ns(i);
            assert_eq!(TTFB.lower_ns(TTFB.index(lo)), lo);
        }
    }
}
