//! The runner's passes against an in-memory Vault, key store and software key.

use super::*;
use crate::cli::Overrides;
use crate::config::{self, Env, FileConfig};
use crate::envelope::Scheme;
use crate::journal::Journal;
use crate::keyring::soft::{self, SoftDecrypter};
use crate::keyring::{ROOT_KEY, unseal_key_name};
use crate::memory_vault::MemoryVault;
use crate::secret::Secret;
use crate::storage::memory::MemoryStore;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// One Vault, one key store on a software key, and the journal's directory. The rekey
/// tests (`runner/rekey.rs`) use it too.
pub(super) struct Scene {
    pub(super) dir: tempfile::TempDir,
    pub(super) ring: Keyring,
    store: Arc<MemoryStore>,
    dec: Arc<SoftDecrypter>,
    pub(super) vault: Arc<MemoryVault>,
}

impl Scene {
    /// A fresh Vault and an empty store. The software key is 1024 bits to keep key
    /// generation fast; OAEP-SHA256 then holds only 62 bytes, too few for an unseal key,
    /// so new values use OAEP-SHA1 (86 bytes).
    fn new() -> Self {
        Self::with_scheme(Scheme::OaepSha1)
    }

    fn with_scheme(scheme: Scheme) -> Self {
        let (dec, host) = soft::pair();
        let store = Arc::new(MemoryStore::new());
        let ring = Keyring::new(dec.clone(), host, scheme, store.clone());
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            ring,
            store,
            dec,
            vault: Arc::new(MemoryVault::new()),
        }
    }

    /// A Vault initialised by a first pass, its keys in the store.
    pub(super) async fn initialised() -> Self {
        let scene = Self::new();
        assert_eq!(scene.pass().await.expect("init"), PassOutcome::Unsealed);
        scene
    }

    /// The defaults an operator gets (5 shares, threshold 3, root token stored), with the
    /// journal in the scene's directory.
    fn config(&self) -> Config {
        let mut cfg = config::resolve(
            FileConfig::default(),
            &Overrides::default(),
            &Env::default(),
        )
        .expect("the defaults are valid");
        cfg.journal_dir = self.dir.path().to_owned();
        cfg
    }

    fn runner_for(&self, cfg: Config, vault: &Arc<MemoryVault>) -> Runner {
        Runner::new(
            cfg,
            vault.clone(),
            self.ring.clone(),
            None,
            Telemetry::new(),
            Shutdown::new(),
        )
    }

    pub(super) fn runner(&self) -> Runner {
        self.runner_for(self.config(), &self.vault)
    }

    async fn pass(&self) -> Result<PassOutcome, PassError> {
        self.runner().pass(false).await
    }

    async fn load(&self, name: &str) -> String {
        self.ring
            .load(name)
            .await
            .expect("load")
            .unwrap_or_else(|| panic!("`{name}` is not in the store"))
            .expose()
            .to_owned()
    }

    async fn names(&self) -> Vec<String> {
        self.store.names().await.expect("names")
    }

    fn store_ops(&self) -> Vec<usize> {
        ["get", "put", "names", "prune", "delete"]
            .iter()
            .map(|op| self.store.count(op))
            .collect()
    }

    fn decrypts(&self) -> usize {
        self.dec.calls.load(Ordering::SeqCst)
    }

    fn journal(&self) -> PathBuf {
        journal::path(self.dir.path())
    }

    /// Every key `vault` issued (and its root token) is in the store, one value per name,
    /// and opens to exactly what it handed out.
    async fn assert_store_holds(&self, vault: &MemoryVault) {
        for (i, key) in vault.issued_keys().iter().enumerate() {
            let name = unseal_key_name(i);
            assert_eq!(&self.load(&name).await, key, "{name}");
            assert_eq!(self.store.raw(&name).len(), 1, "{name}: one value per name");
        }
        assert_eq!(self.load(ROOT_KEY).await, vault.root_token());
        assert_eq!(self.store.raw(ROOT_KEY).len(), 1);
    }

    fn close(self) {
        self.dir.close().expect("remove the temporary directory");
    }
}

/// The names a store holds for `shares` unseal keys and the root token, sorted.
fn names_for(shares: usize) -> Vec<String> {
    let mut all: Vec<String> = (0..shares).map(unseal_key_name).collect();
    all.push(ROOT_KEY.to_owned());
    all.sort();
    all
}

/// RSA-1024 with OAEP-SHA256 holds 62 bytes and an unseal key is up to 66 characters:
/// initialising would hand out keys that cannot be stored.
#[tokio::test]
async fn a_key_too_small_for_unseal_keys_is_refused_before_init() {
    let scene = Scene::with_scheme(Scheme::OaepSha256);
    let err = scene.pass().await.expect_err("must refuse");
    let text = err.to_string();
    assert!(
        matches!(err, PassError::KeyTooSmall { capacity: 62, .. }),
        "{text}"
    );
    assert!(text.contains("1024-bit") && text.contains("2048"), "{text}");
    assert_eq!(scene.vault.calls("init"), 0, "Vault was not initialised");
    assert_eq!(scene.store.count("put"), 0);
    scene.close();
}

#[tokio::test]
async fn a_fresh_vault_is_initialised_stored_and_unsealed_in_one_pass() {
    let scene = Scene::initialised().await;
    assert!(scene.vault.is_unsealed());
    assert_eq!(scene.vault.calls("init"), 1);
    assert_eq!(scene.vault.issued_keys().len(), 5);
    assert_eq!(scene.names().await, names_for(5));
    scene.assert_store_holds(&scene.vault).await;
    assert!(
        !scene.journal().exists(),
        "the journal is removed once every key is stored"
    );
    scene.close();
}

#[tokio::test]
async fn a_store_failing_after_init_keeps_the_keys_in_the_journal_until_the_next_pass() {
    let scene = Scene::new();
    let mut cfg = scene.config();
    cfg.hsm.token_wait_timeout = Duration::from_millis(1);
    let r = scene.runner_for(cfg, &scene.vault);
    // Two keys go in, then the store goes away.
    scene.store.fail_puts_after(2, 1);

    let err = r.pass(false).await.expect_err("the store failed");
    let PassError::InitPending {
        remaining, journal, ..
    } = &err
    else {
        panic!("expected InitPending, got {err:?}");
    };
    assert_eq!(
        remaining,
        &[
            "vault-unseal-2",
            "vault-unseal-3",
            "vault-unseal-4",
            "vault-root"
        ]
    );
    assert_eq!(journal, &scene.journal());
    assert_eq!(
        scene.vault.calls("unseal"),
        0,
        "nothing unsealed before every key is stored"
    );

    let bytes = std::fs::read(journal).expect("the journal is kept");
    let mut secrets = scene.vault.issued_keys();
    secrets.push(scene.vault.root_token());
    for secret in &secrets {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the journal holds a clear key"
        );
    }
    let message = err.to_string();
    assert!(
        secrets.iter().all(|s| !message.contains(s.as_str())),
        "{message}"
    );

    assert_eq!(
        r.pass(false).await.expect("second pass"),
        PassOutcome::Unsealed
    );
    assert!(scene.vault.is_unsealed());
    assert_eq!(scene.vault.calls("init"), 1, "no second init");
    assert!(!scene.journal().exists());
    assert_eq!(scene.names().await, names_for(5));
    scene.assert_store_holds(&scene.vault).await;
    scene.close();
}

#[tokio::test]
async fn one_corrupted_key_does_not_stop_the_others_from_unsealing() {
    let scene = Scene::initialised().await;
    scene.vault.seal();
    scene.store.insert("vault-unseal-0", vec![7u8; 128]);
    let submitted = scene.vault.calls("unseal");

    assert_eq!(scene.pass().await.expect("unseal"), PassOutcome::Unsealed);
    assert!(scene.vault.is_unsealed());
    assert_eq!(
        scene.vault.calls("unseal") - submitted,
        3,
        "only the three readable keys are submitted"
    );
    scene.close();
}

#[tokio::test]
async fn an_unsealed_vault_costs_the_store_and_the_token_nothing() {
    let scene = Scene::initialised().await;
    let (ops, decrypts) = (scene.store_ops(), scene.decrypts());
    assert_eq!(scene.pass().await.expect("pass"), PassOutcome::Unsealed);
    assert_eq!(scene.store_ops(), ops, "store operations during the pass");
    assert_eq!(scene.decrypts(), decrypts, "decrypts");
    scene.close();
}

#[test]
fn passes_after_expected_waits_come_soon_and_repeating_failures_slower() {
    let join = PassError::Vault(VaultError::Status {
        endpoint: "sys/storage/raft/join",
        status: 500,
        message: "failed to get raft challenge".to_owned(),
    });
    assert_eq!(pace_of(&Err(join)), Pace::Soon);
    assert_eq!(pace_of(&Err(PassError::JoinFailed("x".into()))), Pace::Soon);
    assert_eq!(pace_of(&Ok(PassOutcome::VaultUnreachable)), Pace::Soon);
    assert_eq!(pace_of(&Ok(PassOutcome::Unsealed)), Pace::Period);
    let wrong_key = PassError::MissingKeys {
        needed: 3,
        found: 0,
        unreadable: vec!["vault-unseal-0".into()],
    };
    assert_eq!(pace_of(&Err(wrong_key)), Pace::Slower);
    let empty = PassError::MissingKeys {
        needed: 3,
        found: 0,
        unreadable: Vec::new(),
    };
    assert_eq!(pace_of(&Err(empty)), Pace::Period);
    let unseal = PassError::Vault(VaultError::Status {
        endpoint: "sys/unseal",
        status: 500,
        message: "boom".to_owned(),
    });
    assert_eq!(pace_of(&Err(unseal)), Pace::Period);
}

#[test]
fn an_empty_store_for_an_initialised_vault_says_the_keys_were_probably_lost() {
    let text = PassError::MissingKeys {
        needed: 0,
        found: 0,
        unreadable: Vec::new(),
    }
    .to_string();
    assert!(
        text.contains("keys were probably lost")
            && text.contains("delete its data")
            && text.contains("no key threshold")
            && !text.contains("needs 0"),
        "{text}"
    );
    let text = PassError::MissingKeys {
        needed: 3,
        found: 1,
        unreadable: vec!["vault-unseal-1".into()],
    }
    .to_string();
    assert!(
        text.contains("needs 3 unseal keys but the store holds 1 readable ones")
            && text.contains("(unreadable: vault-unseal-1)"),
        "{text}"
    );
    let text = PassError::StoreMissing {
        store: "Secret vault/vault-unseal-keys".into(),
        needed: 3,
    }
    .to_string();
    assert!(
        text.contains("Secret vault/vault-unseal-keys not found")
            && text.contains("Restore the Secret from a backup"),
        "{text}"
    );
}

/// Vault initialised by an init whose keys never reached the store: the pass says the keys
/// were probably lost, not merely that it "needs 3".
#[tokio::test]
async fn an_initialised_vault_with_an_empty_store_is_reported_as_lost_keys() {
    let scene = Scene::new();
    scene.vault.init(5, 3).await.expect("init elsewhere");
    let err = scene.pass().await.expect_err("nothing to unseal with");
    assert!(
        matches!(err, PassError::MissingKeys { found: 0, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("the keys were probably lost"), "{text}");
    scene.close();
}

/// A stick that cannot decrypt the stored keys (another key pair's values) reports each
/// key once, not on every pass.
#[tokio::test]
async fn unreadable_keys_are_reported_once_per_change() {
    let scene = Scene::initialised().await;
    scene.vault.seal();
    let (other, other_host) = soft::pair();
    let r = Runner::new(
        scene.config(),
        scene.vault.clone(),
        Keyring::new(other, other_host, Scheme::OaepSha1, scene.store.clone()),
        None,
        Telemetry::new(),
        Shutdown::new(),
    );
    for _ in 0..3 {
        let err = r.pass(false).await.expect_err("unreadable");
        assert!(
            matches!(&err, PassError::MissingKeys { unreadable, .. } if unreadable.len() == 5),
            "{err:?}"
        );
        assert_eq!(pace_of(&Err(err)), Pace::Slower);
    }
    let seen = r.unreadable_seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 5, "{seen:?}");
    scene.close();
}

#[tokio::test]
async fn stale_keys_block_init_unless_overwriting_is_allowed() {
    let scene = Scene::initialised().await;
    let fresh = Arc::new(MemoryVault::new());
    let err = scene
        .runner_for(scene.config(), &fresh)
        .pass(false)
        .await
        .expect_err("stale keys");
    assert!(matches!(err, PassError::StaleKeys(5)), "{err:?}");
    assert_eq!(
        fresh.calls("init"),
        0,
        "Vault was never asked to initialise"
    );
    scene.assert_store_holds(&scene.vault).await;

    let mut cfg = scene.config();
    cfg.options.overwrite_existing_keys = true;
    cfg.options.secret_shares = 3;
    cfg.options.secret_threshold = 2;
    assert_eq!(
        scene
            .runner_for(cfg, &fresh)
            .pass(false)
            .await
            .expect("overwrite"),
        PassOutcome::Unsealed
    );
    assert!(fresh.is_unsealed());
    assert_eq!(
        scene.names().await,
        names_for(3),
        "the earlier Vault's surplus keys are removed"
    );
    scene.assert_store_holds(&fresh).await;
    scene.close();
}

/// A member that lost its data, while a raft peer answers initialised, rejoins: it never
/// initialises, not even with `overwriteExistingKeys`, and the shared store is untouched.
#[tokio::test]
async fn a_member_that_lost_its_data_rejoins_its_peers_instead_of_initialising() {
    let scene = Scene::initialised().await;
    let lost = Arc::new(MemoryVault::new());
    let mut cfg = scene.config();
    cfg.options.overwrite_existing_keys = true;
    let peers: Vec<Arc<dyn VaultApi>> = vec![Arc::new(MemoryVault::new()), scene.vault.clone()];
    let err = scene
        .runner_for(cfg, &lost)
        .with_peers(peers)
        .pass(false)
        .await
        .expect_err("the in-memory Vault cannot complete a raft join");
    assert!(matches!(err, PassError::JoinFailed(_)), "{err:?}");
    assert_eq!(lost.calls("raft_join"), 1, "it asked to join the cluster");
    assert_eq!(lost.calls("init"), 0, "it never initialised");
    scene.assert_store_holds(&scene.vault).await;
    scene.close();
}

#[tokio::test]
async fn a_short_init_answer_is_an_error_but_every_returned_key_is_stored() {
    let scene = Scene::new();
    scene.vault.answer_init_with(3);

    let err = scene.pass().await.expect_err("short answer");
    let PassError::InitAnswer(problem) = &err else {
        panic!("expected InitAnswer, got {err:?}");
    };
    assert!(
        problem.contains("asked for 5 unseal keys, Vault returned 3"),
        "{problem}"
    );
    assert_eq!(scene.names().await, names_for(3));
    for (i, key) in scene.vault.issued_keys().iter().take(3).enumerate() {
        assert_eq!(&scene.load(&unseal_key_name(i)).await, key);
    }
    assert_eq!(scene.load(ROOT_KEY).await, scene.vault.root_token());
    assert!(!scene.journal().exists());
    assert_eq!(scene.vault.calls("unseal"), 0);
    scene.close();
}

#[tokio::test]
async fn an_unreachable_vault_ends_the_pass_without_touching_the_store() {
    let scene = Scene::new();
    scene.vault.set_unreachable(true);
    assert_eq!(
        scene.pass().await.expect("pass"),
        PassOutcome::VaultUnreachable
    );
    assert_eq!(scene.store_ops(), [0, 0, 0, 0, 0]);
    assert_eq!(scene.decrypts(), 0);
    assert_eq!(scene.vault.calls("init"), 0);
    scene.close();
}

#[tokio::test]
async fn keys_of_another_vault_are_reported_as_wrong_keys() {
    let scene = Scene::initialised().await;
    let other = Arc::new(MemoryVault::new());
    other.init(5, 3).await.expect("init the other Vault");
    let err = scene
        .runner_for(scene.config(), &other)
        .pass(false)
        .await
        .expect_err("wrong keys");
    let PassError::WrongKeys { submitted, detail } = &err else {
        panic!("expected WrongKeys, got {err:?}");
    };
    assert!(
        (1..=3).contains(submitted),
        "never more keys than the threshold: {submitted}"
    );
    assert!(detail.contains("HTTP 400"), "{detail}");
    assert!(!other.is_unsealed());
    scene.close();
}

/// A Vault whose first init left its keys in the journal (the store failed after two).
async fn journal_left_behind(scene: &Scene) {
    let mut cfg = scene.config();
    cfg.hsm.token_wait_timeout = Duration::from_millis(1);
    scene.store.fail_puts_after(2, 1);
    let err = scene
        .runner_for(cfg, &scene.vault)
        .pass(false)
        .await
        .expect_err("the store failed");
    assert!(matches!(err, PassError::InitPending { .. }), "{err:?}");
    assert!(scene.journal().exists());
}

#[tokio::test]
async fn a_sys_init_in_flight_holds_the_marker_and_counts_as_alive() {
    let scene = Scene::new();
    let r = scene.runner();
    // Any silence is too long here, except during the init.
    r.telemetry.set_liveness_window(Duration::ZERO);
    let (t, marker) = (
        Arc::clone(&r.telemetry),
        journal::in_flight_path(scene.dir.path()),
    );
    let seen = Arc::new(Mutex::new(None));
    let seen_in = Arc::clone(&seen);
    scene.vault.during_init(move || {
        std::thread::sleep(Duration::from_millis(5));
        *seen_in.lock().expect("seen") = Some((t.alive(), marker.exists()));
    });
    assert_eq!(r.pass(false).await.expect("init"), PassOutcome::Unsealed);
    assert_eq!(
        *seen.lock().expect("seen"),
        Some((true, true)),
        "(alive, marker present) while sys/init was in flight"
    );
    assert!(!journal::in_flight_path(scene.dir.path()).exists());
    std::thread::sleep(Duration::from_millis(2));
    assert!(
        !r.telemetry.alive(),
        "the window applies again after the init"
    );
    scene.close();
}

#[tokio::test]
async fn a_dropped_init_answer_is_reported_as_lost_keys_never_as_success() {
    let scene = Scene::new();
    scene.vault.drop_init_answer();
    let err = scene.pass().await.expect_err("keys lost");
    let text = err.to_string();
    assert!(matches!(err, PassError::InitLost { .. }), "{err:?}");
    assert!(err.is_fatal());
    assert!(
        text.contains("Vault may have initialised; its keys are lost")
            && text.contains("reports it is initialised now")
            && text.contains("delete its data"),
        "{text}"
    );
    assert_eq!(scene.store.count("put"), 0);
    assert!(!journal::in_flight_path(scene.dir.path()).exists());
    assert!(!scene.journal().exists());
    scene.close();
}

#[tokio::test]
async fn a_journal_of_another_vault_is_refused_and_kept() {
    let scene = Scene::new();
    journal_left_behind(&scene).await;
    let before = std::fs::read(scene.journal()).expect("journal");
    let names = scene.names().await;

    // A fresh Vault (its storage wiped, or another one) at the same address.
    let fresh = Arc::new(MemoryVault::new());
    let err = scene
        .runner_for(scene.config(), &fresh)
        .pass(false)
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, PassError::JournalForeign { why, .. } if why.contains("not initialised")),
        "{err:?}"
    );
    // One initialised with another seal configuration.
    let other = Arc::new(MemoryVault::new());
    other.init(3, 2).await.expect("init the other Vault");
    let err = scene
        .runner_for(scene.config(), &other)
        .pass(false)
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("3 key shares with threshold 2"), "{text}");
    assert!(text.contains("kept untouched"), "{text}");
    assert_eq!(fresh.calls("init"), 0, "nobody initialised the fresh Vault");
    assert_eq!(std::fs::read(scene.journal()).expect("kept"), before);
    assert_eq!(scene.names().await, names, "nothing stored from it");

    // Its own Vault takes it.
    assert_eq!(scene.pass().await.expect("finish"), PassOutcome::Unsealed);
    scene.assert_store_holds(&scene.vault).await;
    scene.close();
}

#[tokio::test]
async fn finishing_a_journal_never_overwrites_a_value_stored_since() {
    let scene = Scene::new();
    journal_left_behind(&scene).await;
    let theirs = vec![9u8; 128];
    scene.store.insert("vault-unseal-3", theirs.clone());
    let err = scene.pass().await.expect_err("refused");
    assert!(
        matches!(&err, PassError::JournalConflict { name, .. } if name == "vault-unseal-3"),
        "{err:?}"
    );
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(scene.store.raw("vault-unseal-3"), [theirs]);
    assert!(scene.journal().exists(), "the journal is kept");
    assert_eq!(scene.vault.calls("unseal"), 0);
    scene.close();
}

#[tokio::test]
async fn a_vault_answering_more_keys_than_asked_gets_only_those_stored() {
    let scene = Scene::new();
    scene.vault.issue_keys_on_init(500);
    let err = scene.pass().await.expect_err("mismatch reported");
    let text = err.to_string();
    assert!(matches!(err, PassError::InitAnswer(_)), "{err:?}");
    assert!(
        text.contains("asked for 5 unseal keys, Vault returned 500")
            && text.contains("the other 495 are kept"),
        "{text}"
    );
    assert_eq!(scene.names().await, names_for(5), "at most what was asked");
    let issued = scene.vault.issued_keys();
    for (i, key) in issued.iter().take(5).enumerate() {
        assert_eq!(&scene.load(&unseal_key_name(i)).await, key);
    }
    assert_eq!(scene.load(ROOT_KEY).await, scene.vault.root_token());
    // Everything Vault handed out is kept, encrypted, where no start resumes it.
    assert!(!scene.journal().exists());
    let kept: Vec<_> = std::fs::read_dir(scene.dir.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains("unstored-keys"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let j = Journal::from_bytes(&std::fs::read(&kept[0]).expect("read")).expect("parse");
    assert_eq!(j.entries.len(), 501);
    assert_eq!(j.journal_only(), 495);
    for (i, entry) in j.entries.iter().enumerate().skip(5).take(495) {
        assert_eq!(entry.name, unseal_key_name(i));
        let opened = scene
            .ring
            .open(&entry.name, &entry.sealed)
            .await
            .expect("open");
        assert_eq!(opened.expose(), issued[i]);
    }
    // The keys asked for unseal it.
    assert_eq!(scene.pass().await.expect("unseal"), PassOutcome::Unsealed);
    scene.close();
}

#[tokio::test]
async fn losing_the_init_race_in_hsm_mode_says_this_store_cannot_have_the_keys() {
    let scene = Scene::new();
    scene.vault.beaten_to_init();
    let err = scene.pass().await.expect_err("beaten");
    assert!(matches!(err, PassError::InitialisedElsewhere), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("initialised by someone else") && text.contains("can never receive them"),
        "{text}"
    );
    assert_eq!(scene.store.count("put"), 0);
    assert!(!scene.journal().exists());
    // The next pass says the same, not "needs 3 keys".
    let again = scene.pass().await.expect_err("still beaten");
    assert!(
        matches!(
            again,
            PassError::MissingKeys { .. } | PassError::InitialisedElsewhere
        ),
        "{again:?}"
    );
    scene.close();
}

#[tokio::test]
async fn losing_the_init_race_with_a_shared_store_waits_for_the_winners_keys() {
    let scene = Scene::new();
    scene.vault.beaten_to_init();
    let mut cfg = scene.config();
    cfg.mode = Mode::HsmK8s;
    cfg.hsm.token_wait_timeout = Duration::from_secs(30);
    let r = scene.runner_for(cfg, &scene.vault);
    // The winner stores its keys a moment later, into the same store.
    let (ring, vault) = (scene.ring.clone(), scene.vault.clone());
    let winner = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (i, key) in vault.issued_keys().iter().enumerate() {
            ring.store(&unseal_key_name(i), &Secret::from(key.as_str()))
                .await
                .expect("winner stores");
        }
    });
    assert_eq!(r.pass(true).await.expect("unsealed"), PassOutcome::Unsealed);
    winner.await.expect("winner");
    assert!(scene.vault.is_unsealed());
    assert_eq!(scene.vault.calls("init"), 1);
    scene.close();
}

#[tokio::test]
async fn a_shared_store_waits_for_the_winners_keys_only_so_long() {
    let scene = Scene::new();
    scene.vault.beaten_to_init();
    let mut cfg = scene.config();
    cfg.mode = Mode::HsmK8s;
    cfg.hsm.token_wait_timeout = Duration::from_millis(300);
    let r = scene.runner_for(cfg, &scene.vault);
    let err = r.pass(true).await.expect_err("never arrived");
    assert!(
        matches!(
            err,
            PassError::KeysNeverArrived {
                needed: 3,
                found: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("did not appear in the shared store"),
        "{err}"
    );
    // A sidecar pass waits without an error meanwhile.
    let mut cfg = scene.config();
    cfg.mode = Mode::HsmK8s;
    let sidecar = scene.runner_for(cfg, &scene.vault);
    assert_eq!(
        sidecar.pass(false).await.expect("waiting"),
        PassOutcome::WaitingForKeys
    );
    scene.close();
}
