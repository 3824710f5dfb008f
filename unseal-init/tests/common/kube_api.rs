//! A stand-in for the Kubernetes API server, serving only what a Secret store needs (GET,
//! merge PATCH and POST of one Secret) over plain HTTP/1.1 with keep-alive, plus a kubeconfig
//! pointing at it. No kube-apiserver runs on a build machine; this speaks the same wire format
//! (JSON objects, `Status` errors) so the real `kube` client is exercised.

use base64::Engine;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The Secret's data as the fake server holds it (`None` until created).
pub type SecretData = Arc<Mutex<Option<BTreeMap<String, Vec<u8>>>>>;

/// A running fake API server.
pub struct KubeApi {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// Current contents of the one Secret.
    pub data: SecretData,
    /// `METHOD path` of every request served.
    pub requests: Arc<Mutex<Vec<String>>>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn secret_json(ns: &str, name: &str, data: &BTreeMap<String, Vec<u8>>) -> String {
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(b64().encode(v))))
        .collect();
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
        "data": data,
    })
    .to_string()
}

fn not_found(name: &str) -> (u16, String) {
    (
        404,
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("secrets \"{name}\" not found"), "reason": "NotFound",
            "details": {"name": name, "kind": "secrets"}, "code": 404
        })
        .to_string(),
    )
}

fn read_request(stream: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
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
            if buf.len() >= end + 4 + len {
                let mut parts = head.split_whitespace();
                let method = parts.next()?.to_owned();
                let path = parts.next()?.to_owned();
                return Some((method, path, buf[end + 4..end + 4 + len].to_vec()));
            }
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn handle(
    method: &str,
    path: &str,
    body: &[u8],
    ns: &str,
    name: &str,
    data: &SecretData,
) -> (u16, String) {
    let path = path.split('?').next().unwrap_or_default();
    let item = format!("/api/v1/namespaces/{ns}/secrets/{name}");
    let collection = format!("/api/v1/namespaces/{ns}/secrets");
    let mut data = data.lock().expect("lock");
    match (method, path) {
        ("GET", p) if p == item => match data.as_ref() {
            Some(d) => (200, secret_json(ns, name, d)),
            None => not_found(name),
        },
        ("PATCH", p) if p == item => {
            let Some(d) = data.as_mut() else {
                return not_found(name);
            };
            let patch: serde_json::Value = serde_json::from_slice(body).expect("patch json");
            if let Some(map) = patch["data"].as_object() {
                for (k, v) in map {
                    match v.as_str() {
                        Some(s) => {
                            d.insert(k.clone(), b64().decode(s).expect("base64"));
                        }
                        None => {
                            d.remove(k);
                        }
                    }
                }
            }
            (200, secret_json(ns, name, d))
        }
        ("POST", p) if p == collection => {
            if data.is_some() {
                return (
                    409,
                    "{\"kind\":\"Status\",\"code\":409,\"reason\":\"AlreadyExists\"}".into(),
                );
            }
            let obj: serde_json::Value = serde_json::from_slice(body).expect("secret json");
            let mut d = BTreeMap::new();
            if let Some(map) = obj["data"].as_object() {
                for (k, v) in map {
                    d.insert(
                        k.clone(),
                        b64()
                            .decode(v.as_str().unwrap_or_default())
                            .expect("base64"),
                    );
                }
            }
            let out = secret_json(ns, name, &d);
            *data = Some(d);
            (201, out)
        }
        _ => (404, "{\"kind\":\"Status\",\"code\":404}".into()),
    }
}

/// Serves one Secret `ns/name`.
pub fn start(ns: &str, name: &str) -> KubeApi {
    start_with_create_barrier(ns, name, 0)
}

/// Like [`start`], but holds every create (POST) until `creates` of them have arrived (or 20 s
/// passed), then answers them in turn: the first creates the Secret, the others get 409
/// AlreadyExists — what pods starting at once see from a real API server.
pub fn start_with_create_barrier(ns: &str, name: &str, creates: usize) -> KubeApi {
    let barrier = Arc::new((Mutex::new(0usize), std::sync::Condvar::new()));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    let data: SecretData = Arc::new(Mutex::new(None));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (ns, name) = (ns.to_owned(), name.to_owned());
    let (d, r) = (data.clone(), requests.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (d, r, ns, name) = (d.clone(), r.clone(), ns.clone(), name.clone());
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                while let Some((method, path, body)) = read_request(&mut stream) {
                    r.lock().expect("lock").push(format!("{method} {path}"));
                    if method == "POST" && creates > 0 {
                        let (count, arrived) = &*barrier;
                        let mut n = count.lock().expect("lock");
                        *n += 1;
                        arrived.notify_all();
                        let deadline =
                            std::time::Instant::now() + std::time::Duration::from_secs(20);
                        while *n < creates && std::time::Instant::now() < deadline {
                            n = arrived
                                .wait_timeout(n, std::time::Duration::from_millis(100))
                                .expect("wait")
                                .0;
                        }
                    }
                    let (status, out) = handle(&method, &path, &body, &ns, &name, &d);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{out}",
                        out.len()
                    );
                    if stream.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    KubeApi {
        address,
        data,
        requests,
    }
}

impl KubeApi {
    /// Writes a kubeconfig for this server into `dir` (namespace `ns`).
    pub fn kubeconfig(&self, dir: &Path, ns: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: u\n  user:\n    token: test-token\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\n    namespace: {ns}\ncurrent-context: c\n",
                self.address
            ),
        )
        .expect("write kubeconfig");
        path
    }
}
