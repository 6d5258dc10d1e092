//! The choice of group (stable or canary) and of a backend within it.

use crate::maps::{BASIS_POINTS, Group};

/// The bucket in `0..10000` a hash falls in; the canary takes buckets
/// below its weight in basis points. Because a client's bucket does not
/// depend on the weight, raising the weight only moves stable clients to
/// the canary and lowering it only moves canary clients back.
#[inline(always)]
pub const fn bucket(hash: u32) -> u32 {
    hash % BASIS_POINTS
}

/// The group a new connection asks for: the client's segment if it has one,
/// else the canary when the bucket lies below the canary weight.
#[inline(always)]
pub const fn wanted_group(canary_weight: u32, bucket: u32, segment: Option<Group>) -> Group {
    match segment {
        Some(g) => g,
        None if bucket < canary_weight => Group::Canary,
        None => Group::Stable,
    }
}

/// The group a new connection gets, given how many backends each group has.
///
/// A group with no backends sends its share to the other group; `None`
/// when both are empty. The kernel does the same lazily (it reads the other
/// group's set only when the wanted one is empty).
#[inline(always)]
pub const fn choose_group(
    canary_weight: u32,
    bucket: u32,
    segment: Option<Group>,
    stable_len: u32,
    canary_len: u32,
) -> Option<Group> {
    let wanted = wanted_group(canary_weight, bucket, segment);
    let (wanted_len, other_len) = match wanted {
        Group::Stable => (stable_len, canary_len),
        Group::Canary => (canary_len, stable_len),
    };
    if wanted_len > 0 {
        Some(wanted)
    } else if other_len > 0 {
        Some(wanted.other())
    } else {
        None
    }
}

/// Multiply-and-shift range reduction of a hash to `0..len` (`len` > 0).
/// No longer how a backend is chosen (that is the set's Maglev table, see
/// `crate::maglev`): kept as the baseline the remap tests compare with.
///
/// Multiply-and-shift range reduction (Lemire) rather than `%`: as uniform
/// for a well-mixed hash, cheaper, and the verifier can bound its result
/// (it tracks products and shifts, not remainders).
#[inline(always)]
pub const fn backend_index(backend_hash: u32, len: u32) -> u32 {
    ((backend_hash as u64 * len as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::client_hash;

    #[test]
    fn raising_the_weight_only_moves_stable_clients_to_canary() {
        let salt = 0x1234;
        let weights = [0, 1, 10, 500, 1000, 2000, 5000, 9999, 10000];
        for client in 0..5000u32 {
            let b = bucket(client_hash(client, salt));
            let groups: [Group; 9] =
                core::array::from_fn(|i| choose_group(weights[i], b, None, 2, 2).unwrap());
            for pair in groups.windows(2) {
                assert!(
                    !(pair[0] == Group::Canary && pair[1] == Group::Stable),
                    "client {client} moved canary -> stable while the weight rose"
                );
            }
            assert_eq!(groups[0], Group::Stable);
            assert_eq!(groups[8], Group::Canary);
        }
    }

    #[test]
    fn share_of_clients_matches_weight_within_binomial_bound() {
        // 100,000 clients at 10 %: sd = sqrt(n p (1-p)) = 94.9; 99.9 % two-sided
        // bound is 3.29 sd = 312.
        let n = 100_000u32;
        let canary = (0..n)
            .filter(|&c| {
                choose_group(
                    1000,
                    bucket(client_hash(c.wrapping_mul(2654435761), 42)),
                    None,
                    1,
                    1,
                ) == Some(Group::Canary)
            })
            .count() as i64;
        assert!(
            (canary - 10_000).abs() <= 312,
            "canary clients {canary} of {n}"
        );
    }

    #[test]
    fn segments_win_over_weight() {
        assert_eq!(
            choose_group(0, 0, Some(Group::Canary), 1, 1),
            Some(Group::Canary)
        );
        assert_eq!(
            choose_group(10000, 0, Some(Group::Stable), 1, 1),
            Some(Group::Stable)
        );
    }

    #[test]
    fn an_empty_group_hands_its_share_to_the_other() {
        assert_eq!(choose_group(10000, 5, None, 3, 0), Some(Group::Stable));
        assert_eq!(choose_group(0, 5, None, 0, 3), Some(Group::Canary));
        assert_eq!(
            choose_group(0, 5, Some(Group::Stable), 0, 3),
            Some(Group::Canary)
        );
        assert_eq!(choose_group(5000, 5, None, 0, 0), None);
    }

    #[test]
    fn backend_index_spreads_evenly() {
        use crate::hash::{backend_hash, mix32};
        for len in [2u32, 3, 7, 32] {
            let mut counts = [0u32; 32];
            let n = 64_000u32;
            for i in 0..n {
                counts[backend_index(backend_hash(mix32(i)), len) as usize] += 1;
            }
            let expected = n as f64 / len as f64;
            let sd = (n as f64 * (1.0 / len as f64) * (1.0 - 1.0 / len as f64)).sqrt();
            for c in &counts[..len as usize] {
                assert!(
                    (*c as f64 - expected).abs() < 3.9 * sd,
                    "len {len}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn backend_index_stays_in_range() {
        for len in 1..=32 {
            for h in [0, 1, u32::MAX, 0x8000_0000, 12345] {
                assert!(backend_index(h, len) < len);
            }
        }
    }
}
