//! A stand-in for the Kubernetes API server, for the device plugin's replug recovery and node
//! labels: it accepts Events (`POST /api/v1/namespaces/{ns}/events`), evictions (`POST
//! /api/v1/namespaces/{ns}/pods/{pod}/eviction`) and JSON merge patches of a Node's labels
//! (`PATCH /api/v1/nodes/{name}`) over plain HTTP/1.1 on 127.0.0.1 and records them, answering in the API server's wire format so that the real `kube` client
//! inside the plugin is exercised. An eviction can be refused with 429, as the API server
//! does while a PodDisruptionBudget does not allow it. No kube-apiserver runs on a build
//! machine, which is why this exists.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// One request the stand-in served.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The JSON body (`Null` without one).
    pub body: serde_json::Value,
    /// The status answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<ApiRequest>>,
    /// `namespace/pod` whose evictions are refused (429).
    blocked: Mutex<BTreeSet<String>>,
    /// Labels of each node patched so far.
    node_labels: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
}

/// The running stand-in; stops when dropped.
pub struct KubeApi {
    address: String,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl KubeApi {
    /// Starts serving on an ephemeral port of 127.0.0.1.
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the API stand-in")?;
        listener.set_nonblocking(true)?;
        let address = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (s, st) = (s.clone(), st.clone());
                        workers.push(std::thread::spawn(move || serve(stream, &s, &st)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Nothing to accept: poll the stop flag again shortly.
                        std::thread::park_timeout(Duration::from_millis(10));
                    }
                    Err(_) => break,
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        Ok(Self {
            address,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Refuses (or, with `false`, allows again) evictions of `namespace/pod` with 429.
    pub fn block_eviction(&self, namespace: &str, pod: &str, blocked: bool) {
        let key = format!("{namespace}/{pod}");
        let mut set = self
            .shared
            .blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if blocked {
            set.insert(key);
        } else {
            set.remove(&key);
        }
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Events created so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/events") && r.status == 201)
            .map(|r| r.body)
            .collect()
    }

    /// `namespace/pod` of every eviction accepted so far, in order.
    pub fn evictions(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/eviction") && r.status == 201)
            .filter_map(|r| pod_of(&r.path))
            .collect()
    }

    /// The labels of node `name` after every patch so far.
    pub fn node_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.shared
            .node_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Polls until `check` holds on the requests, up to `timeout`.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        check: impl Fn(&[ApiRequest]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check(&self.requests()) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!("timed out; requests: {:#?}", self.requests());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    \
                 server: {}\nusers:\n- name: plugin\n  user:\n    token: stand-in-token\n\
                 contexts:\n- name: c\n  context:\n    cluster: stand-in\n    user: plugin\n\
                 current-context: c\n",
                self.address
            ),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `namespace/pod` from `/api/v1/namespaces/{ns}/pods/{pod}/eviction`.
fn pod_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/pods/")?;
    let pod = rest.strip_suffix("/eviction")?;
    Some(format!("{ns}/{pod}"))
}

fn serve(mut stream: TcpStream, shared: &Shared, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
        while let Some((method, path, body, used)) = parse(&buf) {
            buf.drain(..used);
            let (status, reply) = answer(&method, &path, &body, shared);
            shared
                .requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ApiRequest {
                    method,
                    path,
                    body,
                    status,
                    at: Instant::now(),
                });
            let text = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                reply.len()
            );
            if stream.write_all(text.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// One complete request at the start of `buf`: method, path, JSON body, bytes used.
fn parse(buf: &[u8]) -> Option<(String, String, serde_json::Value, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    if buf.len() < end + 4 + len {
        return None;
    }
    let mut parts = head.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.split('?').next()?.to_owned();
    let body = serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or_default();
    Some((method, path, body, end + 4 + len))
}

fn status(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

fn answer(method: &str, path: &str, body: &serde_json::Value, shared: &Shared) -> (u16, String) {
    if method == "POST" && path.starts_with("/api/v1/namespaces/") && path.ends_with("/events") {
        let mut event = body.clone();
        let name = format!(
            "{}{}",
            event["metadata"]["generateName"]
                .as_str()
                .unwrap_or("event."),
            "x1"
        );
        event["metadata"]["name"] = serde_json::Value::String(name);
        return (201, event.to_string());
    }
    if method == "PATCH"
        && let Some(node) = path.strip_prefix("/api/v1/nodes/")
    {
        let mut nodes = shared.node_labels.lock().unwrap_or_else(|e| e.into_inner());
        let labels = nodes.entry(node.to_owned()).or_default();
        // JSON merge patch of metadata.labels: a string sets, null removes.
        if let Some(patch) = body["metadata"]["labels"].as_object() {
            for (key, value) in patch {
                match value.as_str() {
                    Some(v) => {
                        labels.insert(key.clone(), v.to_owned());
                    }
                    None => {
                        labels.remove(key);
                    }
                }
            }
        }
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": labels},
        });
        return (200, node.to_string());
    }
    if method == "POST"
        && let Some(pod) = pod_of(path)
    {
        let blocked = shared
            .blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&pod);
        return if blocked {
            (
                429,
                status(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                ),
            )
        } else {
            (201, status(201, "", ""))
        };
    }
    (404, status(404, "NotFound", "not served by the stand-in"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_paths() {
        assert_eq!(
            pod_of("/api/v1/namespaces/vault/pods/vault-0/eviction").as_deref(),
            Some("vault/vault-0")
        );
        assert_eq!(pod_of("/api/v1/namespaces/vault/events"), None);
    }
}
