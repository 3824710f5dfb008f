//! `unseal-init hsm rotate-key` against a SoftHSM2 token and a real OpenBao: a new key pair
//! takes the configured label, every stored value is re-encrypted to it (checked with
//! `pkcs11-tool`, independently of the program), the old pair is kept retired or deleted, and a
//! restarted OpenBao unseals from the new pair. A fault matrix (SIGTERM or SIGKILL of the
//! rotation at each step, then `--once`, the sidecar or `hsm rotate-key` again) ends every
//! time with every value readable by the one pair labelled `keyLabel`: printed as a markdown
//! table (`cargo test --test rotate_key -- --nocapture`); `ROTATE_MATRIX_JOBS` (default 3)
//! cells run at once.

mod common;

use common::faults::{Trigger, Watched, has_field, is_event};
use common::{command, default_names, matrix, run, write_config};
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::Token;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const LABEL: &str = "bank-vaults";

/// A token, an OpenBao initialised and unsealed by unseal-init; the config, the stored values
/// in clear (decrypted by `pkcs11-tool`) and the `CKA_ID` of the pair labelled `bank-vaults` before any rotation.
struct Setup {
    hsm: SoftHsm,
    bao: OpenBao,
    dir: tempfile::TempDir,
    config: PathBuf,
    values: BTreeMap<String, String>,
    old_id: String,
    /// Mode hsm-k8s: the values are in a Secret of this API stand-in.
    k8s: Option<K8s>,
}

struct K8s {
    api: nitrokey_e2e::kube_api::KubeApi,
    kubeconfig: PathBuf,
    old_fingerprint: String,
}

fn setup() -> Setup {
    setup_in(false)
}

fn setup_in(k8s: bool) -> Setup {
    let hsm = SoftHsm::new().expect("softhsm token");
    let bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let (extra, k8s) = if k8s {
        let api = nitrokey_e2e::kube_api::KubeApi::start().expect("kube api");
        let kubeconfig = api.kubeconfig_in(dir.path(), "vault").expect("kubeconfig");
        let k = K8s {
            api,
            kubeconfig,
            old_fingerprint: String::new(),
        };
        ("kubernetes:\n  secretName: vault-unseal-keys\n", Some(k))
    } else {
        ("", None)
    };
    let config = write_config(dir.path(), &hsm, &bao.address(), extra);
    let old_id = configured_id(&hsm);
    let mut s = Setup {
        hsm,
        bao,
        dir,
        config,
        values: BTreeMap::new(),
        old_id,
        k8s,
    };
    let r = run(unseal_init(&s, &["--once"]), RUN_TIMEOUT);
    assert_eq!(r.code, Some(0), "{}", r.text);
    s.values = values_now(&s).expect("stored values");
    assert_eq!(
        s.values.keys().cloned().collect::<Vec<_>>(),
        default_names(),
        "an init stores five keys, the root token and vault-test"
    );
    if let Some(k) = s.k8s.as_mut() {
        k.old_fingerprint = secret_fingerprint(&k.api).expect("fingerprint annotation");
    }
    s
}

/// The program with `args` on the setup's config (in mode hsm-k8s against its API stand-in).
fn unseal_init(s: &Setup, args: &[&str]) -> Command {
    let mut cmd = command(&s.hsm);
    cmd.arg("--config").arg(&s.config);
    if let Some(k) = &s.k8s {
        cmd.args(["--mode", "hsm-k8s"])
            .env("KUBECONFIG", &k.kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
    }
    cmd.args(args);
    cmd
}

/// `hsm rotate-key` (with `--yes-single-stick` in mode hsm-k8s).
fn rotate(s: &Setup) -> Command {
    if s.k8s.is_some() {
        unseal_init(s, &["hsm", "rotate-key", "--yes-single-stick"])
    } else {
        unseal_init(s, &["hsm", "rotate-key"])
    }
}

fn secret_fingerprint(api: &nitrokey_e2e::kube_api::KubeApi) -> Option<String> {
    api.secret_annotations("vault", "vault-unseal-keys")
        .get("nitrokey.com/hsm-key-fingerprint")
        .cloned()
}

/// The stored values (the token's, or the Secret's), decrypted with `pkcs11-tool` and the
/// pair labelled `bank-vaults`.
fn values_now(s: &Setup) -> Result<BTreeMap<String, String>, String> {
    let Some(k) = &s.k8s else {
        return Ok(stored_values(&s.hsm));
    };
    let id = configured_id(&s.hsm);
    let data = k
        .api
        .secret("vault", "vault-unseal-keys")
        .ok_or("the Secret is gone")?;
    data.iter()
        .map(|(name, value)| {
            decrypt_with(&s.hsm, value, &id)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect()
}

/// Every stored value, decrypted with `pkcs11-tool` and the private key labelled
/// `bank-vaults` (named by its `CKA_ID`: `pkcs11-tool --decrypt` takes the first private key
/// it finds, whatever `--label` says, and a retired pair may come first).
fn stored_values(hsm: &SoftHsm) -> BTreeMap<String, String> {
    let id = configured_id(hsm);
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    labels.dedup();
    labels
        .into_iter()
        .map(|l| {
            let v = decrypt_stored(hsm, &l, &id);
            (l, v)
        })
        .collect()
}

/// `(label, CKA_ID)` of the token's private keys, sorted.
fn private_keys(hsm: &SoftHsm) -> Vec<(String, String)> {
    let listing = hsm
        .run_pkcs11_tool(true, &["--list-objects", "--type", "privkey"])
        .expect("list private keys");
    let mut keys = Vec::new();
    let mut label = None;
    for line in listing.lines().map(str::trim) {
        if let Some(l) = line.strip_prefix("label:") {
            label = Some(l.trim().trim_matches('\'').to_owned());
        } else if let Some(id) = line.strip_prefix("ID:")
            && let Some(l) = label.take()
        {
            keys.push((l, id.trim().to_owned()));
        }
    }
    keys.sort();
    keys
}

/// `CKA_ID` of the private key labelled `bank-vaults`.
fn configured_id(hsm: &SoftHsm) -> String {
    let keys = private_keys(hsm);
    keys.iter()
        .find(|(l, _)| l == LABEL)
        .map(|(_, id)| id.clone())
        .unwrap_or_else(|| panic!("no private key labelled {LABEL}: {keys:?}"))
}

/// Decrypts stored value `label` (header stripped) with pkcs11-tool and the private key `id`.
fn decrypt_stored(hsm: &SoftHsm, label: &str, id: &str) -> String {
    try_decrypt(hsm, label, id).unwrap_or_else(|e| panic!("{label}: {e}"))
}

fn try_decrypt(hsm: &SoftHsm, label: &str, id: &str) -> Result<String, String> {
    let raw = hsm.read_data(label).map_err(|e| e.to_string())?;
    decrypt_with(hsm, &raw, id).map_err(|e| format!("{label}: {e}"))
}

/// Decrypts bytes in the stored format with pkcs11-tool and the private key `id`.
fn decrypt_with(hsm: &SoftHsm, raw: &[u8], id: &str) -> Result<String, String> {
    if raw.len() != common::HEADER_LEN + 256 || &raw[..3] != b"NKV" {
        return Err("not in the stored format".into());
    }
    let dir = hsm.dir().to_owned();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (i, o) = (
        dir.join(format!("rot-{n}-in.bin")),
        dir.join(format!("rot-{n}-out.bin")),
    );
    std::fs::write(&i, &raw[common::HEADER_LEN..]).map_err(|e| e.to_string())?;
    let (is, os) = (i.display().to_string(), o.display().to_string());
    let result = hsm.run_pkcs11_tool(
        true,
        &[
            "--decrypt",
            "--id",
            id,
            "-m",
            "RSA-PKCS-OAEP",
            "--hash-algorithm",
            "SHA-1",
            "--mgf",
            "MGF1-SHA1",
            "-i",
            &is,
            "-o",
            &os,
        ],
    );
    let plain = std::fs::read(&o);
    let _ = std::fs::remove_file(&i);
    let _ = std::fs::remove_file(&o);
    result.map_err(|e| e.to_string())?;
    String::from_utf8(plain.map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

/// Labels of the token's private keys, sorted.
fn private_key_labels(hsm: &SoftHsm) -> Vec<String> {
    private_keys(hsm).into_iter().map(|(l, _)| l).collect()
}

fn rotate_command(hsm: &SoftHsm, config: &Path, args: &[&str]) -> Command {
    let mut cmd = command(hsm);
    cmd.arg("--config")
        .arg(config)
        .args(["hsm", "rotate-key"])
        .args(args);
    cmd
}

/// Files left in the rotation's part of the journal directory.
fn rotate_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(common::journal_dir(dir).join("rotate"))
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

/// Restarts OpenBao (sealed) and runs `--once`; true when OpenBao is unsealed after it.
fn unseals_restarted(s: &mut Setup) -> Result<(), String> {
    s.bao
        .restart()
        .map_err(|e| format!("restart openbao: {e}"))?;
    s.bao
        .wait_ready(Duration::from_secs(60))
        .map_err(|e| format!("openbao ready: {e}"))?;
    let r = run(unseal_init(s, &["--once"]), RUN_TIMEOUT);
    if r.code != Some(0) {
        return Err(format!(
            "--once after a restart exited {:?}:\n{}",
            r.code, r.text
        ));
    }
    match s.bao.seal_status() {
        Ok(st) if !st.sealed => Ok(()),
        Ok(_) => Err("OpenBao still sealed after --once".into()),
        Err(e) => Err(format!("OpenBao does not answer: {e}")),
    }
}

/// What every state after a rotation (finished, abandoned or resumed) must satisfy: one pair
/// carries the label, no temporary pair is left, one object per value, each decrypting with
/// that pair to what it held before, no rotation files. Returns whether the pair is new.
fn one_whole_key_pair(s: &Setup) -> Result<bool, String> {
    let labels = private_key_labels(&s.hsm);
    if labels.iter().filter(|l| *l == LABEL).count() != 1 {
        return Err(format!("private keys: {labels:?}"));
    }
    if labels.iter().any(|l| l.ends_with("-next")) {
        return Err(format!("a temporary pair is left: {labels:?}"));
    }
    let mut objects = s.hsm.data_labels().map_err(|e| e.to_string())?;
    objects.sort();
    let expected = if s.k8s.is_some() {
        Vec::new()
    } else {
        default_names()
    };
    if objects != expected {
        return Err(format!("data objects on the token: {objects:?}"));
    }
    let now = values_now(s)?;
    if now != s.values {
        let changed: Vec<&String> = now
            .iter()
            .filter(|(k, v)| s.values.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        return Err(format!("values that changed: {changed:?}"));
    }
    let left = rotate_files(s.dir.path());
    if !left.is_empty() {
        return Err(format!("rotation files left: {left:?}"));
    }
    let new = configured_id(&s.hsm) != s.old_id;
    if let Some(k) = &s.k8s {
        let now = secret_fingerprint(&k.api);
        if (now.as_deref() != Some(k.old_fingerprint.as_str())) != new {
            return Err(format!(
                "the Secret's fingerprint annotation ({now:?}) does not follow the pair in use (new: {new})"
            ));
        }
    }
    Ok(new)
}

#[test]
fn rotate_key_re_encrypts_every_value_and_a_restarted_vault_unseals_from_the_new_pair() {
    let mut s = setup();
    let r = run(rotate_command(&s.hsm, &s.config, &[]), RUN_TIMEOUT);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(
        r.stdout.contains("rotated key pair `bank-vaults`"),
        "{}",
        r.stdout
    );
    // `vault-test` holds its own name, which the log names as a key.
    let secrets: Vec<String> = s
        .values
        .iter()
        .filter(|(k, _)| *k != "vault-test")
        .map(|(_, v)| v.clone())
        .collect();
    common::assert_no_secrets(&r.text, &secrets);
    assert_eq!(one_whole_key_pair(&s), Ok(true), "{}", r.text);
    let labels = private_key_labels(&s.hsm);
    assert_eq!(labels.len(), 2, "{labels:?}");
    assert!(
        labels[1].starts_with("bank-vaults-retired-"),
        "the old pair is kept retired: {labels:?}"
    );
    // The values are sealed to the new pair only: the retired one no longer opens them.
    let retired_id = private_keys(&s.hsm)
        .into_iter()
        .find(|(l, _)| l.starts_with("bank-vaults-retired-"))
        .map(|(_, id)| id)
        .expect("retired pair");
    assert!(
        try_decrypt(&s.hsm, "vault-root", &retired_id).is_err(),
        "the retired pair still opens vault-root"
    );
    unseals_restarted(&mut s).expect("a restarted OpenBao unseals from the new pair");

    // A second rotation with --delete-old leaves the first retired pair and no other.
    let before = configured_id(&s.hsm);
    let r = run(
        rotate_command(&s.hsm, &s.config, &["--delete-old"]),
        RUN_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert_ne!(configured_id(&s.hsm), before);
    assert_eq!(
        private_key_labels(&s.hsm),
        labels,
        "the pair just replaced is deleted"
    );
    unseals_restarted(&mut s).expect("unseals after the second rotation");
}

/// Mode hsm-k8s: refused without `--yes-single-stick` (other sticks would keep only the old
/// pair); with it, the Secret's values are re-encrypted and its fingerprint annotation follows.
#[test]
fn rotate_key_in_mode_hsm_k8s_needs_the_single_stick_flag_and_moves_the_secret_to_the_new_pair() {
    let mut s = setup_in(true);
    let k = s.k8s.as_ref().expect("mode hsm-k8s");
    let old_fingerprint = k.old_fingerprint.clone();

    let r = run(unseal_init(&s, &["hsm", "rotate-key"]), RUN_TIMEOUT);
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(r.text.contains("--yes-single-stick"), "{}", r.text);
    assert_eq!(private_key_labels(&s.hsm), [LABEL], "nothing generated");
    assert_eq!(secret_fingerprint(&k.api), Some(old_fingerprint.clone()));
    assert!(rotate_files(s.dir.path()).is_empty());

    let r = run(rotate(&s), RUN_TIMEOUT);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert_ne!(configured_id(&s.hsm), s.old_id);
    assert_eq!(
        values_now(&s).expect("the Secret's values"),
        s.values,
        "same values, new pair"
    );
    let new_fingerprint = secret_fingerprint(&k.api).expect("fingerprint annotation");
    assert_ne!(new_fingerprint, old_fingerprint);
    assert!(
        r.stdout
            .contains(&format!("new fingerprint {new_fingerprint}")),
        "the annotation names the new pair: {}",
        r.stdout
    );
    assert!(rotate_files(s.dir.path()).is_empty());
    assert!(
        s.hsm.data_labels().expect("labels").is_empty(),
        "nothing stored on the token in mode hsm-k8s"
    );
    unseals_restarted(&mut s).expect("a restarted OpenBao unseals from the Secret");
}

/// A moment of the rotation, reached by its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Intent,
    Generated,
    Journalled,
    Retired,
    Promoted,
    Stored(&'static str),
    AllStored,
    Complete,
}

impl Step {
    fn all() -> Vec<Self> {
        vec![
            Self::Intent,
            Self::Generated,
            Self::Journalled,
            Self::Retired,
            Self::Promoted,
            Self::Stored("vault-root"),
            Self::Stored("vault-unseal-4"),
            Self::AllStored,
            Self::Complete,
        ]
    }

    fn label(self) -> String {
        match self {
            Self::Intent => "intent written".into(),
            Self::Generated => "new pair generated (temporary label)".into(),
            Self::Journalled => "re-encrypted values journalled".into(),
            Self::Retired => "old pair relabelled retired".into(),
            Self::Promoted => "new pair relabelled `keyLabel`".into(),
            Self::Stored(name) => format!("`{name}` replaced"),
            Self::AllStored => "all replaced, journal removed".into(),
            Self::Complete => "rotation complete".into(),
        }
    }

    fn reached_by(self, line: &str) -> bool {
        match self {
            Self::Intent => is_event(line, "key rotation intent written"),
            Self::Generated => is_event(line, "new key pair generated"),
            Self::Journalled => is_event(line, "key rotation journal written"),
            Self::Retired => is_event(line, "old key pair relabelled as retired"),
            Self::Promoted => is_event(line, "new key pair now carries the configured label"),
            Self::Stored(name) => {
                is_event(line, "value re-encrypted to the new key pair stored")
                    && has_field(line, "key", name)
            }
            Self::AllStored => is_event(line, "every value stored under the new key pair"),
            Self::Complete => is_event(line, "key rotation complete"),
        }
    }
}

/// What hits the step, and how unseal-init starts next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    /// SIGTERM to the rotation; the next start is `--once`.
    Term,
    /// SIGKILL; the next start is `--once`.
    KillThenOnce,
    /// SIGKILL; the next start is the sidecar, stopped with SIGTERM once ready.
    KillThenSidecar,
    /// SIGKILL; the next start is `hsm rotate-key` again (which settles, then rotates anew).
    KillThenRotate,
    /// Mode hsm-k8s (`--yes-single-stick`): SIGKILL; the next start is `--once`.
    K8sKillThenOnce,
    /// Mode hsm-k8s: SIGKILL; the next start is `hsm rotate-key --yes-single-stick` again.
    K8sKillThenRotate,
}

const COLUMNS: [Column; 6] = [
    Column::Term,
    Column::KillThenOnce,
    Column::KillThenSidecar,
    Column::KillThenRotate,
    Column::K8sKillThenOnce,
    Column::K8sKillThenRotate,
];

impl Column {
    fn label(self) -> &'static str {
        match self {
            Self::Term => "SIGTERM, then `--once`",
            Self::KillThenOnce => "SIGKILL, then `--once`",
            Self::KillThenSidecar => "SIGKILL, then the sidecar",
            Self::KillThenRotate => "SIGKILL, then `hsm rotate-key`",
            Self::K8sKillThenOnce => "hsm-k8s: SIGKILL, then `--once`",
            Self::K8sKillThenRotate => "hsm-k8s: SIGKILL, then `hsm rotate-key`",
        }
    }
}

/// How a cell ended; `resumed`: the next start found the rotation unfinished (the signal
/// landed before the end), as its log says.
enum Outcome {
    NewPair { resumed: bool },
    OldPair { resumed: bool },
    Failed(String),
}

impl matrix::CellOutcome for Outcome {
    fn text(&self) -> String {
        let mark = |resumed: bool| if resumed { " (settled)" } else { "" };
        match self {
            Self::NewPair { resumed } => format!("new pair{}, unseals", mark(*resumed)),
            Self::OldPair { resumed } => format!("old pair kept{}, unseals", mark(*resumed)),
            Self::Failed(_) => "**FAILED**".to_owned(),
        }
    }

    fn failure(&self) -> Option<&str> {
        match self {
            Self::Failed(why) => Some(why),
            _ => None,
        }
    }
}

fn run_cell(step: Step, col: Column) -> Outcome {
    let mut s = setup_in(matches!(
        col,
        Column::K8sKillThenOnce | Column::K8sKillThenRotate
    ));
    let signal = if col == Column::Term {
        libc::SIGTERM
    } else {
        libc::SIGKILL
    };
    let trigger = Trigger {
        matches: Box::new(move |line: &str| step.reached_by(line)),
        action: Box::new(move |run| run.send(signal)),
    };
    let mut hit = Watched::spawn(rotate(&s), Some(trigger));
    if hit.wait_exit(RUN_TIMEOUT).is_none() {
        hit.kill();
        return Outcome::Failed(format!("the rotation hung:\n{}", hit.tail(15)));
    }
    if !hit.fired() {
        return Outcome::Failed(format!("step never reached:\n{}", hit.tail(15)));
    }
    let next = match col {
        Column::KillThenRotate | Column::K8sKillThenRotate => run(rotate(&s), RUN_TIMEOUT),
        Column::KillThenSidecar => {
            let (child, endpoints) = common::spawn_sidecar(&s.hsm, s.dir.path(), &s.bao.address());
            let ready = common::faults::poll(Duration::from_secs(90), || {
                nitrokey_e2e::openbao::http(&endpoints, "GET", "/readyz", None)
                    .is_ok_and(|(st, _)| st == 200)
            });
            common::faults::signal_child(&child, libc::SIGTERM);
            let mut r = common::wait(child, Duration::from_secs(60));
            if !ready {
                r.code = Some(-1);
                r.text.insert_str(0, "the sidecar never became ready\n");
            }
            r
        }
        Column::Term | Column::KillThenOnce | Column::K8sKillThenOnce => {
            run(unseal_init(&s, &["--once"]), RUN_TIMEOUT)
        }
    };
    if next.code != Some(0) {
        return Outcome::Failed(format!("next start exited {:?}:\n{}", next.code, next.text));
    }
    let new = match one_whole_key_pair(&s) {
        Ok(new) => new,
        Err(why) => return Outcome::Failed(format!("{why}\n{}", next.text)),
    };
    if let Err(why) = unseals_restarted(&mut s) {
        return Outcome::Failed(why);
    }
    // Before a rotation of its own (the `hsm rotate-key` column) starts.
    let own = next
        .text
        .find("key rotation intent written")
        .unwrap_or(next.text.len());
    let resumed = next.text[..own].contains("key rotation in progress");
    if new {
        Outcome::NewPair { resumed }
    } else {
        Outcome::OldPair { resumed }
    }
}

#[test]
fn every_fault_at_every_rotation_step_leaves_every_value_with_the_configured_pair() {
    let m = matrix::Matrix {
        steps: Step::all(),
        columns: COLUMNS.to_vec(),
        step_label: Step::label,
        column_label: |c: Column| c.label().to_owned(),
    };
    m.run_and_check(
        matrix::jobs("ROTATE_MATRIX_JOBS", 3),
        run_cell,
        |why| Outcome::Failed(format!("panicked: {why}")),
        "\n(settled): the next start found the rotation unfinished and settled it.\n",
    );
}
