//! The Kubernetes API client of replug recovery and node labels: the `kube` client configured
//! from `KUBECONFIG` or the pod's service account, with a User-Agent naming this program on
//! every request and a bound on every answer, so that an API server that stops answering
//! cannot hold up the task waiting for it.

use std::time::Duration;

use http::HeaderValue;
use http::header::USER_AGENT;
use kube::{Client, Config};

use crate::names::USER_AGENT as AGENT;

/// Longest wait for an answer of the API server (none of the calls made here streams).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the client retries answers the API server calls transient (429, 503, 504) by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retries {
    /// kube's own retry with backoff: for calls whose caller just wants them done.
    Client,
    /// None: every answer comes back at once. Evictions need this: a PodDisruptionBudget
    /// refuses them with 429, which kube's retry would otherwise retry for the caller, blocking
    /// it and hiding the refusal from the plugin's own retry, log and metric.
    Caller,
}

/// A client from the environment's configuration; `retries` says who retries 429s.
pub async fn connect(retries: Retries) -> Result<Client, kube::Error> {
    let mut config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    config
        .headers
        .push((USER_AGENT, HeaderValue::from_static(AGENT)));
    config.read_timeout = Some(ANSWER_TIMEOUT);
    // Counted from the request, not from when a pooled connection went idle.
    config.reset_reader_on_write = true;
    config.default_retry = retries == Retries::Client;
    Client::try_from(config)
}
