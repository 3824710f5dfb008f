//! Operator subcommands (`unseal-init hsm ...`): what the manual pkcs11-tool steps did, with
//! this program's slot selection, PIN handling and object format. Output goes to stdout and
//! never contains a secret value, except `hsm reveal`'s, whose whole output is the one value
//! asked for (break-glass access).

use crate::backup;
use crate::cli::HsmCommand;
use crate::config::{Config, Mode};
use crate::envelope;
use crate::hsm;
use crate::hsm_actor::HsmHandle;
use crate::keypair;
use crate::runner::open_for_command;
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
        HsmCommand::Reveal { name, yes } => reveal(cfg, telemetry, name, *yes).await,
        HsmCommand::Store { name, force } => store(cfg, telemetry, name, *force).await,
        HsmCommand::Backup { file, force } => backup(cfg, telemetry, file, *force).await,
        HsmCommand::Restore { file, force } => restore(cfg, telemetry, file, *force).await,
        HsmCommand::RotateKey {
            delete_old,
            yes_single_stick,
        } => crate::runner::rotate::command(cfg, telemetry, *delete_old, *yes_single_stick).await,
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
    crate::runner::rotate::settle(cfg, &hsm).await?;
    Ok(hsm)
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

/// Longest input `hsm store` reads from stdin: far more than any RSA key's capacity, so a
/// value that is too long is reported with its length, and a stream that never ends is cut.
const MAX_STDIN: usize = 4096;

/// Break-glass: decrypts the value stored under `name` and writes it, and nothing else, to
/// stdout. Refuses a terminal without `--yes` before the token is touched.
async fn reveal(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
    name: &str,
    yes: bool,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    check_name(name)?;
    let terminal = std::io::stdout().is_terminal();
    if terminal && !yes {
        anyhow::bail!(crate::ConfirmationRequired(format!(
            "refusing to print `{name}` to a terminal without --yes (it would stay on screen and in the scrollback); pipe it into the command that needs it, or pass --yes"
        )));
    }
    let opened = open_for_command(cfg, telemetry).await?;
    let storage = opened.keyring.storage().kind();
    let Some(value) = opened.keyring.load(name).await? else {
        anyhow::bail!("nothing is stored under `{name}` in the {storage}");
    };
    write_stdout(value.expose().as_bytes(), terminal)
        .with_context(|| format!("writing `{name}` to stdout"))?;
    tracing::info!(key = name, storage, "revealed a stored value on stdout");
    Ok(())
}

/// Refuses a name no store holds, quoting at most its first 64 characters (escaped).
fn check_name(name: &str) -> anyhow::Result<()> {
    if backup::valid_name(name) {
        return Ok(());
    }
    let shown: String = name
        .chars()
        .take(64)
        .flat_map(char::escape_default)
        .collect();
    let more = if name.chars().count() > 64 { "…" } else { "" };
    anyhow::bail!(
        "`{shown}{more}` is not a name a store can hold (1 to {} of the characters a-z A-Z 0-9 - _ .)",
        backup::MAX_NAME
    )
}

/// Writes `value` straight to file descriptor 1, bypassing the standard library's stdout
/// buffer, which would keep a copy of the secret that nothing zeroes.
fn write_stdout(value: &[u8], newline: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsFd;
    let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    out.write_all(value)?;
    if newline {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads at most [`MAX_STDIN`] bytes of stdin into memory zeroed on drop, straight from file
/// descriptor 0 (the standard library's stdin buffer would keep a copy). One trailing
/// newline (`\n` or `\r\n`) is dropped: `echo` and most editors add one.
fn read_stdin_value(name: &str) -> anyhow::Result<crate::secret::Secret> {
    use std::io::{IsTerminal, Read};
    use std::os::fd::AsFd;
    if std::io::stdin().is_terminal() {
        anyhow::bail!(
            "stdin is a terminal, where the value would be echoed; pipe it in instead, e.g. `printf '%s' \"$VALUE\" | unseal-init hsm store {name}` or `unseal-init hsm store {name} < FILE`"
        );
    }
    let input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    // Room for the limit and one more byte, allocated once: a growing buffer would leave
    // copies of the value behind in freed memory.
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(MAX_STDIN + 1));
    input
        .take(MAX_STDIN as u64 + 1)
        .read_to_end(&mut buf)
        .context("reading the value from stdin")?;
    if buf.len() > MAX_STDIN {
        anyhow::bail!("stdin holds more than {MAX_STDIN} bytes; no stored value is that long");
    }
    if buf.ends_with(b"\n") {
        buf.pop();
        if buf.ends_with(b"\r") {
            buf.pop();
        }
    }
    if let Err(expected) = crate::keyring::plaintext_shape(name, &buf) {
        anyhow::bail!(
            "the value on stdin ({} bytes) is not {expected}, as `{name}` holds; nothing stored",
            buf.len()
        );
    }
    let text = String::from_utf8(std::mem::take(&mut *buf)).map_err(|e| {
        zeroize::Zeroize::zeroize(&mut e.into_bytes());
        anyhow::anyhow!("the value on stdin is not UTF-8 text; nothing stored")
    })?;
    Ok(crate::secret::Secret::new(text))
}

/// Stores a value read from stdin under `name`: written beside the old value, read back and
/// decrypted on the token, and only then is the old value removed. A different value already
/// stored is replaced only with `--force`.
async fn store(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
    name: &str,
    force: bool,
) -> anyhow::Result<()> {
    check_name(name)?;
    let value = read_stdin_value(name)?;
    let opened = open_for_command(cfg, telemetry).await?;
    let keyring = opened.keyring;
    if value.expose().len() > keyring.capacity() {
        anyhow::bail!(
            "the value on stdin has {} bytes; the {}-bit key pair with {} holds at most {}; nothing stored",
            value.expose().len(),
            keyring.key_bits(),
            keyring.scheme().name(),
            keyring.capacity()
        );
    }
    let existing = match keyring.load(name).await {
        Ok(None) => backup::Existing::Absent,
        Ok(Some(old)) if old == value => backup::Existing::Same,
        Ok(Some(_)) => backup::Existing::Different,
        Err(e) if e.is_about_the_value() => backup::Existing::Unreadable,
        Err(e) => return Err(e.into()),
    };
    match backup::plan_restore(&[(name.to_owned(), existing)], force) {
        Err(_) => anyhow::bail!(crate::ConfirmationRequired(format!(
            "`{name}` already holds a different value{}; refusing to replace it without --force (nothing written)",
            if existing == backup::Existing::Unreadable {
                " (one this token cannot read)"
            } else {
                ""
            }
        ))),
        Ok(plan) if plan.iter().all(|(_, a)| *a == backup::Action::Keep) => {
            println!("`{name}` already holds this value; nothing written");
            return Ok(());
        }
        Ok(_) => {}
    }
    keyring.store(name, &value).await?;
    println!(
        "stored `{name}` in the {} (format v{} {}), read back and decrypted on the token",
        keyring.storage().kind(),
        envelope::VERSION,
        keyring.scheme().name()
    );
    Ok(())
}

/// Writes every stored value, as stored (ciphertext), to `file`, after checking that each
/// one decrypts with this token: a backup holding a value nobody can open is no backup.
async fn backup(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
    file: &std::path::Path,
    force: bool,
) -> anyhow::Result<()> {
    let to_stdout = file.as_os_str() == "-";
    if !to_stdout && file.exists() && !force {
        anyhow::bail!(crate::ConfirmationRequired(format!(
            "{} exists; refusing to replace it without --force",
            file.display()
        )));
    }
    let opened = open_for_command(cfg, telemetry).await?;
    let keyring = opened.keyring;
    let storage = keyring.storage();
    let names: Vec<String> = storage
        .names()
        .await?
        .into_iter()
        .filter(|n| is_vault_name(n))
        .collect();
    if names.is_empty() {
        anyhow::bail!(
            "the {} holds no value to back up (vault-unseal-N, vault-root, vault-test)",
            storage.kind()
        );
    }
    let mut values = Vec::with_capacity(names.len());
    let mut unreadable = Vec::new();
    for name in names {
        let Some(bytes) = storage.get(&name).await? else {
            continue;
        };
        match keyring.open(&name, &bytes).await {
            Ok(_) => values.push((name, bytes)),
            Err(e) if e.is_about_the_value() => unreadable.push(format!("{e}")),
            Err(e) => return Err(e.into()),
        }
    }
    if !unreadable.is_empty() {
        anyhow::bail!(
            "no backup written: {} value(s) do not decrypt with this token: {}",
            unreadable.len(),
            unreadable.join("; ")
        );
    }
    let key_id = keyring.fingerprint()?;
    let listed: Vec<String> = values.iter().map(|(n, _)| n.clone()).collect();
    let bytes = backup::encode(&backup::Backup {
        key_id: key_id.clone(),
        values,
    })?;
    let report = format!(
        "backed up {} value(s) from the {} to {} (ciphertext only, encrypted with key pair {key_id}): {}",
        listed.len(),
        storage.kind(),
        if to_stdout {
            "stdout".into()
        } else {
            file.display().to_string()
        },
        listed.join(", ")
    );
    if to_stdout {
        // The file itself goes to stdout (e.g. out of `kubectl exec`), the report beside it.
        write_stdout(&bytes, false).context("writing the backup to stdout")?;
        eprintln!("{report}");
    } else {
        write_file_atomically(file, &bytes)
            .with_context(|| format!("writing the backup to {}", file.display()))?;
        println!("{report}");
    }
    Ok(())
}

/// Writes `bytes` to `path` so that `path` is, at every moment, either what it was or the
/// whole new content: a temporary file beside it (mode 0600, created afresh), fsync'd, renamed
/// over it, and the directory fsync'd so the rename survives a crash.
fn write_file_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Reads `path` (stdin for `-`), never more than one byte past the largest backup, which
/// the format's reader then refuses.
fn read_backup_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let input: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?)
    };
    let mut bytes = Vec::new();
    input
        .take(backup::MAX_FILE as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

/// Puts a backup's values into the store. Nothing is written until every value in the file
/// has decrypted with this token and no different value stands in the way (without
/// `--force`); each write is then verified as any store is.
async fn restore(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
    file: &std::path::Path,
    force: bool,
) -> anyhow::Result<()> {
    let bytes = read_backup_file(file)?;
    let saved = backup::decode(&bytes)
        .with_context(|| format!("{} is not a usable backup", file.display()))?;
    let opened = open_for_command(cfg, telemetry).await?;
    let keyring = opened.keyring;
    let storage = keyring.storage();
    let ours = keyring.fingerprint()?;
    if saved.key_id != ours {
        anyhow::bail!(
            "{} holds values encrypted with key pair {}, but this token's key pair is {ours}; restore it with a token holding that key pair (one the DKEK backup was unwrapped onto); nothing restored",
            file.display(),
            saved.key_id
        );
    }
    let mut found = Vec::with_capacity(saved.values.len());
    let mut clear = Vec::with_capacity(saved.values.len());
    for (name, value) in &saved.values {
        let v = keyring.open(name, value).await.with_context(|| {
            format!(
                "`{name}` in the backup cannot be read with this token's key pair; nothing restored"
            )
        })?;
        let existing = match storage.get(name).await? {
            None => backup::Existing::Absent,
            Some(b) if b == *value => backup::Existing::Same,
            Some(b) => match keyring.open(name, &b).await {
                Ok(x) if x == v => backup::Existing::SameValue,
                Ok(_) => backup::Existing::Different,
                Err(e) if e.is_about_the_value() => backup::Existing::Unreadable,
                Err(e) => return Err(e.into()),
            },
        };
        found.push((name.clone(), existing));
        clear.push(v);
    }
    let plan = backup::plan_restore(&found, force).map_err(|names| {
        crate::ConfirmationRequired(format!(
            "the {} holds different values under {}; refusing to replace them without --force (nothing restored)",
            storage.kind(),
            names.join(", ")
        ))
    })?;
    let (mut written, mut kept) = (0, 0);
    for (i, (name, action)) in plan.iter().enumerate() {
        match (action, found[i].1) {
            (backup::Action::Keep, _) => {
                println!("`{name}` already holds the backup's value");
                kept += 1;
                continue;
            }
            // Into an empty place the backup's bytes go as they are (a Bank-Vaults value
            // stays one Bank-Vaults can read).
            (backup::Action::Write, backup::Existing::Absent) => {
                keyring
                    .store_sealed(name, &saved.values[i].1, Some(&clear[i]))
                    .await?;
            }
            // Over another value, sealed afresh: on the token the newest write stamp is
            // the value read, and the backup's may be older than the value it replaces.
            (backup::Action::Write, _) => keyring.store(name, &clear[i]).await?,
        }
        println!("restored `{name}`: read back and decrypted on the token");
        written += 1;
    }
    println!(
        "{written} value(s) restored and {kept} already present in the {}, encrypted with key pair {ours}",
        storage.kind()
    );
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

    /// The file is replaced whole, with mode 0600 whatever the old one had, and nothing is
    /// left beside it; a write that cannot happen leaves the old file as it was.
    #[test]
    fn a_backup_file_is_replaced_whole_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("b.nkbackup");
        std::fs::write(&file, "old").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        super::write_file_atomically(&file, b"new").expect("replace");
        assert_eq!(std::fs::read(&file).expect("read"), b"new");
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let missing = dir.path().join("no-such-dir").join("b.nkbackup");
        assert!(super::write_file_atomically(&missing, b"x").is_err());
        // A directory in the way of the rename: the old content stays, no temporary remains.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).expect("mkdir");
        std::fs::write(blocked.join("inside"), "keep").expect("write");
        assert!(super::write_file_atomically(&blocked, b"x").is_err());
        assert_eq!(
            std::fs::read(blocked.join("inside")).expect("read"),
            b"keep"
        );
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["b.nkbackup", "blocked"]);
    }

    #[test]
    fn a_bad_name_is_quoted_short_and_escaped() {
        assert!(super::check_name("vault-root").is_ok());
        let long = format!("\u{1b}[31m{}", "x".repeat(10_000));
        let msg = super::check_name(&long).expect_err("bad name").to_string();
        assert!(msg.starts_with("`\\u{1b}[31mxxx"), "{msg}");
        assert!(msg.contains("…` is not a name"), "{msg}");
        assert!(msg.len() < 250, "{msg}");
    }
}
