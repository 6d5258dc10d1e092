//! A SYN flood from the client namespace: raw IPv4/TCP SYNs, each from a
//! different client address and port (a seeded sequence), to one address.
//! Bounded in count; only ever sent inside a test's namespaces.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, Result, bail};
use kanari_common::csum;

use crate::netns::Netns;

/// The IPv4 + TCP SYN from `src` to `dst`, checksums filled in.
pub fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_check = csum::checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    let t = 20;
    p[t..t + 2].copy_from_slice(&src.port().to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&dst.port().to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    p[t + 12] = 5 << 4;
    p[t + 13] = 0x02; // SYN
    p[t + 14..t + 16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let sum = csum::sum(&p[t..], csum::sum(&pseudo, 0));
    p[t + 16..t + 18].copy_from_slice(&(!csum::fold64(sum)).to_ne_bytes());
    p
}

/// Sends `count` SYNs to `dst` from the client namespace, each from a fresh
/// (address, port) in 10.1.0.0/16 (seeded by `seed`). Returns how many went out.
pub fn syn_flood(client: &Netns, dst: SocketAddrV4, count: u32, seed: u32) -> Result<u32> {
    client.run_in(move || -> Result<u32> {
        // SAFETY: a raw socket of our own, closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening a raw socket");
        }
        let mut sent = 0;
        for i in 0..count {
            let n = i.wrapping_mul(2_654_435_761).wrapping_add(seed);
            let src = SocketAddrV4::new(
                Ipv4Addr::new(10, 1, ((n >> 8) % 250) as u8, (n % 250 + 1) as u8),
                1024 + (n >> 16) as u16 % 60000,
            );
            let pkt = syn_packet(src, dst, n);
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a valid buffer and address for the call.
            let r = unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if r == pkt.len() as isize {
                sent += 1;
            } else {
                let e = std::io::Error::last_os_error();
                // A full queue: give it a moment.
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    // SAFETY: our fd.
                    unsafe { libc::close(fd) };
                    bail!("sending a SYN: {e}");
                }
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        Ok(sent)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_are_valid() {
        let p = syn_packet(
            SocketAddrV4::new([10, 1, 0, 7].into(), 40000),
            SocketAddrV4::new([10, 0, 0, 100].into(), 80),
            7,
        );
        assert_eq!(csum::fold64(csum::sum(&p[..20], 0)), 0xffff);
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        assert_eq!(
            csum::fold64(csum::sum(&p[20..], csum::sum(&pseudo, 0))),
            0xffff
        );
    }
}
