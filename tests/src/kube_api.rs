//! A stand-in for the Kubernetes API server. No kube-apiserver runs on a build machine, so the
//! tests talk to this instead: it answers over plain HTTP/1.1 on 127.0.0.1 in the API server's
//! wire format (JSON objects, `Status` errors), so that the real `kube` client inside the
//! programs under test is exercised, and it records every request for the tests to check.
//!
//! It serves what the two programs use:
//!
//! - for the device plugin's replug recovery and node labels: Events
//!   (`POST /api/v1/namespaces/{ns}/events`), pods (`GET /api/v1/namespaces/{ns}/pods/{pod}`:
//!   every pod exists, with the uid [`pod_uid`] gives it), evictions
//!   (`POST /api/v1/namespaces/{ns}/pods/{pod}/eviction`) and JSON merge patches of a Node's
//!   labels (`PATCH /api/v1/nodes/{name}`; `GET` too: every node exists, with the uid
//!   [`node_uid`] gives it). An eviction can be refused as the API server refuses one that a
//!   PodDisruptionBudget does not allow (see [`KubeApi::block_eviction`]); an accepted one
//!   deletes the pod, which leaves its claims' reservations (see [`crate::kube_api_dra`]);
//! - for unseal-init's Secret store: Secrets of any namespace and name (`GET` and JSON merge
//!   `PATCH` of `/api/v1/namespaces/{ns}/secrets/{name}`, `POST /api/v1/namespaces/{ns}/secrets`
//!   with 409 AlreadyExists when it exists). Creates can be held until several have arrived, so
//!   that pods starting at once race for one Secret as they do against a real API server;
//! - for the DRA mode: ResourceSlices and ResourceClaims, in [`crate::kube_api_dra`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;

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
    /// The request's `User-Agent` header, if it had one.
    pub user_agent: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// The decoded data of a Secret, by key.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// How long a held create waits for the others at most.
const CREATE_HOLD: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<ApiRequest>>,
    /// `namespace/pod` whose evictions are refused (429).
    blocked: Mutex<BTreeSet<String>>,
    /// Labels of each node patched so far.
    node_labels: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// Data of each Secret, by (namespace, name).
    secrets: Mutex<BTreeMap<(String, String), SecretData>>,
    /// Annotations of each Secret, by (namespace, name): merge-patched, created and returned
    /// as the API server does.
    secret_annotations: Mutex<BTreeMap<(String, String), BTreeMap<String, String>>>,
    /// Secret creates to hold until this many have arrived (0: none is held).
    hold_creates: usize,
    /// Secret creates arrived so far.
    creates: Mutex<usize>,
    /// Signalled at each create's arrival.
    create_arrived: Condvar,
    /// ResourceSlices and ResourceClaims (see [`crate::kube_api_dra`]).
    dra: Arc<crate::kube_api_dra::DraObjects>,
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
        Self::serve(Shared::default())
    }

    /// Like [`KubeApi::start`], but holds every Secret create until `creates` of them have
    /// arrived (or 20 s passed), then answers them in turn: the first creates the Secret, the
    /// others get 409 AlreadyExists, as pods starting at once see from a real API server.
    pub fn start_holding_creates(creates: usize) -> anyhow::Result<Self> {
        Self::serve(Shared {
            hold_creates: creates,
            ..Shared::default()
        })
    }

    /// Like [`KubeApi::start`], on a given port: an API server that comes back where clients
    /// were already told to find it (after an outage).
    pub fn start_on(port: u16) -> anyhow::Result<Self> {
        Self::serve_on(
            TcpListener::bind(("127.0.0.1", port)).context("binding the API stand-in")?,
            Shared::default(),
        )
    }

    fn serve(shared: Shared) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the API stand-in")?;
        Self::serve_on(listener, shared)
    }

    fn serve_on(listener: TcpListener, shared: Shared) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let address = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(shared);
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

    /// The ResourceSlices and ResourceClaims served (see [`crate::kube_api_dra`]).
    pub fn dra(&self) -> Arc<crate::kube_api_dra::DraObjects> {
        self.shared.dra.clone()
    }

    /// Refuses (or, with `false`, allows again) evictions of `namespace/pod` as a
    /// PodDisruptionBudget does on a real API server: kube-apiserver's eviction subresource
    /// (`pkg/registry/core/pod/storage/eviction.go`) answers HTTP 429 TooManyRequests, a
    /// `Status` with the message "Cannot evict pod as it would violate the pod's disruption
    /// budget." and a `DisruptionBudget` cause naming the budget, and no `Retry-After`; the pod
    /// stays. The caller is expected to try again later (`kubectl drain` does every 5 s).
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

    /// The annotations of Secret `namespace/name` (empty until it has any).
    pub fn secret_annotations(&self, namespace: &str, name: &str) -> BTreeMap<String, String> {
        self.shared
            .secret_annotations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// The decoded data of Secret `namespace/name` (`None` until it is created).
    pub fn secret(&self, namespace: &str, name: &str) -> Option<SecretData> {
        self.shared
            .secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Deletes Secret `namespace/name` with its annotations, as `kubectl delete secret` does:
    /// from then on a `GET` answers 404 NotFound and a `PATCH` 404 (a create makes it anew).
    pub fn delete_secret(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut secrets = self
            .shared
            .secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        secrets.remove(&key);
        self.shared
            .secret_annotations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// Puts Secret `namespace/name` back with `data` and `annotations` (a restore from a
    /// backup: `kubectl apply` of a saved copy).
    pub fn restore_secret(
        &self,
        namespace: &str,
        name: &str,
        data: SecretData,
        annotations: BTreeMap<String, String>,
    ) {
        let key = (namespace.to_owned(), name.to_owned());
        self.shared
            .secret_annotations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), annotations);
        self.shared
            .secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, data);
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
        self.write_kubeconfig(dir, None)
    }

    /// Like [`KubeApi::kubeconfig`], with `namespace` as the context's namespace.
    pub fn kubeconfig_in(&self, dir: &Path, namespace: &str) -> anyhow::Result<PathBuf> {
        self.write_kubeconfig(dir, Some(namespace))
    }

    fn write_kubeconfig(&self, dir: &Path, namespace: Option<&str>) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let namespace = namespace
            .map(|ns| format!("    namespace: {ns}\n"))
            .unwrap_or_default();
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    \
                 server: {}\nusers:\n- name: plugin\n  user:\n    token: stand-in-token\n\
                 contexts:\n- name: c\n  context:\n    cluster: stand-in\n    user: plugin\n\
                 {namespace}current-context: c\n",
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

/// The namespace, and the name unless it is the collection, from
/// `/api/v1/namespaces/{ns}/secrets[/{name}]`.
fn secret_of(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once('/')?;
    if rest == "secrets" {
        return Some((ns, None));
    }
    let name = rest.strip_prefix("secrets/")?;
    (!name.is_empty() && !name.contains('/')).then_some((ns, Some(name)))
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
        while let Some((method, path, body, user_agent, used)) = parse(&buf) {
            buf.drain(..used);
            let at = Instant::now();
            let (status, reply) = answer(&method, &path, &body, shared, stop);
            shared
                .requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ApiRequest {
                    method,
                    path,
                    body,
                    status,
                    user_agent,
                    at,
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

/// One complete request at the start of `buf`: method, path, JSON body, User-Agent, bytes used.
#[allow(clippy::type_complexity)]
fn parse(buf: &[u8]) -> Option<(String, String, serde_json::Value, Option<String>, usize)> {
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
    let user_agent = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("user-agent")
            .then(|| v.trim().to_owned())
    });
    let mut parts = head.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.split('?').next()?.to_owned();
    let body = serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or_default();
    Some((method, path, body, user_agent, end + 4 + len))
}

fn status(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

fn answer(
    method: &str,
    path: &str,
    body: &serde_json::Value,
    shared: &Shared,
    stop: &AtomicBool,
) -> (u16, String) {
    if let Some((ns, name)) = secret_of(path) {
        return answer_secret(method, ns, name, body, shared, stop);
    }
    if let Some(answer) = shared.dra.answer(method, path, body) {
        return answer;
    }
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
    if method == "GET"
        && let Some(node) = path.strip_prefix("/api/v1/nodes/")
        && !node.is_empty()
        && !node.contains('/')
    {
        let labels = shared
            .node_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
            .unwrap_or_default();
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "uid": node_uid(node), "labels": labels},
        });
        return (200, node.to_string());
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
    if method == "GET"
        && let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((ns, name)) = rest.split_once("/pods/")
        && !name.is_empty()
        && !name.contains('/')
    {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": pod_uid(ns, name)},
        });
        return (200, pod.to_string());
    }
    if method == "POST"
        && let Some(pod) = pod_of(path)
    {
        let blocked = shared
            .blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&pod);
        if blocked {
            return (429, budget_refusal(&pod));
        }
        // The evicted pod goes, and with it its claims' reservations.
        if let Some((ns, name)) = pod.split_once('/') {
            shared.dra.pod_gone(ns, name);
        }
        return (201, status(201, "", ""));
    }
    not_served()
}

/// The API server's refusal of an eviction a PodDisruptionBudget does not allow (see
/// [`KubeApi::block_eviction`]); the budget is named after the pod here.
fn budget_refusal(pod: &str) -> String {
    let budget = pod.rsplit('/').next().unwrap_or(pod);
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Cannot evict pod as it would violate the pod's disruption budget.",
        "reason": "TooManyRequests",
        "details": {"causes": [{
            "reason": "DisruptionBudget",
            "message": format!(
                "The disruption budget {budget}-pdb needs 1 healthy pods and has 1 currently"
            ),
        }]},
        "code": 429,
    })
    .to_string()
}

/// The uid the stand-in gives node `name` (every node exists, as every pod does).
pub fn node_uid(name: &str) -> String {
    // Pods' namespaces are never empty: no pod shares a node's uid.
    pod_uid("", name)
}

/// The uid the stand-in gives pod `namespace/name` (stable, shaped like the API server's
/// UUIDs).
pub fn pod_uid(namespace: &str, name: &str) -> String {
    // FNV-1a over the name: distinct pods get distinct uids, the same pod the same one.
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        hash ^= u128::from(b);
        hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let h = format!("{hash:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn not_served() -> (u16, String) {
    (404, status(404, "NotFound", "not served by the stand-in"))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn secret_json(ns: &str, name: &str, data: &SecretData) -> String {
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

/// Applies a merge patch of `metadata.annotations` (a string sets, null removes) to the
/// Secret's annotations, and puts them into `reply`.
fn annotate(
    shared: &Shared,
    ns: &str,
    name: &str,
    patch: &serde_json::Value,
    (code, reply): (u16, String),
) -> (u16, String) {
    if !(200..300).contains(&code) {
        return (code, reply);
    }
    let mut all = shared
        .secret_annotations
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let own = all.entry((ns.to_owned(), name.to_owned())).or_default();
    for (key, value) in patch["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
    {
        match value.as_str() {
            Some(text) => {
                own.insert(key.clone(), text.to_owned());
            }
            None => {
                own.remove(key);
            }
        }
    }
    let Ok(mut json) = serde_json::from_str::<serde_json::Value>(&reply) else {
        return (code, reply);
    };
    if !own.is_empty() {
        json["metadata"]["annotations"] = serde_json::json!(own);
    }
    (code, json.to_string())
}

fn secret_not_found(name: &str) -> (u16, String) {
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

fn bad_base64(key: &str) -> (u16, String) {
    let message = format!("data[{key}] is not base64");
    (400, status(400, "BadRequest", &message))
}

/// GET, merge PATCH and POST of Secrets; `name` is `None` for the collection.
fn answer_secret(
    method: &str,
    ns: &str,
    name: Option<&str>,
    body: &serde_json::Value,
    shared: &Shared,
    stop: &AtomicBool,
) -> (u16, String) {
    match (method, name) {
        ("GET", Some(name)) => {
            let secrets = shared.secrets.lock().unwrap_or_else(|e| e.into_inner());
            match secrets.get(&(ns.to_owned(), name.to_owned())) {
                Some(data) => annotate(
                    shared,
                    ns,
                    name,
                    &serde_json::Value::Null,
                    (200, secret_json(ns, name, data)),
                ),
                None => secret_not_found(name),
            }
        }
        ("PATCH", Some(name)) => {
            let mut secrets = shared.secrets.lock().unwrap_or_else(|e| e.into_inner());
            let Some(data) = secrets.get_mut(&(ns.to_owned(), name.to_owned())) else {
                return secret_not_found(name);
            };
            // JSON merge patch of data: a base64 string sets, null removes.
            let mut patched = data.clone();
            for (key, value) in body["data"].as_object().into_iter().flatten() {
                match value.as_str() {
                    Some(text) => match b64().decode(text) {
                        Ok(bytes) => {
                            patched.insert(key.clone(), bytes);
                        }
                        Err(_) => return bad_base64(key),
                    },
                    None => {
                        patched.remove(key);
                    }
                }
            }
            *data = patched;
            annotate(shared, ns, name, body, (200, secret_json(ns, name, data)))
        }
        ("POST", None) => {
            hold_create(shared, stop);
            let Some(name) = body["metadata"]["name"].as_str() else {
                return (422, status(422, "Invalid", "metadata.name: Required value"));
            };
            let mut data = SecretData::new();
            for (key, value) in body["data"].as_object().into_iter().flatten() {
                match b64().decode(value.as_str().unwrap_or_default()) {
                    Ok(bytes) => {
                        data.insert(key.clone(), bytes);
                    }
                    Err(_) => return bad_base64(key),
                }
            }
            let mut secrets = shared.secrets.lock().unwrap_or_else(|e| e.into_inner());
            let key = (ns.to_owned(), name.to_owned());
            if secrets.contains_key(&key) {
                return (
                    409,
                    "{\"kind\":\"Status\",\"code\":409,\"reason\":\"AlreadyExists\"}".into(),
                );
            }
            let reply = secret_json(ns, name, &data);
            secrets.insert(key, data);
            annotate(shared, ns, name, body, (201, reply))
        }
        _ => not_served(),
    }
}

/// With creates held, counts this one and waits until the number held have arrived, 20 s have
/// passed or the stand-in stops.
fn hold_create(shared: &Shared, stop: &AtomicBool) {
    if shared.hold_creates == 0 {
        return;
    }
    let mut arrived = shared.creates.lock().unwrap_or_else(|e| e.into_inner());
    *arrived += 1;
    shared.create_arrived.notify_all();
    let deadline = Instant::now() + CREATE_HOLD;
    while *arrived < shared.hold_creates
        && Instant::now() < deadline
        && !stop.load(Ordering::SeqCst)
    {
        arrived = shared
            .create_arrived
            .wait_timeout(arrived, Duration::from_millis(100))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
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

    #[test]
    fn secret_paths() {
        assert_eq!(
            secret_of("/api/v1/namespaces/vault/secrets"),
            Some(("vault", None))
        );
        assert_eq!(
            secret_of("/api/v1/namespaces/vault/secrets/keys"),
            Some(("vault", Some("keys")))
        );
        assert_eq!(secret_of("/api/v1/namespaces/vault/secrets/"), None);
        assert_eq!(secret_of("/api/v1/namespaces/vault/events"), None);
        assert_eq!(secret_of("/api/v1/namespaces/vault/pods/p/eviction"), None);
    }

    fn call(api: &KubeApi, method: &str, path: &str, body: serde_json::Value) -> (u16, String) {
        let body = (!body.is_null()).then_some(&body);
        crate::openbao::http(api.address(), method, path, body).unwrap()
    }

    #[test]
    fn secrets_are_created_read_and_merge_patched() {
        let api = KubeApi::start().unwrap();
        let item = "/api/v1/namespaces/vault/secrets/keys";
        let (code, text) = call(&api, "GET", item, serde_json::Value::Null);
        assert_eq!(code, 404);
        let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reply["reason"], "NotFound");
        assert_eq!(reply["details"]["name"], "keys");
        assert_eq!(call(&api, "PATCH", item, serde_json::json!({})).0, 404);

        let create = serde_json::json!({
            "metadata": {"name": "keys"}, "data": {"a": "YQ==", "b": "Yg=="},
        });
        let collection = "/api/v1/namespaces/vault/secrets";
        let (code, text) = call(&api, "POST", collection, create.clone());
        assert_eq!(code, 201);
        let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reply["type"], "Opaque");
        assert_eq!(reply["metadata"]["resourceVersion"], "1");
        let (code, text) = call(&api, "POST", collection, create);
        assert_eq!(code, 409);
        assert!(text.contains("AlreadyExists"), "{text}");

        let patch = serde_json::json!({"data": {"a": null, "c": "Yw=="}});
        let (code, text) = call(&api, "PATCH", item, patch);
        assert_eq!(code, 200);
        let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reply["data"], serde_json::json!({"b": "Yg==", "c": "Yw=="}));
        let want = BTreeMap::from([
            ("b".to_owned(), b"b".to_vec()),
            ("c".to_owned(), b"c".to_vec()),
        ]);
        assert_eq!(api.secret("vault", "keys"), Some(want));
        assert_eq!(api.secret("other", "keys"), None);
        assert_eq!(call(&api, "GET", item, serde_json::Value::Null).0, 200);
    }

    #[test]
    fn held_creates_are_answered_together_one_winning() {
        let api = KubeApi::start_holding_creates(2).unwrap();
        let create = |value: &str| {
            let body = serde_json::json!({"metadata": {"name": "keys"}, "data": {"k": value}});
            call(&api, "POST", "/api/v1/namespaces/vault/secrets", body).0
        };
        let sent = Instant::now();
        let (mut codes, first_answered) = std::thread::scope(|scope| {
            let one = scope.spawn(|| (create("MQ=="), Instant::now()));
            std::thread::sleep(Duration::from_millis(300));
            let two = scope.spawn(|| create("Mg=="));
            let (code, answered) = one.join().unwrap();
            ([code, two.join().unwrap()], answered)
        });
        assert!(
            first_answered >= sent + Duration::from_millis(300),
            "the first was not held"
        );
        codes.sort();
        assert_eq!(codes, [201, 409]);
    }

    #[test]
    fn a_held_create_does_not_outlast_the_stand_in() {
        let api = KubeApi::start_holding_creates(2).unwrap();
        let address = api.address().to_owned();
        let client = std::thread::spawn(move || {
            let body = serde_json::json!({"metadata": {"name": "keys"}});
            crate::openbao::http(
                &address,
                "POST",
                "/api/v1/namespaces/vault/secrets",
                Some(&body),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let dropping = Instant::now();
        drop(api);
        assert!(
            dropping.elapsed() < Duration::from_secs(2),
            "{:?}",
            dropping.elapsed()
        );
        let _ = client.join();
    }
}
