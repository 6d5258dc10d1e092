//! Faults injected on purpose, for the tests that show the agent recovers
//! from them. Compiled only with the `fault-injection` feature, which the
//! test build enables and a release build (`cargo install`, the image)
//! does not.
//!
//! `KANARI_FAULTS=FILE`: while FILE exists and names a fault on a line of
//! its own, that fault happens. Faults:
//! - `map-writes`: every write to the data path's maps fails.

use anyhow::{Result, bail};

/// Whether `fault` is switched on now.
fn on(fault: &str) -> bool {
    std::env::var_os("KANARI_FAULTS")
        .and_then(|path| std::fs::read_to_string(path).ok())
        .is_some_and(|text| text.lines().any(|l| l.trim() == fault))
}

/// Fails when `map-writes` is switched on.
pub fn map_write() -> Result<()> {
    if on("map-writes") {
        bail!("injected fault: map writes fail (KANARI_FAULTS names map-writes)");
    }
    Ok(())
}
