//! A bare HTTP/1.1 client for the kubeapi tests: one request per connection,
//! and watches read chunk by chunk, so the tests see exactly what the server
//! writes (status codes, headers, one JSON event per line).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Response {
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    extra: &str,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect to the API server");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("a status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            return (status, headers);
        }
        let (k, v) = l.split_once(':').expect("a header");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
}

/// One request with a JSON (or patch) body; the answer read whole.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> Response {
    let bytes = body
        .map(|b| serde_json::to_vec(b).unwrap())
        .unwrap_or_default();
    let mut r = BufReader::new(send(addr, method, path, content_type, &bytes, ""));
    let (status, headers) = read_head(&mut r);
    let mut raw = Vec::new();
    r.read_to_end(&mut raw).unwrap();
    let body = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into()));
    Response {
        status,
        headers,
        body,
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, "application/json", None)
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, "application/json", Some(body))
}

pub fn put(addr: SocketAddr, path: &str, body: &Value) -> Response {
    request(addr, "PUT", path, "application/json", Some(body))
}

pub fn patch(addr: SocketAddr, path: &str, ty: &str, body: &Value) -> Response {
    request(addr, "PATCH", path, ty, Some(body))
}

/// An open watch: its events, one at a time.
pub struct Watch {
    reader: BufReader<TcpStream>,
    data: Vec<u8>,
    pub status: u16,
    ended: bool,
}

impl Watch {
    pub fn open(addr: SocketAddr, path: &str) -> Watch {
        let mut reader = BufReader::new(send(addr, "GET", path, "application/json", b"", ""));
        let (status, headers) = read_head(&mut reader);
        let chunked = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
        let mut w = Watch {
            reader,
            data: Vec::new(),
            status,
            ended: false,
        };
        if !chunked {
            w.reader.read_to_end(&mut w.data).unwrap();
            w.ended = true;
        }
        w
    }

    /// The next event, or None once the stream ended or `within` passed.
    pub fn next(&mut self, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.data.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.data.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).expect("each line is one JSON event"));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if self.ended {
                return None;
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut size = String::new();
            match self.reader.read_line(&mut size) {
                Ok(0) => self.ended = true,
                Ok(_) => {
                    let n = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
                    if n == 0 {
                        self.ended = true;
                        continue;
                    }
                    let mut chunk = vec![0; n + 2];
                    self.reader.read_exact(&mut chunk).unwrap();
                    self.data.extend_from_slice(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(_) => self.ended = true,
            }
        }
    }

    /// Whether the server closed the stream within `within` (events before
    /// the end are skipped).
    pub fn ends_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if self.next(left).is_none() {
                return self.ended;
            }
        }
        false
    }
}
