//! A real etcd cluster (the system's `etcd` 3.4, 1 or 3 members) for a
//! [`Fleet`]: each member in a network namespace of its own, all joined to
//! the fleet's nodes by a control network apart from the fabric, so a node
//! can be cut off etcd while it still reaches its backends and clients.
//!
//! ```text
//!  etcd member M ns              ctl ns (router)              node K ns (the fleet's)
//!  e0 10.4.M.1:2379/2380 ─── mM 10.4.M.254     nK 10.5.K.254 ─── ctl 10.5.K.1
//!  default via 10.4.M.254                                         10.4.0.0/16 via 10.5.K.254
//! ```
//!
//! None of it meets the fleet's addresses (10.0.0.100, 10.1/16, 10.2/16,
//! 10.3.0.0/24, 172.16/16, 192.168.0/24) or interface names (`n0`, `fK`).
//! Dropping an [`Etcd`] kills every member by its own PID, removes their
//! data and deletes the namespaces (the veths to the nodes with them).

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    fleet::Fleet,
    netns::{Netns, run, unique_tag},
    topology::{ethtool_tx, veth},
};

/// How long the members may take to answer `endpoint health` after a start.
pub const ETCD_DEADLINE: Duration = Duration::from_secs(20);
/// Raft timing, in ms. etcd's defaults: a 100 ms heartbeat and a 1 s
/// election timeout elect a 3-member cluster within 1 to 2 s (a new
/// cluster's first election is advanced, `--initial-election-tick-advance`)
/// and leave a 10× margin for a heartbeat late on a loaded 2-core machine;
/// shorter ones made elections flap there for nothing the tests learn.
pub const HEARTBEAT_MS: u32 = 100;
pub const ELECTION_MS: u32 = 1000;
/// The client port on each member's address.
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// Member `m`'s address.
pub fn member_addr(m: usize) -> String {
    format!("10.4.{m}.1")
}

/// Node `k`'s address on the control network.
pub fn node_ctl_addr(k: usize) -> String {
    format!("10.5.{k}.1")
}

/// The interface on each fleet node that joins it to the control network.
pub const NODE_CTL_IFACE: &str = "ctl";

/// `etcdctl --endpoints=ENDPOINTS ARGS...` (API v3) run inside `ns`; its
/// stdout, or an error with its stderr when it fails. Timeouts are
/// etcdctl's (dial 2 s, command 5 s) unless `args` set them, e.g.
/// `--command-timeout=1s`.
pub fn etcdctl(ns: &Netns, endpoints: &[String], args: &[&str]) -> Result<String> {
    let out = run(ns
        .command("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(args)
        .stdin(Stdio::null()))?;
    String::from_utf8(out.stdout).context("etcdctl's output is not UTF-8")
}

struct Member {
    ns: Netns,
    child: Option<Child>,
    data_dir: PathBuf,
    log: PathBuf,
}

/// The PEM files of a cluster served over TLS with client certificates
/// ([`Etcd::start_tls`]): a CA of the test's own, the members' certificate
/// (for every member's address) and a client's.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    /// Makes the files in `dir` with openssl: EC P-256 keys, a day's validity.
    fn make(dir: &Path, members: usize) -> Result<Tls> {
        std::fs::create_dir_all(dir)?;
        let f = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| -> Result<()> {
            run(Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .stdin(Stdio::null()))
            .map(drop)
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca-key.pem",
                    "-out",
                    "ca.pem",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=kanari-test-ca",
                ],
            ]
            .concat(),
        )?;
        let ips = (0..members)
            .map(|m| format!("IP:{}", member_addr(m)))
            .collect::<Vec<_>>()
            .join(",");
        for (name, ext) in [
            (
                "server",
                format!("subjectAltName={ips}\nextendedKeyUsage=serverAuth\n"),
            ),
            ("client", "extendedKeyUsage=clientAuth\n".to_string()),
        ] {
            std::fs::write(f(&format!("{name}.ext")), ext)?;
            let key = format!("{name}-key.pem");
            let csr = format!("{name}.csr");
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-keyout",
                        &key,
                        "-out",
                        &csr,
                        "-subj",
                        &format!("/CN=kanari-test-{name}"),
                    ],
                ]
                .concat(),
            )?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ])?;
        }
        Ok(Tls {
            ca: f("ca.pem"),
            server_cert: f("server.pem"),
            server_key: f("server-key.pem"),
            client_cert: f("client.pem"),
            client_key: f("client-key.pem"),
        })
    }

    /// etcdctl's flags to reach the cluster as the client.
    fn etcdctl_flags(&self) -> Vec<String> {
        vec![
            format!("--cacert={}", self.ca.display()),
            format!("--cert={}", self.client_cert.display()),
            format!("--key={}", self.client_key.display()),
        ]
    }
}

pub struct Etcd {
    tag: String,
    /// With [`Etcd::start_tls`]: clients speak TLS and show a certificate.
    pub tls: Option<Tls>,
    /// Where every member's data dir and log live; removed on drop.
    dir: PathBuf,
    // Field order is drop order (after `Drop::drop` killed the members):
    // the members' namespaces, then the router.
    members: Vec<Member>,
    /// The router of the control network; `etcdctl` runs from here.
    pub ctl: Netns,
}

impl Etcd {
    /// Starts `members` members (1 or 3) joined to every node of `fleet` and
    /// returns when each answers `etcdctl endpoint health` (within
    /// [`ETCD_DEADLINE`]; else fails with the members' log tails).
    pub fn start(fleet: &Fleet, members: usize) -> Result<Etcd> {
        Self::start_with(fleet, members, false)
    }

    /// [`Etcd::start`] serving clients over TLS only and asking each for a
    /// certificate of the test's CA ([`Etcd::tls`]).
    pub fn start_tls(fleet: &Fleet, members: usize) -> Result<Etcd> {
        Self::start_with(fleet, members, true)
    }

    fn start_with(fleet: &Fleet, members: usize, tls: bool) -> Result<Etcd> {
        if !(members == 1 || members == 3) {
            bail!("an etcd cluster of 1 or 3 members, not {members}");
        }
        let tag = unique_tag();
        let dir = data_root().join(format!("kanari-etcd-{tag}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ctl = Netns::new(&tag, "ctl")?;
        // From here on, a failure drops `etcd`: processes, data and namespaces go.
        let mut etcd = Etcd {
            tag: tag.clone(),
            tls: None,
            dir,
            members: Vec::new(),
            ctl,
        };
        if tls {
            etcd.tls = Some(Tls::make(&etcd.dir.join("tls"), members)?);
        }
        etcd.ctl.sysctl("net.ipv4.ip_forward", "1")?;
        for m in 0..members {
            let ns = Netns::new(&tag, &format!("e{m}"))?;
            let link = format!("m{m}");
            veth((&ns, "e0"), (&etcd.ctl, &link))?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", member_addr(m)),
                "dev",
                "e0",
            ])?;
            ns.ip(&["link", "set", "e0", "up"])?;
            ns.ip(&["route", "add", "default", "via", &format!("10.4.{m}.254")])?;
            ethtool_tx(&ns, "e0", false)?;
            let c = &etcd.ctl;
            c.ip(&["addr", "add", &format!("10.4.{m}.254/24"), "dev", &link])?;
            c.ip(&["link", "set", &link, "up"])?;
            ethtool_tx(c, &link, false)?;
            let data_dir = etcd.dir.join(format!("m{m}"));
            let log = etcd.dir.join(format!("m{m}.log"));
            etcd.members.push(Member {
                ns,
                child: None,
                data_dir,
                log,
            });
        }
        for (k, n) in fleet.nodes.iter().enumerate() {
            let node = &n.node;
            let link = format!("n{k}");
            veth((node, NODE_CTL_IFACE), (&etcd.ctl, &link))?;
            let addr = format!("{}/24", node_ctl_addr(k));
            node.ip(&["addr", "add", &addr, "dev", NODE_CTL_IFACE])?;
            ethtool_tx(node, NODE_CTL_IFACE, false)?;
            let c = &etcd.ctl;
            c.ip(&["addr", "add", &format!("10.5.{k}.254/24"), "dev", &link])?;
            c.ip(&["link", "set", &link, "up"])?;
            ethtool_tx(c, &link, false)?;
            etcd.cut_node(fleet, k, false)?;
        }
        // Every member at once: a new 3-member cluster elects once a quorum is up.
        for m in 0..members {
            etcd.restart_member(m)?;
        }
        etcd.wait_healthy(ETCD_DEADLINE)?;
        Ok(etcd)
    }

    /// The number of members.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Member `m`'s client URL, e.g. `http://10.4.0.1:2379`.
    pub fn endpoint(&self, m: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{CLIENT_PORT}", member_addr(m))
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|m| self.endpoint(m)).collect()
    }

    /// `etcdctl --endpoints=<every member> ARGS...` from the ctl namespace
    /// (which reaches every member unless [`Etcd::cut_member`] cut it); stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        self.etcdctl_to(&self.ctl, &self.endpoints(), args)
    }

    /// etcdctl from `ns` to `endpoints`, with the client's TLS files when
    /// the cluster asks for them.
    fn etcdctl_to(&self, ns: &Netns, endpoints: &[String], args: &[&str]) -> Result<String> {
        let flags = self
            .tls
            .as_ref()
            .map(Tls::etcdctl_flags)
            .unwrap_or_default();
        let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        etcdctl(ns, endpoints, &all)
    }

    /// `etcdctl --endpoints=<every member> ARGS...` from `ns`, e.g. a fleet node's.
    pub fn etcdctl_in(&self, ns: &Netns, args: &[&str]) -> Result<String> {
        self.etcdctl_to(ns, &self.endpoints(), args)
    }

    /// Cuts node `k` off etcd (its `ctl` link down, in the node namespace:
    /// it keeps its clients, the fabric and its backends) or joins it again
    /// (the link up and its route to 10.4.0.0/16, which went with the link).
    pub fn cut_node(&self, fleet: &Fleet, k: usize, cut: bool) -> Result<()> {
        let node = &fleet
            .nodes
            .get(k)
            .with_context(|| format!("no node {k} in the fleet"))?
            .node;
        if cut {
            node.ip(&["link", "set", NODE_CTL_IFACE, "down"])
        } else {
            node.ip(&["link", "set", NODE_CTL_IFACE, "up"])?;
            let hop = format!("10.5.{k}.254");
            node.ip(&["route", "replace", "10.4.0.0/16", "via", &hop])
        }
    }

    /// Takes member `m`'s link down (it still runs, but reaches neither its
    /// peers nor its clients: two of three cut lose the quorum) or up again.
    pub fn cut_member(&self, m: usize, cut: bool) -> Result<()> {
        let ns = &self.member(m)?.ns;
        if cut {
            ns.ip(&["link", "set", "e0", "down"])
        } else {
            ns.ip(&["link", "set", "e0", "up"])?;
            let hop = format!("10.4.{m}.254");
            ns.ip(&["route", "replace", "default", "via", &hop])
        }
    }

    /// SIGKILLs member `m` (by its PID) and waits for it; its data stays.
    pub fn kill_member(&mut self, m: usize) -> Result<()> {
        let member = self.member_mut(m)?;
        let mut child = member
            .child
            .take()
            .with_context(|| format!("member {m} is not running"))?;
        child.kill().context("killing etcd")?;
        child.wait().context("waiting for etcd")?;
        Ok(())
    }

    /// (Re)starts member `m` on its data dir, without waiting: with a data
    /// dir already there, etcd rejoins as the member it was (the
    /// `--initial-cluster*` flags only bootstrap). [`Etcd::wait_healthy`] waits.
    pub fn restart_member(&mut self, m: usize) -> Result<()> {
        let members = self.members.len();
        let token = self.tag.clone();
        let client = self.endpoint(m);
        let tls = self.tls.clone();
        let member = self.member_mut(m)?;
        if member.child.is_some() {
            bail!("member {m} is running");
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&member.log)
            .with_context(|| format!("opening {}", member.log.display()))?;
        let cluster = (0..members)
            .map(|i| format!("m{i}=http://{}:{PEER_PORT}", member_addr(i)))
            .collect::<Vec<_>>()
            .join(",");
        let peer = format!("http://{}:{PEER_PORT}", member_addr(m));
        let mut cmd = member.ns.command("etcd");
        cmd.arg(format!("--name=m{m}"))
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={cluster}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={token}"))
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_MS}"))
            // A member cut off and back does not force an election (3.5's default).
            .arg("--pre-vote")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .args(tls.iter().flat_map(|t| {
                [
                    format!("--cert-file={}", t.server_cert.display()),
                    format!("--key-file={}", t.server_key.display()),
                    format!("--trusted-ca-file={}", t.ca.display()),
                    "--client-cert-auth".to_string(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        member.child = Some(spawn(&mut cmd)?);
        Ok(())
    }

    /// Waits until every member answers `etcdctl endpoint health` (a
    /// committed read: the cluster has a leader and a quorum); fails early
    /// when a member exits, and after `deadline` with the members' log tails.
    pub fn wait_healthy(&mut self, deadline: Duration) -> Result<()> {
        let start = Instant::now();
        let mut pending: Vec<usize> = (0..self.members.len()).collect();
        loop {
            for (m, member) in self.members.iter_mut().enumerate() {
                let Some(child) = member.child.as_mut() else {
                    bail!("member {m} is not running");
                };
                if let Some(status) = child.try_wait()? {
                    member.child = None;
                    bail!(
                        "etcd member {m} exited ({status}); its log:\n{}",
                        tail(&member.log, 30)
                    );
                }
            }
            let mut why = String::new();
            pending.retain(|&m| {
                let health = self.etcdctl_to(
                    &self.ctl,
                    &[self.endpoint(m)],
                    &[
                        "--dial-timeout=1s",
                        "--command-timeout=1s",
                        "endpoint",
                        "health",
                    ],
                );
                match health {
                    Ok(_) => false,
                    Err(e) => {
                        why = format!("member {m}: {e:#}");
                        true
                    }
                }
            });
            if pending.is_empty() {
                return Ok(());
            }
            if start.elapsed() > deadline {
                let logs = pending
                    .iter()
                    .map(|&m| format!("member {m}'s log:\n{}", tail(&self.members[m].log, 30)))
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!("etcd not healthy within {deadline:?} ({why});\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Member `m`'s namespace.
    pub fn member_ns(&self, m: usize) -> Result<&Netns> {
        Ok(&self.member(m)?.ns)
    }

    /// Member `m`'s log (etcd's stderr), e.g. for a failing test's message.
    pub fn member_log(&self, m: usize, lines: usize) -> Result<String> {
        Ok(tail(&self.member(m)?.log, lines))
    }

    fn member(&self, m: usize) -> Result<&Member> {
        self.members
            .get(m)
            .with_context(|| format!("no etcd member {m}"))
    }

    fn member_mut(&mut self, m: usize) -> Result<&mut Member> {
        self.members
            .get_mut(m)
            .with_context(|| format!("no etcd member {m}"))
    }
}

/// Where the data dirs go: tmpfs (`/dev/shm`) when there is one, so etcd's
/// fsyncs cost nothing and a busy disk cannot stall a heartbeat; else the
/// temp dir.
fn data_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.spawn().with_context(|| format!("starting {cmd:?}"))
}

/// The last `lines` lines of the file at `path`.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(reading {}: {e})", path.display()),
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                // SIGKILL to this member's own PID (`ip netns exec` execs etcd).
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: removing {}: {e}", self.dir.display());
        }
    }
}
