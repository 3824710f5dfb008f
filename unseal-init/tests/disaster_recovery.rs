//! Disaster recovery as the recovery guide runs it, with real tokens and a real OpenBao: two
//! tokens hold the same RSA key pair (generated off-token with `openssl` and imported into
//! SoftHSM2 with `pkcs11-tool` and into the TPM token with `tpm2_ptool`, as a DKEK backup
//! unwrapped onto a new stick gives the same pair), so values backed up from one are restored
//! onto the other. Single node: token A initialises OpenBao, `hsm backup`, A is destroyed,
//! `hsm restore` onto B, a restarted OpenBao is unsealed from B. HA: the Secret is deleted
//! while Vault is unsealed, `hsm restore` puts it back, a restarted OpenBao is unsealed from
//! it (Kubernetes API stand-in). Every stored value is checked with OpenSC's `pkcs11-tool`.

mod common;

use common::*;
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use nitrokey_e2e::token::{Scheme, Token, generate_rsa_key_pem};
use nitrokey_e2e::tpm::Tpm;
use sha2::Digest;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SECRET: &str = "vault-unseal-keys";

/// A configuration for `token` and the Vault at `vault` in `dir`, plus `extra` YAML lines.
fn config_for(dir: &Path, token: &dyn Token, vault: &str, extra: &str) -> PathBuf {
    let path = dir.join("unseal-init.yaml");
    std::fs::write(
        &path,
        format!(
            "mode: hsm\njournalDir: {}\nvault:\n  address: {vault}\nhsm:\n  modulePath: {}\n  slotId: {}\n  pin: {USER_PIN}\n  keyLabel: bank-vaults\n{extra}",
            journal_dir(dir).display(),
            token.module().display(),
            token.slot_id()
        ),
    )
    .expect("write config");
    path
}

/// `unseal-init --config CONFIG ARGS` (with the kubeconfig, in mode hsm-k8s, when given).
fn unseal_init(token: &dyn Token, config: &Path, kube: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = command(token);
    cmd.arg("--config").arg(config).args(args);
    if let Some(kubeconfig) = kube {
        cmd.args(["--mode", "hsm-k8s"])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
    }
    run(cmd, Duration::from_secs(120))
}

fn ok(run: Run) -> Run {
    assert_eq!(run.code, Some(0), "{}", run.text);
    run
}

/// Two tokens, SoftHSM2 and the TPM, holding one key pair made off-token.
fn twin_tokens(dir: &Path) -> (SoftHsm, Tpm) {
    let pem = generate_rsa_key_pem(dir, "pair").expect("openssl genpkey");
    let a = SoftHsm::without_key().expect("softhsm");
    a.import_key_pair(&pem).expect("import into SoftHSM2");
    let b = Tpm::without_key().expect("tpm");
    b.import_key_pair(&pem).expect("import into the TPM token");
    std::fs::remove_file(&pem).expect("remove the key file");
    assert_eq!(
        a.public_key_der().expect("A's public key"),
        b.public_key_der().expect("B's public key"),
        "both tokens hold the same pair"
    );
    (a, b)
}

/// `SHA256:` and the hex SHA-256 of the token's DER public key, computed here.
fn fingerprint(token: &dyn Token) -> String {
    let der = token.public_key_der().expect("export public key");
    format!("SHA256:{}", hex::encode(sha2::Sha256::digest(&der)))
}

/// A stored value in this program's format, decrypted by `pkcs11-tool` on `token` with the
/// scheme its header names.
fn open_on(token: &dyn Token, raw: &[u8]) -> String {
    assert_eq!(&raw[..3], b"NKV", "no format header");
    let scheme = match raw[4] {
        1 => Scheme::OaepSha256,
        2 => Scheme::OaepSha1,
        other => panic!("scheme {other}"),
    };
    String::from_utf8(token.decrypt(&raw[HEADER_LEN..], scheme).expect("decrypt")).expect("utf-8")
}

/// Every stored object's bytes, by label, sorted.
fn stored(token: &dyn Token) -> Vec<(String, Vec<u8>)> {
    let mut labels = token.data_labels().expect("labels");
    labels.sort();
    labels
        .into_iter()
        .map(|l| {
            let bytes = token.read_data(&l).expect("read object");
            (l, bytes)
        })
        .collect()
}

#[test]
fn a_backup_restored_onto_another_token_with_the_same_key_pair_unseals_vault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = twin_tokens(dir.path());
    let mut bao = OpenBao::start().expect("openbao");
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).expect("mkdir");
    std::fs::create_dir_all(&dir_b).expect("mkdir");
    let config_a = config_for(&dir_a, &a, &bao.address(), "");
    let config_b = config_for(&dir_b, &b, &bao.address(), "");

    ok(unseal_init(&a, &config_a, None, &["--once"]));
    let on_a = stored(&a);
    let names: Vec<String> = on_a.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(names, default_names());
    let clear: Vec<String> = on_a.iter().map(|(_, v)| open_on(&a, v)).collect();
    // The secrets among them (`vault-test` holds its own name).
    let secrets: Vec<String> = on_a
        .iter()
        .zip(&clear)
        .filter(|((l, _), _)| l != "vault-test")
        .map(|(_, c)| c.clone())
        .collect();

    // The backup: mode 0600, ciphertext only, nothing left beside it.
    let backups = dir.path().join("backups");
    std::fs::create_dir(&backups).expect("mkdir");
    let file = backups.join("vault.nkbackup");
    let file_arg = file.to_str().expect("utf-8 path");
    let made = ok(unseal_init(
        &a,
        &config_a,
        None,
        &["hsm", "backup", file_arg],
    ));
    assert!(
        made.stdout.contains("backed up 7 value(s)"),
        "{}",
        made.stdout
    );
    let mode = std::fs::metadata(&file)
        .expect("backup")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let text = std::fs::read_to_string(&file).expect("read backup");
    assert!(
        text.starts_with("nitrokey-unseal-init-backup 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("key {}\n", fingerprint(&a))),
        "{text}"
    );
    assert_no_secrets(&text, &secrets);
    assert_no_secrets(&made.text, &secrets);
    let entries: Vec<String> = std::fs::read_dir(&backups)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["vault.nkbackup"]);
    // To stdout (e.g. out of `kubectl exec`): the same bytes, the report on stderr.
    let piped = ok(unseal_init(&a, &config_a, None, &["hsm", "backup", "-"]));
    assert_eq!(piped.stdout, text);
    assert!(piped.text.contains("to stdout"), "{}", piped.text);
    // An existing backup is replaced only with --force.
    let refused = unseal_init(&a, &config_a, None, &["hsm", "backup", file_arg]);
    assert_eq!(refused.code, Some(2), "{}", refused.text);
    assert!(refused.text.contains("--force"), "{}", refused.text);
    ok(unseal_init(
        &a,
        &config_a,
        None,
        &["hsm", "backup", file_arg, "--force"],
    ));
    assert_eq!(std::fs::read_to_string(&file).expect("read"), text);

    // Stick A is gone for good, and Vault restarts sealed.
    drop(a);
    bao.restart().expect("restart OpenBao");
    assert!(bao.seal_status().expect("status").sealed);

    // Restored onto B: the same bytes, each decrypting on B.
    let restored = ok(unseal_init(
        &b,
        &config_b,
        None,
        &["hsm", "restore", file_arg],
    ));
    assert!(
        restored
            .stdout
            .contains("7 value(s) restored and 0 already present"),
        "{}",
        restored.stdout
    );
    assert_eq!(stored(&b), on_a);
    for ((label, raw), want) in on_a.iter().zip(&clear) {
        assert_eq!(&open_on(&b, raw), want, "{label}");
    }
    assert_no_secrets(&restored.text, &secrets);
    // A second restore finds everything in place and writes nothing.
    let again = ok(unseal_init(
        &b,
        &config_b,
        None,
        &["hsm", "restore", file_arg],
    ));
    assert!(
        again
            .stdout
            .contains("0 value(s) restored and 7 already present"),
        "{}",
        again.stdout
    );
    assert_eq!(stored(&b), on_a);

    // OpenBao unsealed from B.
    let unsealed = ok(unseal_init(&b, &config_b, None, &["--once"]));
    assert!(
        !unsealed.text.contains("initializing vault"),
        "{}",
        unsealed.text
    );
    assert!(!bao.seal_status().expect("status").sealed);

    // A different value in the way is replaced only with --force.
    let root_index = names.iter().position(|n| n == "vault-root").expect("root");
    let other = "s.ThisIsNotTheRootToken00000";
    let mut cmd = command(&b);
    cmd.arg("--config")
        .arg(&config_b)
        .args(["hsm", "store", "vault-root", "--force"])
        .stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), other.as_bytes())
        .expect("write stdin");
    let replaced = wait(child, Duration::from_secs(60));
    assert_eq!(replaced.code, Some(0), "{}", replaced.text);
    let conflict = unseal_init(&b, &config_b, None, &["hsm", "restore", file_arg]);
    assert_eq!(conflict.code, Some(2), "{}", conflict.text);
    assert!(
        conflict.text.contains("different values under vault-root")
            && conflict.text.contains("--force"),
        "{}",
        conflict.text
    );
    assert_eq!(
        open_on(&b, &b.read_data("vault-root").expect("read")),
        other
    );
    let forced = ok(unseal_init(
        &b,
        &config_b,
        None,
        &["hsm", "restore", file_arg, "--force"],
    ));
    assert!(
        forced
            .stdout
            .contains("1 value(s) restored and 6 already present"),
        "{}",
        forced.stdout
    );
    let labels = b.data_labels().expect("labels");
    assert_eq!(labels.iter().filter(|l| *l == "vault-root").count(), 1);
    assert_eq!(
        open_on(&b, &b.read_data("vault-root").expect("read")),
        clear[root_index]
    );

    // A token with another key pair, and a damaged file, are refused before any write.
    let stranger = SoftHsm::new().expect("another token");
    let dir_s = dir.path().join("s");
    std::fs::create_dir_all(&dir_s).expect("mkdir");
    let config_s = config_for(&dir_s, &stranger, &bao.address(), "");
    let foreign = unseal_init(&stranger, &config_s, None, &["hsm", "restore", file_arg]);
    assert_eq!(foreign.code, Some(1), "{}", foreign.text);
    assert!(
        foreign.text.contains(&fingerprint(&b)) && foreign.text.contains(&fingerprint(&stranger)),
        "{}",
        foreign.text
    );
    assert!(stranger.data_labels().expect("labels").is_empty());
    let damaged = dir.path().join("damaged.nkbackup");
    std::fs::write(
        &damaged,
        text.replacen("value vault-root T", "value vault-root U", 1),
    )
    .expect("write");
    let bad = unseal_init(
        &b,
        &config_b,
        None,
        &["hsm", "restore", damaged.to_str().expect("utf-8")],
    );
    assert_eq!(bad.code, Some(1), "{}", bad.text);
    assert!(bad.text.contains("altered or damaged"), "{}", bad.text);
}

#[test]
fn a_deleted_secret_is_restored_from_the_backup_and_vault_unseals_from_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = twin_tokens(dir.path());
    let mut bao = OpenBao::start().expect("openbao");
    let api = KubeApi::start().expect("kube api");
    let kubeconfig = api.kubeconfig_in(dir.path(), "vault").expect("kubeconfig");
    let extra = format!("kubernetes:\n  secretName: {SECRET}\n");
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).expect("mkdir");
    std::fs::create_dir_all(&dir_b).expect("mkdir");
    // Two pods, each with its own stick holding the pair.
    let config_a = config_for(&dir_a, &a, &bao.address(), &extra);
    let config_b = config_for(&dir_b, &b, &bao.address(), &extra);
    let kube = Some(kubeconfig.as_path());

    ok(unseal_init(&a, &config_a, kube, &["--once"]));
    let before = api.secret("vault", SECRET).expect("secret written");
    let root_raw = before.get("vault-root").expect("vault-root").clone();
    let root = open_on(&a, &root_raw);

    // Backed up through the other pod's stick.
    let file = dir.path().join("secret.nkbackup");
    let file_arg = file.to_str().expect("utf-8 path");
    ok(unseal_init(
        &b,
        &config_b,
        kube,
        &["hsm", "backup", file_arg],
    ));

    // The Secret is deleted while Vault runs unsealed: nothing to reveal any more.
    api.delete_secret("vault", SECRET);
    assert!(!bao.seal_status().expect("status").sealed);
    let gone = unseal_init(&a, &config_a, kube, &["hsm", "reveal", "vault-root"]);
    assert_eq!(gone.code, Some(1), "{}", gone.text);
    assert!(
        gone.text
            .contains("nothing is stored under `vault-root` in the Kubernetes Secret"),
        "{}",
        gone.text
    );

    // Restored, from stdin (e.g. into `kubectl exec -i`): the same data, the key pair's
    // fingerprint recorded again.
    let mut cmd = command(&a);
    cmd.arg("--config")
        .arg(&config_a)
        .args(["hsm", "restore", "-", "--mode", "hsm-k8s"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(std::fs::File::open(&file).expect("open backup"));
    let restored = ok(run(cmd, Duration::from_secs(120)));
    assert!(
        restored.stdout.contains("7 value(s) restored"),
        "{}",
        restored.stdout
    );
    assert_eq!(api.secret("vault", SECRET).as_ref(), Some(&before));
    assert_eq!(
        api.secret_annotations("vault", SECRET)
            .get("nitrokey.com/hsm-key-fingerprint"),
        Some(&fingerprint(&a))
    );
    let shown = ok(unseal_init(
        &b,
        &config_b,
        kube,
        &["hsm", "reveal", "vault-root"],
    ));
    assert_eq!(shown.stdout, root);

    // A restarted Vault unseals from the restored Secret, with the other pod's stick.
    bao.restart().expect("restart OpenBao");
    assert!(bao.seal_status().expect("status").sealed);
    ok(unseal_init(&b, &config_b, kube, &["--once"]));
    assert!(!bao.seal_status().expect("status").sealed);
}

/// Values Bank-Vaults wrote (bare ciphertext, OAEP-SHA1 and PKCS#1 v1.5) are backed up and
/// restored byte for byte, so Bank-Vaults can still read them; a bare value that only
/// "decrypts" to something that is not a value of its name (PKCS#1 v1.5 decryption can yield
/// random bytes instead of an error) is refused by the backup and by the restore, which then
/// writes nothing.
#[test]
fn bank_vaults_values_are_backed_up_and_restored_as_they_are() {
    let token = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_for(dir.path(), &token, "http://127.0.0.1:1", "");
    let root = "s.7xWq0v3UJcYk2Ph9Lr4aQ8Zm";
    let key = "5e".repeat(33);
    let root_ct = token
        .encrypt_with_public_key(root.as_bytes(), Scheme::OaepSha1)
        .expect("encrypt");
    let key_ct = token
        .encrypt_with_public_key(key.as_bytes(), Scheme::Pkcs1v15)
        .expect("encrypt");
    token.write_data("vault-root", &root_ct).expect("write");
    token.write_data("vault-unseal-0", &key_ct).expect("write");
    let file = dir.path().join("bv.nkbackup");
    let file_arg = file.to_str().expect("utf-8 path");
    ok(unseal_init(
        &token,
        &config,
        None,
        &["hsm", "backup", file_arg],
    ));

    token.delete_object("data", "vault-root").expect("delete");
    token
        .delete_object("data", "vault-unseal-0")
        .expect("delete");
    let restored = ok(unseal_init(
        &token,
        &config,
        None,
        &["hsm", "restore", file_arg],
    ));
    assert!(
        restored.stdout.contains("2 value(s) restored"),
        "{}",
        restored.stdout
    );
    assert_eq!(token.read_data("vault-root").expect("read"), root_ct);
    assert_eq!(token.read_data("vault-unseal-0").expect("read"), key_ct);

    // Text that is no unseal key, under an unseal key's name: not backed up.
    let text = std::fs::read_to_string(&file).expect("read backup");
    let junk = token
        .encrypt_with_public_key(b"not an unseal key at all, not hex", Scheme::Pkcs1v15)
        .expect("encrypt");
    token.write_data("vault-unseal-1", &junk).expect("write");
    let refused = unseal_init(
        &token,
        &config,
        None,
        &["hsm", "backup", file_arg, "--force"],
    );
    assert_eq!(refused.code, Some(1), "{}", refused.text);
    assert!(
        refused.text.contains("no backup written")
            && refused
                .text
                .contains("`vault-unseal-1` does not decrypt to an unseal key"),
        "{}",
        refused.text
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read"), text);

    // The same value in a backup file with a right checksum: refused, nothing written.
    token
        .delete_object("data", "vault-unseal-1")
        .expect("delete");
    token.delete_object("data", "vault-root").expect("delete");
    use base64::Engine;
    let body = text
        .lines()
        .filter(|l| !l.starts_with("sha256 "))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        + &format!(
            "value vault-unseal-1 {}\n",
            base64::engine::general_purpose::STANDARD.encode(&junk)
        );
    let forged = dir.path().join("forged.nkbackup");
    std::fs::write(
        &forged,
        format!(
            "{body}sha256 {}\n",
            hex::encode(sha2::Sha256::digest(body.as_bytes()))
        ),
    )
    .expect("write");
    let refused = unseal_init(
        &token,
        &config,
        None,
        &["hsm", "restore", forged.to_str().expect("utf-8")],
    );
    assert_eq!(refused.code, Some(1), "{}", refused.text);
    assert!(
        refused
            .text
            .contains("`vault-unseal-1` in the backup cannot be read")
            && refused.text.contains("nothing restored"),
        "{}",
        refused.text
    );
    assert_eq!(token.data_labels().expect("labels"), ["vault-unseal-0"]);
}
