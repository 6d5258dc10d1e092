//! One decision per service across the nodes: who decides (a Lease), and
//! what the decider writes for everyone to see (the CanaryRelease's status
//! and Events).
//!
//! [`lease`] and [`status`] are pure; [`kubernetes`] reads and writes them.

pub mod kubernetes;
pub mod lease;
pub mod merge;
pub mod peers;
pub mod status;
