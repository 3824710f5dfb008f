//! Rotating the token's RSA key pair: the I/O around [`crate::rotation`]'s decisions. The
//! command (`hsm rotate-key`) journals the re-encrypted values and then runs the same
//! [`settle`] that every start runs before it looks the key pair up, so a rotation a signal
//! cut short is finished (or, before its journal existed, abandoned) by whichever start
//! comes next.

use crate::config::{Config, Mode};
use crate::crypto::HostKey;
use crate::envelope::{self, Scheme};
use crate::hsm::HsmError;
use crate::hsm_actor::HsmHandle;
use crate::journal::{self, Entry, Journal, Owner};
use crate::keypair;
use crate::keyring::{Decrypter, Keyring, TEST_KEY};
use crate::rotation::{self, EntryStep, Intent, Pair, Seen, Step};
use crate::secret::Secret;
use crate::telemetry::Telemetry;
use anyhow::{Context, anyhow, bail};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Log message: the intent file is durable (the new pair is generated next).
pub const INTENT_WRITTEN: &str = "key rotation intent written";
/// Log message: the new pair exists under its temporary label.
pub const GENERATED: &str = "new key pair generated";
/// Log message: every value re-encrypted to the new pair is in the journal.
pub const JOURNALLED: &str = "key rotation journal written";
/// Log message: the old pair carries its retired label.
pub const RETIRED: &str = "old key pair relabelled as retired";
/// Log message: the new pair carries the configured label.
pub const PROMOTED: &str = "new key pair now carries the configured label";
/// Log message: one value was replaced and verified with the new pair (field `key`).
pub const VALUE_STORED: &str = "value re-encrypted to the new key pair stored";
/// Log message: every value is stored and the journal removed.
pub const STORED: &str = "every value stored under the new key pair; journal removed";
/// Log message: the rotation is finished.
pub const COMPLETE: &str = "key rotation complete";
/// Log message: a rotation cut short before its journal was undone.
pub const ABANDONED: &str = "abandoned a key rotation cut short before its journal";

fn dir(cfg: &Config) -> PathBuf {
    cfg.journal_dir.join(rotation::SUBDIR)
}

/// A write-ahead journal of the init step or of a rekey: its values are sealed to the pair in
/// use when it was written, which must stay until that journal is finished.
fn other_journal(cfg: &Config) -> Option<PathBuf> {
    let rekey_dir = cfg.journal_dir.join(crate::rekey::SUBDIR);
    [
        journal::path(&cfg.journal_dir),
        journal::path(&rekey_dir),
        rekey_dir.join(crate::rekey::INTENT),
    ]
    .into_iter()
    .find(|p| p.exists())
}

fn read_intent(dir: &Path) -> anyhow::Result<Option<Intent>> {
    let path = dir.join(rotation::INTENT);
    match fs::read(&path) {
        Ok(bytes) => Intent::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| anyhow!("{}: not a key rotation intent: {e}", path.display())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn id_bytes(hex_id: &str) -> anyhow::Result<Vec<u8>> {
    hex::decode(hex_id).map_err(|_| anyhow!("`{hex_id}` is not a hex CKA_ID"))
}

/// Decrypts with the pair of one `CKA_ID`, whatever its label.
struct ById {
    hsm: HsmHandle,
    id: Vec<u8>,
}

impl Decrypter for ById {
    fn decrypt<'a>(
        &'a self,
        scheme: Scheme,
        ciphertext: &'a [u8],
    ) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, HsmError>> {
        let ct = ciphertext.to_vec();
        let id = self.id.clone();
        async move {
            self.hsm
                .call("decrypt", move |h| {
                    keypair::decrypt_by_id(h, &id, scheme, &ct)
                })
                .await
        }
        .boxed()
    }
}

/// A key ring over the token store whose decryptions use the pair `id`.
async fn ring_for(
    cfg: &Config,
    hsm: &HsmHandle,
    id: &[u8],
    scheme: Option<Scheme>,
) -> anyhow::Result<Keyring> {
    let key_id = id.to_vec();
    let key: HostKey = hsm
        .call("read_public_key", move |h| {
            keypair::public_key_by_id(h, &key_id)
        })
        .await?;
    let scheme = match scheme {
        Some(s) => s,
        None => {
            let (probe_id, probe_key) = (id.to_vec(), key.clone());
            hsm.call("probe_scheme", move |h| {
                keypair::probe_scheme_by_id(h, &probe_id, &probe_key)
            })
            .await?
        }
    };
    let decrypter = Arc::new(ById {
        hsm: hsm.clone(),
        id: id.to_vec(),
    });
    let storage = super::storage_for(cfg, hsm).await?;
    Ok(Keyring::new(decrypter, key, scheme, storage))
}

async fn observe(cfg: &Config, hsm: &HsmHandle) -> anyhow::Result<(Seen, Option<Intent>)> {
    let dir = dir(cfg);
    let intent = read_intent(&dir)?;
    let journal = journal::read(&dir)?.is_some();
    let (mut old, mut new) = (Pair::Absent, Pair::Absent);
    if let Some(i) = &intent {
        if i.label != cfg.hsm.key_label {
            bail!(
                "{}: a key rotation of key pair `{}` is unfinished, but the configured keyLabel is `{}`; run with keyLabel `{}` to finish it",
                dir.join(rotation::INTENT).display(),
                i.label,
                cfg.hsm.key_label,
                i.label
            );
        }
        let next = rotation::next_label(&i.label);
        let retired = rotation::retired_label(&i.label, &i.old_fingerprint);
        for (id, slot) in [(&i.old_id, &mut old), (&i.new_id, &mut new)] {
            let id = id_bytes(id)?;
            let (public, private) = hsm
                .call("find_key_by_id", move |h| keypair::labels_by_id(h, &id))
                .await?;
            *slot = rotation::classify(
                public.as_deref(),
                private.as_deref(),
                &i.label,
                &next,
                &retired,
            );
        }
    }
    Ok((
        Seen {
            intent: intent.is_some(),
            journal,
            old,
            new,
        },
        intent,
    ))
}

/// Finishes (or abandons) a rotation an earlier run left on disk; returns at once when there
/// is none. Run at every start after login and before the key pair is looked up: until it is
/// done, the configured label may name no pair, or a pair the stored values are not sealed to.
pub async fn settle(cfg: &Config, hsm: &HsmHandle) -> anyhow::Result<()> {
    let dir = dir(cfg);
    // Each step changes what `observe` sees; a rotation has at most five of them.
    for _ in 0..8 {
        let (seen, intent) = observe(cfg, hsm).await?;
        let step = rotation::decide(seen);
        let Some(intent) = intent else {
            return match step {
                Step::Refuse(why) => Err(anyhow!("{}: {why}", dir.display())),
                _ => Ok(()),
            };
        };
        tracing::info!(?step, old = ?seen.old, new = ?seen.new, "key rotation in progress");
        let old_id = id_bytes(&intent.old_id)?;
        let new_id = id_bytes(&intent.new_id)?;
        match step {
            Step::Nothing => return Ok(()),
            Step::Refuse(why) => bail!(
                "key rotation in {} cannot go on: {why}; nothing was changed",
                dir.display()
            ),
            Step::Abandon => {
                let removed = hsm
                    .call("destroy_key_pair", move |h| {
                        keypair::destroy_by_id(h, &new_id)
                    })
                    .await?;
                journal::remove(&dir)?;
                journal::remove_file(&dir, rotation::INTENT)?;
                tracing::warn!(
                    removed,
                    "{ABANDONED}; the old key pair stays in use and the stored values were not touched"
                );
                return Ok(());
            }
            Step::RetireOld => {
                let label = rotation::retired_label(&intent.label, &intent.old_fingerprint);
                let l = label.clone();
                hsm.call("relabel_key_pair", move |h| {
                    keypair::relabel_by_id(h, &old_id, &l)
                })
                .await?;
                tracing::info!(label, "{RETIRED}");
            }
            Step::PromoteNew => {
                let label = intent.label.clone();
                hsm.call("relabel_key_pair", move |h| {
                    keypair::relabel_by_id(h, &new_id, &label)
                })
                .await?;
                tracing::info!(label = intent.label, "{PROMOTED}");
            }
            Step::Store => store(cfg, hsm, &intent).await?,
            Step::Finish => {
                if let Some(pending) = other_journal(cfg).filter(|_| intent.delete_old) {
                    tracing::warn!(
                        journal = %pending.display(),
                        "old key pair kept retired, not deleted: a journal sealed to it waits to be finished"
                    );
                } else if intent.delete_old {
                    let removed = hsm
                        .call("destroy_key_pair", move |h| {
                            keypair::destroy_by_id(h, &old_id)
                        })
                        .await?;
                    tracing::info!(removed, "old key pair deleted");
                }
                journal::remove_file(&dir, rotation::INTENT)?;
                tracing::info!("{COMPLETE}");
                return Ok(());
            }
        }
    }
    bail!(
        "key rotation in {} made no progress; nothing more was changed",
        dir.display()
    )
}

/// Replaces each stored value by the journal's, verified with the new pair; a value the
/// journal lacks (stored since it was written) is re-encrypted from the old pair.
async fn store(cfg: &Config, hsm: &HsmHandle, intent: &Intent) -> anyhow::Result<()> {
    let dir = dir(cfg);
    let Some(j) = journal::read(&dir)? else {
        return Ok(());
    };
    let new_id = id_bytes(&intent.new_id)?;
    let old_id = id_bytes(&intent.old_id)?;
    // The configured label names the new pair from here on; the HSM thread must pair its
    // private half by the new id, not a handle it remembered for the old pair.
    let id = new_id.clone();
    hsm.with(move |h| h.set_key_id(id)).await?;
    let key_id = new_id.clone();
    let new_key = hsm
        .call("read_public_key", move |h| {
            keypair::public_key_by_id(h, &key_id)
        })
        .await?;
    let scheme = j
        .entries
        .first()
        .and_then(|e| envelope::decode(&e.sealed, new_key.modulus_len()).ok())
        .and_then(|e| e.scheme);
    let new_ring = ring_for(cfg, hsm, &new_id, scheme).await?;
    if new_ring.storage().shared() {
        // The Secret records which pair its values belong to: from here on, the new one (a
        // start of another pod still holding only the old pair then refuses the Secret).
        let fingerprint = new_ring.fingerprint()?;
        new_ring.storage().set_key_id(&fingerprint).await?;
        tracing::info!(
            fingerprint,
            "recorded the new key pair's fingerprint with the stored values"
        );
    }
    let replaces = j.owner.as_ref().map(|o| &o.replaces);
    let mut changed = Vec::new();
    for entry in &j.entries {
        let stored = new_ring.storage().get(&entry.name).await?;
        let was = replaces
            .and_then(|r| r.get(&entry.name))
            .map(String::as_str);
        match rotation::entry_step(stored.as_deref(), was, &entry.sealed) {
            EntryStep::Store => {
                new_ring
                    .store_sealed(&entry.name, &entry.sealed, None)
                    .await
                    .with_context(|| format!("storing `{}` under the new key pair", entry.name))?;
                tracing::info!(key = entry.name, "{VALUE_STORED}");
            }
            EntryStep::Changed => {
                tracing::warn!(
                    key = entry.name,
                    "value changed since the rotation journal was written; re-encrypting what is stored instead"
                );
                changed.push(entry.name.clone());
            }
            EntryStep::Deleted => tracing::warn!(
                key = entry.name,
                "value deleted since the rotation journal was written; not stored again"
            ),
        }
    }
    let names = new_ring.storage().names().await?;
    let mut old_ring = None;
    for name in names {
        if j.entries.iter().any(|e| e.name == name) && !changed.contains(&name) {
            continue;
        }
        match new_ring.load(&name).await {
            Ok(_) => continue,
            Err(e) if e.is_about_the_value() => {}
            Err(e) => return Err(e.into()),
        }
        if old_ring.is_none() {
            old_ring = Some(ring_for(cfg, hsm, &old_id, Some(new_ring.scheme())).await?);
        }
        let Some(old) = old_ring.as_ref() else {
            continue;
        };
        let value: Option<Secret> = old
            .load(&name)
            .await
            .with_context(|| format!("`{name}` opens with neither key pair"))?;
        if let Some(value) = value {
            new_ring.store(&name, &value).await?;
            tracing::info!(key = name, "{VALUE_STORED}");
        }
    }
    journal::remove(&dir)?;
    tracing::info!("{STORED}");
    Ok(())
}

/// `hsm rotate-key`: a new pair, every stored value re-encrypted to it and verified, the
/// switch, the values replaced; the old pair kept under its retired label, or deleted with
/// `delete_old`.
pub async fn command(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
    delete_old: bool,
    single_stick: bool,
) -> anyhow::Result<()> {
    if cfg.mode == Mode::HsmK8s && !single_stick {
        return Err(crate::ConfirmationRequired(
            "in mode hsm-k8s the Secret is read by every Vault whose stick holds this key pair (imported from one DKEK-wrapped export); a new pair is made on this stick only, so every other stick could no longer read the Secret. If this stick is the only one, run again with --yes-single-stick; otherwise see docs/rotation.md; nothing was changed".to_owned(),
        )
        .into());
    }
    let opened = super::open_for_command(cfg, telemetry).await?;
    let hsm = opened.hsm;
    let old_ring = opened.keyring;
    // A Secret recording another pair is refused before anything is written.
    old_ring.check_identity().await?;
    let (_, info) = hsm.call("find_key", keypair::public_key).await?;
    if info.id_hex.is_empty() {
        bail!(
            "key pair `{}` has no CKA_ID, so a rotation could not tell its halves from the new pair's; nothing was changed",
            info.label
        );
    }
    if let Some(pending) = other_journal(cfg) {
        bail!(
            "{} holds values sealed to the current key pair that are not stored yet; start unseal-init (e.g. `--once`) to finish it, then rotate; nothing was changed",
            pending.display()
        );
    }
    let dir = dir(cfg);
    journal::check_writable(&dir)?;
    // Everything is read with the old pair first: a value it cannot open stops the rotation
    // before anything is written.
    let names = old_ring.storage().names().await?;
    let mut names: Vec<String> = names.into_iter().collect();
    names.sort();
    names.dedup();
    let mut values: Vec<(String, Secret)> = Vec::new();
    let mut replaces = std::collections::BTreeMap::new();
    for name in &names {
        let Some(bytes) = old_ring.storage().get(name).await? else {
            continue;
        };
        match old_ring.open(name, &bytes).await {
            Ok(v) => {
                replaces.insert(name.clone(), journal::digest(&bytes));
                values.push((name.clone(), v));
            }
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "`{name}` cannot be read with key pair `{}`, so it could not be re-encrypted; nothing was changed (delete it with `hsm delete` if it is not needed)",
                    info.label
                )));
            }
        }
    }
    // The journal holds at least one entry (an empty one reads as corrupt): `vault-test`,
    // which the pre-flight check would write anyway, goes with the rest.
    if !values.iter().any(|(n, _)| n == TEST_KEY) {
        values.push((TEST_KEY.to_owned(), Secret::from(TEST_KEY)));
    }
    let mut new_id = vec![0u8; 20];
    rand::fill(&mut new_id[..]);
    let intent = Intent {
        label: info.label.clone(),
        old_id: info.id_hex.clone(),
        old_fingerprint: info.fingerprint.clone(),
        new_id: hex::encode(&new_id),
        delete_old,
    };
    journal::write_file(&dir, rotation::INTENT, &intent.to_bytes())?;
    tracing::info!(new_id = intent.new_id, "{INTENT_WRITTEN}");
    let (label, id) = (rotation::next_label(&info.label), new_id.clone());
    hsm.call("generate_key_pair", move |h| {
        keypair::generate_with(h, &label, &id).map(|_| ())
    })
    .await?;
    tracing::info!("{GENERATED}");
    let new_ring = ring_for(cfg, &hsm, &new_id, None).await?;
    let mut entries = Vec::with_capacity(values.len());
    for (name, value) in &values {
        let sealed = new_ring.seal(name, value)?;
        let opened = new_ring.open(name, &sealed).await?;
        if &opened != value {
            bail!("`{name}` sealed to the new key pair does not decrypt to its value");
        }
        entries.push(Entry {
            name: name.clone(),
            sealed,
            journal_only: false,
        });
    }
    let entry_count = entries.len();
    drop(values);
    let created_ms = crate::keyring::now_ms();
    journal::write(
        &dir,
        &Journal {
            vault: cfg.vault.address.clone(),
            created_ms,
            // Only `replaces` means anything here: what each entry may replace.
            owner: Some(Owner {
                shares_asked: 0,
                keys_returned: 0,
                threshold: 0,
                replaces,
            }),
            entries,
        },
    )?;
    tracing::info!("{JOURNALLED}");
    settle(cfg, &hsm).await?;
    let new_fp = new_ring.fingerprint()?;
    let old_fate = if delete_old {
        "deleted".to_owned()
    } else {
        format!(
            "kept as `{}` (see docs/rotation.md for deleting it)",
            rotation::retired_label(&info.label, &info.fingerprint)
        )
    };
    println!(
        "rotated key pair `{}`: {} values re-encrypted; new fingerprint {new_fp}; old pair {} {old_fate}",
        info.label, entry_count, info.fingerprint
    );
    Ok(())
}
