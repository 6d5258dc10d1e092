//! Builds the eBPF programs (`bpf/ebpf`) for `bpfel-unknown-none` with the
//! nightly toolchain and leaves the object at `$OUT_DIR/kanari` for
//! `include_bytes_aligned!`.
//!
//! The nested build's output is shown only when it fails: a successful
//! build prints nothing. (aya-build, which this replaces, relays every line
//! of it as a `warning:` — about 40 of them — that a newcomer reads as
//! trouble.) The command is aya-build's: `cargo build --release --target
//! bpfel-unknown-none -Z build-std=core`, with BTF and debug info, in a
//! target directory of its own under `$OUT_DIR`.
//!
//! With `AYA_BUILD_SKIP=1` (lint without bpf-linker) an empty object is written
//! instead; such a binary refuses to load and says why.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

/// The toolchain channel that builds the eBPF crate; never a dated one.
const NIGHTLY: &str = "nightly";

/// The commit the binary is built from, for `kanari_build_info`.
fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn var(name: &str) -> anyhow::Result<String> {
    env::var(name).map_err(|_| anyhow!("{name} not set"))
}

/// Builds the eBPF crate at `root` into `out_dir/kanari`.
fn build_ebpf(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let target = match var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported endianness {other}"),
    };
    // The architecture the programs' helpers are for (aya-ebpf's bpf_target_arch).
    let arch = var("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64".to_string()
    } else {
        arch
    };
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", NIGHTLY, "cargo", "build", "--package", "kanari-ebpf"])
        .args(["--bins", "--release", "--target", target])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(root)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // Set by the stable cargo running us; left in place they would make
        // the nested cargo use the stable compiler.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN");
    let out = cmd
        .output()
        .with_context(|| format!("starting {cmd:?} (is rustup installed?)"))?;
    if !out.status.success() {
        // Shown by cargo under the failed build script's output.
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!(
            "building the eBPF programs failed ({}): the nested build's output is above",
            out.status
        );
    }
    let object = target_dir.join(target).join("release").join("kanari");
    fs::copy(&object, out_dir.join("kanari"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-env=KANARI_GIT_COMMIT={}", git_commit());
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(var("OUT_DIR")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(out_dir.join("kanari"), []).context("writing the empty eBPF object")?;
        return Ok(());
    }
    let root = PathBuf::from(var("CARGO_MANIFEST_DIR")?).join("../bpf/ebpf");
    // The build-dependency on kanari-ebpf reruns this when its library or
    // dependencies change; these cover its programs and the shared crate.
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-changed={}/../common/src", root.display());
    build_ebpf(&root, &out_dir).context(
        "building the eBPF programs failed; `cargo xtask bootstrap` installs what they need (nightly rust-src, bpf-linker)",
    )
}
