//! End to end: Flagger-style webhooks of a rollout.
//!
//! A `confirm-promotion` gate that answers 403 holds the last step (asked
//! again after each passing check) and its 2xx promotes; an `event` webhook
//! receives each step and the promotion as Flagger's payload; a webhook that
//! never answers and one where nothing listens are counted as failed and slow
//! down neither the rollout nor the other webhooks.
//!
//! They need root (without it they fail; `KANARI_SKIP_PRIVILEGED=1` skips them
//! explicitly outside CI).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use kanari_tests::{
    agent::Agent,
    control::{rollout, scrape, sum, until, wait_rollout},
    load::Load,
    netns::{Netns, require_root},
    topology::{Topology, TopologyOptions, VIP},
};
use serde_json::Value;

/// An HTTP receiver on the node's loopback: records every POST's JSON body
/// and answers `status` (0: never answers, the connection stays open).
struct Receiver {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    bodies: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(ns: &Netns, status: u16) -> Receiver {
        let listener = ns
            .run_in(|| TcpListener::bind("127.0.0.1:0"))
            .expect("the namespace's thread")
            .expect("binding a receiver");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("an address");
        let status = Arc::new(AtomicU16::new(status));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (status, bodies, stop) = (status.clone(), bodies.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            if let Some(conn) = serve(conn, &status, &bodies) {
                                held.push(conn);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Receiver {
            addr,
            status,
            bodies,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request; answers it, or returns the connection to hold open.
fn serve(mut conn: TcpStream, status: &AtomicU16, bodies: &Mutex<Vec<Value>>) -> Option<TcpStream> {
    conn.set_nonblocking(false).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let body = loop {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                break buf[end + 4..end + 4 + length].to_vec();
            }
        }
    };
    if let Ok(v) = serde_json::from_slice(&body) {
        bodies.lock().unwrap().push(v);
    }
    let code = status.load(Ordering::Relaxed);
    if code == 0 {
        return Some(conn);
    }
    let _ = write!(
        conn,
        "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    None
}

#[test]
fn a_promotion_gate_holds_until_it_answers_2xx_and_events_follow_the_rollout() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&TopologyOptions::default()).expect("topology");
    let events = Receiver::start(&topo.node, 200);
    let gate = Receiver::start(&topo.node, 403);
    let hang = Receiver::start(&topo.node, 0);
    let yaml = topo.config(
        0.0,
        &format!(
            "    rollout:\n      steps: [10, 50, 100]\n      interval: 1s\n      min_requests: 10\n      webhooks:\n        - {{name: chat, type: event, url: '{}', metadata: {{team: payments}}}}\n        - {{name: gate, type: confirm-promotion, url: '{}', retries: 0}}\n        - {{name: hang, type: event, url: '{}', timeout: 1s, retries: 0}}\n        - {{name: nowhere, type: event, url: 'http://127.0.0.1:1/', retries: 1}}\n    analysis: {{compare_to_stable: {{max_latency_increase: 300, max_error_rate_increase: 5, tail_quantile: 0.9}}}}\n",
            events.url(),
            gate.url(),
            hang.url()
        ),
        "tc",
    );
    let agent = Agent::start(&topo.node, &yaml).expect("kanari starts");
    let s = agent.socket.as_path();
    let load = Load::start(&topo.client, VIP, 400.0, 8, 0).expect("load");
    // The last step below 100 %, held by the gate's 403.
    wait_rollout(s, 60, "the promotion gate", |_, r| {
        r.awaiting.as_deref() == Some("confirm-promotion")
    });
    until(10, "the gate asked twice", || {
        let asked = gate.bodies().len();
        (asked >= 2)
            .then_some(())
            .ok_or(format!("asked {asked} times"))
    });
    let (w, r) = rollout(s);
    assert_eq!((r.phase.as_str(), w), ("progressing", 50.0), "{r:#?}");
    assert!(r.reason.contains("403"), "{}", r.reason);
    let asked = &gate.bodies()[0];
    assert_eq!(asked["phase"], "WaitingPromotion", "{asked}");
    assert_eq!(asked["metadata"]["type"], "confirm-promotion", "{asked}");
    // The gate opens: the next passing check promotes.
    gate.status.store(200, Ordering::Relaxed);
    let (w, _) = wait_rollout(s, 10, "the promotion", |_, r| r.phase == "promoted");
    assert_eq!(w, 100.0);
    load.stop();

    // Flagger's payload for each step and the promotion, in order.
    let got = until(10, "the promotion event", || {
        let b = events.bodies();
        b.iter()
            .any(|e| e["metadata"]["event"] == "promoted")
            .then(|| b.clone())
            .ok_or(format!("{b:#?}"))
    });
    let said: Vec<(String, String)> = got
        .iter()
        .map(|e| {
            (
                e["metadata"]["event"].as_str().unwrap_or("").to_string(),
                e["metadata"]["weight"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let steps: Vec<&(String, String)> = said.iter().filter(|(e, _)| e == "step").collect();
    assert!(
        steps.iter().any(|(_, w)| w == "50"),
        "a step event at 50 %: {said:?}"
    );
    let promoted = got
        .iter()
        .find(|e| e["metadata"]["event"] == "promoted")
        .unwrap();
    assert_eq!(promoted["name"], "web");
    assert_eq!(promoted["phase"], "Succeeded");
    assert_eq!(promoted["metadata"]["team"], "payments");
    assert_eq!(promoted["metadata"]["weight"], "100");
    assert!(
        promoted["checksum"].as_str().is_some_and(|c| c.len() == 16),
        "{promoted}"
    );
    assert!(!hang.bodies().is_empty(), "the hanging webhook was called");

    // Every delivery counted, by outcome.
    until(10, "the failed deliveries counted", || {
        let m = scrape(&topo.node);
        let n = |hook: &str, outcome: &str| {
            sum(
                &m,
                "kanari_webhook_deliveries_total",
                &[("webhook", hook), ("outcome", outcome)],
            )
        };
        let seen = [
            n("gate", "failed"),
            n("gate", "ok"),
            n("chat", "ok"),
            n("nowhere", "failed"),
            n("hang", "failed"),
        ];
        (seen.iter().all(|x| *x >= 1.0) && seen[2] >= steps.len() as f64 + 1.0)
            .then_some(())
            .ok_or(format!(
                "gate failed/ok, chat ok, nowhere failed, hang failed: {seen:?}"
            ))
    });
    agent.stop().expect("kanari stops");
}
