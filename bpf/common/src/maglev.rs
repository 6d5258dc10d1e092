//! Consistent choice of a backend within a group: a Maglev lookup table
//! (Eisenbud et al., NSDI 2016), as Katran and Cilium use.
//!
//! Each group's backend set carries a table of [`SIZE`] slots, each naming
//! one of the set's backends; a connection takes the slot its backend hash
//! falls in. Every backend fills slots along its own permutation of the
//! table, in turns, so each gets `SIZE / n` slots (±1), and adding or
//! removing one backend moves only about `1 / (n + 1)` of the slots: a
//! packet whose conntrack entry is gone (evicted, or a restart without pins)
//! finds the backend it had unless that backend's share changed.
//!
//! A backend's permutation depends on its address and port alone, and
//! backends take their turns in address order, so the table depends only on
//! the *set* of backends: every node of a fleet, whatever order it learned
//! them in, builds the same table and chooses alike.

use crate::{
    hash::mix32,
    maps::{Backend, MAX_BACKENDS_PER_GROUP},
};

/// Slots of a table: a prime (so every skip visits every slot) of at least
/// 100 × the most backends a group holds, so shares differ by at most 1 %.
pub const SIZE: usize = 3203;

/// A slot no backend has taken (only in a table of an empty set).
pub const NONE: u8 = u8::MAX;

const OFFSET: u32 = 0x6d61_676c; // "magl"
const SKIP: u32 = 0x6576_736b; // "evsk"

/// The slot of a backend hash: multiply-and-shift, whose bound the verifier
/// follows (it does not bound remainders).
#[inline(always)]
pub const fn slot(backend_hash: u32) -> usize {
    ((backend_hash as u64 * SIZE as u64) >> 32) as usize
}

#[inline(always)]
const fn key_hash(seed: u32, b: &Backend) -> u32 {
    mix32(mix32(seed ^ b.addr) ^ b.port as u32)
}

/// Fills `table` for `backends` (at most [`MAX_BACKENDS_PER_GROUP`]; the
/// rest are ignored): each slot holds an index into `backends`, or [`NONE`]
/// when there are none. Runs on the host (the agent writes the table with
/// the set); the kernel only reads it.
pub fn fill(backends: &[Backend], table: &mut [u8; SIZE]) {
    *table = [NONE; SIZE];
    let n = backends.len().min(MAX_BACKENDS_PER_GROUP);
    if n == 0 {
        return;
    }
    // Turns in address order, so the table does not depend on list order.
    let mut order = [0u8; MAX_BACKENDS_PER_GROUP];
    for (i, o) in order.iter_mut().enumerate().take(n) {
        *o = i as u8;
    }
    let order = &mut order[..n];
    order.sort_unstable_by_key(|&i| {
        let b = &backends[i as usize];
        (u32::from_be(b.addr), u16::from_be(b.port), i)
    });
    let mut offset = [0u64; MAX_BACKENDS_PER_GROUP];
    let mut skip = [0u64; MAX_BACKENDS_PER_GROUP];
    let mut next = [0u64; MAX_BACKENDS_PER_GROUP];
    for i in 0..n {
        offset[i] = (key_hash(OFFSET, &backends[i]) as usize % SIZE) as u64;
        skip[i] = (key_hash(SKIP, &backends[i]) as usize % (SIZE - 1) + 1) as u64;
    }
    let mut filled = 0;
    loop {
        for &i in order.iter() {
            let i = i as usize;
            // The backend's next slot along its permutation that is still free.
            let mut c = ((offset[i] + next[i] * skip[i]) % SIZE as u64) as usize;
            while table[c] != NONE {
                next[i] += 1;
                c = ((offset[i] + next[i] * skip[i]) % SIZE as u64) as usize;
            }
            table[c] = i as u8;
            next[i] += 1;
            filled += 1;
            if filled == SIZE {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::println;

    fn backend(i: u32) -> Backend {
        Backend {
            addr: u32::to_be(0x0a00_0000 | i),
            port: u16::to_be(8080),
            _pad: 0,
            id: i,
        }
    }

    fn table(backends: &[Backend]) -> [u8; SIZE] {
        let mut t = [0; SIZE];
        fill(backends, &mut t);
        t
    }

    /// The backend (by address) each slot names.
    fn owners(backends: &[Backend]) -> [u32; SIZE] {
        let t = table(backends);
        core::array::from_fn(|s| backends[t[s] as usize].addr)
    }

    #[test]
    fn size_is_a_prime_of_at_least_a_hundred_slots_per_backend() {
        const { assert!(SIZE >= 100 * MAX_BACKENDS_PER_GROUP) };
        assert!(
            (2..SIZE)
                .take_while(|d| d * d <= SIZE)
                .all(|d| !SIZE.is_multiple_of(d))
        );
    }

    #[test]
    fn every_backend_gets_an_even_share() {
        for n in [1u32, 2, 3, 8, 9, 31, 32] {
            let set: [Backend; 32] = core::array::from_fn(|i| backend(i as u32 + 1));
            let t = table(&set[..n as usize]);
            let mut counts = [0usize; 32];
            for s in t {
                counts[s as usize] += 1;
            }
            let (lo, hi) = (SIZE / n as usize, SIZE.div_ceil(n as usize));
            for c in &counts[..n as usize] {
                // Maglev's turns give each backend its share, ±1 slot.
                assert!((lo - 1..=hi + 1).contains(c), "{n} backends: {counts:?}");
            }
        }
        assert!(table(&[]).iter().all(|&s| s == NONE));
    }

    #[test]
    fn the_table_does_not_depend_on_the_order_of_the_list() {
        let set: [Backend; 8] = core::array::from_fn(|i| backend(i as u32 + 1));
        let mut reversed = set;
        reversed.reverse();
        assert_eq!(owners(&set), owners(&reversed));
    }

    /// Share of slots whose backend changes from `a` to `b`.
    fn moved(a: &[Backend], b: &[Backend]) -> f64 {
        let (x, y) = (owners(a), owners(b));
        x.iter().zip(&y).filter(|(p, q)| p != q).count() as f64 / SIZE as f64
    }

    #[test]
    fn adding_or_removing_one_backend_moves_about_its_share() {
        let set: [Backend; 9] = core::array::from_fn(|i| backend(i as u32 + 1));
        // One added to eight: the newcomer takes 1/9 of the slots; Maglev
        // moves a little more than that minimum (the paper's Figure 11).
        let added = moved(&set[..8], &set);
        assert!((1.0 / 9.0..0.15).contains(&added), "moved {added}");
        // One of nine removed: its slots move, and few others.
        let without: [Backend; 8] = core::array::from_fn(|i| set[if i < 4 { i } else { i + 1 }]);
        let removed = moved(&set, &without);
        println!("one added to eight moves {added:.4}, one of nine removed {removed:.4}");
        assert!((1.0 / 9.0..0.15).contains(&removed), "moved {removed}");
    }
}
