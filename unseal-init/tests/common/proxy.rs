//! A one-request-per-connection HTTP proxy in front of OpenBao that lets a test act at an exact
//! point of the conversation (e.g. kill the server right after `sys/init` answered).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
