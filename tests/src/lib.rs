//! kanari's end-to-end harness: network namespaces with Drop guards, the HTTP
//! test backend, a client that can be thousands of clients, the agent as a
//! child process, the network that joins them, a real etcd cluster beside
//! a fleet, and cgroups with a client inside for socket-level load
//! balancing. Used by the tests in `tests/tests/`, the demo
//! (`kanari-demo`) and the benchmarks.

pub mod agent;
pub mod backend;
pub mod bench;
pub mod cgroup;
pub mod client;
pub mod control;
pub mod etcd;
pub mod fleet;
pub mod flood;
pub mod frames;
pub mod kubeapi;
pub mod load;
pub mod netns;
pub mod prometheus;
pub mod python;
pub mod rng;
pub mod socket_client;
pub mod topology;
