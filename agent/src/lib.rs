//! The kanari agent as a library: the binary (`main.rs`) is a thin CLI over it,
//! and the end-to-end tests use it to load the same eBPF object.

pub mod analysis;
pub mod api;
pub mod config;
pub mod datapath;
pub mod engine;
pub mod metrics;
pub mod notify;
pub mod pins;
pub mod plan;
pub mod rollout;
pub mod stats;
pub mod status;
pub mod telemetry;
pub mod view;
