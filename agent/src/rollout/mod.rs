//! Rollouts: the pure state machine of one service's canary ([`machine`]),
//! the engine that runs one per service ([`engine`]), and the store that
//! keeps them across restarts ([`store`]).

pub mod engine;
pub mod machine;
pub mod store;

pub use engine::{Counts, Decision, Engine, Notice};
pub use machine::{Action, Event, Phase, Refused, Retired, RollbackCause, State, step};
pub use store::Store;
