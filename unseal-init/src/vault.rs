//! A small client for the parts of Vault's HTTP API this program needs: seal status, init,
//! unseal, and raft join. Works against Vault and OpenBao alike.

use crate::secret::Secret;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

/// Vault API failures. Bodies are included only for endpoints that never echo secrets.
#[derive(Debug, Error)]
pub enum VaultError {
    /// The CA certificate could not be used.
    #[error("cannot use Vault CA certificate {path}: {reason}")]
    CaCert {
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Vault did not answer (not listening yet, network).
    #[error("Vault at {address} is unreachable: {reason}")]
    Unreachable {
        /// Address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The connection broke after the request may have reached Vault (not a refused
    /// connection): Vault may have acted on it without anyone receiving its answer.
    #[error("the connection to Vault at {address} broke before {endpoint} answered: {reason}")]
    Interrupted {
        /// Endpoint.
        endpoint: &'static str,
        /// Address.
        address: String,
        /// Why.
        reason: String,
    },
    /// Vault's TLS certificate failed verification: waiting will not change it.
    #[error(
        "Vault at {address} presented a TLS certificate this program does not trust: {reason}; this will not fix itself: set vault.caCert (or VAULT_CACERT) to the CA that signed it, or fix the certificate"
    )]
    Certificate {
        /// Address.
        address: String,
        /// Why.
        reason: String,
    },
    /// Vault answered with an error status.
    #[error("Vault {endpoint} returned HTTP {status}: {message}")]
    Status {
        /// Endpoint.
        endpoint: &'static str,
        /// HTTP status.
        status: u16,
        /// Vault's `errors`, or the body.
        message: String,
    },
    /// Vault's answer could not be understood.
    #[error("Vault {endpoint} returned an unexpected body: {reason}")]
    Body {
        /// Endpoint.
        endpoint: &'static str,
        /// Why.
        reason: String,
    },
}

/// `GET /v1/sys/seal-status`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct SealStatus {
    /// Initialised.
    pub initialized: bool,
    /// Sealed.
    pub sealed: bool,
    /// Threshold.
    #[serde(default, rename = "t")]
    pub threshold: u32,
    /// Shares.
    #[serde(default, rename = "n")]
    pub shares: u32,
    /// Keys submitted towards the threshold.
    #[serde(default)]
    pub progress: u32,
}

/// The secrets `sys/init` returns.
pub struct InitResult {
    /// Unseal keys, hex.
    pub keys: Vec<Secret>,
    /// Root token.
    pub root_token: Secret,
}

impl InitResult {
    /// What does not match the request: number of keys, key format, an empty root token.
    /// Pure; the caller keeps whatever came back regardless, since it exists nowhere else.
    pub fn problems(&self, shares: u8) -> Vec<String> {
        let mut out = Vec::new();
        if self.keys.len() != usize::from(shares) {
            out.push(format!(
                "asked for {shares} unseal keys, Vault returned {}",
                self.keys.len()
            ));
        }
        for (i, k) in self.keys.iter().enumerate() {
            let v = k.expose();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(format!(
                    "unseal key {i} is not a hex string ({} characters)",
                    v.len()
                ));
            }
        }
        if self.root_token.is_empty() {
            out.push("the root token is empty".to_owned());
        }
        out
    }
}

/// `GET sys/rekey/init`: the rekey in progress, if any.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct RekeyStatus {
    /// A rekey is in progress.
    #[serde(default)]
    pub started: bool,
    /// Its nonce (every `sys/rekey/update` names it).
    #[serde(default)]
    pub nonce: String,
    /// New threshold.
    #[serde(default, rename = "t")]
    pub threshold: u32,
    /// New shares.
    #[serde(default, rename = "n")]
    pub shares: u32,
    /// Current keys submitted so far.
    #[serde(default)]
    pub progress: u32,
    /// Current keys needed.
    #[serde(default)]
    pub required: u32,
    /// Set once the new keys were handed out and wait for verification.
    #[serde(default)]
    pub verification_nonce: String,
}

/// The answer to one `sys/rekey/update`: progress, or (on the last key) the new keys.
pub struct RekeyUpdate {
    /// The new keys were handed out.
    pub complete: bool,
    /// Current keys submitted so far (when not complete).
    pub progress: u32,
    /// The new unseal keys, hex; handed out exactly once.
    pub keys: Vec<Secret>,
    /// The nonce of the verification the new keys now wait for.
    pub verification_nonce: String,
}

#[derive(Deserialize)]
struct RekeyUpdateBody {
    #[serde(default)]
    complete: bool,
    #[serde(default)]
    progress: u32,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    verification_nonce: String,
}

/// `GET sys/rekey/verify`, and the answer to a `PUT` of one new key.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct RekeyVerify {
    /// The nonce every new key must be submitted with.
    #[serde(default)]
    pub nonce: String,
    /// New keys submitted so far.
    #[serde(default)]
    pub progress: u32,
    /// New threshold.
    #[serde(default, rename = "t")]
    pub threshold: u32,
    /// The verification succeeded: Vault now uses the new keys.
    #[serde(default)]
    pub complete: bool,
}

#[derive(Deserialize)]
struct InitBody {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    root_token: String,
}

/// Largest response body read from Vault: its answers are small, and a misbehaving server or
/// proxy must not be able to make this process allocate without bound.
pub const MAX_BODY: usize = 1024 * 1024;

/// Time allowed for every request except `sys/init`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest part of an error body quoted in a message: Vault's own errors are short, and a
/// proxy's HTML page is only worth its first words.
pub const MAX_ERROR_TEXT: usize = 200;

/// `text` on one line, control characters and runs of white space as one space, cut after
/// [`MAX_ERROR_TEXT`] characters with the full length noted.
pub fn error_excerpt(text: &str) -> String {
    let flat: String = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match flat.char_indices().nth(MAX_ERROR_TEXT) {
        Some((cut, _)) => format!("{}… ({} bytes in all)", &flat[..cut], text.len()),
        None => flat,
    }
}

/// HTTP statuses a proxy or load balancer in front of Vault answers while Vault is away
/// (restarting, not yet listening): worth waiting for, like a refused connection.
pub fn is_gateway_status(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// The error and every cause below it, on one line (reqwest's own message omits the cause:
/// connection refused, certificate rejected, timed out).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[derive(Deserialize)]
struct ErrorsBody {
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Deserialize)]
struct JoinBody {
    #[serde(default)]
    joined: bool,
}

/// Client for one Vault address.
#[derive(Clone)]
pub struct VaultClient {
    http: reqwest::Client,
    address: String,
    telemetry: Option<std::sync::Arc<crate::telemetry::Telemetry>>,
}

impl VaultClient {
    /// Builds a client; with `ca_cert` (a PEM bundle, like Vault's `VAULT_CACERT`) only
    /// that CA is trusted. There is no client-wide timeout: every request sets its own, and
    /// `sys/init` has none (abandoning it would lose the keys Vault hands out).
    pub fn new(address: &str, ca_cert: Option<&Path>) -> Result<Self, VaultError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(crate::names::USER_AGENT);
        if let Some(path) = ca_cert {
            let ca_err = |reason: String| VaultError::CaCert {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no PEM certificate found".to_owned()));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| VaultError::CaCert {
            path: ca_cert.map(|p| p.display().to_string()).unwrap_or_default(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            http,
            address: address.trim_end_matches('/').to_owned(),
            telemetry: None,
        })
    }

    /// Times every request into `telemetry`.
    pub fn with_telemetry(
        mut self,
        telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
    ) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// The address this client talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.address)
    }

    fn unreachable(&self, e: reqwest::Error) -> VaultError {
        let mut reason = error_chain(&e);
        // rustls says "invalid peer certificate: UnknownIssuer" (or NotValidForName, Expired).
        if e.is_connect() && reason.to_ascii_lowercase().contains("certificate") {
            return VaultError::Certificate {
                address: self.address.clone(),
                reason,
            };
        }
        if e.is_timeout() && !reason.contains("timed out") {
            reason.push_str(" (timed out)");
        }
        VaultError::Unreachable {
            address: self.address.clone(),
            reason,
        }
    }

    /// A transport failure of `endpoint`. For `sys/init`, anything but a refused connection
    /// may have reached Vault, which then initialises whether or not its answer arrives.
    fn transport_error(&self, endpoint: &'static str, e: reqwest::Error) -> VaultError {
        if endpoint == "sys/init" && !e.is_connect() {
            return VaultError::Interrupted {
                endpoint,
                address: self.address.clone(),
                reason: error_chain(&e),
            };
        }
        self.unreachable(e)
    }

    async fn send(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
        echo_body: bool,
    ) -> Result<bytes_body::Body, VaultError> {
        let start = std::time::Instant::now();
        let result = async {
            let mut resp = req.send().await?;
            let status = resp.status();
            // Sized from Content-Length, and grown by hand otherwise: a Vec's own growth
            // would free the old buffer, part of a `sys/init` answer, without zeroing it.
            let expected = resp
                .content_length()
                .map_or(0, |n| usize::try_from(n).unwrap_or(MAX_BODY).min(MAX_BODY));
            let mut body = bytes_body::Body(Vec::with_capacity(expected));
            while let Some(chunk) = resp.chunk().await? {
                if body.0.len() + chunk.len() > MAX_BODY {
                    return Ok(Err(status));
                }
                bytes_body::append(&mut body.0, &chunk);
                // The chunk is the HTTP stack's buffer: zeroed too when no one else holds it.
                if let Ok(mut own) = chunk.try_into_mut() {
                    zeroize::Zeroize::zeroize(&mut own[..]);
                }
            }
            Ok::<_, reqwest::Error>(Ok((status, body)))
        }
        .await;
        if let Some(t) = &self.telemetry {
            t.vault_request(endpoint, start.elapsed());
        }
        let (status, body) = match result.map_err(|e| self.transport_error(endpoint, e))? {
            Ok(answer) => answer,
            Err(status) => {
                return Err(VaultError::Body {
                    endpoint,
                    reason: format!(
                        "HTTP {} with a body larger than {MAX_BODY} bytes; not read further",
                        status.as_u16()
                    ),
                });
            }
        };
        if !status.is_success() {
            let message = match serde_json::from_slice::<ErrorsBody>(&body.0) {
                Ok(b) if !b.errors.is_empty() => error_excerpt(&b.errors.join("; ")),
                _ if echo_body => error_excerpt(&String::from_utf8_lossy(&body.0)),
                _ => "(body withheld)".to_owned(),
            };
            return Err(VaultError::Status {
                endpoint,
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    /// `GET sys/seal-status`.
    /// A gateway error (502–504) from something in front of Vault counts as Vault being
    /// unreachable: it is waited for, not a failure.
    pub async fn seal_status(&self) -> Result<SealStatus, VaultError> {
        let body = match self
            .send(
                "sys/seal-status",
                self.http
                    .get(self.url("sys/seal-status"))
                    .timeout(REQUEST_TIMEOUT),
                true,
            )
            .await
        {
            Err(VaultError::Status {
                status, message, ..
            }) if is_gateway_status(status) => {
                return Err(VaultError::Unreachable {
                    address: self.address.clone(),
                    reason: format!("HTTP {status} from a proxy in front of Vault: {message}"),
                });
            }
            other => other?,
        };
        serde_json::from_slice(&body.0).map_err(|e| VaultError::Body {
            endpoint: "sys/seal-status",
            reason: e.to_string(),
        })
    }

    /// `PUT sys/init`; the response holds the unseal keys and root token. No timeout: the
    /// request is never abandoned, because Vault initialises whether or not anyone is still
    /// listening for its answer.
    pub async fn init(&self, shares: u8, threshold: u8) -> Result<InitResult, VaultError> {
        let req = self
            .http
            .put(self.url("sys/init"))
            .json(&serde_json::json!({
                "secret_shares": shares,
                "secret_threshold": threshold,
            }));
        let body = self.send("sys/init", req, false).await?;
        let parsed: InitBody = serde_json::from_slice(&body.0).map_err(|_| VaultError::Body {
            endpoint: "sys/init",
            reason: "no keys/root_token in the response".to_owned(),
        })?;
        Ok(InitResult {
            keys: parsed.keys.into_iter().map(Secret::new).collect(),
            root_token: Secret::new(parsed.root_token),
        })
    }

    /// `PUT sys/unseal` with `{"reset": true}`.
    pub async fn unseal_reset(&self) -> Result<SealStatus, VaultError> {
        let req = self
            .http
            .put(self.url("sys/unseal"))
            .timeout(REQUEST_TIMEOUT)
            .json(&serde_json::json!({ "reset": true }));
        let body = self.send("sys/unseal", req, true).await?;
        serde_json::from_slice(&body.0).map_err(|e| VaultError::Body {
            endpoint: "sys/unseal",
            reason: e.to_string(),
        })
    }

    /// `PUT sys/unseal` with one key share.
    pub async fn unseal(&self, key: &Secret) -> Result<SealStatus, VaultError> {
        let req = self
            .http
            .put(self.url("sys/unseal"))
            .timeout(REQUEST_TIMEOUT)
            .header("content-type", "application/json")
            .body(unseal_body(key)?);
        let body = self.send("sys/unseal", req, false).await?;
        serde_json::from_slice(&body.0).map_err(|e| VaultError::Body {
            endpoint: "sys/unseal",
            reason: e.to_string(),
        })
    }

    fn parse<T: serde::de::DeserializeOwned>(
        endpoint: &'static str,
        body: &bytes_body::Body,
    ) -> Result<T, VaultError> {
        serde_json::from_slice(&body.0).map_err(|e| VaultError::Body {
            endpoint,
            reason: e.to_string(),
        })
    }

    /// `GET sys/rekey/init`.
    pub async fn rekey_status(&self) -> Result<RekeyStatus, VaultError> {
        let req = self
            .http
            .get(self.url("sys/rekey/init"))
            .timeout(REQUEST_TIMEOUT);
        let body = self.send("sys/rekey/init", req, true).await?;
        Self::parse("sys/rekey/init", &body)
    }

    /// `PUT sys/rekey/init` with verification required: the current keys stay valid until
    /// the new ones are verified.
    pub async fn rekey_init(&self, shares: u8, threshold: u8) -> Result<RekeyStatus, VaultError> {
        let req = self
            .http
            .put(self.url("sys/rekey/init"))
            .timeout(REQUEST_TIMEOUT)
            .json(&serde_json::json!({
                "secret_shares": shares,
                "secret_threshold": threshold,
                "require_verification": true,
            }));
        let body = self.send("sys/rekey/init", req, true).await?;
        Self::parse("sys/rekey/init", &body)
    }

    /// `DELETE sys/rekey/init`: cancels the rekey in progress; the current keys stay valid.
    pub async fn rekey_cancel(&self) -> Result<(), VaultError> {
        let req = self
            .http
            .delete(self.url("sys/rekey/init"))
            .timeout(REQUEST_TIMEOUT);
        self.send("sys/rekey/init", req, true).await.map(drop)
    }

    /// `PUT sys/rekey/update` with one current key. No timeout: the last one's answer is
    /// the only copy of the new keys.
    pub async fn rekey_update(&self, key: &Secret, nonce: &str) -> Result<RekeyUpdate, VaultError> {
        let req = self
            .http
            .put(self.url("sys/rekey/update"))
            .header("content-type", "application/json")
            .body(key_body(key, Some(nonce))?);
        let body = self.send("sys/rekey/update", req, false).await?;
        let parsed: RekeyUpdateBody =
            serde_json::from_slice(&body.0).map_err(|_| VaultError::Body {
                endpoint: "sys/rekey/update",
                reason: "not a rekey progress or keys answer".to_owned(),
            })?;
        Ok(RekeyUpdate {
            complete: parsed.complete,
            progress: parsed.progress,
            keys: parsed.keys.into_iter().map(Secret::new).collect(),
            verification_nonce: parsed.verification_nonce,
        })
    }

    /// `GET sys/rekey/verify`.
    pub async fn rekey_verify_status(&self) -> Result<RekeyVerify, VaultError> {
        let req = self
            .http
            .get(self.url("sys/rekey/verify"))
            .timeout(REQUEST_TIMEOUT);
        let body = self.send("sys/rekey/verify", req, true).await?;
        Self::parse("sys/rekey/verify", &body)
    }

    /// `PUT sys/rekey/verify` with one new key.
    pub async fn rekey_verify(&self, key: &Secret, nonce: &str) -> Result<RekeyVerify, VaultError> {
        let req = self
            .http
            .put(self.url("sys/rekey/verify"))
            .timeout(REQUEST_TIMEOUT)
            .header("content-type", "application/json")
            .body(key_body(key, Some(nonce))?);
        let body = self.send("sys/rekey/verify", req, false).await?;
        Self::parse("sys/rekey/verify", &body)
    }

    /// `PUT sys/storage/raft/join` towards `leader`; true when Vault reports joined.
    pub async fn raft_join(
        &self,
        leader: &str,
        leader_ca: Option<&str>,
    ) -> Result<bool, VaultError> {
        let mut payload = serde_json::json!({ "leader_api_addr": leader });
        if let Some(ca) = leader_ca {
            payload["leader_ca_cert"] = serde_json::Value::String(ca.to_owned());
        }
        let req = self
            .http
            .put(self.url("sys/storage/raft/join"))
            .timeout(REQUEST_TIMEOUT)
            .json(&payload);
        let body = self.send("sys/storage/raft/join", req, true).await?;
        let parsed: JoinBody = serde_json::from_slice(&body.0).map_err(|e| VaultError::Body {
            endpoint: "sys/storage/raft/join",
            reason: e.to_string(),
        })?;
        Ok(parsed.joined)
    }
}

/// What the Vault flow needs of Vault, so it can run against an in-memory model in tests.
pub trait VaultApi: Send + Sync {
    /// The address of this Vault, for logs and the init journal.
    fn address(&self) -> &str;

    /// `GET sys/seal-status`.
    fn seal_status(&self) -> BoxFuture<'_, Result<SealStatus, VaultError>>;

    /// `PUT sys/init`; never abandoned, since its answer is the only copy of the keys.
    fn init(&self, shares: u8, threshold: u8) -> BoxFuture<'_, Result<InitResult, VaultError>>;

    /// `PUT sys/unseal` with `{"reset": true}`.
    fn unseal_reset(&self) -> BoxFuture<'_, Result<SealStatus, VaultError>>;

    /// `PUT sys/unseal` with one key share.
    fn unseal<'a>(&'a self, key: &'a Secret) -> BoxFuture<'a, Result<SealStatus, VaultError>>;

    /// `PUT sys/storage/raft/join` towards `leader`; true when Vault reports joined.
    fn raft_join<'a>(
        &'a self,
        leader: &'a str,
        leader_ca: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, VaultError>>;

    /// `GET sys/rekey/init`.
    fn rekey_status(&self) -> BoxFuture<'_, Result<RekeyStatus, VaultError>> {
        async { Err(unsupported("sys/rekey/init")) }.boxed()
    }

    /// `PUT sys/rekey/init`, verification required.
    fn rekey_init(
        &self,
        _shares: u8,
        _threshold: u8,
    ) -> BoxFuture<'_, Result<RekeyStatus, VaultError>> {
        async { Err(unsupported("sys/rekey/init")) }.boxed()
    }

    /// `DELETE sys/rekey/init`.
    fn rekey_cancel(&self) -> BoxFuture<'_, Result<(), VaultError>> {
        async { Err(unsupported("sys/rekey/init")) }.boxed()
    }

    /// `PUT sys/rekey/update` with one current key; never abandoned.
    fn rekey_update<'a>(
        &'a self,
        _key: &'a Secret,
        _nonce: &'a str,
    ) -> BoxFuture<'a, Result<RekeyUpdate, VaultError>> {
        async { Err(unsupported("sys/rekey/update")) }.boxed()
    }

    /// `GET sys/rekey/verify`.
    fn rekey_verify_status(&self) -> BoxFuture<'_, Result<RekeyVerify, VaultError>> {
        async { Err(unsupported("sys/rekey/verify")) }.boxed()
    }

    /// `PUT sys/rekey/verify` with one new key.
    fn rekey_verify<'a>(
        &'a self,
        _key: &'a Secret,
        _nonce: &'a str,
    ) -> BoxFuture<'a, Result<RekeyVerify, VaultError>> {
        async { Err(unsupported("sys/rekey/verify")) }.boxed()
    }
}

/// What a [`VaultApi`] without the rekey endpoints answers them.
fn unsupported(endpoint: &'static str) -> VaultError {
    VaultError::Status {
        endpoint,
        status: 405,
        message: "not supported by this Vault API".to_owned(),
    }
}

impl VaultApi for VaultClient {
    fn address(&self) -> &str {
        VaultClient::address(self)
    }

    fn seal_status(&self) -> BoxFuture<'_, Result<SealStatus, VaultError>> {
        VaultClient::seal_status(self).boxed()
    }

    fn init(&self, shares: u8, threshold: u8) -> BoxFuture<'_, Result<InitResult, VaultError>> {
        VaultClient::init(self, shares, threshold).boxed()
    }

    fn unseal_reset(&self) -> BoxFuture<'_, Result<SealStatus, VaultError>> {
        VaultClient::unseal_reset(self).boxed()
    }

    fn unseal<'a>(&'a self, key: &'a Secret) -> BoxFuture<'a, Result<SealStatus, VaultError>> {
        VaultClient::unseal(self, key).boxed()
    }

    fn raft_join<'a>(
        &'a self,
        leader: &'a str,
        leader_ca: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, VaultError>> {
        VaultClient::raft_join(self, leader, leader_ca).boxed()
    }

    fn rekey_status(&self) -> BoxFuture<'_, Result<RekeyStatus, VaultError>> {
        VaultClient::rekey_status(self).boxed()
    }

    fn rekey_init(
        &self,
        shares: u8,
        threshold: u8,
    ) -> BoxFuture<'_, Result<RekeyStatus, VaultError>> {
        VaultClient::rekey_init(self, shares, threshold).boxed()
    }

    fn rekey_cancel(&self) -> BoxFuture<'_, Result<(), VaultError>> {
        VaultClient::rekey_cancel(self).boxed()
    }

    fn rekey_update<'a>(
        &'a self,
        key: &'a Secret,
        nonce: &'a str,
    ) -> BoxFuture<'a, Result<RekeyUpdate, VaultError>> {
        VaultClient::rekey_update(self, key, nonce).boxed()
    }

    fn rekey_verify_status(&self) -> BoxFuture<'_, Result<RekeyVerify, VaultError>> {
        VaultClient::rekey_verify_status(self).boxed()
    }

    fn rekey_verify<'a>(
        &'a self,
        key: &'a Secret,
        nonce: &'a str,
    ) -> BoxFuture<'a, Result<RekeyVerify, VaultError>> {
        VaultClient::rekey_verify(self, key, nonce).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_answers_are_checked_against_the_request() {
        let ok = InitResult {
            keys: vec![Secret::from("ab12"), Secret::from("cd34")],
            root_token: Secret::from("s.token"),
        };
        assert!(ok.problems(2).is_empty());
        let problems = ok.problems(3);
        assert_eq!(problems, ["asked for 3 unseal keys, Vault returned 2"]);
        let bad = InitResult {
            keys: vec![Secret::from("not hex!")],
            root_token: Secret::from(""),
        };
        let problems = bad.problems(1).join("; ");
        assert!(
            problems.contains("unseal key 0 is not a hex string"),
            "{problems}"
        );
        assert!(problems.contains("root token is empty"), "{problems}");
        assert!(
            !problems.contains("not hex!"),
            "the value itself is never shown"
        );
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error sending request")
        }
    }
    impl std::fmt::Display for Inner {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection refused")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    #[test]
    fn error_bodies_are_cut_to_one_short_line() {
        let page = format!(
            "<html>\r\n<head><title>500 Internal Server Error</title></head>\n<body>{}</body></html>",
            "x".repeat(1024 * 1024)
        );
        let cut = error_excerpt(&page);
        assert!(cut.starts_with("<html> <head><title>500 Internal"), "{cut}");
        assert!(cut.chars().count() < MAX_ERROR_TEXT + 40, "{}", cut.len());
        assert!(
            cut.ends_with(&format!("({} bytes in all)", page.len())),
            "{cut}"
        );
        assert!(!cut.contains('\n') && !cut.contains('\r'), "{cut}");
        assert_eq!(error_excerpt("Vault is sealed"), "Vault is sealed");
        // Cut on a character boundary.
        let wide = "é".repeat(MAX_ERROR_TEXT * 2);
        assert!(error_excerpt(&wide).starts_with(&"é".repeat(MAX_ERROR_TEXT)));
        assert!(is_gateway_status(502) && is_gateway_status(504));
        assert!(!is_gateway_status(500) && !is_gateway_status(501) && !is_gateway_status(505));
    }

    #[test]
    fn unreachable_reasons_carry_their_cause() {
        assert_eq!(
            error_chain(&Outer(Inner)),
            "error sending request: connection refused"
        );
    }
}

/// The JSON body of one `sys/unseal` request, in a buffer that is zeroed when the HTTP stack
/// drops its last reference to it (after the request was written). Written into room
/// reserved for the longest escaping, so it never moves and leaves no copy behind.
fn unseal_body(key: &Secret) -> Result<bytes::Bytes, VaultError> {
    let value = key.expose();
    let mut body = zeroize::Zeroizing::new(Vec::with_capacity(value.len() * 6 + 16));
    body.extend_from_slice(b"{\"key\":");
    serde_json::to_writer(&mut *body, value).map_err(|e| VaultError::Body {
        endpoint: "sys/unseal",
        reason: e.to_string(),
    })?;
    body.push(b'}');
    Ok(bytes::Bytes::from_owner(body))
}

/// The JSON body `{"key": KEY, "nonce": NONCE}` of a rekey request, built as
/// [`unseal_body`] builds its own: in reserved room, zeroed when the HTTP stack drops it.
fn key_body(key: &Secret, nonce: Option<&str>) -> Result<bytes::Bytes, VaultError> {
    let value = key.expose();
    let nonce = nonce.unwrap_or_default();
    let mut body =
        zeroize::Zeroizing::new(Vec::with_capacity(value.len() * 6 + nonce.len() * 6 + 32));
    body.extend_from_slice(b"{\"key\":");
    serde_json::to_writer(&mut *body, value)
        .and_then(|()| {
            body.extend_from_slice(b",\"nonce\":");
            serde_json::to_writer(&mut *body, nonce)
        })
        .map_err(|e| VaultError::Body {
            endpoint: "sys/rekey",
            reason: e.to_string(),
        })?;
    body.push(b'}');
    Ok(bytes::Bytes::from_owner(body))
}

mod bytes_body {
    /// A response body that is dropped without being logged.
    pub struct Body(pub Vec<u8>);

    /// Appends `more`, moving to a larger buffer by hand and zeroing the old one.
    pub fn append(buf: &mut Vec<u8>, more: &[u8]) {
        if buf.capacity() - buf.len() < more.len() {
            let mut bigger = Vec::with_capacity((buf.len() + more.len()).max(2 * buf.capacity()));
            bigger.extend_from_slice(buf);
            zeroize::Zeroize::zeroize(buf);
            *buf = bigger;
        }
        buf.extend_from_slice(more);
    }

    impl Drop for Body {
        fn drop(&mut self) {
            zeroize::Zeroize::zeroize(&mut self.0);
        }
    }
}
