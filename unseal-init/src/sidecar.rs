//! Sidecar mode's lifetime: open the token, finish any init journal, pre-flight, then pass
//! after pass — staying up when the token refuses the PIN or is not there yet.
//!
//! Exiting would hand the decision to the kubelet, which restarts a native sidecar and so
//! presents the same wrong PIN again until the token blocks it. Here a refused PIN makes the
//! sidecar unready (with the reason on `/readyz` and in `unseal_init_hsm_pin_rejected`) while
//! it stays live, and it logs in again only with a different PIN ([`crate::pin`]). A missing
//! token is waited for the same way: a stick can be plugged in at any time.

use crate::config::Config;
use crate::pin::{self, PinMemory};
use crate::runner::{self, Runner};
use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;
use crate::vault::VaultClient;
use nitrokey_common::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;

/// Runs until a stop is requested or a failure no waiting can fix; PIN failures and a lost
/// token are waited out.
pub async fn run(
    mut cfg: Config,
    telemetry: Arc<Telemetry>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut pins = PinMemory::new(cfg.hsm.pin.take());
    let pin_file = cfg.hsm.pin_file.clone();
    let mut pauses = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        cfg.hsm.pin = pins.in_use().cloned();
        let result = session(&cfg, &telemetry, &shutdown).await;
        // Everything holding this PIN (token session, keyring, runner) is gone by now.
        cfg.hsm.pin = None;
        let err = match result {
            Ok(()) => return Ok(()),
            // Lost keys end the program with an error even during a stop: exiting 0 would
            // report success.
            Err(e) if fatal(&e) => return Err(e),
            Err(_) if shutdown.requested() => return Ok(()),
            Err(e) => e,
        };
        let Some(failure) = pin::pin_failure(&err) else {
            if transient(&err) {
                let pause = pauses.next();
                tracing::warn!(error = %format!("{err:#}"), retry_in = ?pause, "the HSM token is unavailable; opening it again");
                telemetry.token_problem(Some("HSM token unavailable"));
                if shutdown.sleep_or_stop(pause).await.is_stop() {
                    return Ok(());
                }
                continue;
            }
            return Err(err);
        };
        pins.failed(failure);
        telemetry.pin_problem(Some(failure.reason()));
        let waiting = match &pin_file {
            Some(path) => format!(
                "waiting for the PIN file {} to hold a different PIN",
                path.display()
            ),
            None => {
                "the PIN cannot change while running; waiting to be restarted with a corrected PIN"
                    .to_owned()
            }
        };
        tracing::error!(
            error = %format!("{err:#}"),
            "cannot log in to the HSM and will not retry this PIN; {waiting} (/readyz reports not ready meanwhile)"
        );
        if !pin::wait_for_new_pin(&mut pins, pin_file.as_deref(), &telemetry, &shutdown).await {
            return Ok(());
        }
        telemetry.pin_problem(None);
    }
}

/// True for failures no restart or wait can undo (keys lost).
fn fatal(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<runner::PassError>()
            .is_some_and(runner::PassError::is_fatal)
    })
}

/// True when the token was there and went away (or its module needs re-opening): worth
/// another try rather than an exit.
fn transient(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<crate::hsm::HsmError>()
            .is_some_and(crate::hsm::HsmError::is_transient)
            || e.downcast_ref::<runner::PassError>()
                .is_some_and(runner::PassError::suspects_token)
    })
}

/// One logged-in session: token and key store, journal and pre-flight, then the pass loop.
async fn session(
    cfg: &Config,
    telemetry: &Arc<Telemetry>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let opened = runner::open_keyring(cfg, Arc::clone(telemetry), shutdown, None).await?;
    telemetry.token_problem(None);
    let vault = VaultClient::new(&cfg.vault.address, cfg.vault.ca_cert.as_deref())?
        .with_telemetry(Arc::clone(telemetry));
    let runner = Runner::new(
        cfg.clone(),
        Arc::new(vault),
        opened.keyring,
        Some(opened.hsm),
        Arc::clone(telemetry),
        shutdown.clone(),
    )
    .guarding_the_store();
    // A Secret found deleted at start (Vault already initialised) is waited for: restoring it
    // from a backup is what fixes it, and a restart would only ask again.
    // At most 30 s: `/healthz` expects a heartbeat within a minute before the pass loop runs.
    let mut pauses = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match runner.start().await {
            Err(runner::PassError::StoreMissing { store, .. }) if !shutdown.requested() => {
                tracing::debug!(
                    store = store.as_str(),
                    "waiting for the key store to be restored"
                );
                telemetry.heartbeat();
                if shutdown.sleep_or_stop(pauses.next()).await.is_stop() {
                    return Ok(());
                }
            }
            other => break other?,
        }
    }
    runner.watch().await?;
    Ok(())
}
