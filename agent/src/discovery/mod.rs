//! Services from Kubernetes: CanaryReleases, Services and EndpointSlices
//! watched, each release turned into a service of the file's shape and
//! handed to the loop, which validates it beside the file's services.
//!
//! [`releases`] is the pure mapping; [`watch`] the watchers around it.

pub mod releases;
pub mod watch;
