//! Operator subcommands (`unseal-init hsm ...`): what the seed's pkcs11-tool steps did, with
//! this program's slot selection, PIN handling and object format. Output goes to stdout and
//! never contains a secret value.

use crate::cli::HsmCommand;
use crate::config::Config;
use crate::envelope;
use crate::hsm::{self, Hsm};
use crate::keypair;
use crate::runner::open_keyring;
use crate::storage::lock;
use crate::telemetry::Telemetry;
use crate::token_store;
use anyhow::Context;
use std::sync::Arc;

/// Runs one `hsm` subcommand.
pub async fn run(cfg: &Config, command: &HsmCommand) -> anyhow::Result<()> {
    let telemetry = Telemetry::new();
    match command {
        HsmCommand::Info => info(cfg),
        HsmCommand::Keygen => keygen(cfg, telemetry),
        HsmCommand::List => list(cfg, telemetry).await,
        HsmCommand::Delete { label, yes } => delete(cfg, telemetry, label, *yes).await,
        HsmCommand::Migrate => migrate(cfg, telemetry).await,
    }
}

fn info(cfg: &Config) -> anyhow::Result<()> {
    let ctx = hsm::load_module(&cfg.hsm.module_path)?;
    let lib = ctx.get_library_info().context("C_GetInfo")?;
    println!(
        "Library: {} {} (Cryptoki {}), {}",
        lib.library_description(),
        lib.library_version(),
        lib.cryptoki_version(),
        lib.manufacturer_id()
    );
    for slot in ctx.get_all_slots().context("C_GetSlotList")? {
        let Ok(si) = ctx.get_slot_info(slot) else {
            continue;
        };
        println!(
            "Slot {} ({}): {}",
            slot.id(),
            si.manufacturer_id().trim(),
            si.slot_description().trim()
        );
        if !si.token_present() {
            println!("  no token");
            continue;
        }
        if let Ok(t) = ctx.get_token_info(slot) {
            println!("  token label:   {}", t.label().trim());
            println!("  manufacturer:  {}", t.manufacturer_id().trim());
            println!("  model:         {}", t.model().trim());
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
        }
        if let Ok(mechs) = ctx.get_mechanism_list(slot) {
            let names: Vec<String> = mechs.iter().map(|m| m.to_string()).collect();
            println!("  mechanisms ({}): {}", names.len(), names.join(", "));
        }
    }
    Ok(())
}

fn keygen(cfg: &Config, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let mut hsm = Hsm::open(&cfg.hsm, telemetry)?;
    hsm.login()?;
    match keypair::public_key(&mut hsm) {
        Ok((_, info)) => {
            println!(
                "RSA key pair `{}` already exists ({} bits, id {}); nothing generated",
                info.label, info.bits, info.id_hex
            );
            Ok(())
        }
        Err(hsm::HsmError::KeyMissing(_)) => {
            keypair::generate(&mut hsm)?;
            let (_, info) = keypair::public_key(&mut hsm)?;
            println!(
                "generated RSA key pair `{}` ({} bits, id {}) on slot {}",
                info.label,
                info.bits,
                info.id_hex,
                hsm.slot_id()
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn list(cfg: &Config, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let mut hsm = Hsm::open(&cfg.hsm, telemetry)?;
    hsm.login()?;
    match keypair::public_key(&mut hsm) {
        Ok((_, info)) => println!(
            "Key pair: {} (RSA {} bits, id {})",
            info.label, info.bits, info.id_hex
        ),
        Err(e) => println!("Key pair: {e}"),
    }
    let objects = token_store::list(&mut hsm)?;
    println!("Data objects on slot {}: {}", hsm.slot_id(), objects.len());
    for (label, value) in objects {
        println!(
            "  {label}: {} bytes, {}",
            value.len(),
            envelope::describe(&value)
        );
    }
    if let Some(k) = &cfg.kubernetes {
        drop(hsm);
        let store =
            crate::secret_store::SecretStore::connect(k.namespace.as_deref(), &k.name).await?;
        let keys = store.keys().await?;
        println!("Kubernetes Secret {}: {}", k.name, keys.join(", "));
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
    let (shared, keyring) = open_keyring(cfg, telemetry).await?;
    let removed = keyring.storage().delete(label).await?;
    // Objects left on the token by mode `hsm` are removed even when the store is a Secret.
    let on_token = if matches!(keyring.storage(), crate::storage::Storage::Kubernetes(_)) {
        token_store::delete(&mut *lock(&shared)?, label)?
    } else {
        0
    };
    println!(
        "deleted {} object(s) labelled `{label}`",
        removed + on_token
    );
    Ok(())
}

async fn migrate(cfg: &Config, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let (_, keyring) = open_keyring(cfg, telemetry).await?;
    let names = keyring.storage().names().await?;
    let mut migrated = 0;
    for name in names.iter().filter(|n| is_vault_name(n)) {
        if keyring
            .migrate(name)
            .await
            .with_context(|| format!("migrating `{name}`"))?
        {
            println!(
                "migrated `{name}` to format v{} {}",
                envelope::VERSION,
                keyring.scheme().name()
            );
            migrated += 1;
        } else {
            println!("`{name}` is already current");
        }
    }
    println!("{migrated} value(s) migrated");
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
