//! Registration with the kubelet and the watch that keeps it registered.
//!
//! The supervisor is level-triggered: after every file-system event in the device-plugin
//! directory (and every few seconds as a safety net) it checks two facts and repairs them:
//!
//! 1. *Our socket is the one we bound.* If it vanished (a restarting kubelet deletes every
//!    socket in the directory) the server is restarted on a fresh socket.
//! 2. *We are registered with the kubelet that owns the current `kubelet.sock`.* If the socket
//!    was re-created (a kubelet restart) or we re-served, `Register` is called again. A missing
//!    `kubelet.sock` is waited for; an unreachable one is retried with backoff; a kubelet that
//!    answers `Register` with an error has rejected the plugin, which ends the process.
//!
//! The server always runs before `Register` is sent: the kubelet dials the plugin back and
//! calls `GetDevicePluginOptions` before it answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use nitrokey_proto::v1beta1::RegisterRequest;
use nitrokey_proto::v1beta1::registration_client::RegistrationClient;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Endpoint, Uri};

use crate::config::{Config, SOCKET_NAME};
use crate::metrics::Metrics;
use crate::server::{self, FileId, Serving};
use crate::state::PluginState;

/// How long one `Register` call may take (the kubelet's own dial-back allows 10 s).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// First retry delay after an unreachable kubelet; doubled up to [`MAX_BACKOFF`]. Short,
/// because a new `kubelet.sock` exists a moment before the kubelet listens on it.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// Failed attempts in a row below this backoff are expected races, logged at debug level.
const QUIET_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Safety-net re-check interval, in case a file-system event was missed.
const RECHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Why `Register` did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The kubelet could not be reached (not listening yet, restarting, timed out): retry.
    #[error("kubelet unreachable: {0}")]
    Unreachable(String),
    /// The kubelet answered with an error: the plugin is not wanted as configured.
    #[error("kubelet rejected the registration: {0}")]
    Rejected(String),
}

/// What ends the supervisor with a failure.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The kubelet rejected the registration.
    #[error(transparent)]
    Rejected(RegisterError),
    /// The plugin socket could not be served.
    #[error("cannot serve on {0}: {1}")]
    Serve(PathBuf, std::io::Error),
    /// The device-plugin directory cannot be watched.
    #[error("cannot watch {0}: {1}")]
    Watch(PathBuf, notify::Error),
}

/// Calls `Register` on the kubelet socket at `kubelet_socket`.
pub async fn register(
    kubelet_socket: &Path,
    request: RegisterRequest,
) -> Result<(), RegisterError> {
    let path = kubelet_socket.to_owned();
    // The URI is required by tonic but unused: the connector dials the unix socket.
    let channel = Endpoint::from_static("http://kubelet.sock")
        .connect_timeout(Duration::from_secs(5))
        .timeout(REGISTER_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| RegisterError::Unreachable(error_chain(&e)))?;
    match RegistrationClient::new(channel).register(request).await {
        Ok(_) => Ok(()),
        Err(status) => match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted => Err(RegisterError::Unreachable(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
            _ => Err(RegisterError::Rejected(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Keeps the plugin served and registered until `shutdown`.
#[derive(Debug)]
pub struct Supervisor {
    config: Config,
    state: Arc<PluginState>,
    metrics: Arc<Metrics>,
}

/// Registration progress with the current kubelet.
#[derive(Debug, Default)]
struct Registration {
    /// The kubelet socket we last registered with.
    kubelet: Option<FileId>,
    /// Whether that registration still holds (false after re-serving or a kubelet change).
    current: bool,
    /// When the next attempt may be made, after a failure.
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Supervisor {
    /// A supervisor for this configuration and state.
    pub fn new(config: Config, state: Arc<PluginState>, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            state,
            metrics,
        }
    }

    fn request(&self) -> RegisterRequest {
        RegisterRequest {
            version: nitrokey_proto::VERSION.to_owned(),
            endpoint: SOCKET_NAME.to_owned(),
            resource_name: self.config.resource_name.clone(),
            options: Some(server::options()),
        }
    }

    /// Serves and registers, re-doing both as the kubelet comes and goes, until `shutdown`
    /// (then stops serving and removes the socket) or a rejected registration.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SupervisorError> {
        let dir = self.config.plugin_dir.clone();
        let kubelet_socket = self.config.kubelet_socket_path();
        let socket = self.config.socket_path();

        let (fs_tx, mut fs_rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = fs_tx.send(event);
        })
        .map_err(|e| SupervisorError::Watch(dir.clone(), e))?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| SupervisorError::Watch(dir.clone(), e))?;

        let mut serving: Option<Serving> = None;
        let mut reg = Registration {
            backoff: MIN_BACKOFF,
            ..Default::default()
        };
        let mut waiting_logged = false;
        let result = loop {
            // 1. Our socket.
            let healthy = serving
                .as_ref()
                .is_some_and(|s| s.socket_intact() && !s.finished());
            if !healthy {
                if let Some(old) = serving.take() {
                    tracing::warn!(socket = %socket.display(),
                        "plugin socket removed or server stopped; serving again");
                    // The old generation winds down (ending its streams) while the new one
                    // already serves on a fresh socket at the same path.
                    tokio::spawn(old.stop());
                }
                match Serving::start(&socket, self.state.clone(), self.metrics.clone()) {
                    Ok(s) => serving = Some(s),
                    Err(e) => break Err(SupervisorError::Serve(socket.clone(), e)),
                }
                reg.current = false;
                self.metrics.set_registered(false);
            }

            // 2. Registration with the kubelet owning kubelet.sock.
            let kubelet = FileId::of(&kubelet_socket);
            match kubelet {
                None => {
                    if reg.current {
                        tracing::warn!("kubelet.sock disappeared; waiting for the kubelet");
                        reg.current = false;
                        self.metrics.set_registered(false);
                    }
                    if !waiting_logged {
                        tracing::info!(socket = %kubelet_socket.display(), "waiting for the kubelet socket");
                        waiting_logged = true;
                    }
                }
                Some(id) => {
                    waiting_logged = false;
                    let restarted = reg.kubelet.is_some_and(|old| old != id);
                    if reg.current && restarted {
                        tracing::info!(
                            "kubelet.sock re-created: the kubelet restarted; registering again"
                        );
                        reg.current = false;
                        self.metrics.set_registered(false);
                    }
                    let due = reg.retry_at.is_none_or(|at| Instant::now() >= at);
                    if !reg.current && due {
                        let attempt = tokio::select! {
                            () = shutdown.cancelled() => break Ok(()),
                            attempt = register(&kubelet_socket, self.request()) => attempt,
                        };
                        match attempt {
                            Ok(()) => {
                                Metrics::count(&self.metrics.registrations, "ok");
                                if restarted {
                                    self.metrics.kubelet_restarts.inc();
                                }
                                tracing::info!(resource = %self.config.resource_name,
                                    endpoint = SOCKET_NAME, "registered with the kubelet");
                                reg.kubelet = Some(id);
                                reg.current = true;
                                reg.retry_at = None;
                                reg.backoff = MIN_BACKOFF;
                                self.metrics.set_registered(true);
                            }
                            Err(RegisterError::Unreachable(e)) => {
                                Metrics::count(&self.metrics.registrations, "unreachable");
                                if reg.backoff < QUIET_BACKOFF {
                                    tracing::debug!(error = %e, retry_in = ?reg.backoff,
                                        "registration failed; retrying");
                                } else {
                                    tracing::warn!(error = %e, retry_in = ?reg.backoff,
                                        "registration failed; retrying");
                                }
                                reg.retry_at = Some(Instant::now() + reg.backoff);
                                reg.backoff = (reg.backoff * 2).min(MAX_BACKOFF);
                            }
                            Err(e @ RegisterError::Rejected(_)) => {
                                Metrics::count(&self.metrics.registrations, "rejected");
                                tracing::error!(error = %e, resource = %self.config.resource_name,
                                    "the kubelet rejected the device plugin; exiting");
                                break Err(SupervisorError::Rejected(e));
                            }
                        }
                        // Events that arrived while registering are looked at next round.
                        continue;
                    }
                }
            }

            // 3. Wait for something to change.
            let retry = async {
                match reg.retry_at.filter(|_| !reg.current) {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                event = fs_rx.recv() => {
                    // Take the whole burst at once: one round of checks covers it.
                    let mut batch: Vec<_> = event.into_iter().collect();
                    while let Ok(more) = fs_rx.try_recv() {
                        batch.push(more);
                    }
                    let mut kubelet_created = false;
                    for event in &batch {
                        kubelet_created |= observe(event, &kubelet_socket);
                    }
                    if kubelet_created {
                        // A new kubelet deserves an immediate attempt.
                        reg.retry_at = None;
                        reg.backoff = MIN_BACKOFF;
                    }
                }
                () = retry => {}
                () = tokio::time::sleep(RECHECK_INTERVAL) => {}
            }
        };

        drop(watcher);
        self.metrics.set_registered(false);
        if let Some(s) = serving.take() {
            s.stop().await;
            tracing::info!(socket = %socket.display(), "stopped serving; socket removed");
        }
        result
    }
}

/// Logs an event in the plugin directory; `true` if it (re)created kubelet.sock.
fn observe(event: &notify::Result<notify::Event>, kubelet_socket: &Path) -> bool {
    match event {
        Ok(event) => {
            tracing::debug!(kind = ?event.kind, paths = ?event.paths, "plugin directory event");
            matches!(event.kind, EventKind::Create(_))
                && event.paths.iter().any(|p| p == kubelet_socket)
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watch error");
            false
        }
    }
}
