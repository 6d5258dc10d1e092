//! Packet parsing for IPv4/TCP over Ethernet.
//!
//! The parser works on a byte range given as two addresses, `start..end`, which
//! is what an XDP or TC context provides (`data`, `data_end`) and what a host
//! test gets from a slice. Every read is bounds-checked right before it happens,
//! in the form the verifier understands (`start + offset + size > end`).

use core::{mem::size_of, net::Ipv4Addr};

/// Ethernet header length (no VLAN tag: tagged frames are not parsed and pass).
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4, as read from the wire with `from_ne_bytes`.
pub const ETH_P_IP_WIRE: u16 = u16::from_ne_bytes(0x0800u16.to_be_bytes());
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
/// ICMP errors that quote the datagram they are about (RFC 792): the
/// destination was unreachable (type 3; code 4 is "fragmentation needed",
/// path MTU discovery's signal) and the time to live ran out (type 11).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// The ICMP header: type, code, checksum, 4 bytes of rest-of-header.
pub const ICMP_HLEN: usize = 8;
/// Offset of the IPv4 header checksum from the start of the frame.
pub const IP_CHECK_OFF: usize = ETH_HLEN + 10;
/// Offset of the IPv4 source address from the start of the frame.
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
/// Offset of the IPv4 destination address from the start of the frame.
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;
/// Offsets within the TCP header.
pub const TCP_SPORT_OFF: usize = 0;
pub const TCP_DPORT_OFF: usize = 2;
pub const TCP_CHECK_OFF: usize = 16;
/// The most header bytes the parser reads: Ethernet, IPv4 with the longest
/// options (60 bytes), the fixed TCP header.
pub const MAX_PARSE_LEN: usize = ETH_HLEN + 60 + size_of::<TcpHeader>();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The IPv4 header without options. Byte arrays only: alignment 1, so a
/// pointer into a packet at any offset is valid for it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Header {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// The fixed part of the TCP header.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpHeader {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    /// Data offset in the high nibble.
    pub data_off: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

const _: () = assert!(size_of::<Ipv4Header>() == 20);
const _: () = assert!(size_of::<TcpHeader>() == 20);

/// Why a frame is not handled. Every one of these means "pass it untouched".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Shorter than the headers it announces.
    Truncated,
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...).
    NotIpv4,
    /// IPv4 but not TCP (ICMP, UDP, ...).
    NotTcp,
    /// A fragment: only the first carries ports, so none is translated.
    Fragment,
    /// Header fields that contradict each other (IHL < 5, version != 4,
    /// total length shorter than the headers or longer than the frame, TCP
    /// data offset < 5 or past the segment).
    Malformed,
}

/// The fields of an IPv4/TCP frame that steering needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcp4 {
    /// Offset of the TCP header from the start of the frame (14 + IHL × 4).
    pub l4_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// Length of the TCP segment (header and payload) from the IP total length.
    pub l4_len: u16,
    /// Length of the TCP header, options included.
    pub tcp_hlen: u16,
    /// The TCP checksum field as found.
    pub check: u16,
    /// The sequence number as found (wire order, read natively: compared
    /// only — a SYN's is the connection's initial sequence number).
    pub seq: u32,
}

impl Tcp4 {
    /// A SYN that opens a connection (no ACK, no RST).
    #[inline(always)]
    pub fn is_new_connection(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }

    /// Flags no TCP stack sends: SYN with FIN.
    #[inline(always)]
    pub fn is_invalid(&self) -> bool {
        self.flags & (TCP_SYN | TCP_FIN) == TCP_SYN | TCP_FIN
    }

    #[inline(always)]
    pub fn is_rst(&self) -> bool {
        self.flags & TCP_RST != 0
    }

    #[inline(always)]
    pub fn is_fin(&self) -> bool {
        self.flags & TCP_FIN != 0
    }

    /// A SYN-ACK: the server's answer to a SYN.
    #[inline(always)]
    pub fn is_syn_ack(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
    }

    /// Bytes of TCP payload.
    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        self.l4_len - self.tcp_hlen
    }

    /// Offset of the TCP payload from the start of the frame.
    #[inline(always)]
    pub fn payload_off(&self) -> usize {
        self.l4_off + self.tcp_hlen as usize
    }
}

/// A pointer to a `T` at `offset` in `start..end`, if it fits.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Result<*const T, Skip> {
    if start + offset + size_of::<T>() > end {
        return Err(Skip::Truncated);
    }
    Ok((start + offset) as *const T)
}

/// A mutable pointer to a `T` at `offset` in `start..end`, if it fits.
#[inline(always)]
pub fn ptr_at_mut<T>(start: usize, end: usize, offset: usize) -> Result<*mut T, Skip> {
    if start + offset + size_of::<T>() > end {
        return Err(Skip::Truncated);
    }
    Ok((start + offset) as *mut T)
}

/// Parses Ethernet / IPv4 (options allowed) / TCP.
///
/// `start..end` holds at least the headers; `frame_len` is the whole frame's
/// length, which in TC can exceed the linear area `start..end`. A frame
/// shorter than its IPv4 total length is cut short and is skipped: the
/// stack would drop it, so it must not create a connection.
///
/// # Safety
/// `start..end` must be readable memory (a packet, or a slice on the host).
#[inline(always)]
pub unsafe fn parse_tcp4(start: usize, end: usize, frame_len: usize) -> Result<Tcp4, Skip> {
    let ethertype: *const [u8; 2] = ptr_at(start, end, 12)?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    if u16::from_ne_bytes(unsafe { *ethertype }) != ETH_P_IP_WIRE {
        return Err(Skip::NotIpv4);
    }
    let ip: *const Ipv4Header = ptr_at(start, end, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    let ip = unsafe { *ip };
    if ip.version_ihl >> 4 != 4 {
        return Err(Skip::Malformed);
    }
    let ihl = (ip.version_ihl & 0x0f) as usize * 4;
    if ihl < size_of::<Ipv4Header>() {
        return Err(Skip::Malformed);
    }
    // More-fragments flag or a non-zero offset.
    if u16::from_be_bytes(ip.frag) & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }
    if ip.proto != IPPROTO_TCP {
        return Err(Skip::NotTcp);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < ihl + size_of::<TcpHeader>() {
        return Err(Skip::Malformed);
    }
    let l4_off = ETH_HLEN + ihl;
    let tcp: *const TcpHeader = ptr_at(start, end, l4_off)?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    let tcp = unsafe { *tcp };
    // After the header reads on purpose: checked earlier, this comparison
    // lets the compiler drop the pointer check above (it implies it when
    // `frame_len` is `end - start`), which the verifier cannot follow.
    if ETH_HLEN + tot_len > frame_len {
        return Err(Skip::Truncated);
    }
    let doff = ((tcp.data_off >> 4) as usize) * 4;
    if doff < size_of::<TcpHeader>() || ihl + doff > tot_len {
        return Err(Skip::Malformed);
    }
    Ok(Tcp4 {
        l4_off,
        saddr: u32::from_ne_bytes(ip.saddr),
        daddr: u32::from_ne_bytes(ip.daddr),
        sport: u16::from_ne_bytes(tcp.sport),
        dport: u16::from_ne_bytes(tcp.dport),
        flags: tcp.flags,
        l4_len: (tot_len - ihl) as u16,
        tcp_hlen: doff as u16,
        check: u16::from_ne_bytes(tcp.check),
        seq: u32::from_ne_bytes(tcp.seq),
    })
}

/// The destination address and port of the first fragment of a TCP
/// datagram (offset 0, more to come), when the frame holds its ports: a
/// fragment of a connection to a VIP, which cannot be translated (the other
/// fragments carry no ports) and is dropped and counted rather than left to
/// be black-holed. `None` for anything else.
///
/// # Safety
/// As for [`parse_tcp4`].
#[inline(always)]
pub unsafe fn first_fragment_dest(start: usize, end: usize) -> Option<(u32, u16)> {
    let ip: *const Ipv4Header = ptr_at(start, end, ETH_HLEN).ok()?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    let ip = unsafe { *ip };
    let ihl = (ip.version_ihl & 0x0f) as usize * 4;
    let frag = u16::from_be_bytes(ip.frag);
    if ip.version_ihl >> 4 != 4
        || ihl < size_of::<Ipv4Header>()
        || ip.proto != IPPROTO_TCP
        || frag & 0x1fff != 0
        || frag & 0x2000 == 0
    {
        return None;
    }
    let ports: *const [u8; 4] = ptr_at(start, end, ETH_HLEN + ihl).ok()?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    let ports = unsafe { *ports };
    Some((
        u32::from_ne_bytes(ip.daddr),
        u16::from_ne_bytes([ports[2], ports[3]]),
    ))
}

/// An ICMP error about a TCP segment, as far as translating it needs: the
/// quoted segment's addresses and ports, and the checksums an edit must keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError4 {
    /// The outer destination (the quoted segment's sender).
    pub daddr: u32,
    /// Offsets from the start of the frame: the ICMP header, the quoted
    /// IPv4 header, the quoted TCP header.
    pub icmp_off: usize,
    pub inner_off: usize,
    pub inner_l4_off: usize,
    /// The quoted segment's source and destination.
    pub inner_saddr: u32,
    pub inner_daddr: u32,
    pub inner_sport: u16,
    pub inner_dport: u16,
    /// The ICMP checksum and the quoted IPv4 header's checksum.
    pub icmp_check: u16,
    pub inner_ip_check: u16,
    /// The quoted TCP checksum, when the quote reaches it (RFC 792 asks for
    /// only 8 bytes of the segment; Linux quotes up to 576 bytes in all).
    pub inner_tcp_check: Option<u16>,
}

/// Parses Ethernet / IPv4 / ICMP destination-unreachable or time-exceeded
/// quoting an IPv4 / TCP segment (at least its ports). Anything else is
/// `NotTcp` (not ours to translate), or `Malformed`/`Truncated`/`Fragment`
/// as for [`parse_tcp4`].
///
/// # Safety
/// As for [`parse_tcp4`].
#[inline(always)]
pub unsafe fn parse_icmp4_error(
    start: usize,
    end: usize,
    frame_len: usize,
) -> Result<IcmpError4, Skip> {
    let ethertype: *const [u8; 2] = ptr_at(start, end, 12)?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    if u16::from_ne_bytes(unsafe { *ethertype }) != ETH_P_IP_WIRE {
        return Err(Skip::NotIpv4);
    }
    let ip: *const Ipv4Header = ptr_at(start, end, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    let ip = unsafe { *ip };
    let ihl = (ip.version_ihl & 0x0f) as usize * 4;
    if ip.version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Header>() {
        return Err(Skip::Malformed);
    }
    if u16::from_be_bytes(ip.frag) & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }
    if ip.proto != IPPROTO_ICMP {
        return Err(Skip::NotTcp);
    }
    let icmp_off = ETH_HLEN + ihl;
    let icmp: *const [u8; ICMP_HLEN] = ptr_at(start, end, icmp_off)?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    let icmp = unsafe { *icmp };
    if icmp[0] != ICMP_DEST_UNREACH && icmp[0] != ICMP_TIME_EXCEEDED {
        return Err(Skip::NotTcp);
    }
    let inner_off = icmp_off + ICMP_HLEN;
    let inner: *const Ipv4Header = ptr_at(start, end, inner_off)?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    let inner = unsafe { *inner };
    let inner_ihl = (inner.version_ihl & 0x0f) as usize * 4;
    if inner.version_ihl >> 4 != 4 || inner_ihl < size_of::<Ipv4Header>() {
        return Err(Skip::Malformed);
    }
    // Only a first fragment (or a whole datagram) carries the ports.
    if inner.proto != IPPROTO_TCP || u16::from_be_bytes(inner.frag) & 0x1fff != 0 {
        return Err(Skip::NotTcp);
    }
    let inner_l4_off = inner_off + inner_ihl;
    let ports: *const [u8; 8] = ptr_at(start, end, inner_l4_off)?;
    // SAFETY: bounds checked by ptr_at, alignment 1.
    let ports = unsafe { *ports };
    // Read before the length checks below on purpose (see `parse_tcp4`):
    // after them the compiler could drop this pointer check, which the
    // verifier cannot follow from them.
    let check_off = inner_l4_off + TCP_CHECK_OFF;
    let tcp_check = match ptr_at::<[u8; 2]>(start, end, check_off) {
        // SAFETY: bounds checked by ptr_at, alignment 1.
        Ok(c) => Some(u16::from_ne_bytes(unsafe { *c })),
        Err(_) => None,
    };
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < ihl + ICMP_HLEN + inner_ihl + 8 {
        return Err(Skip::Malformed);
    }
    if ETH_HLEN + tot_len > frame_len {
        return Err(Skip::Truncated);
    }
    let inner_tcp_check = tcp_check.filter(|_| check_off + 2 <= ETH_HLEN + tot_len);
    Ok(IcmpError4 {
        daddr: u32::from_ne_bytes(ip.daddr),
        icmp_off,
        inner_off,
        inner_l4_off,
        inner_saddr: u32::from_ne_bytes(inner.saddr),
        inner_daddr: u32::from_ne_bytes(inner.daddr),
        inner_sport: u16::from_ne_bytes([ports[0], ports[1]]),
        inner_dport: u16::from_ne_bytes([ports[2], ports[3]]),
        icmp_check: u16::from_ne_bytes([icmp[2], icmp[3]]),
        inner_ip_check: u16::from_ne_bytes(inner.check),
        inner_tcp_check,
    })
}

/// An address as stored in maps: the four octets in wire order, read natively.
#[inline(always)]
pub const fn addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address a map value or parser field holds.
#[inline(always)]
pub const fn ipv4(addr: u32) -> Ipv4Addr {
    let o = addr.to_ne_bytes();
    Ipv4Addr::new(o[0], o[1], o[2], o[3])
}

/// A port as stored in maps (network byte order).
#[inline(always)]
pub const fn port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The host-order port of a map value or parser field.
#[inline(always)]
pub const fn host_port(port: u16) -> u16 {
    u16::from_be_bytes(port.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// A frame: Ethernet, IPv4 with `options` (a multiple of 4 bytes), TCP with `flags`.
    fn frame(options: &[u8], flags: u8, payload: &[u8]) -> Vec<u8> {
        let ihl = 20 + options.len();
        let tot = ihl + 20 + payload.len();
        let mut f = Vec::new();
        f.extend_from_slice(&[0xaa; 6]);
        f.extend_from_slice(&[0xbb; 6]);
        f.extend_from_slice(&[0x08, 0x00]);
        f.push(0x40 | (ihl / 4) as u8);
        f.push(0);
        f.extend_from_slice(&(tot as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0]); // id, DF
        f.extend_from_slice(&[64, 6, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1]);
        f.extend_from_slice(&[10, 0, 0, 100]);
        f.extend_from_slice(options);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&80u16.to_be_bytes());
        f.extend_from_slice(&[0; 8]);
        f.push(5 << 4);
        f.push(flags);
        f.extend_from_slice(&[0xff, 0xff, 0x12, 0x34, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn parse(f: &[u8]) -> Result<Tcp4, Skip> {
        let start = f.as_ptr() as usize;
        unsafe { parse_tcp4(start, start + f.len(), f.len()) }
    }

    #[test]
    fn parses_syn_without_options() {
        let p = parse(&frame(&[], TCP_SYN, &[])).unwrap();
        assert_eq!(p.l4_off, 34);
        assert_eq!(ipv4(p.saddr), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(ipv4(p.daddr), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(host_port(p.sport), 40000);
        assert_eq!(host_port(p.dport), 80);
        assert_eq!(p.l4_len, 20);
        assert_eq!(p.payload_len(), 0);
        assert_eq!(p.check, u16::from_ne_bytes([0x12, 0x34]));
        assert!(p.is_new_connection());
    }

    #[test]
    fn parses_ip_options_and_finds_tcp_after_them() {
        // Record-route style option padding: 40 bytes, the maximum.
        let opts = [1u8; 40];
        let p = parse(&frame(&opts, TCP_ACK, b"GET /")).unwrap();
        assert_eq!(p.l4_off, 14 + 60);
        assert_eq!(host_port(p.dport), 80);
        assert_eq!(p.l4_len, 25);
        assert_eq!(p.payload_len(), 5);
        assert_eq!(p.payload_off(), 14 + 60 + 20);
        assert!(!p.is_new_connection());
    }

    #[test]
    fn syn_ack_and_rst_are_not_new_connections() {
        assert!(
            !parse(&frame(&[], TCP_SYN | TCP_ACK, &[]))
                .unwrap()
                .is_new_connection()
        );
        let rst = parse(&frame(&[], TCP_SYN | TCP_RST, &[])).unwrap();
        assert!(!rst.is_new_connection());
        assert!(rst.is_rst());
    }

    #[test]
    fn every_truncation_is_skipped_not_misread() {
        for f in [
            frame(&[1u8; 8], TCP_SYN, &[]),
            frame(&[], TCP_ACK, b"GET / HTTP/1.1\r\n\r\n"),
        ] {
            for len in 0..f.len() {
                assert!(parse(&f[..len]).is_err(), "truncated to {len} bytes parsed");
            }
            assert!(parse(&f).is_ok());
        }
    }

    #[test]
    fn a_frame_longer_than_its_ip_packet_is_fine() {
        // Ethernet pads short frames to 60 bytes.
        let mut f = frame(&[], TCP_SYN, &[]);
        f.extend_from_slice(&[0; 6]);
        assert_eq!(parse(&f).unwrap().l4_len, 20);
    }

    #[test]
    fn linear_area_shorter_than_the_frame_still_parses() {
        // TC: the headers are linear, the payload may not be.
        let f = frame(&[], TCP_ACK, b"payload");
        let start = f.as_ptr() as usize;
        let p = unsafe { parse_tcp4(start, start + 54, f.len()) }.unwrap();
        assert_eq!(p.l4_len, 27);
        assert_eq!(
            unsafe { parse_tcp4(start, start + 54, 54) },
            Err(Skip::Truncated)
        );
    }

    #[test]
    fn tcp_data_offset_past_the_segment_is_malformed() {
        let mut f = frame(&[], TCP_SYN, &[]);
        f[34 + 12] = 6 << 4; // 24-byte header in a 20-byte segment
        assert_eq!(parse(&f), Err(Skip::Malformed));
    }

    #[test]
    fn non_tcp_non_ipv4_fragments_and_bad_headers_are_skipped() {
        let mut arp = frame(&[], TCP_SYN, &[]);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse(&arp), Err(Skip::NotIpv4));

        let mut vlan = frame(&[], TCP_SYN, &[]);
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(parse(&vlan), Err(Skip::NotIpv4));

        let mut udp = frame(&[], TCP_SYN, &[]);
        udp[14 + 9] = 17;
        assert_eq!(parse(&udp), Err(Skip::NotTcp));

        let mut more_fragments = frame(&[], TCP_SYN, &[]);
        more_fragments[14 + 6] = 0x20;
        assert_eq!(parse(&more_fragments), Err(Skip::Fragment));

        let mut later_fragment = frame(&[], TCP_SYN, &[]);
        later_fragment[14 + 7] = 0x10;
        assert_eq!(parse(&later_fragment), Err(Skip::Fragment));

        let mut short_ihl = frame(&[], TCP_SYN, &[]);
        short_ihl[14] = 0x44;
        assert_eq!(parse(&short_ihl), Err(Skip::Malformed));

        let mut v6 = frame(&[], TCP_SYN, &[]);
        v6[14] = 0x65;
        assert_eq!(parse(&v6), Err(Skip::Malformed));

        let mut short_total = frame(&[], TCP_SYN, &[]);
        short_total[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(parse(&short_total), Err(Skip::Malformed));

        let mut short_doff = frame(&[], TCP_SYN, &[]);
        short_doff[34 + 12] = 4 << 4;
        assert_eq!(parse(&short_doff), Err(Skip::Malformed));
    }

    #[test]
    fn a_first_tcp_fragment_names_its_destination() {
        let dest = |f: &[u8]| {
            let start = f.as_ptr() as usize;
            unsafe { first_fragment_dest(start, start + f.len()) }
        };
        let mut first = frame(&[], TCP_SYN, &[]);
        first[14 + 6] = 0x20; // more fragments, offset 0
        assert_eq!(
            dest(&first).map(|(a, p)| (ipv4(a), host_port(p))),
            Some((Ipv4Addr::new(10, 0, 0, 100), 80))
        );
        let mut later = first.clone();
        later[14 + 7] = 0x10; // offset 16 × 8
        assert_eq!(dest(&later), None);
        let whole = frame(&[], TCP_SYN, &[]);
        assert_eq!(dest(&whole), None);
        let mut udp = first.clone();
        udp[14 + 9] = IPPROTO_UDP;
        assert_eq!(dest(&udp), None);
        assert_eq!(dest(&first[..14 + 20 + 3]), None);
    }

    /// An ICMP error of `kind` from 10.9.0.1 to 10.0.0.100 quoting the
    /// first `quoted` bytes of the SYN-ACK 10.0.0.100:80 -> 10.0.0.1:40000.
    fn icmp_error(kind: u8, quoted: usize) -> Vec<u8> {
        let segment = frame(&[], TCP_SYN | TCP_ACK, &[]);
        let mut q = segment[14..].to_vec();
        q[12..16].copy_from_slice(&[10, 0, 0, 100]);
        q[16..20].copy_from_slice(&[10, 0, 0, 1]);
        q[20..24].copy_from_slice(&[0, 80, 0x9c, 0x40]);
        q.truncate(quoted);
        let tot = 20 + 8 + q.len();
        let mut f = Vec::new();
        f.extend_from_slice(&[0xaa; 6]);
        f.extend_from_slice(&[0xbb; 6]);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(tot as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
        f.extend_from_slice(&[10, 9, 0, 1, 10, 0, 0, 100]);
        f.extend_from_slice(&[kind, 4, 0x12, 0x34, 0, 0, 0x05, 0x00]);
        f.extend_from_slice(&q);
        f
    }

    fn parse_icmp(f: &[u8]) -> Result<IcmpError4, Skip> {
        let start = f.as_ptr() as usize;
        unsafe { parse_icmp4_error(start, start + f.len(), f.len()) }
    }

    #[test]
    fn an_icmp_error_quoting_a_tcp_segment_is_parsed() {
        let e = parse_icmp(&icmp_error(ICMP_DEST_UNREACH, 40)).unwrap();
        assert_eq!(ipv4(e.daddr), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!((e.icmp_off, e.inner_off, e.inner_l4_off), (34, 42, 62));
        assert_eq!(ipv4(e.inner_saddr), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(ipv4(e.inner_daddr), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            (host_port(e.inner_sport), host_port(e.inner_dport)),
            (80, 40000)
        );
        assert_eq!(e.icmp_check, u16::from_ne_bytes([0x12, 0x34]));
        assert_eq!(e.inner_tcp_check, Some(u16::from_ne_bytes([0x12, 0x34])));
        // RFC 792's minimum quote: the ports, no TCP checksum.
        let e = parse_icmp(&icmp_error(ICMP_TIME_EXCEEDED, 28)).unwrap();
        assert_eq!(e.inner_tcp_check, None);
        assert_eq!(
            parse_icmp(&icmp_error(ICMP_DEST_UNREACH, 27)),
            Err(Skip::Truncated)
        );
        // Echo requests and errors about UDP are not ours.
        assert_eq!(parse_icmp(&icmp_error(8, 40)), Err(Skip::NotTcp));
        let mut udp = icmp_error(ICMP_DEST_UNREACH, 40);
        udp[42 + 9] = IPPROTO_UDP;
        assert_eq!(parse_icmp(&udp), Err(Skip::NotTcp));
        // A TCP frame is not an ICMP error.
        assert_eq!(parse_icmp(&frame(&[], TCP_SYN, &[])), Err(Skip::NotTcp));
    }

    #[test]
    fn address_and_port_conversions_round_trip() {
        let ip = Ipv4Addr::new(192, 168, 7, 9);
        assert_eq!(ipv4(addr(ip)), ip);
        assert_eq!(addr(ip).to_ne_bytes(), [192, 168, 7, 9]);
        assert_eq!(host_port(port(8080)), 8080);
        assert_eq!(port(8080).to_ne_bytes(), 8080u16.to_be_bytes());
    }
}
