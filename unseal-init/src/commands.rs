//! Operator subcommands (`unseal-init hsm ...`): what the manual pkcs11-tool steps did, with
//! this program's slot selection, PIN handling and object format. Output goes to stdout and
//! never contains a secret value.

use crate::cli::HsmCommand;
use crate::config::{Config, Mode};
use crate::envelope;
use crate::hsm;
use crate::hsm_actor::HsmHandle;
use crate::keypair;
use crate::runner::open_keyring;
use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;
use crate::token_store;
use anyhow::Context;
use std::sync::Arc;

/// How often `hsm info` looks for a token while the pcscd it just started finds readers.
const INFO_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs one `hsm` subcommand. With `hsm.daemon` it starts (and on return stops) its own pcscd
/// first, as the unseal path does: OpenSC sees no reader without one.
pub async fn run(cfg: &Config, command: &HsmCommand) -> anyhow::Result<()> {
    if cfg.hsm.daemon {
        crate::pcscd::start().await?;
    }
    let telemetry = Telemetry::new();
    match command {
        HsmCommand::Info => info(cfg).await,
        HsmCommand::Keygen => keygen(cfg, telemetry).await,
        HsmCommand::List => list(cfg, telemetry).await,
        HsmCommand::Delete { label, yes } => delete(cfg, telemetry, label, *yes).await,
        HsmCommand::Migrate => migrate(cfg, telemetry).await,
    }
}

/// Library, then every slot; fails when no slot holds an initialised token, since nothing
/// else can then work. With a pcscd of its own (which needs a moment to find the reader and
/// power the card), waits up to `hsm.tokenWaitTimeout` for a token first.
async fn info(cfg: &Config) -> anyhow::Result<()> {
    let ctx = hsm::load_module(&cfg.hsm.module_path)?;
    let usable = |ctx: &hsm::Module| {
        ctx.get_slots_with_token()
            .map(|slots| {
                slots
                    .into_iter()
                    .any(|s| ctx.get_token_info(s).is_ok_and(|t| t.token_initialized()))
            })
            .unwrap_or(false)
    };
    if cfg.hsm.daemon {
        let give_up = tokio::time::Instant::now() + cfg.hsm.token_wait_timeout;
        while !usable(&ctx) && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(INFO_POLL).await;
        }
    }
    let lib = ctx.get_library_info().context("C_GetInfo")?;
    println!(
        "Library: {} {} (Cryptoki {}), {}",
        lib.library_description(),
        lib.library_version(),
        lib.cryptoki_version(),
        lib.manufacturer_id()
    );
    let slots = ctx.get_all_slots().context("C_GetSlotList")?;
    let mut with_token = 0;
    for &slot in &slots {
        let Ok(si) = ctx.get_slot_info(slot) else {
            continue;
        };
        let manufacturer = si.manufacturer_id().trim().to_owned();
        if manufacturer.is_empty() {
            println!("Slot {}: {}", slot.id(), si.slot_description().trim());
        } else {
            println!(
                "Slot {} ({manufacturer}): {}",
                slot.id(),
                si.slot_description().trim()
            );
        }
        if !si.token_present() {
            println!("  no token");
            continue;
        }
        if let Ok(t) = ctx.get_token_info(slot) {
            if t.token_initialized() {
                with_token += 1;
            }
            println!("  token label:   {}", t.label().trim());
            println!("  manufacturer:  {}", t.manufacturer_id().trim());
            println!(
                "  model:         {}",
                t.model()
                    .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            );
            println!("  serial:        {}", t.serial_number().trim());
            let mut flags = Vec::new();
            if t.token_initialized() {
                flags.push("initialized");
            }
            if t.login_required() {
                flags.push("login required");
            }
            if t.user_pin_count_low() {
                flags.push("user PIN count low");
            }
            if t.user_pin_final_try() {
                flags.push("user PIN final try");
            }
            if t.user_pin_locked() {
                flags.push("user PIN locked");
            }
            println!("  flags:         {}", flags.join(", "));
            if let Some(fp) = keypair::public_fingerprint(&ctx, slot, &cfg.hsm.key_label) {
                println!("  key pair:      {} {fp}", cfg.hsm.key_label);
            }
        }
        if let Ok(mechs) = ctx.get_mechanism_list(slot) {
            let names: Vec<String> = mechs.iter().map(|m| m.to_string()).collect();
            println!("  mechanisms ({}): {}", names.len(), names.join(", "));
        }
    }
    if with_token == 0 {
        let waited = if cfg.hsm.daemon {
            format!(
                " after waiting {} (hsm.tokenWaitTimeout)",
                humantime::format_duration(cfg.hsm.token_wait_timeout)
            )
        } else {
            String::new()
        };
        anyhow::bail!(
            "no usable HSM slot{waited}: {} slot(s) listed, none with an initialised token (is the stick plugged in{}?)",
            slots.len(),
            if cfg.hsm.daemon {
                " and passed to the container"
            } else {
                ", and pcscd running (hsm.daemon starts one)"
            }
        );
    }
    Ok(())
}

/// Starts the HSM thread, waits (up to `hsm.tokenWaitTimeout`) for the token and logs in.
async fn logged_in(cfg: &Config, telemetry: Arc<Telemetry>) -> anyhow::Result<HsmHandle> {
    let hsm = HsmHandle::start(&cfg.hsm, telemetry).await?;
    hsm.wait_for_token(Some(cfg.hsm.token_wait_timeout), &Shutdown::new(), |_| {})
        .await?;
    hsm.with(|h| h.login()).await??;
    Ok(hsm)
}

/// The key store as a subcommand sees it: waiting for the token as `--once` does.
async fn open_for_command(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
) -> anyhow::Result<crate::runner::Opened> {
    open_keyring(
        cfg,
        telemetry,
        &Shutdown::new(),
        Some(cfg.hsm.token_wait_timeout),
    )
    .await
}

async fn keygen(cfg: &Config, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let hsm = logged_in(cfg, telemetry).await?;
    let found = hsm.call("find_key", keypair::public_key).await;
    match found {
        Ok((_, info)) => {
            println!(
                "RSA key pair `{}` already exists ({} bits, id {}); nothing generated",
                info.label, info.bits, info.id_hex
            );
            Ok(())
        }
        Err(hsm::HsmError::KeyMissing(_)) => {
            hsm.call("generate_key_pair", keypair::generate).await?;
            let (_, info) = hsm.call("find_key", keypair::public_key).await?;
            let slot = hsm.with(|h| h.slot_id()).await?.unwrap_or_default();
            println!(
                "generated RSA key pair `{}` ({} bits, id {}) on slot {slot}",
                info.label, info.bits, info.id_hex,
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn list(cfg: &Config, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let hsm = logged_in(cfg, telemetry).await?;
    match hsm.call("find_key", keypair::public_key).await {
        Ok((_, info)) => println!(
            "Key pair: {} (RSA {} bits, id {}, fingerprint {})",
            info.label, info.bits, info.id_hex, info.fingerprint
        ),
        Err(e) => println!("Key pair: {e}"),
    }
    let objects = hsm.call("list_objects", token_store::list).await?;
    let slot = hsm.with(|h| h.slot_id()).await?.unwrap_or_default();
    println!("Data objects on slot {slot}: {}", objects.len());
    for (label, value) in objects {
        println!(
            "  {label}: {} bytes, {}",
            value.len(),
            envelope::describe(&value)
        );
    }
    if let Some(k) = &cfg.kubernetes {
        let store =
            crate::secret_store::SecretStore::connect(k.namespace.as_deref(), &k.name).await?;
        let keys = store.keys().await?;
        println!("Kubernetes Secret {}: {}", k.name, keys.join(", "));
        if let Some(id) = store.key_id().await? {
            println!("  encrypted with key pair {id}");
        }
    }
    Ok(())
}

async fn delete(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
    label: &str,
    yes: bool,
) -> anyhow::Result<()> {
    if !yes {
        anyhow::bail!(crate::ConfirmationRequired(format!(
            "refusing to delete `{label}` without --yes (this cannot be undone)"
        )));
    }
    let opened = open_for_command(cfg, telemetry).await?;
    let removed = opened.keyring.storage().delete(label).await?;
    // Objects left on the token by mode `hsm` are removed even when the store is a Secret.
    let on_token = if cfg.mode == Mode::HsmK8s {
        let name = label.to_owned();
        opened
            .hsm
            .call("destroy_object", move |h| token_store::delete(h, &name))
            .await?
    } else {
        0
    };
    println!(
        "deleted {} object(s) labelled `{label}`",
        removed + on_token
    );
    Ok(())
}

/// Rewrites every legacy value it can read; a value that cannot be decrypted is reported by
/// name and skipped, and the command fails at the end naming them.
async fn migrate(cfg: &Config, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let opened = open_for_command(cfg, telemetry).await?;
    let keyring = opened.keyring;
    let names = keyring.storage().names().await?;
    let mut migrated = 0;
    let mut failed = Vec::new();
    for name in names.iter().filter(|n| is_vault_name(n)) {
        match keyring.migrate(name).await {
            Ok(true) => {
                println!(
                    "migrated `{name}` to format v{} {}",
                    envelope::VERSION,
                    keyring.scheme().name()
                );
                migrated += 1;
            }
            Ok(false) => println!("`{name}` is already current"),
            Err(e) if e.is_about_the_value() => {
                println!("`{name}` skipped: {e}");
                failed.push(name.clone());
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("migrating `{name}`"))),
        }
    }
    println!("{migrated} value(s) migrated");
    if !failed.is_empty() {
        anyhow::bail!(
            "{} value(s) could not be read and were left as they are: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Names this program (and Bank-Vaults) stores.
pub fn is_vault_name(name: &str) -> bool {
    name == crate::keyring::ROOT_KEY
        || name == crate::keyring::TEST_KEY
        || name
            .strip_prefix("vault-unseal-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_vault_names_are_migrated() {
        assert!(super::is_vault_name("vault-unseal-0"));
        assert!(super::is_vault_name("vault-unseal-12"));
        assert!(super::is_vault_name("vault-root"));
        assert!(super::is_vault_name("vault-test"));
        assert!(!super::is_vault_name("vault-unseal-"));
        assert!(!super::is_vault_name("something-else"));
    }
}
