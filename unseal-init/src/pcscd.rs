//! Supervises `pcscd` when `hsm.daemon` is true: OpenSC reaches USB tokens through it.
//!
//! pcscd runs in the foreground as a child with its socket inside the container, at
//! pcsc-lite's fixed path `/run/pcscd/pcscd.comm` (Debian's pcscd ignores
//! `PCSCLITE_CSOCK_NAME` for its own socket, so no other path can work). The module is loaded
//! only once the socket answers; the token itself may show up later, which the HSM layer waits
//! for. A crashed pcscd is restarted with backoff. pcscd gets none of this program's secrets
//! in its environment.
//!
//! pcscd's own messages (its stderr) become this program's log lines, so that a JSON log stays
//! JSON: each at WARN (pcscd prints only its errors unless asked for more, and none of them
//! ends this program: it restarts pcscd and waits for the token), with pcscd's source location
//! as a field.

use nitrokey_common::backoff::Backoff;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};

/// Longest pcscd line relayed as one log line; a longer one is relayed in pieces.
const MAX_LINE: u64 = 4096;

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
    cmd.arg("--foreground")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BANK_VAULTS_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("VAULT_TOKEN");
    let mut child = cmd
        .spawn()
        .map_err(|source| PcscdError::Spawn { program, source })?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(relay(stderr));
    }
    Ok(child)
}

/// One line pcscd wrote: where in pcscd it comes from (`ifdwrapper.c:477:IFDControl()`),
/// when pcscd says so, and the message.
#[derive(Debug, PartialEq, Eq)]
pub struct PcscdLine<'a> {
    /// pcscd's source file, line and function.
    pub source: Option<&'a str>,
    /// The message itself.
    pub message: &'a str,
}

/// Splits a line of pcscd's stderr: `00000000 ifdwrapper.c:477:IFDControl() Card not
/// transacted: 606` (pcsc-lite's log format: microseconds since its previous line, the
/// source location, the message). Anything else is kept whole as the message.
pub fn parse_line(line: &str) -> PcscdLine<'_> {
    let line = line.trim_end_matches(['\r', '\n']);
    let rest = match line.split_once(' ') {
        Some((stamp, rest)) if !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit()) => {
            rest
        }
        _ => line,
    };
    match rest.split_once(' ') {
        Some((source, message)) if source.ends_with("()") && source.contains(".c:") => PcscdLine {
            source: Some(source),
            message: message.trim(),
        },
        _ => PcscdLine {
            source: None,
            message: rest.trim(),
        },
    }
}

/// Logs every line pcscd writes to stderr until it closes it.
async fn relay(stderr: ChildStderr) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let parsed = parse_line(&text);
        if parsed.message.is_empty() {
            continue;
        }
        match parsed.source {
            Some(source) => tracing::warn!(target: "pcscd", source, "pcscd: {}", parsed.message),
            None => tracing::warn!(target: "pcscd", "pcscd: {}", parsed.message),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcscd_lines_are_split_into_source_and_message() {
        assert_eq!(
            parse_line("00000000 ifdwrapper.c:477:IFDControl() Card not transacted: 606\n"),
            PcscdLine {
                source: Some("ifdwrapper.c:477:IFDControl()"),
                message: "Card not transacted: 606",
            }
        );
        assert_eq!(
            parse_line("00001234 pcscdaemon.c:633:main() pcscd set to foreground"),
            PcscdLine {
                source: Some("pcscdaemon.c:633:main()"),
                message: "pcscd set to foreground",
            }
        );
        // Not pcsc-lite's format: kept whole.
        assert_eq!(
            parse_line("something odd happened\r\n"),
            PcscdLine {
                source: None,
                message: "something odd happened",
            }
        );
        assert_eq!(parse_line("").message, "");
    }
}
