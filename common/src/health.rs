//! The HTTP endpoint both programs serve on their metrics address: `/metrics` (Prometheus'
//! OpenMetrics text), `/healthz` (liveness) and `/readyz` (readiness). Each program answers
//! from its own state through [`Probes`]; the routes, status codes and content type are the
//! same for both, so one probe configuration and one scrape configuration fit either.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Content type of the OpenMetrics text format prometheus-client writes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the endpoints report. `Ok` carries the body of a 200, `Err` the reason of a 503.
pub trait Probes: Send + Sync + 'static {
    /// Every metric, encoded as OpenMetrics text.
    fn metrics(&self) -> String;
    /// Whether the process still does its work (a failure makes the kubelet restart it).
    fn live(&self) -> Result<String, String>;
    /// Whether the process has done what it is there for (registered, Vault unsealed, ...).
    fn ready(&self) -> Result<String, String>;
}

/// Binds `address` and serves the endpoints until `shutdown` completes. Returns the bound
/// address (useful with port 0) once listening.
pub async fn serve(
    address: SocketAddr,
    probes: Arc<dyn Probes>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(probes);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP endpoint failed");
        }
    });
    Ok(bound)
}

async fn metrics(State(probes): State<Arc<dyn Probes>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        probes.metrics(),
    )
}

fn answer(result: Result<String, String>) -> (StatusCode, String) {
    match result {
        Ok(body) => (StatusCode::OK, format!("{body}\n")),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn healthz(State(probes): State<Arc<dyn Probes>>) -> impl IntoResponse {
    answer(probes.live())
}

async fn readyz(State(probes): State<Arc<dyn Probes>>) -> impl IntoResponse {
    answer(probes.ready())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Flags {
        live: AtomicBool,
        ready: AtomicBool,
    }

    impl Probes for Flags {
        fn metrics(&self) -> String {
            "# TYPE up gauge\nup 1\n# EOF\n".to_owned()
        }
        fn live(&self) -> Result<String, String> {
            if self.live.load(Ordering::SeqCst) {
                Ok("ok".to_owned())
            } else {
                Err("main loop stalled".to_owned())
            }
        }
        fn ready(&self) -> Result<String, String> {
            if self.ready.load(Ordering::SeqCst) {
                Ok("ok".to_owned())
            } else {
                Err("not registered".to_owned())
            }
        }
    }

    /// One HTTP/1.1 request over a plain socket: status line and body.
    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("read");
        let status = text.lines().next().unwrap_or_default().to_owned();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn endpoints_answer_from_the_probes_and_stop_on_shutdown() {
        let probes = Arc::new(Flags {
            live: AtomicBool::new(true),
            ready: AtomicBool::new(false),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = serve(
            "127.0.0.1:0".parse().expect("address"),
            probes.clone(),
            async {
                let _ = stopped.await;
            },
        )
        .await
        .expect("serve");

        let (status, body) = get(addr, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        assert!(body.contains("up 1"), "{body}");
        assert_eq!(get(addr, "/healthz").await.0, "HTTP/1.1 200 OK");
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(body, "not registered\n");
        probes.ready.store(true, Ordering::SeqCst);
        probes.live.store(false, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.0, "HTTP/1.1 200 OK");
        assert_eq!(
            get(addr, "/healthz").await,
            (
                "HTTP/1.1 503 Service Unavailable".to_owned(),
                "main loop stalled\n".to_owned()
            )
        );
        assert!(get(addr, "/nothing").await.0.contains("404"));

        let _ = stop.send(());
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("still listening after shutdown");
    }
}
