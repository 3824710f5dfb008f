//! `unseal-init rekey` against a real OpenBao and a SoftHSM2 token: the keys rotate, the new
//! ones are what the store holds and what opens a restarted Vault, bad requests change
//! nothing, and a fault matrix (SIGTERM or SIGKILL of the rekey, SIGKILL of OpenBao, at each
//! step) ends every time with either the new keys stored and opening Vault, or the rekey
//! cancelled and the old keys stored and opening Vault: never neither. The matrix is printed
//! as a markdown table (`cargo test --test rekey -- --nocapture`); `REKEY_MATRIX_JOBS`
//! (default 4) cells run at once.
//!
//! OpenBao 2.4 and later disable the unauthenticated `sys/rekey` endpoints unless the
//! listener sets `disable_unauthed_rekey_endpoints = false`, which these servers do (one test
//! checks what a server without it answers).

mod common;

use common::faults::{Trigger, Watched, has_field, is_event};
use common::{command, matrix, run, run_once_ok, write_config};
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::Token;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Lets OpenBao serve `sys/rekey` (restarting it; it comes back sealed).
fn allow_rekey(bao: &mut OpenBao) {
    bao.stop().expect("stop openbao");
    let path = bao.config_path().to_owned();
    let text = std::fs::read_to_string(&path).expect("read openbao config");
    let text = text.replacen(
        "tls_disable = true\n",
        "tls_disable = true\n  disable_unauthed_rekey_endpoints = false\n",
        1,
    );
    std::fs::write(&path, text).expect("write openbao config");
    bao.start_again().expect("start openbao");
    bao.wait_ready(Duration::from_secs(60))
        .expect("openbao ready");
}

/// A token, an OpenBao serving `sys/rekey`, initialised and unsealed by unseal-init (5 shares,
/// threshold 3); the config, and the keys `sys/init` handed out as the store holds them.
struct Setup {
    hsm: SoftHsm,
    bao: OpenBao,
    dir: tempfile::TempDir,
    config: PathBuf,
    old: Vec<String>,
}

fn setup() -> Setup {
    let hsm = SoftHsm::new().expect("softhsm token");
    let mut bao = OpenBao::start().expect("openbao");
    allow_rekey(&mut bao);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    run_once_ok(&hsm, &config);
    let old = stored_keys(&hsm);
    assert_eq!(old.len(), 5);
    Setup {
        hsm,
        bao,
        dir,
        config,
        old,
    }
}

/// The stored unseal keys, decrypted with pkcs11-tool, in index order.
fn stored_keys(hsm: &SoftHsm) -> Vec<String> {
    let mut names: Vec<(usize, String)> = hsm
        .data_labels()
        .expect("labels")
        .into_iter()
        .filter_map(|l| {
            let i = l.strip_prefix("vault-unseal-")?.parse().ok()?;
            Some((i, l))
        })
        .collect();
    names.sort();
    names.dedup();
    names
        .iter()
        .map(|(_, l)| common::decrypt_stored(hsm, l))
        .collect()
}

fn rekey_command(hsm: &SoftHsm, config: &Path, args: &[&str]) -> Command {
    let mut cmd = command(hsm);
    cmd.arg("--config").arg(config).arg("rekey").args(args);
    cmd
}

/// Files left in the rekey's part of the journal directory.
fn rekey_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(common::journal_dir(dir).join("rekey"))
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

/// Restarts OpenBao (sealed) and submits `keys` directly, not through the program under
/// test; true when they unseal it.
fn keys_open_restarted(bao: &mut OpenBao, keys: &[String]) -> bool {
    bao.restart().expect("restart openbao");
    bao.wait_ready(Duration::from_secs(60))
        .expect("openbao ready");
    for key in keys {
        match bao.unseal(key) {
            Ok(s) if !s.sealed => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

fn rekey_in_progress(bao: &OpenBao) -> bool {
    let (status, body) =
        nitrokey_e2e::openbao::http(&bao.address(), "GET", "/v1/sys/rekey/init", None)
            .expect("sys/rekey/init");
    assert_eq!(status, 200, "{body}");
    body.contains("\"started\":true")
}

#[test]
fn rekey_rotates_the_keys_and_the_new_ones_open_a_restarted_vault() {
    let mut s = setup();
    let r = run(
        rekey_command(
            &s.hsm,
            &s.config,
            &["--secret-shares", "3", "--secret-threshold", "2"],
        ),
        RUN_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(r.stdout.contains("rekeyed"), "{}", r.stdout);
    let new = stored_keys(&s.hsm);
    assert_eq!(new.len(), 3, "vault-unseal-3 and -4 are removed");
    assert!(new.iter().all(|k| !s.old.contains(k)), "every key is new");
    let labels = s.hsm.data_labels().expect("labels");
    assert!(labels.contains(&"vault-root".to_owned()), "{labels:?}");
    let status = s.bao.seal_status().expect("seal status");
    assert_eq!((status.n, status.t, status.sealed), (3, 2, false));
    let mut secrets = s.old.clone();
    secrets.extend(new.iter().cloned());
    common::assert_no_secrets(&r.text, &secrets);
    assert!(rekey_files(s.dir.path()).is_empty());
    assert!(!rekey_in_progress(&s.bao));

    // A restarted Vault refuses the old keys and opens with the new ones, and the program
    // unseals it from the store.
    assert!(!keys_open_restarted(&mut s.bao, &s.old[..3]));
    assert!(keys_open_restarted(&mut s.bao, &new[..2]));
    s.bao.restart().expect("restart");
    s.bao.wait_ready(Duration::from_secs(60)).expect("ready");
    run_once_ok(&s.hsm, &s.config);
    assert!(!s.bao.seal_status().expect("status").sealed);

    // Without flags the seal configuration stays as it is.
    let r = run(rekey_command(&s.hsm, &s.config, &[]), RUN_TIMEOUT);
    assert_eq!(r.code, Some(0), "{}", r.text);
    let newer = stored_keys(&s.hsm);
    assert_eq!(newer.len(), 3);
    assert!(newer.iter().all(|k| !new.contains(k)));
    let status = s.bao.seal_status().expect("seal status");
    assert_eq!((status.n, status.t), (3, 2));
    assert!(keys_open_restarted(&mut s.bao, &newer[1..]));
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let hsm = SoftHsm::new().expect("softhsm token");
    let mut bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    run_once_ok(&hsm, &config);
    let old = stored_keys(&hsm);

    // A server that keeps the unauthenticated endpoints disabled (OpenBao's default).
    let r = run(rekey_command(&hsm, &config, &[]), RUN_TIMEOUT);
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.text.contains("disable_unauthed_rekey_endpoints = false"),
        "{}",
        r.text
    );
    assert!(rekey_files(dir.path()).is_empty());

    allow_rekey(&mut bao);
    run_once_ok(&hsm, &config);
    for (args, says) in [
        (
            &["--secret-shares", "2", "--secret-threshold", "3"][..],
            "--secret-threshold 3 is more than --secret-shares 2",
        ),
        (&["--secret-threshold", "6"][..], "--secret-threshold 6"),
        (&["--secret-shares", "0"][..], "at least 1"),
        (
            &["--secret-shares", "3", "--secret-threshold", "1"][..],
            "at least 2",
        ),
    ] {
        let r = run(rekey_command(&hsm, &config, args), RUN_TIMEOUT);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.text);
        assert!(r.text.contains(says), "{args:?}: {}", r.text);
    }
    let r = run(
        rekey_command(&hsm, &config, &["--secret-shares", "300"]),
        RUN_TIMEOUT,
    );
    assert_eq!(r.code, Some(2), "{}", r.text);

    // Fewer readable keys than Vault's threshold.
    for i in 0..3 {
        hsm.delete_object("data", &format!("vault-unseal-{i}"))
            .expect("delete");
    }
    let r = run(rekey_command(&hsm, &config, &[]), RUN_TIMEOUT);
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.text.contains("needs 3 unseal keys") && r.text.contains("holds 2 readable"),
        "{}",
        r.text
    );
    assert_eq!(stored_keys(&hsm), old[3..]);
    let status = bao.seal_status().expect("seal status");
    assert_eq!((status.n, status.t, status.sealed), (5, 3, false));
    assert!(!rekey_in_progress(&bao));
    assert!(rekey_files(dir.path()).is_empty());
    common::assert_no_secrets(&r.text, &old);
}

/// A moment of the rekey, reached by its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Started,
    Answered,
    JournalWritten,
    Verified,
    KeyStored(usize),
    Complete,
}

const NEW_SHARES: usize = 3;

impl Step {
    fn all() -> Vec<Self> {
        let mut v = vec![
            Self::Started,
            Self::Answered,
            Self::JournalWritten,
            Self::Verified,
        ];
        v.extend((0..NEW_SHARES).map(Self::KeyStored));
        v.push(Self::Complete);
        v
    }

    fn label(self) -> String {
        match self {
            Self::Started => "`sys/rekey/init` answered".into(),
            Self::Answered => "new keys handed out".into(),
            Self::JournalWritten => "journal written".into(),
            Self::Verified => "new keys verified".into(),
            Self::KeyStored(i) => format!("`vault-unseal-{i}` replaced"),
            Self::Complete => "rekey complete".into(),
        }
    }

    fn reached_by(self, line: &str) -> bool {
        match self {
            Self::Started => is_event(line, "rekey started"),
            Self::Answered => is_event(line, "rekey answered; encrypting the new keys"),
            Self::JournalWritten => is_event(line, "rekey journal written"),
            Self::Verified => is_event(line, "new unseal keys verified with Vault"),
            Self::KeyStored(i) => {
                is_event(line, "new unseal key stored in key store")
                    && has_field(line, "key", &format!("vault-unseal-{i}"))
            }
            Self::Complete => is_event(line, "rekey complete"),
        }
    }
}

/// What hits the step, and how unseal-init starts next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    /// SIGTERM to the rekey; the next start is `--once`.
    Term,
    /// SIGKILL to the rekey; the next start is `--once` (what the sidecar's start does).
    KillThenStart,
    /// SIGKILL to the rekey; the next start is `rekey` again.
    KillThenRekey,
    /// SIGKILL to the rekey; the next start is the sidecar, stopped with SIGTERM once ready.
    KillThenSidecar,
    /// SIGKILL to OpenBao, restarted on its storage (sealed); the next start is `--once`.
    KillVault,
}

const COLUMNS: [Column; 5] = [
    Column::Term,
    Column::KillThenStart,
    Column::KillThenRekey,
    Column::KillThenSidecar,
    Column::KillVault,
];

impl Column {
    fn label(self) -> &'static str {
        match self {
            Self::Term => "SIGTERM rekey, then `--once`",
            Self::KillThenStart => "SIGKILL rekey, then `--once`",
            Self::KillThenRekey => "SIGKILL rekey, then `rekey`",
            Self::KillThenSidecar => "SIGKILL rekey, then the sidecar",
            Self::KillVault => "SIGKILL OpenBao + restart, then `--once`",
        }
    }
}

/// How a cell ended: which keys Vault and the store ended with, or what broke.
enum Outcome {
    NewKeys,
    OldKeys,
    Failed(String),
}

impl matrix::CellOutcome for Outcome {
    fn text(&self) -> String {
        match self {
            Self::NewKeys => "new keys stored, unseal".to_owned(),
            Self::OldKeys => "cancelled, old keys unseal".to_owned(),
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
    let mut s = setup();
    let bao_pid = s.bao.pid().expect("openbao pid");
    let trigger = Trigger {
        matches: Box::new(move |line: &str| step.reached_by(line)),
        action: Box::new(move |run| match col {
            Column::Term => run.send(libc::SIGTERM),
            Column::KillThenStart | Column::KillThenRekey | Column::KillThenSidecar => {
                run.send(libc::SIGKILL)
            }
            // SAFETY: kill(2) on this process's own child, reaped only later by
            // `OpenBao::kill` on the cell's thread.
            Column::KillVault => unsafe {
                libc::kill(bao_pid as i32, libc::SIGKILL);
            },
        }),
    };
    let mut hit = Watched::spawn(
        rekey_command(
            &s.hsm,
            &s.config,
            &["--secret-shares", "3", "--secret-threshold", "2"],
        ),
        Some(trigger),
    );
    let status = hit.wait_exit(RUN_TIMEOUT);
    if status.is_none() {
        hit.kill();
        return Outcome::Failed(format!("the rekey hung:\n{}", hit.tail(15)));
    }
    if !hit.fired() {
        return Outcome::Failed(format!("step never reached:\n{}", hit.tail(15)));
    }
    if col == Column::Term && status.and_then(|st| st.code()) != Some(0) {
        return Outcome::Failed(format!(
            "SIGTERM'd rekey exited with {status:?}:\n{}",
            hit.tail(15)
        ));
    }
    if col == Column::KillVault {
        let _ = s.bao.kill();
        s.bao.start_again().expect("start openbao");
        s.bao
            .wait_ready(Duration::from_secs(60))
            .expect("openbao ready");
    }
    let next = match col {
        Column::KillThenRekey => run(rekey_command(&s.hsm, &s.config, &[]), RUN_TIMEOUT),
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
        _ => {
            let mut cmd = command(&s.hsm);
            cmd.arg("--config").arg(&s.config).arg("--once");
            run(cmd, RUN_TIMEOUT)
        }
    };
    if next.code != Some(0) {
        return Outcome::Failed(format!("next start exited {:?}:\n{}", next.code, next.text));
    }
    if col == Column::KillThenRekey {
        // The rekey run only finishes or clears the earlier one; Vault may be sealed only if
        // OpenBao was hit, which this column does not do.
        let _ = run_once_ok(&s.hsm, &s.config);
    }
    let left = rekey_files(s.dir.path());
    if !left.is_empty() {
        return Outcome::Failed(format!("rekey files left: {left:?}\n{}", next.text));
    }
    let Ok(vault) = s.bao.seal_status() else {
        return Outcome::Failed("OpenBao does not answer".into());
    };
    if vault.sealed {
        return Outcome::Failed(format!("Vault sealed after the next start:\n{}", next.text));
    }
    let stored = stored_keys(&s.hsm);
    let outcome = if stored == s.old {
        Outcome::OldKeys
    } else if stored.len() == NEW_SHARES && stored.iter().all(|k| !s.old.contains(k)) {
        Outcome::NewKeys
    } else {
        return Outcome::Failed(format!(
            "the store holds {} keys, {} of them old",
            stored.len(),
            stored.iter().filter(|k| s.old.contains(k)).count()
        ));
    };
    if vault.n as usize != stored.len() {
        return Outcome::Failed(format!(
            "Vault has {} shares, the store {}",
            vault.n,
            stored.len()
        ));
    }
    if !keys_open_restarted(&mut s.bao, &stored) {
        return Outcome::Failed("the stored keys do not open a restarted Vault".into());
    }
    outcome
}

#[test]
fn every_fault_at_every_rekey_step_ends_with_one_whole_set_of_keys() {
    let m = matrix::Matrix {
        steps: Step::all(),
        columns: COLUMNS.to_vec(),
        step_label: Step::label,
        column_label: |c: Column| c.label().to_owned(),
    };
    m.run_and_check(
        matrix::jobs("REKEY_MATRIX_JOBS", 4),
        run_cell,
        |why| Outcome::Failed(format!("panicked: {why}")),
        "",
    );
}

/// Runs the rekey to 3 shares and SIGKILLs it at `step`.
fn killed_at(s: &Setup, step: Step) {
    let trigger = Trigger {
        matches: Box::new(move |line: &str| step.reached_by(line)),
        action: Box::new(|run| run.send(libc::SIGKILL)),
    };
    let mut hit = Watched::spawn(
        rekey_command(
            &s.hsm,
            &s.config,
            &["--secret-shares", "3", "--secret-threshold", "2"],
        ),
        Some(trigger),
    );
    assert!(hit.wait_exit(RUN_TIMEOUT).is_some(), "{}", hit.tail(15));
    assert!(hit.fired(), "{}", hit.tail(15));
}

/// The two states no signal reaches reliably, set up by hand: Vault unsealed with nothing
/// pending and a journal without the verified marker. A probe rekey with the journal's keys,
/// cancelled at once, tells whether Vault switched to them.
#[test]
fn a_journal_without_a_verdict_is_settled_by_a_probe_rekey() {
    // Vault verified the new keys and the process died before it wrote the marker.
    let mut s = setup();
    killed_at(&s, Step::Verified);
    let marker = common::journal_dir(s.dir.path()).join("rekey/rekey-verified");
    let _ = std::fs::remove_file(&marker);
    assert!(!rekey_in_progress(&s.bao));
    let r = run_once_ok(&s.hsm, &s.config);
    assert!(r.text.contains("Probe"), "{}", r.text);
    let stored = stored_keys(&s.hsm);
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|k| !s.old.contains(k)));
    assert!(rekey_files(s.dir.path()).is_empty());
    assert!(!rekey_in_progress(&s.bao), "the probe rekey was cancelled");
    assert!(keys_open_restarted(&mut s.bao, &stored[..2]));

    // The rekey was lost (cancelled here by hand) before its keys were verified.
    let mut s = setup();
    killed_at(&s, Step::JournalWritten);
    let cancelled = rekey_in_progress(&s.bao);
    if cancelled {
        let (status, body) =
            nitrokey_e2e::openbao::http(&s.bao.address(), "DELETE", "/v1/sys/rekey/init", None)
                .expect("cancel");
        assert_eq!(status, 204, "{body}");
    }
    let r = run_once_ok(&s.hsm, &s.config);
    let stored = stored_keys(&s.hsm);
    if cancelled {
        assert!(r.text.contains("Probe"), "{}", r.text);
        assert_eq!(
            stored, s.old,
            "the journal's keys are refused; the old ones stay"
        );
    } else {
        // The run verified before it died: Vault uses the new keys.
        assert_eq!(stored.len(), 3);
    }
    assert!(rekey_files(s.dir.path()).is_empty());
    assert!(!rekey_in_progress(&s.bao));
    assert!(keys_open_restarted(&mut s.bao, &stored));
}

/// The unseal keys in the Secret `vault/vault-unseal-keys`, decrypted with pkcs11-tool, in
/// index order.
fn secret_keys(api: &nitrokey_e2e::kube_api::KubeApi, hsm: &SoftHsm) -> Vec<String> {
    let data = api
        .secret("vault", "vault-unseal-keys")
        .expect("the Secret exists");
    let mut keys: Vec<(usize, String)> = data
        .iter()
        .filter_map(|(name, value)| {
            let i = name.strip_prefix("vault-unseal-")?.parse().ok()?;
            let plain = hsm
                .decrypt(
                    &value[common::HEADER_LEN..],
                    nitrokey_e2e::token::Scheme::OaepSha1,
                )
                .expect("pkcs11-tool decrypt");
            Some((i, String::from_utf8(plain).expect("utf-8")))
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

/// Mode hsm-k8s: the keys are read from, and the new ones written to, the Secret.
#[test]
fn rekey_in_mode_hsm_k8s_rotates_the_keys_in_the_secret() {
    let hsm = SoftHsm::new().expect("softhsm token");
    let mut bao = OpenBao::start().expect("openbao");
    allow_rekey(&mut bao);
    let api = nitrokey_e2e::kube_api::KubeApi::start().expect("kube api");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig_in(dir.path(), "vault").expect("kubeconfig");
    let config = write_config(
        dir.path(),
        &hsm,
        &bao.address(),
        "kubernetes:\n  secretName: vault-unseal-keys\n",
    );
    let k8s = |mut cmd: Command| {
        cmd.args(["--mode", "hsm-k8s"])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    };
    let mut once = command(&hsm);
    once.arg("--config").arg(&config).arg("--once");
    let r = run(k8s(once), RUN_TIMEOUT);
    assert_eq!(r.code, Some(0), "{}", r.text);
    let old = secret_keys(&api, &hsm);
    assert_eq!(old.len(), 5);
    assert!(
        hsm.data_labels()
            .expect("labels")
            .iter()
            .all(|l| !l.starts_with("vault-unseal-")),
        "nothing on the token"
    );

    let r = run(
        k8s(rekey_command(
            &hsm,
            &config,
            &["--secret-shares", "3", "--secret-threshold", "2"],
        )),
        RUN_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "{}", r.text);
    let new = secret_keys(&api, &hsm);
    assert_eq!(
        new.len(),
        3,
        "vault-unseal-3 and -4 are removed from the Secret"
    );
    assert!(new.iter().all(|k| !old.contains(k)));
    let mut secrets = old.clone();
    secrets.extend(new.iter().cloned());
    common::assert_no_secrets(&r.text, &secrets);
    assert!(rekey_files(dir.path()).is_empty());
    assert!(keys_open_restarted(&mut bao, &new[1..]));
}
