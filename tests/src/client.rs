//! An HTTP client that picks its source address, so one namespace can stand
//! for thousands of clients (the client namespace routes a whole /16 to its
//! loopback). Every operation has a deadline: a test fails, it never hangs.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpSocket, time::timeout};

/// How long any one step (connect, request, read) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a test backend answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// The backend's version label.
    pub version: String,
    /// The backend that answered.
    pub backend: SocketAddrV4,
    /// The client's end of the connection.
    pub local: SocketAddrV4,
}

fn parse_reply(status: u16, body: &[u8], local: SocketAddrV4) -> Result<Reply> {
    let text = std::str::from_utf8(body).context("a non-UTF-8 answer")?;
    let (version, backend) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| anyhow!("not a test backend answer: {text:?}"))?;
    Ok(Reply {
        status,
        version: version.to_string(),
        backend: backend.parse().context("the backend address")?,
        local,
    })
}

/// An open keep-alive connection.
pub struct Conn {
    sender: http1::SendRequest<Empty<Bytes>>,
    pub local: SocketAddrV4,
    /// The server's end as getpeername(2) reports it: the address dialled,
    /// unless something below the socket rewrote it.
    pub peer: SocketAddrV4,
    driver: tokio::task::JoinHandle<()>,
}

impl Conn {
    /// Connects from `src` (port chosen by the kernel) to `dst`.
    pub async fn open(src: Ipv4Addr, dst: SocketAddrV4) -> Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        // The port is chosen at connect(), unique per destination, as for
        // a socket never bound: bind() alone would pick one unique on the
        // host, and with tens of thousands of closed connections waiting in
        // TIME_WAIT its search slows to a crawl (the socketlb bench).
        let one: libc::c_int = 1;
        // SAFETY: a valid socket, an int option of the size given.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            bail!(
                "setting IP_BIND_ADDRESS_NO_PORT: {}",
                std::io::Error::last_os_error()
            );
        }
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
            .with_context(|| format!("binding {src}"))?;
        let stream = timeout(STEP_TIMEOUT, socket.connect(SocketAddr::V4(dst)))
            .await
            .with_context(|| format!("connecting {src} -> {dst} timed out"))?
            .with_context(|| format!("connecting {src} -> {dst}"))?;
        let local = match stream.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => bail!("unexpected IPv6 local address {a}"),
        };
        let peer = match stream.peer_addr().context("getpeername")? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => bail!("unexpected IPv6 peer address {a}"),
        };
        let (sender, conn) = timeout(STEP_TIMEOUT, http1::handshake(TokioIo::new(stream)))
            .await
            .context("HTTP handshake timed out")??;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            local,
            peer,
            driver,
        })
    }

    /// Sends `GET /` and reads the whole answer.
    pub async fn get(&mut self) -> Result<Reply> {
        let local = self.local;
        timeout(STEP_TIMEOUT, async {
            self.sender.ready().await.context("connection not ready")?;
            let req = Request::get("/")
                .header("host", "kanari-test")
                .body(Empty::new())?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .context("sending the request")?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .context("reading the answer")?
                .to_bytes();
            parse_reply(status, &body, local)
        })
        .await
        .with_context(|| format!("request from {local} timed out"))?
        .with_context(|| format!("request from {local}"))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One connection, one request, closed.
pub async fn get_once(src: Ipv4Addr, dst: SocketAddrV4) -> Result<Reply> {
    let mut c = Conn::open(src, dst).await?;
    c.get().await
}

/// Runs `f` on every input with at most `concurrency` in flight; results in
/// input order. After the first failure no new job starts (they fail as
/// skipped), so a broken data path fails a test in seconds, not minutes.
pub async fn run_bounded<T, F, Fut>(inputs: Vec<T>, concurrency: usize, f: F) -> Vec<Result<Reply>>
where
    T: 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<Reply>> + 'static,
{
    run_jobs(inputs, concurrency, true, f).await
}

/// Like [`run_bounded`], but every job runs whatever the others' outcome
/// (for tests whose requests are meant to fail).
pub async fn run_all<T, F, Fut>(inputs: Vec<T>, concurrency: usize, f: F) -> Vec<Result<Reply>>
where
    T: 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<Reply>> + 'static,
{
    run_jobs(inputs, concurrency, false, f).await
}

async fn run_jobs<T, F, Fut>(
    inputs: Vec<T>,
    concurrency: usize,
    stop_on_error: bool,
    f: F,
) -> Vec<Result<Reply>>
where
    T: 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<Reply>> + 'static,
{
    let sem = std::rc::Rc::new(tokio::sync::Semaphore::new(concurrency));
    let failed = std::rc::Rc::new(std::cell::Cell::new(false));
    let local = tokio::task::LocalSet::new();
    let mut handles = Vec::new();
    for input in inputs {
        let fut = f(input);
        let (sem, failed) = (sem.clone(), failed.clone());
        handles.push(local.spawn_local(async move {
            let _permit = sem.acquire().await.expect("semaphore open");
            if failed.get() {
                return Err(anyhow!("skipped after an earlier failure"));
            }
            let r = fut.await;
            if r.is_err() && stop_on_error {
                failed.set(true);
            }
            r
        }));
    }
    local
        .run_until(async move {
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await.unwrap_or_else(|e| Err(anyhow!("task failed: {e}"))));
            }
            out
        })
        .await
}

/// A current-thread runtime for a client thread.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// `GET path` from this thread's namespace; the status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    timeout(STEP_TIMEOUT, async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting {addr}"))?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .with_context(|| format!("GET {addr}{path} timed out"))?
}
