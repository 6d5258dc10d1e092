//! The kanari agent as a library: the binary (`main.rs`) is a thin CLI over it,
//! and the end-to-end tests use it to load the same eBPF object.

pub mod config;
pub mod datapath;
pub mod pins;
pub mod plan;
