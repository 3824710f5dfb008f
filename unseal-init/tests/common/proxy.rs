//! A one-request-per-connection HTTP proxy in front of OpenBao that lets a test act at an exact
//! point of the conversation (e.g. kill the server right after `sys/init` answered).
//!
//! [`start`] runs one hook on one request. [`start_tap`] hands every exchange to a [`Tap`],
//! which can watch requests, hold a reply for as long as a scenario needs, or rewrite it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pass it through.
    Forward,
    /// Forward, run the hook after the upstream answered, then deliver the answer.
    HookAfterResponse,
    /// Run the hook instead of forwarding; the client sees the connection close.
    HookInstead,
}

/// A running proxy.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// Set once the hook ran.
    pub fired: Arc<AtomicBool>,
}

fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(buf);
            }
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn rewrite_request(raw: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut out: Vec<String> = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(str::to_owned)
        .collect();
    out.push("Connection: close".into());
    format!("{}\r\n\r\n{body}", out.join("\r\n")).into_bytes()
}

fn rewrite_response(raw: &[u8]) -> Vec<u8> {
    let (head, body) = split_response(raw);
    assemble_response(&head, &body)
}

/// Splits a raw response into its head and its (de-chunked) body.
fn split_response(raw: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    (head.to_owned(), body)
}

/// A response with `head`'s status and headers, `body`, and framing for one exchange.
fn assemble_response(head: &str, body: &str) -> Vec<u8> {
    let mut lines: Vec<String> = head
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !l.starts_with("connection:")
                && !l.starts_with("content-length:")
                && !l.starts_with("transfer-encoding:")
        })
        .map(str::to_owned)
        .collect();
    lines.push(format!("Content-Length: {}", body.len()));
    lines.push("Connection: close".into());
    format!("{}\r\n\r\n{body}", lines.join("\r\n")).into_bytes()
}

/// Starts a proxy to the server at `upstream` (`http://127.0.0.1:PORT`) that applies `action`
/// to the first request whose request line starts with `prefix` (e.g. `PUT /v1/sys/init`) and
/// forwards everything else; the hook runs at most once.
pub fn start(
    upstream: &str,
    prefix: &'static str,
    action: Action,
    hook: impl Fn() + Send + Sync + 'static,
) -> Proxy {
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    let fired = Arc::new(AtomicBool::new(false));
    let fired_thread = fired.clone();
    let hook = Arc::new(hook);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
            let Some(request) = read_request(&mut client) else {
                continue;
            };
            let line = String::from_utf8_lossy(&request)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            let action = if fired_thread.load(Ordering::SeqCst) || !line.starts_with(prefix) {
                Action::Forward
            } else {
                action
            };
            if action == Action::HookInstead {
                fired_thread.store(true, Ordering::SeqCst);
                hook();
                continue;
            }
            let Ok(mut up) = TcpStream::connect(&upstream) else {
                continue;
            };
            if up.write_all(&rewrite_request(&request)).is_err() {
                continue;
            }
            let mut response = Vec::new();
            if up.read_to_end(&mut response).is_err() || response.is_empty() {
                continue;
            }
            if action == Action::HookAfterResponse {
                fired_thread.store(true, Ordering::SeqCst);
                hook();
            }
            let _ = client.write_all(&rewrite_response(&response));
        }
    });
    Proxy { address, fired }
}

impl Proxy {
    /// Waits until the hook ran; panics naming `what` after `timeout`.
    pub fn wait_fired(&self, what: &str, timeout: Duration) {
        let started = std::time::Instant::now();
        while !self.fired.load(Ordering::SeqCst) {
            assert!(started.elapsed() < timeout, "{what} never reached");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One request as a [`Tap`] sees it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request line, e.g. `PUT /v1/sys/init HTTP/1.1`.
    pub line: String,
    /// The request body.
    pub body: String,
    /// When the proxy had read the whole request.
    pub at: Instant,
}

impl Seen {
    /// True for `method` on `path` (`/v1/...`, no query string).
    pub fn is(&self, method: &str, path: &str) -> bool {
        let mut parts = self.line.split_whitespace();
        parts.next() == Some(method)
            && parts
                .next()
                .is_some_and(|p| p.split('?').next() == Some(path))
    }
}

/// Watches, holds or rewrites the exchanges of a [`start_tap`] proxy. Each connection has its
/// own thread, so a held reply stalls only its own client.
pub trait Tap: Send + Sync + 'static {
    /// Called once the upstream answered with `body` (de-chunked); may block to hold the
    /// reply. Returns the body to deliver, or `None` to close the connection unanswered.
    fn response(&self, _seen: &Seen, body: String) -> Option<String> {
        Some(body)
    }
}

/// A running [`start_tap`] proxy; stops accepting connections when dropped.
pub struct TapProxy {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    stop: Arc<AtomicBool>,
}

impl Drop for TapProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag and ends.
        let _ = TcpStream::connect(self.address.trim_start_matches("http://"));
    }
}

fn serve_tapped(mut client: TcpStream, upstream: &str, tap: &dyn Tap) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let Some(request) = read_request(&mut client) else {
        return;
    };
    let text = String::from_utf8_lossy(&request);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let seen = Seen {
        line: head.lines().next().unwrap_or_default().to_owned(),
        body: body.to_owned(),
        at: Instant::now(),
    };
    let Ok(mut up) = TcpStream::connect(upstream) else {
        return;
    };
    if up.write_all(&rewrite_request(&request)).is_err() {
        return;
    }
    let mut response = Vec::new();
    if up.read_to_end(&mut response).is_err() || response.is_empty() {
        return;
    }
    let (head, body) = split_response(&response);
    if let Some(body) = tap.response(&seen, body) {
        let _ = client.write_all(&assemble_response(&head, &body));
    }
}

/// Starts a proxy to the server at `upstream` (`http://127.0.0.1:PORT`) that shows every
/// exchange to `tap`.
pub fn start_tap(upstream: &str, tap: Arc<dyn Tap>) -> TapProxy {
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            if stopped.load(Ordering::SeqCst) {
                return;
            }
            let Ok(client) = client else { continue };
            let (tap, upstream) = (tap.clone(), upstream.clone());
            std::thread::spawn(move || serve_tapped(client, &upstream, tap.as_ref()));
        }
    });
    TapProxy { address, stop }
}
