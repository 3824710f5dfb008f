//! The HTTP endpoint on `metricsAddress`: `/metrics` (Prometheus text), `/healthz` (200 while
//! the gRPC server is serving) and `/readyz` (200 once registered with the kubelet). The
//! server is the one both programs share ([`nitrokey_common::health`]); the answers are here.

use std::net::SocketAddr;
use std::sync::Arc;

use nitrokey_common::health::{self, Probes};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Binds `address` and serves the endpoints until `shutdown` is cancelled. Returns the bound
/// address (useful with port 0) once listening.
pub async fn start(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    health::serve(address, metrics, shutdown.cancelled_owned()).await
}

impl Probes for Metrics {
    fn metrics(&self) -> String {
        self.encode()
    }

    fn live(&self) -> Result<String, String> {
        if let Some(reason) = self.failure() {
            Err(reason.to_string())
        } else if self.serving() {
            Ok("ok".to_owned())
        } else {
            Err("device plugin gRPC server is not serving".to_owned())
        }
    }

    fn ready(&self) -> Result<String, String> {
        if self.registered() {
            Ok("ok".to_owned())
        } else {
            Err("not registered with the kubelet".to_owned())
        }
    }
}
