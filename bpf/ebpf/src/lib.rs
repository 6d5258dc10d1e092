//! Exists so `kanari` can depend on this crate in `build-dependencies`; the
//! eBPF programs are in `main.rs`, built for `bpfel-unknown-none` by `agent/build.rs`.
#![no_std]
