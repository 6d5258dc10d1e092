//! `cargo xtask bench`: kanari measured beside what users would run instead,
//! in one run, on this machine. Each suite is a module; each returns a
//! [`SuiteReport`] (a markdown section, every figure as JSON, charts, and the
//! issue's targets with what was measured). `kanari-bench` runs the suites
//! and writes `bench/results/latest.{md,json}` and one SVG per chart.
//!
//! Everything runs in network namespaces the suites create and remove
//! (the harness's Drop guards), bounded in time; `--quick` keeps the whole
//! run under three minutes with fewer rounds and shorter runs.

pub mod chart;
pub mod datapath;
pub mod footprint;
pub mod judge;
pub mod openloop;
pub mod perpacket;
pub mod report;
pub mod rollback;
pub mod scale;
pub mod socketlb;
pub mod tools;

use std::path::PathBuf;

pub use report::{Chart, SuiteReport, Target};

/// What every suite gets.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Fewer rounds, shorter runs: the whole run under three minutes.
    pub quick: bool,
    /// Seed for every random choice (client addresses, frames).
    pub seed: u64,
    /// The `kanari` binary measured (a release build under `cargo xtask bench`).
    pub kanari: PathBuf,
}

impl Ctx {
    /// `full` normally, `quick` under `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}
