//! Supervises `pcscd` when `hsm.daemon` is true: OpenSC reaches USB tokens through it.
//!
//! pcscd runs in the foreground as a child with its socket inside the container, at
//! pcsc-lite's fixed path `/run/pcscd/pcscd.comm` (Debian's pcscd ignores
//! `PCSCLITE_CSOCK_NAME` for its own socket, so no other path can work). The module is loaded
//! only once the socket answers; the token itself may show up later, which the HSM layer waits
//! for. A crashed pcscd is restarted with backoff. pcscd gets none of this program's secrets
//! in its environment.

use nitrokey_common::backoff::Backoff;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tokio::process::{Child, Command};

/// pcscd start-up failures.
#[derive(Debug, Error)]
pub enum PcscdError {
    /// The binary could not be started.
    #[error("cannot start pcscd ({program}): {source}")]
    Spawn {
        /// Program.
        program: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The socket directory could not be created.
    #[error("cannot create pcscd socket directory {path}: {source}")]
    Dir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// pcscd did not answer in time.
    #[error("pcscd did not answer on {0} within {1:?}")]
    Timeout(PathBuf, Duration),
    /// pcscd exited during start-up.
    #[error("pcscd exited during start-up: {0}")]
    Exited(String),
}

/// Program used for pcscd (`UNSEAL_INIT_PCSCD` overrides, for unusual images).
pub fn program() -> String {
    std::env::var("UNSEAL_INIT_PCSCD").unwrap_or_else(|_| "pcscd".to_owned())
}

fn spawn(socket: &Path) -> Result<Child, PcscdError> {
    let program = program();
    let _ = socket;
    let mut cmd = Command::new(&program);
    cmd.arg("--foreground").kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BANK_VAULTS_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("VAULT_TOKEN");
    cmd.spawn()
        .map_err(|source| PcscdError::Spawn { program, source })
}

async fn wait_ready(child: &mut Child, socket: &Path, timeout: Duration) -> Result<(), PcscdError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(PcscdError::Exited(status.to_string()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PcscdError::Timeout(socket.to_owned(), timeout));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts pcscd, waits until its socket answers, and keeps it running in the background.
pub async fn start() -> Result<(), PcscdError> {
    let socket = PathBuf::from(crate::config::DEFAULT_PCSCD_SOCKET);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|source| PcscdError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        tracing::info!(socket = %socket.display(), "pcscd already answering; using it without supervising");
        return Ok(());
    }
    let _ = std::fs::remove_file(&socket);
    let mut child = spawn(&socket)?;
    wait_ready(&mut child, &socket, Duration::from_secs(15)).await?;
    tracing::info!(socket = %socket.display(), pid = child.id(), "pcscd is answering");
    tokio::spawn(supervise(child, socket));
    Ok(())
}

async fn supervise(mut child: Child, socket: PathBuf) {
    let mut delays = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let status = child.wait().await;
        let delay = delays.next();
        tracing::warn!(?status, retry_in = ?delay, "pcscd exited; restarting");
        tokio::time::sleep(delay).await;
        let _ = std::fs::remove_file(&socket);
        match spawn(&socket) {
            Ok(mut c) => match wait_ready(&mut c, &socket, Duration::from_secs(15)).await {
                Ok(()) => {
                    tracing::info!("pcscd restarted");
                    delays.reset();
                    child = c;
                }
                Err(e) => {
                    tracing::error!(error = %e, "pcscd restart failed");
                    child = c;
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "pcscd restart failed");
                tokio::time::sleep(delays.peek()).await;
            }
        }
    }
}
