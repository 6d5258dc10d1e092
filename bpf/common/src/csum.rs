//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624).
//!
//! All words are read from the packet natively (`from_ne_bytes`) and written
//! back the same way; ones'-complement sums are byte-order independent, so the
//! results are right on either endianness as long as both sides agree.
//!
//! Two states of a TCP checksum field matter for NAT:
//! - **complete**: the field holds the final checksum (packets from a NIC, or
//!   from a sender without offload). A rewrite must update it for the changed
//!   address *and* port: [`replace4`], [`replace2`].
//! - **partial** (`CHECKSUM_PARTIAL`, transmit offload not yet done, as a veth
//!   peer hands over locally generated packets): the field holds only the
//!   folded pseudo-header sum, the *seed*, and the device or the stack later
//!   adds the segment's bytes. A rewrite must update the seed for the changed
//!   address only, without complement: [`replace4_seed`]; a port lies inside
//!   the summed bytes and needs nothing.

/// Folds a ones'-complement accumulator of a few words to 16 bits.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
const fn words(v: u32) -> u32 {
    (v & 0xffff) + (v >> 16)
}

#[inline(always)]
const fn not_words(v: u32) -> u32 {
    (!v & 0xffff) + (!v >> 16)
}

/// A complete checksum after a 32-bit field changed from `from` to `to`.
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    !fold((!check) as u32 + not_words(from) + words(to))
}

/// A complete checksum after a 16-bit field changed from `from` to `to`.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    !fold((!check) as u32 + (!from) as u32 + to as u32)
}

/// A partial checksum (pseudo-header seed) after an address in the pseudo
/// header changed from `from` to `to` (Linux `inet_proto_csum_replace4` on a
/// `CHECKSUM_PARTIAL` skb).
#[inline(always)]
pub const fn replace4_seed(seed: u16, from: u32, to: u32) -> u16 {
    fold(seed as u32 + not_words(from) + words(to))
}

/// The seed Linux writes into the TCP checksum field of a packet whose
/// checksum is left to offload: the folded pseudo-header sum, not complemented.
#[inline(always)]
pub const fn pseudo_seed(saddr: u32, daddr: u32, proto: u8, l4_len: u16) -> u16 {
    fold(
        words(saddr)
            + words(daddr)
            + u16::from_ne_bytes([0, proto]) as u32
            + u16::from_ne_bytes(l4_len.to_be_bytes()) as u32,
    )
}

/// Whether a TCP checksum field holds the offload seed rather than a complete
/// checksum. A complete checksum equals the seed by chance once in 65,536
/// packets; callers treat such packets as partial, which the TC path (that
/// knows the skb's real state) then handles correctly.
#[inline(always)]
pub const fn looks_partial(check: u16, saddr: u32, daddr: u32, l4_len: u16) -> bool {
    check == pseudo_seed(saddr, daddr, crate::wire::IPPROTO_TCP, l4_len)
}

/// The ones'-complement sum of `data`, not folded (host side: tests, tools).
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += u16::from_ne_bytes([*last, 0]) as u64;
    }
    acc
}

/// Folds a wide accumulator (host side).
pub fn fold64(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum of `data` (host side): what a sender writes in the field
/// when the field itself was zero while summing.
pub fn checksum(data: &[u8]) -> u16 {
    !fold64(sum(data, 0))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// A TCP segment with its pseudo header, checksum computed from scratch.
    fn tcp_checksum(saddr: [u8; 4], daddr: [u8; 4], segment: &[u8]) -> u16 {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&saddr);
        pseudo.extend_from_slice(&daddr);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        !fold64(sum(segment, sum(&pseudo, 0)))
    }

    fn segment(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&sport.to_be_bytes());
        s.extend_from_slice(&dport.to_be_bytes());
        s.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        s.extend_from_slice(payload);
        s
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is ddf2 (big endian).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold64(sum(&data, 0)).to_ne_bytes(), [0xdd, 0xf2]);
    }

    #[test]
    fn incremental_dnat_equals_recomputation() {
        let (client, vip, backend) = ([10, 1, 0, 7], [10, 0, 0, 100], [10, 2, 0, 1]);
        for payload in [&b""[..], b"GET / HTTP/1.1\r\n\r\n", b"x"] {
            let before = segment(40000, 80, payload);
            let after = segment(40000, 8080, payload);
            let check = tcp_checksum(client, vip, &before);
            let updated = replace4(
                replace2(
                    check,
                    u16::from_ne_bytes(80u16.to_be_bytes()),
                    u16::from_ne_bytes(8080u16.to_be_bytes()),
                ),
                u32::from_ne_bytes(vip),
                u32::from_ne_bytes(backend),
            );
            assert_eq!(updated, tcp_checksum(client, backend, &after));
        }
    }

    #[test]
    fn incremental_ip_header_update_equals_recomputation() {
        let mut hdr = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 7, 10, 0, 0, 100,
        ];
        let check = checksum(&hdr);
        let (from, to) = (
            u32::from_ne_bytes([10, 0, 0, 100]),
            u32::from_ne_bytes([10, 2, 0, 1]),
        );
        hdr[16..20].copy_from_slice(&[10, 2, 0, 1]);
        assert_eq!(replace4(check, from, to), checksum(&hdr));
    }

    #[test]
    fn seed_update_matches_the_seed_of_the_new_addresses() {
        let (client, vip, backend) = (
            u32::from_ne_bytes([10, 1, 0, 7]),
            u32::from_ne_bytes([10, 0, 0, 100]),
            u32::from_ne_bytes([10, 2, 0, 1]),
        );
        for len in [20u16, 40, 1480] {
            let seed = pseudo_seed(client, vip, 6, len);
            assert!(looks_partial(seed, client, vip, len));
            assert_eq!(
                replace4_seed(seed, vip, backend),
                pseudo_seed(client, backend, 6, len)
            );
        }
    }

    #[test]
    fn seed_finished_by_offload_is_the_full_checksum() {
        // What a NIC does with a partial packet: sum the segment with the seed
        // in the checksum field, complement, store.
        let (client, vip) = ([10, 1, 0, 7], [10, 0, 0, 100]);
        let mut seg = segment(40000, 80, b"hello");
        let seed = pseudo_seed(
            u32::from_ne_bytes(client),
            u32::from_ne_bytes(vip),
            6,
            seg.len() as u16,
        );
        seg[16..18].copy_from_slice(&seed.to_ne_bytes());
        let finished = !fold64(sum(&seg, 0));
        seg[16..18].copy_from_slice(&[0, 0]);
        assert_eq!(finished, tcp_checksum(client, vip, &seg));
    }

    #[test]
    fn a_complete_checksum_rarely_looks_partial() {
        let (client, vip) = ([10, 1, 0, 7], [10, 0, 0, 100]);
        let mut hits = 0;
        for sport in 1024..u16::MAX {
            let seg = segment(sport, 80, b"");
            let check = tcp_checksum(client, vip, &seg);
            if looks_partial(
                check,
                u32::from_ne_bytes(client),
                u32::from_ne_bytes(vip),
                20,
            ) {
                hits += 1;
            }
        }
        // 64k distinct segments: the chance coincidence is about 1 in 65,536 each.
        assert!(hits <= 4, "{hits} complete checksums looked partial");
    }
}
