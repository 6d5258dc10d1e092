//! Builds the eBPF programs (`bpf/ebpf`) with aya-build and leaves the object
//! at `$OUT_DIR/kanari` for `include_bytes_aligned!`.
//!
//! With `AYA_BUILD_SKIP=1` (lint without bpf-linker) an empty object is written
//! instead; such a binary refuses to load and says why.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The commit the binary is built from, for `kanari_build_info`.
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-env=KANARI_GIT_COMMIT={}", git_commit());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(out_dir.join("kanari"), []).context("writing the empty eBPF object")?;
        return Ok(());
    }
    let root = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    )
    .join("../bpf/ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    println!("cargo:rerun-if-changed={root}/../common/src");
    aya_build::build_ebpf([Package { name: "kanari-ebpf", root_dir: root, ..Default::default() }], Toolchain::default())
        .context("building the eBPF programs failed; `cargo xtask bootstrap` installs what they need (nightly rust-src, bpf-linker)")
}
