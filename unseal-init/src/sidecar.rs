//! Sidecar mode's lifetime: open the token, pre-flight, then pass after pass — and, when the
//! token refuses the user PIN, stay up instead of exiting.
//!
//! Exiting would hand the decision to the kubelet, which restarts a native sidecar and so
//! presents the same wrong PIN again until the token blocks it. Here a refused PIN makes the
//! sidecar unready (with the reason on `/readyz` and in `unseal_init_hsm_pin_rejected`) while
//! it stays live, and it logs in again only with a different PIN ([`crate::pin`]).

use crate::config::Config;
use crate::pin::{self, PinMemory};
use crate::runner::{self, Runner};
use crate::telemetry::Telemetry;
use crate::vault::VaultClient;
use std::sync::Arc;

/// Runs until a failure that is not about the PIN; PIN failures are waited out.
pub async fn run(mut cfg: Config, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let mut pins = PinMemory::new(cfg.hsm.pin.take());
    let pin_file = cfg.hsm.pin_file.clone();
    loop {
        cfg.hsm.pin = pins.in_use().cloned();
        let result = session(&cfg, &telemetry).await;
        // Everything holding this PIN (token session, keyring, runner) is gone by now.
        cfg.hsm.pin = None;
        let err = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let Some(failure) = pin::pin_failure(&err) else {
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
        pin::wait_for_new_pin(&mut pins, pin_file.as_deref(), &telemetry).await;
        telemetry.pin_problem(None);
    }
}

/// One logged-in session: token and key store, pre-flight, then the pass loop.
async fn session(cfg: &Config, telemetry: &Arc<Telemetry>) -> anyhow::Result<()> {
    let (_hsm, keyring) = runner::open_keyring(cfg, Arc::clone(telemetry)).await?;
    let vault = VaultClient::new(&cfg.vault.address, cfg.vault.ca_cert.as_deref())?
        .with_telemetry(Arc::clone(telemetry));
    let runner = Runner::new(cfg.clone(), vault, keyring, Arc::clone(telemetry));
    runner.preflight().await?;
    runner.watch().await
}
