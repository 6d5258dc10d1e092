//! The Python tools `cargo xtask test` installs in a virtual environment
//! (yamllint, kubectl, scipy, ...): where the tests find them.

use std::path::{Path, PathBuf};

/// A program from the Python tools (`$KANARI_PYTHON_TOOLS`, else the
/// bootstrap's `~/.local/share/kanari/python-tools/bin`); panics, never
/// skips, when it is missing.
pub fn python_tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("KANARI_PYTHON_TOOLS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| Path::new(&h).join(".local/share/kanari/python-tools/bin"))
        })
        .expect("KANARI_PYTHON_TOOLS or HOME");
    let tool = dir.join(name);
    assert!(
        tool.is_file(),
        "{} is missing: run the tests with `cargo xtask test`, which installs it (PyPI), \
         or set KANARI_PYTHON_TOOLS to a directory with it",
        tool.display()
    );
    tool
}
