//! Keeps the registration socket served: binds it afresh at start (a plugin deletes its old
//! socket and listens anew, which is what the kubelet's plugin watcher expects), and binds it
//! again when it disappears or is replaced while the driver runs (a node clean-up, an operator
//! emptying `plugins_registry`), so that the kubelet, which registers whatever socket appears
//! there, finds the driver again without a restart of its pod.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nitrokey_proto::pluginregistration_v1::registration_server::RegistrationServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use super::registration::Registration;

/// How often the socket is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Why a socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Creating, removing or binding failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The gRPC server failed.
    #[error("serving {0}: {1}")]
    Serve(PathBuf, tonic::transport::Error),
}

/// Binds a unix socket at `path` afresh (removing what is there).
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SocketError::Io(dir.to_path_buf(), e))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(SocketError::Io(path.to_path_buf(), e));
        }
        _ => {}
    }
    UnixListener::bind(path).map_err(|e| SocketError::Io(path.to_path_buf(), e))
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Serves `registration` on `path` until `shutdown`, binding it again whenever the socket
/// there is no longer the one bound.
pub async fn serve(
    path: PathBuf,
    registration: Registration,
    shutdown: CancellationToken,
) -> Result<(), SocketError> {
    loop {
        let listener = bind(&path)?;
        let bound = inode(&path);
        let stop = shutdown.child_token();
        let server = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(registration.clone()))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::pin!(server);
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                served = &mut server => {
                    served.map_err(|e| SocketError::Serve(path.clone(), e))?;
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    break;
                }
                _ = check.tick() => {
                    if inode(&path) != bound {
                        tracing::warn!(path = %path.display(),
                            "the registration socket was removed or replaced; serving it again");
                        stop.cancel();
                    }
                }
            }
        }
    }
}
