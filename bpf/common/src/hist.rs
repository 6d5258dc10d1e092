//! The latency histogram's buckets: log-linear, four sub-buckets per power of
//! two from 1.024 µs to about 17 s, plus one bucket below and one above.
//!
//! The kernel only computes [`bucket_index`]; the agent turns bucket counts
//! into quantiles and Prometheus `le` buckets with [`bucket_upper_ns`].

/// Bucket 1 starts at 2^10 ns (1.024 µs).
pub const MIN_SHIFT: u32 = 10;
/// log2 of the sub-buckets per power of two.
pub const SUB_BITS: u32 = 2;
pub const SUBS: u32 = 1 << SUB_BITS;
/// Powers of two covered: 2^10 .. 2^34 ns (17.2 s).
pub const OCTAVES: u32 = 24;
/// Underflow, `OCTAVES * SUBS` log-linear buckets, overflow.
pub const BUCKETS: usize = (1 + OCTAVES * SUBS + 1) as usize;
/// Index of the overflow bucket (>= 2^34 ns).
pub const OVERFLOW: u32 = BUCKETS as u32 - 1;

/// The bucket of a duration in nanoseconds.
#[inline(always)]
pub const fn bucket_index(ns: u64) -> u32 {
    if ns < (1 << MIN_SHIFT) {
        return 0;
    }
    let log2 = 63 - ns.leading_zeros();
    if log2 >= MIN_SHIFT + OCTAVES {
        return OVERFLOW;
    }
    let sub = ((ns >> (log2 - SUB_BITS)) & (SUBS as u64 - 1)) as u32;
    1 + (log2 - MIN_SHIFT) * SUBS + sub
}

/// The smallest duration in bucket `i` (ns).
pub const fn bucket_lower_ns(i: u32) -> u64 {
    if i == 0 {
        return 0;
    }
    if i >= OVERFLOW {
        return 1 << (MIN_SHIFT + OCTAVES);
    }
    let log2 = MIN_SHIFT + (i - 1) / SUBS;
    let sub = ((i - 1) % SUBS) as u64;
    (1 << log2) + sub * (1 << (log2 - SUB_BITS))
}

/// The first duration past bucket `i` (ns); `u64::MAX` for the overflow bucket.
pub const fn bucket_upper_ns(i: u32) -> u64 {
    if i >= OVERFLOW {
        u64::MAX
    } else {
        bucket_lower_ns(i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_1us_to_16s_with_four_per_octave() {
        assert_eq!(BUCKETS, 98);
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(1023), 0);
        assert_eq!(bucket_index(1024), 1);
        assert_eq!(bucket_index(1024 + 255), 1);
        assert_eq!(bucket_index(1024 + 256), 2);
        assert_eq!(bucket_index(2047), 4);
        assert_eq!(bucket_index(2048), 5);
        assert!(bucket_upper_ns(OVERFLOW - 1) > 16_000_000_000);
        assert_eq!(bucket_index(u64::MAX), OVERFLOW);
    }

    #[test]
    fn every_bucket_index_round_trips_through_its_bounds() {
        for i in 0..BUCKETS as u32 {
            let lo = bucket_lower_ns(i);
            assert_eq!(bucket_index(lo), i, "lower bound of {i}");
            if i < OVERFLOW {
                let hi = bucket_upper_ns(i);
                assert!(hi > lo);
                assert_eq!(bucket_index(hi - 1), i, "last value of {i}");
                assert_eq!(bucket_index(hi), i + 1, "upper bound of {i}");
            }
        }
    }

    #[test]
    fn relative_width_is_at_most_a_quarter() {
        for i in 1..OVERFLOW {
            let (lo, hi) = (bucket_lower_ns(i), bucket_upper_ns(i));
            assert!((hi - lo) as f64 / lo as f64 <= 0.25 + 1e-12, "bucket {i}");
        }
    }
}
