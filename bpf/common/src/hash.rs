//! Hashes for group and backend choice, identical in the kernel and the agent
//! (the agent and the tests predict where a client lands).
//!
//! The mixing step is MurmurHash3's 32-bit finalizer: a bijection with full
//! avalanche, cheap in eBPF (shifts, xors, two multiplies per word).

use crate::maps::FlowKey;

/// Domain separators, so the client hash, the flow hash and the backend index
/// are independent even for the same salt.
const CLIENT: u32 = 0x6b61_6e61; // "kana"
const FLOW: u32 = 0x7269_666c; // "rifl"
const BACKEND: u32 = 0x6261_636b; // "back"

#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The hash of a client address under a service's salt (`client` affinity).
#[inline(always)]
pub const fn client_hash(saddr: u32, salt: u32) -> u32 {
    mix32(mix32(salt ^ CLIENT) ^ saddr)
}

/// The hash of a connection's 5-tuple under a service's salt (`connection`
/// affinity, and the backend within a group).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, salt: u32) -> u32 {
    let mut h = mix32(salt ^ FLOW);
    h = mix32(h ^ key.saddr);
    h = mix32(h ^ key.daddr);
    h = mix32(h ^ ((key.sport as u32) << 16 | key.dport as u32));
    mix32(h ^ key.proto as u32)
}

/// Derives the backend-index hash from a flow hash, independent of the
/// group bucket taken from the same flow hash in `connection` mode.
#[inline(always)]
pub const fn backend_hash(flow_hash: u32) -> u32 {
    mix32(flow_hash ^ BACKEND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_a_bijection_on_a_sample_and_avalanches() {
        // Flipping one input bit flips about half the output bits.
        let mut total = 0u32;
        for i in 0..1000u32 {
            for bit in 0..32 {
                total += (mix32(i) ^ mix32(i ^ (1 << bit))).count_ones();
            }
        }
        let mean = total as f64 / 32_000.0;
        assert!((15.0..17.0).contains(&mean), "mean flipped bits {mean}");
    }

    #[test]
    fn client_hash_depends_on_salt_and_address() {
        assert_ne!(client_hash(1, 7), client_hash(2, 7));
        assert_ne!(client_hash(1, 7), client_hash(1, 8));
        assert_eq!(client_hash(1, 7), client_hash(1, 7));
    }

    #[test]
    fn flow_hash_sees_every_field() {
        let k = FlowKey::new(1, 2, 3, 4);
        let h = flow_hash(&k, 0);
        assert_ne!(h, flow_hash(&FlowKey::new(9, 2, 3, 4), 0));
        assert_ne!(h, flow_hash(&FlowKey::new(1, 9, 3, 4), 0));
        assert_ne!(h, flow_hash(&FlowKey::new(1, 2, 9, 4), 0));
        assert_ne!(h, flow_hash(&FlowKey::new(1, 2, 3, 9), 0));
        assert_ne!(h, flow_hash(&k, 1));
    }
}
