//! The kanari agent as a library: the binary (`main.rs`) is a thin CLI over
//! it, and the end-to-end tests use it to load the same eBPF object.
//!
//! - [`daemon`]: `kanari run` — the loop that owns the state and its inputs;
//! - [`config`], [`plan`], [`rollout`], [`analysis`], [`telemetry`]: the pure
//!   parts it asks (what the file says, what to write, what to decide);
//! - [`datapath`], [`pins`]: the kernel seen from userspace;
//! - [`snapshot`], [`metrics`], [`status`], [`api`]: what it shows, and how
//!   operators reach it ([`verb`]).

pub mod analysis;
pub mod api;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod discovery;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod fleet;
pub mod hooks;
pub mod metrics;
pub mod notify;
pub mod pins;
pub mod plan;
pub mod record;
pub mod replay;
pub mod rollout;
pub mod sequential;
pub mod snapshot;
pub mod status;
pub mod telemetry;
pub mod verb;
