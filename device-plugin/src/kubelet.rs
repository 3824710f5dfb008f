//! Registration with the kubelet and the watch that keeps it registered.
//!
//! The decisions are a pure state machine, [`next_action`]: it is told what happened
//! ([`Event`]: what the device-plugin directory looks like now, how a `Register` call ended,
//! a timer) and answers what to do ([`Action`]). [`Supervisor::run`] only carries actions out
//! and turns file-system changes, results and timers into events.
//!
//! The rules:
//!
//! 1. *Our socket is the one we bound.* If it vanished (a restarting kubelet deletes every
//!    socket in the directory) the server is restarted on a fresh socket, and the
//!    registration is void.
//! 2. *We are registered with the kubelet that owns the current `kubelet.sock`.* A new
//!    `kubelet.sock` (another inode) voids the registration. `Register` is sent only after a
//!    connect to the socket succeeds: a `kubelet.sock` left behind by a dead kubelet refuses
//!    connections, and so does a new one in the instant between its creation and the
//!    kubelet's `listen`. Such a refusal is the normal course of a restart: it is retried
//!    within milliseconds, at once when a new `kubelet.sock` appears, and is neither logged
//!    above debug level nor counted as a failed registration.
//! 3. A kubelet that accepted the connection but failed the call, and still accepts
//!    connections, is retried with backoff and counted as `unreachable` (one that stopped
//!    listening died during the call: rule 2); one that answered with an error rejected the
//!    plugin, which ends the process, as the device-plugin API asks.
//!
//! The server always runs before `Register` is sent: the kubelet dials the plugin back and
//! calls `GetDevicePluginOptions` before it answers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use nitrokey_proto::v1beta1::RegisterRequest;
use nitrokey_proto::v1beta1::registration_client::RegistrationClient;
use notify::{RecursiveMode, Watcher};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Endpoint, Uri};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::names::SOCKET_NAME;
use crate::server::{self, FileId, Serving};
use crate::state::PluginState;

/// How long one `Register` call may take (the kubelet's own dial-back allows 10 s).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// First retry after `kubelet.sock` refused the connection: the kubelet is about to listen.
const MIN_NOT_LISTENING_BACKOFF: Duration = Duration::from_millis(1);
/// First retry after a kubelet that accepted the connection failed the call.
const MIN_FAILURE_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Safety-net re-check interval, in case a file-system event was missed.
const RECHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Why `Register` did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Nothing accepts connections on `kubelet.sock` (missing, left by a dead kubelet, or not
    /// listening yet): the kubelet is starting or restarting.
    #[error("nothing listens on kubelet.sock: {0}")]
    NotListening(String),
    /// The kubelet accepted the connection but the call failed (timed out, cancelled): retry.
    #[error("kubelet unreachable: {0}")]
    Unreachable(String),
    /// The kubelet could not dial the plugin's socket back (or call it) during `Register`:
    /// our socket is not what it should be; serve again and retry.
    #[error("the kubelet could not reach the plugin's socket: {0}")]
    DialBack(String),
    /// The kubelet answered with an error: the plugin is not wanted as configured.
    #[error("kubelet rejected the registration: {0}")]
    Rejected(String),
    /// A new `kubelet.sock` appeared (or the plugin's socket went) before or while the call
    /// was in flight; it was abandoned.
    #[error("kubelet.sock was replaced during the call")]
    Superseded,
}

/// Prefixes of the kubelet's `Register` errors about dialling the plugin back (kubelet
/// `devicemanager`: errFailedToDialDevicePlugin, and the failed `GetDevicePluginOptions`).
const DIAL_BACK_ERRORS: [&str; 2] = [
    "failed to dial device plugin",
    "failed to get device plugin options",
];

/// What ends the supervisor with a failure.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The kubelet rejected the registration.
    #[error("kubelet rejected the registration: {0}")]
    Rejected(String),
    /// The plugin socket could not be served.
    #[error("cannot serve on {0}: {1}")]
    Serve(PathBuf, std::io::Error),
    /// The device-plugin directory cannot be watched.
    #[error("cannot watch {0}: {1}")]
    Watch(PathBuf, notify::Error),
}

/// What the supervisor knows about the server and the kubelet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SupervisorState {
    /// A server generation serves on a socket that is still the one it bound.
    pub serving: bool,
    /// The current `kubelet.sock`, if there is one.
    pub kubelet: Option<FileId>,
    /// The `kubelet.sock` the current registration was made with (`None`: not registered).
    pub registered: Option<FileId>,
    /// The `kubelet.sock` of the last successful registration, even if it lapsed since.
    pub last_registered: Option<FileId>,
    /// Failed attempts in a row on the current `kubelet.sock`.
    pub failures: u32,
    /// A retry is scheduled; no attempt before it is due (or a new `kubelet.sock` appears).
    pub retry_pending: bool,
    /// Kubelet restarts seen: a new `kubelet.sock` after a registration, whether or not the
    /// plugin managed to register with each (a kubelet may restart again before it answers).
    pub kubelet_restarts: u64,
}

/// Something the supervisor learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The device-plugin directory as it is now (at start, after a change, periodically).
    Observed {
        /// Our socket is still the file our server bound, and the server runs.
        plugin_socket_intact: bool,
        /// The identity of `kubelet.sock`, if it exists.
        kubelet: Option<FileId>,
    },
    /// A new server generation serves on a fresh socket.
    Served,
    /// `Register` succeeded.
    Registered,
    /// Connecting to `kubelet.sock` was refused or it vanished.
    NotListening,
    /// The kubelet accepted the connection but the call failed.
    Unreachable,
    /// The kubelet could not dial our socket back during `Register`.
    DialBackFailed,
    /// The kubelet answered `Register` with an error.
    Rejected(String),
    /// The scheduled retry is due.
    RetryDue,
    /// SIGTERM or SIGINT.
    Shutdown,
}

/// What the supervisor should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Serve on a fresh socket (stopping any previous generation).
    Serve,
    /// Call `Register`; `after_restart` when the kubelet is a new one since the last success.
    Register {
        /// The registration follows a kubelet restart.
        after_restart: bool,
    },
    /// Retry after this delay (nothing else to do until then or until something changes).
    RetryIn(Duration),
    /// Nothing to do until something changes.
    Wait,
    /// Stop: `None` for a normal shutdown, else why the kubelet rejected the plugin.
    Exit(Option<String>),
}

/// The supervisor's decision: updates `state` with `event` and says what to do. Pure.
pub fn next_action(state: &mut SupervisorState, event: Event) -> Action {
    match event {
        Event::Observed {
            plugin_socket_intact,
            kubelet,
        } => {
            if !plugin_socket_intact {
                state.serving = false;
                state.registered = None;
            }
            if kubelet != state.kubelet {
                if kubelet.is_some() && state.last_registered.is_some_and(|l| Some(l) != kubelet) {
                    state.kubelet_restarts += 1;
                }
                // Another kubelet (or none): earlier failures and waits were about the old one.
                state.kubelet = kubelet;
                state.failures = 0;
                state.retry_pending = false;
            }
            if state.registered.is_some() && state.registered != state.kubelet {
                state.registered = None;
            }
        }
        Event::Served => {
            state.serving = true;
            state.registered = None;
        }
        Event::Registered => {
            state.registered = state.kubelet;
            state.last_registered = state.kubelet;
            state.failures = 0;
            state.retry_pending = false;
        }
        Event::NotListening | Event::Unreachable => {
            let first = if event == Event::NotListening {
                MIN_NOT_LISTENING_BACKOFF
            } else {
                MIN_FAILURE_BACKOFF
            };
            let delay = first
                .saturating_mul(1 << state.failures.min(16))
                .min(MAX_BACKOFF);
            state.failures = state.failures.saturating_add(1);
            state.retry_pending = true;
            return Action::RetryIn(delay);
        }
        Event::DialBackFailed => {
            // Serve on a fresh socket, then register again once the retry is due.
            state.serving = false;
            state.registered = None;
            let delay = MIN_FAILURE_BACKOFF
                .saturating_mul(1 << state.failures.min(16))
                .min(MAX_BACKOFF);
            state.failures = state.failures.saturating_add(1);
            state.retry_pending = true;
            return Action::RetryIn(delay);
        }
        Event::Rejected(reason) => return Action::Exit(Some(reason)),
        Event::RetryDue => state.retry_pending = false,
        Event::Shutdown => return Action::Exit(None),
    }
    if !state.serving {
        return Action::Serve;
    }
    match state.kubelet {
        Some(kubelet) if state.registered != Some(kubelet) && !state.retry_pending => {
            Action::Register {
                after_restart: state.last_registered.is_some_and(|last| last != kubelet),
            }
        }
        _ => Action::Wait,
    }
}

/// Connection attempts made at once when `kubelet.sock` refuses, before the timer's backoff
/// takes over.
const QUICK_CONNECT_ATTEMPTS: u32 = 64;

/// Connects to `path`. A socket seen the moment it was bound may refuse for the microseconds
/// until its owner calls `listen`; the timer's 1 ms resolution would make that a millisecond
/// or two, so a refusal is retried at once a few times, yielding the CPU in between (the
/// kubelet may be waiting for this core). A socket left by a dead kubelet still refuses, at a
/// cost of well under a millisecond.
async fn connect_listening(path: &Path) -> std::io::Result<UnixStream> {
    let mut attempt = 1;
    loop {
        match UnixStream::connect(path).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && attempt < QUICK_CONNECT_ATTEMPTS =>
            {
                attempt += 1;
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

/// Calls `Register` on the kubelet socket at `kubelet_socket`. The connection is made first,
/// on its own, so that a socket nobody listens on is told apart from a failed call.
///
/// Once connected, `still_current()` is asked whether the call is still the one to make (the
/// kubelet socket the caller last looked at, and the plugin's own socket intact); if not, it
/// is abandoned as [`RegisterError::Superseded`]. A kubelet deletes every socket in the
/// directory before it listens, so a kubelet that started since the caller's last look has
/// deleted ours by the time the connection succeeds: announcing that socket would fail.
pub async fn register(
    kubelet_socket: &Path,
    request: RegisterRequest,
    still_current: impl Fn() -> bool,
) -> Result<(), RegisterError> {
    let stream = connect_listening(kubelet_socket)
        .await
        .map_err(|e| RegisterError::NotListening(e.to_string()))?;
    if !still_current() {
        return Err(RegisterError::Superseded);
    }
    let path = kubelet_socket.to_owned();
    let first = Arc::new(Mutex::new(Some(stream)));
    // The URI is required by tonic but unused: the connector hands over the connection made
    // above (and dials the socket again should tonic ever reconnect).
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .timeout(REGISTER_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            let first = first.lock().unwrap_or_else(|e| e.into_inner()).take();
            async move {
                match first {
                    Some(stream) => Ok(TokioIo::new(stream)),
                    None => UnixStream::connect(path).await.map(TokioIo::new),
                }
            }
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
            | Code::ResourceExhausted => {
                let reason = format!("{:?}: {}", status.code(), status.message());
                // A kubelet that died during the call (a restart) no longer listens: that is
                // the normal course of a restart, not a failed registration.
                match UnixStream::connect(kubelet_socket).await {
                    Ok(_) => Err(RegisterError::Unreachable(reason)),
                    Err(e) => Err(RegisterError::NotListening(format!(
                        "{reason}; the kubelet went away during the call: {e}"
                    ))),
                }
            }
            _ if DIAL_BACK_ERRORS
                .iter()
                .any(|p| status.message().contains(p)) =>
            {
                Err(RegisterError::DialBack(status.message().to_owned()))
            }
            _ => Err(RegisterError::Rejected(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        },
    }
}

/// Logs a burst of file-system events (the first one given, the rest still queued): one look
/// at the directory afterwards covers them all.
fn drain(
    first: Option<notify::Result<notify::Event>>,
    fs_rx: &mut mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
) {
    for event in first
        .into_iter()
        .chain(std::iter::from_fn(|| fs_rx.try_recv().ok()))
    {
        match event {
            Ok(e) => tracing::debug!(kind = ?e.kind, paths = ?e.paths, "plugin directory event"),
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        }
    }
}

/// A gRPC channel over the unix socket at `path` (for the kubelet's other APIs).
pub async fn unix_channel(path: &Path) -> Result<tonic::transport::Channel, String> {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| error_chain(&e))
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
        let mut state = SupervisorState::default();
        let mut retry_at: Option<Instant> = None;
        let mut waiting_logged = false;
        // Directory events consumed while a Register call was in flight: look again before
        // waiting (our own socket may have gone meanwhile).
        let mut look_again = false;
        // kubelet.sock is looked at first: a restarting kubelet deletes our socket before it
        // creates its new one, so a new kubelet.sock seen here means our socket's deletion (if
        // any) is visible to the second look.
        let observe = |serving: &Option<Serving>| {
            let kubelet = FileId::of(&kubelet_socket);
            Event::Observed {
                plugin_socket_intact: serving
                    .as_ref()
                    .is_some_and(|s| s.socket_intact() && !s.finished()),
                kubelet,
            }
        };
        let mut event = observe(&serving);
        let result = loop {
            let restarts_before = state.kubelet_restarts;
            let action = next_action(&mut state, event);
            self.metrics
                .kubelet_restarts
                .inc_by(state.kubelet_restarts - restarts_before);
            self.metrics.set_registered(state.registered.is_some());
            if !state.retry_pending {
                retry_at = None;
            }
            if state.kubelet.is_none() && !waiting_logged {
                tracing::info!(socket = %kubelet_socket.display(), "waiting for the kubelet socket");
                waiting_logged = true;
            } else if state.kubelet.is_some() {
                waiting_logged = false;
            }
            event = match action {
                Action::Exit(None) => break Ok(()),
                Action::Exit(Some(reason)) => break Err(SupervisorError::Rejected(reason)),
                Action::Serve => {
                    if let Some(old) = serving.take() {
                        if old.finished() {
                            tracing::warn!(socket = %socket.display(),
                                "the gRPC server stopped; serving again");
                        } else {
                            tracing::info!(socket = %socket.display(),
                                "serving again on a fresh socket (the kubelet restarts?)");
                        }
                        // The old generation winds down (ending its streams) while the new one
                        // already serves on a fresh socket at the same path.
                        tokio::spawn(old.stop());
                    }
                    match Serving::start(&socket, self.state.clone(), self.metrics.clone()) {
                        Ok(s) => serving = Some(s),
                        Err(e) => break Err(SupervisorError::Serve(socket.clone(), e)),
                    }
                    Event::Served
                }
                Action::Register { after_restart } => {
                    let target = state.kubelet;
                    let current = || {
                        FileId::of(&kubelet_socket) == target
                            && serving.as_ref().is_some_and(Serving::socket_intact)
                    };
                    let call = register(&kubelet_socket, self.request(), current);
                    tokio::pin!(call);
                    // A kubelet that restarts while the call is in flight may never answer
                    // it, or answer with an error about a socket it deleted itself: a new
                    // kubelet.sock abandons the call for the new kubelet.
                    let attempt = loop {
                        tokio::select! {
                            () = shutdown.cancelled() => break None,
                            attempt = &mut call => break Some(attempt),
                            event = fs_rx.recv() => {
                                drain(event, &mut fs_rx);
                                look_again = true;
                                if FileId::of(&kubelet_socket) != target {
                                    tracing::debug!("kubelet.sock replaced while registering");
                                    break Some(Err(RegisterError::Superseded));
                                }
                            }
                        }
                    };
                    match attempt {
                        None => break Ok(()),
                        Some(Err(RegisterError::Superseded)) => observe(&serving),
                        Some(Err(RegisterError::Unreachable(_) | RegisterError::DialBack(_)))
                            if FileId::of(&kubelet_socket) != target =>
                        {
                            tracing::debug!(
                                "registration failed; kubelet.sock was replaced meanwhile"
                            );
                            observe(&serving)
                        }
                        Some(attempt) => self.registered(attempt, after_restart),
                    }
                }
                Action::RetryIn(_) | Action::Wait if std::mem::take(&mut look_again) => {
                    if let Action::RetryIn(delay) = action {
                        retry_at = Some(Instant::now() + delay);
                    }
                    observe(&serving)
                }
                Action::RetryIn(delay) => {
                    retry_at = Some(Instant::now() + delay);
                    self.wait(&shutdown, &mut fs_rx, retry_at, &observe, &serving)
                        .await
                }
                Action::Wait => {
                    self.wait(&shutdown, &mut fs_rx, retry_at, &observe, &serving)
                        .await
                }
            };
        };

        drop(watcher);
        self.metrics.set_registered(false);
        if let Some(s) = serving.take() {
            s.stop().await;
            tracing::info!(socket = %socket.display(), "stopped serving; socket removed");
        }
        result
    }

    /// Logs and counts the outcome of a `Register` call and turns it into an event.
    fn registered(&self, attempt: Result<(), RegisterError>, after_restart: bool) -> Event {
        match attempt {
            Ok(()) => {
                Metrics::count(&self.metrics.registrations, "ok");
                if after_restart {
                    tracing::info!(resource = %self.config.resource_name, endpoint = SOCKET_NAME,
                        "the kubelet restarted; registered again");
                } else {
                    tracing::info!(resource = %self.config.resource_name, endpoint = SOCKET_NAME,
                        "registered with the kubelet");
                }
                Event::Registered
            }
            Err(RegisterError::NotListening(e)) => {
                tracing::debug!(error = %e, "kubelet.sock is not accepting connections yet");
                Event::NotListening
            }
            Err(RegisterError::Unreachable(e)) => {
                Metrics::count(&self.metrics.registrations, "unreachable");
                tracing::warn!(error = %e, "registration failed; retrying");
                Event::Unreachable
            }
            Err(RegisterError::DialBack(e)) => {
                Metrics::count(&self.metrics.registrations, "unreachable");
                tracing::warn!(error = %e, "the kubelet could not dial the plugin back; serving again");
                Event::DialBackFailed
            }
            Err(RegisterError::Superseded) => Event::NotListening,
            Err(RegisterError::Rejected(e)) => {
                Metrics::count(&self.metrics.registrations, "rejected");
                tracing::error!(error = %e, resource = %self.config.resource_name,
                    "the kubelet rejected the device plugin; exiting");
                Event::Rejected(e)
            }
        }
    }

    /// Waits for a change in the directory, the retry timer, the safety-net interval or
    /// shutdown.
    async fn wait(
        &self,
        shutdown: &CancellationToken,
        fs_rx: &mut mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
        retry_at: Option<Instant>,
        observe: &impl Fn(&Option<Serving>) -> Event,
        serving: &Option<Serving>,
    ) -> Event {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => Event::Shutdown,
            event = fs_rx.recv() => {
                drain(event, fs_rx);
                observe(serving)
            }
            () = retry => Event::RetryDue,
            () = tokio::time::sleep(RECHECK_INTERVAL) => observe(serving),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: FileId = FileId::from_parts(1, 10, 100, 0);
    const NEW: FileId = FileId::from_parts(1, 11, 200, 0);

    fn seen(intact: bool, kubelet: Option<FileId>) -> Event {
        Event::Observed {
            plugin_socket_intact: intact,
            kubelet,
        }
    }

    /// Serving and registered with `OLD`.
    fn registered() -> SupervisorState {
        let mut s = SupervisorState::default();
        assert_eq!(next_action(&mut s, seen(false, Some(OLD))), Action::Serve);
        assert_eq!(
            next_action(&mut s, Event::Served),
            Action::Register {
                after_restart: false
            }
        );
        assert_eq!(next_action(&mut s, Event::Registered), Action::Wait);
        assert_eq!(s.registered, Some(OLD));
        s
    }

    #[test]
    fn serves_before_registering_and_waits_for_the_kubelet() {
        let mut s = SupervisorState::default();
        assert_eq!(next_action(&mut s, seen(false, None)), Action::Serve);
        assert_eq!(next_action(&mut s, Event::Served), Action::Wait);
        assert_eq!(next_action(&mut s, seen(true, None)), Action::Wait);
        assert_eq!(
            next_action(&mut s, seen(true, Some(OLD))),
            Action::Register {
                after_restart: false
            }
        );
    }

    #[test]
    fn nothing_to_do_while_registered() {
        let mut s = registered();
        assert_eq!(next_action(&mut s, seen(true, Some(OLD))), Action::Wait);
        assert_eq!(next_action(&mut s, Event::RetryDue), Action::Wait);
    }

    #[test]
    fn kubelet_restart_reserves_probes_and_registers_once_with_the_new_socket() {
        let mut s = registered();
        // The new kubelet deleted our socket first; kubelet.sock is still the dead one.
        assert_eq!(next_action(&mut s, seen(false, Some(OLD))), Action::Serve);
        assert_eq!(s.registered, None);
        assert_eq!(
            next_action(&mut s, Event::Served),
            Action::Register {
                after_restart: false
            }
        );
        // The dead socket refuses the connection: a quick, quiet retry.
        assert_eq!(
            next_action(&mut s, Event::NotListening),
            Action::RetryIn(Duration::from_millis(1))
        );
        assert_eq!(next_action(&mut s, seen(true, None)), Action::Wait);
        // The new kubelet.sock: at once, without waiting for the retry.
        assert_eq!(
            next_action(&mut s, seen(true, Some(NEW))),
            Action::Register {
                after_restart: true
            }
        );
        assert_eq!(s.failures, 0);
        assert_eq!(next_action(&mut s, Event::Registered), Action::Wait);
        assert_eq!(s.registered, Some(NEW));
        assert_eq!(s.last_registered, Some(NEW));
        assert_eq!(s.kubelet_restarts, 1);
    }

    #[test]
    fn every_new_kubelet_counts_as_a_restart_even_one_gone_before_it_answered() {
        const NEWER: FileId = FileId::from_parts(1, 12, 300, 0);
        let mut s = registered();
        assert_eq!(s.kubelet_restarts, 0, "the first kubelet is no restart");
        assert_eq!(next_action(&mut s, seen(false, Some(NEW))), Action::Serve);
        assert_eq!(
            next_action(&mut s, Event::Served),
            Action::Register {
                after_restart: true
            }
        );
        // NEW restarts again while our Register is in flight: the call is abandoned.
        assert_eq!(next_action(&mut s, seen(false, Some(NEWER))), Action::Serve);
        assert_eq!(
            next_action(&mut s, Event::Served),
            Action::Register {
                after_restart: true
            }
        );
        assert_eq!(next_action(&mut s, Event::Registered), Action::Wait);
        assert_eq!(s.kubelet_restarts, 2);
        // Seeing the same kubelet again, or it vanishing, is no restart.
        assert_eq!(next_action(&mut s, seen(true, Some(NEWER))), Action::Wait);
        assert_eq!(next_action(&mut s, seen(true, None)), Action::Wait);
        assert_eq!(s.kubelet_restarts, 2);
    }

    #[test]
    fn new_kubelet_socket_alone_voids_the_registration() {
        let mut s = registered();
        assert_eq!(
            next_action(&mut s, seen(true, Some(NEW))),
            Action::Register {
                after_restart: true
            }
        );
        assert_eq!(s.registered, None);
        assert!(s.serving, "our socket is intact: no need to serve again");
    }

    #[test]
    fn kubelet_socket_gone_voids_the_registration() {
        let mut s = registered();
        assert_eq!(next_action(&mut s, seen(true, None)), Action::Wait);
        assert_eq!(s.registered, None);
        // The same file back (e.g. a missed event) is not a restart.
        assert_eq!(
            next_action(&mut s, seen(true, Some(OLD))),
            Action::Register {
                after_restart: false
            }
        );
    }

    #[test]
    fn own_socket_deleted_alone_reserves_and_registers_with_the_same_kubelet() {
        let mut s = registered();
        assert_eq!(next_action(&mut s, seen(false, Some(OLD))), Action::Serve);
        assert_eq!(
            next_action(&mut s, Event::Served),
            Action::Register {
                after_restart: false
            }
        );
    }

    #[test]
    fn retries_back_off_and_wait_for_their_timer() {
        let mut s = SupervisorState::default();
        next_action(&mut s, seen(false, Some(OLD)));
        next_action(&mut s, Event::Served);
        let mut delays = Vec::new();
        for _ in 0..20 {
            match next_action(&mut s, Event::NotListening) {
                Action::RetryIn(d) => delays.push(d),
                other => panic!("{other:?}"),
            }
            // A change that is not a new kubelet.sock does not cut the wait short.
            assert_eq!(next_action(&mut s, seen(true, Some(OLD))), Action::Wait);
            assert_eq!(
                next_action(&mut s, Event::RetryDue),
                Action::Register {
                    after_restart: false
                }
            );
        }
        assert_eq!(delays[0], Duration::from_millis(1));
        assert_eq!(delays[1], Duration::from_millis(2));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*delays.last().unwrap(), MAX_BACKOFF);
        assert_eq!(
            next_action(&mut s, Event::Unreachable),
            Action::RetryIn(MAX_BACKOFF)
        );
        let mut fresh = SupervisorState::default();
        next_action(&mut fresh, seen(false, Some(OLD)));
        next_action(&mut fresh, Event::Served);
        assert_eq!(
            next_action(&mut fresh, Event::Unreachable),
            Action::RetryIn(MIN_FAILURE_BACKOFF)
        );
        assert_eq!(fresh.failures, 1);
    }

    #[test]
    fn a_failed_dial_back_reserves_then_registers_when_due() {
        let mut s = registered();
        next_action(&mut s, seen(true, Some(NEW)));
        assert_eq!(
            next_action(&mut s, Event::DialBackFailed),
            Action::RetryIn(MIN_FAILURE_BACKOFF)
        );
        assert!(!s.serving);
        // Whatever arrives first, the socket is served again before anything else ...
        assert_eq!(next_action(&mut s, seen(false, Some(NEW))), Action::Serve);
        // ... and the registration waits for the retry.
        assert_eq!(next_action(&mut s, Event::Served), Action::Wait);
        assert_eq!(
            next_action(&mut s, Event::RetryDue),
            Action::Register {
                after_restart: true
            }
        );
    }

    #[test]
    fn rejection_and_shutdown_end_it() {
        let mut s = registered();
        assert_eq!(
            next_action(&mut s, Event::Rejected("name taken".into())),
            Action::Exit(Some("name taken".into()))
        );
        assert_eq!(next_action(&mut s, Event::Shutdown), Action::Exit(None));
    }
}
