//! The kanari agent as a library: the binary (`main.rs`) is a thin CLI over it,
//! and the end-to-end tests use it to load the same eBPF object.

pub mod api;
pub mod config;
pub mod datapath;
pub mod metrics;
pub mod pins;
pub mod plan;
pub mod status;
pub mod telemetry;
pub mod view;
