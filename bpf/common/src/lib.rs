//! What the kernel programs and the agent must agree on, and the pure logic
//! both sides run: map keys and values (`maps`), packet parsing (`wire`),
//! checksum arithmetic (`csum`), hashing (`hash`), the choice of group
//! (`select`) and of a backend in it (`maglev`), latency buckets (`hist`) and
//! the HTTP status line (`http`).
//!
//! The crate is `no_std` so the eBPF programs compile it for `bpfel-unknown-none`,
//! and every function here is also unit-tested on the host. Functions the eBPF
//! programs call are `#[inline(always)]`: the verifier must see the bounds checks
//! next to the packet accesses they protect.
//!
//! Byte order: every address and port stored in a map, and every value the
//! parser returns, is in **network byte order** — the `u32`/`u16` read straight
//! from the packet's bytes with `from_ne_bytes`. Use [`wire::addr`] and
//! [`wire::port`] to convert from host values.
#![no_std]

pub mod csum;
pub mod hash;
pub mod hist;
pub mod http;
pub mod maglev;
pub mod maps;
pub mod select;
pub mod wire;
