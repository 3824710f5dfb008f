//! Break-glass access: `hsm reveal` prints one stored value (the root token, an unseal key)
//! and nothing else, refuses a terminal without `--yes`, reads Bank-Vaults' values too; `hsm
//! store` puts a value read from stdin back in the same format. The documented procedure runs
//! end to end against a real OpenBao with OpenBao's own CLI: reveal the root token, generate a
//! new one with `operator generate-root` from the revealed unseal keys, revoke the old one,
//! store the new one. Values are checked independently with OpenSC's `pkcs11-tool`.

mod common;

use base64::Engine;
use common::*;
use nitrokey_e2e::openbao::{OpenBao, bao_program, http};
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::{Scheme, Token};
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// `unseal-init --config CONFIG hsm ARGS`, stdin from `input` when given.
fn hsm_cmd(token: &dyn Token, config: &Path, args: &[&str], input: Option<&[u8]>) -> Run {
    let mut cmd = command(token);
    cmd.arg("--config").arg(config).arg("hsm").args(args);
    let Some(input) = input else {
        return run(cmd, Duration::from_secs(60));
    };
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn unseal-init");
    let mut stdin = child.stdin.take().expect("stdin");
    // The program may refuse before reading it all: a broken pipe is its answer, not ours.
    let _ = stdin.write_all(input);
    drop(stdin);
    wait(child, Duration::from_secs(60))
}

/// The stored value under `label`, decrypted on the token by `pkcs11-tool` with the scheme
/// its header names.
fn decrypt_on(token: &dyn Token, label: &str) -> String {
    let raw = token.read_data(label).expect("read object");
    assert_eq!(&raw[..3], b"NKV", "{label} lacks the format header");
    let scheme = match raw[4] {
        1 => Scheme::OaepSha256,
        2 => Scheme::OaepSha1,
        other => panic!("{label}: scheme {other}"),
    };
    String::from_utf8(token.decrypt(&raw[HEADER_LEN..], scheme).expect("decrypt")).expect("utf-8")
}

/// OpenBao's CLI against `vault` (with `token`, if any); returns stdout, failing on a
/// non-zero exit.
fn bao_cli(vault: &OpenBao, token: Option<&str>, args: &[&str], input: Option<&str>) -> String {
    let mut cmd = std::process::Command::new(bao_program());
    cmd.env("BAO_ADDR", vault.address())
        .env_remove("BAO_TOKEN")
        .env_remove("VAULT_TOKEN")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = token {
        cmd.env("BAO_TOKEN", t);
    }
    let mut child = cmd.spawn().expect("spawn bao");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("bao");
    assert!(
        out.status.success(),
        "bao {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Status of `auth/token/lookup-self` with `token`.
fn token_status(vault: &OpenBao, token: &str) -> u16 {
    vault
        .get_with_token("/v1/auth/token/lookup-self", token)
        .expect("lookup-self")
        .0
}

#[test]
fn the_root_token_is_revealed_regenerated_revoked_and_stored_again() {
    let (hsm, mut bao, dir) = peers();
    // OpenBao 2.5.3 and later serve the unauthenticated `sys/generate-root` endpoints, the
    // only way to a new root token when the old one is lost, only on a listener that allows
    // them (Vault serves them on every listener).
    let hcl = std::fs::read_to_string(bao.config_path()).expect("read OpenBao config");
    let allowed = hcl.replace(
        "  tls_disable = true\n",
        "  tls_disable = true\n  disable_unauthed_generate_root_endpoints = false\n",
    );
    assert_ne!(allowed, hcl, "the listener block changed shape:\n{hcl}");
    std::fs::write(bao.config_path(), allowed).expect("write OpenBao config");
    bao.restart().expect("restart OpenBao");
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    run_once_ok(&hsm, &config);
    let old_root = decrypt_stored(&hsm, "vault-root");
    let keys: Vec<String> = (0..5)
        .map(|i| decrypt_stored(&hsm, &format!("vault-unseal-{i}")))
        .collect();
    let mut outputs = Vec::new();

    // Reveal: the exact value on stdout (piped, so no newline), nothing of it elsewhere.
    let shown = hsm_cmd(&hsm, &config, &["reveal", "vault-root"], None);
    assert_eq!(shown.code, Some(0), "{}", shown.text);
    assert_eq!(shown.stdout, old_root);
    let stderr = &shown.text[shown.stdout.len()..];
    assert!(!stderr.contains(&old_root), "{stderr}");
    assert_eq!(token_status(&bao, &shown.stdout), 200);
    let missing = hsm_cmd(&hsm, &config, &["reveal", "vault-unseal-9"], None);
    assert_eq!(missing.code, Some(1), "{}", missing.text);
    assert!(
        missing
            .text
            .contains("nothing is stored under `vault-unseal-9`"),
        "{}",
        missing.text
    );
    assert!(missing.stdout.is_empty(), "{}", missing.stdout);

    // A new root token from three unseal keys, as the recovery guide does it: OpenBao's CLI
    // uses the authenticated `sys/generate-root-token` endpoints, so the guide (and this
    // test) speak to the unauthenticated ones over HTTP, as Vault's CLI does.
    let put = |path: &str, body: serde_json::Value| {
        let (code, text) = http(&bao.address(), "PUT", path, Some(&body)).expect("http");
        assert_eq!(code, 200, "{path}: {text}");
        json(&text)
    };
    let started = put("/v1/sys/generate-root/attempt", serde_json::json!({}));
    let otp = started["otp"].as_str().expect("otp").to_owned();
    let nonce = started["nonce"].as_str().expect("nonce").to_owned();
    let mut encoded = None;
    for (i, want) in keys.iter().enumerate().take(3) {
        let key = hsm_cmd(
            &hsm,
            &config,
            &["reveal", &format!("vault-unseal-{i}")],
            None,
        );
        assert_eq!(key.code, Some(0), "{}", key.text);
        assert_eq!(&key.stdout, want);
        let progress = put(
            "/v1/sys/generate-root/update",
            serde_json::json!({"key": key.stdout, "nonce": nonce}),
        );
        encoded = progress["encoded_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        outputs.push(key.text[key.stdout.len()..].to_owned());
    }
    let encoded = encoded.expect("generate-root finished after the threshold");
    // The token XORed with the one-time password, base64 without padding.
    let xored = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .expect("base64");
    let new_root: String = xored
        .iter()
        .zip(otp.bytes())
        .map(|(a, b)| char::from(a ^ b))
        .collect();
    assert_ne!(new_root, old_root);
    assert_eq!(token_status(&bao, &new_root), 200);

    // The old token revoked: it no longer works.
    bao_cli(&bao, Some(&old_root), &["token", "revoke", "-self"], None);
    assert_eq!(token_status(&bao, &old_root), 403);

    // Without --force the different value is refused and the stored one stays.
    let refused = hsm_cmd(
        &hsm,
        &config,
        &["store", "vault-root"],
        Some(format!("{new_root}\n").as_bytes()),
    );
    assert_eq!(refused.code, Some(2), "{}", refused.text);
    assert!(refused.text.contains("--force"), "{}", refused.text);
    assert_eq!(decrypt_stored(&hsm, "vault-root"), old_root);

    let stored = hsm_cmd(
        &hsm,
        &config,
        &["store", "vault-root", "--force"],
        Some(format!("{new_root}\n").as_bytes()),
    );
    assert_eq!(stored.code, Some(0), "{}", stored.text);
    assert!(
        stored.stdout.contains("stored `vault-root`"),
        "{}",
        stored.stdout
    );
    // One object, the new value (trailing newline dropped), the old one pruned.
    let labels = hsm.data_labels().expect("labels");
    assert_eq!(labels.iter().filter(|l| *l == "vault-root").count(), 1);
    assert_eq!(decrypt_stored(&hsm, "vault-root"), new_root);
    let again = hsm_cmd(&hsm, &config, &["reveal", "vault-root"], None);
    assert_eq!(again.stdout, new_root);
    let same = hsm_cmd(
        &hsm,
        &config,
        &["store", "vault-root"],
        Some(new_root.as_bytes()),
    );
    assert_eq!(same.code, Some(0), "{}", same.text);
    assert!(
        same.stdout
            .contains("already holds this value; nothing written"),
        "{}",
        same.stdout
    );

    outputs.extend([refused.text, stored.text, same.text, missing.text]);
    let mut secrets = keys.clone();
    secrets.extend([old_root, new_root]);
    for text in outputs {
        assert_no_secrets(&text, &secrets);
    }
}

/// A pseudo-terminal pair: (controller, the terminal end a child writes to).
fn pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut controller, mut terminal) = (0, 0);
    // SAFETY: openpty fills two descriptors it opened; both are owned from here on.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    unsafe {
        (
            std::fs::File::from_raw_fd(controller),
            std::os::fd::OwnedFd::from_raw_fd(terminal),
        )
    }
}

/// Everything the terminal's controller can read once the child has exited.
fn drain(mut controller: std::fs::File) -> String {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor this test owns.
    unsafe {
        let flags = libc::fcntl(controller.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(
            controller.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        );
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Ends with EIO (no terminal end open any more) or EAGAIN (nothing left).
    while let Ok(n) = controller.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn reveal_refuses_a_terminal_without_yes_and_reads_bank_vaults_values() {
    let hsm = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &hsm, "http://127.0.0.1:1", "");
    // Values as Bank-Vaults wrote them: bare ciphertext, OAEP-SHA1 (v1.33+) and PKCS#1 v1.5.
    let root = "s.7xWq0v3UJcYk2Ph9Lr4aQ8Zm";
    let key = "3f".repeat(33);
    let ct = hsm
        .encrypt_with_public_key(root.as_bytes(), Scheme::OaepSha1)
        .expect("encrypt");
    hsm.write_data("vault-root", &ct).expect("write");
    let ct = hsm
        .encrypt_with_public_key(key.as_bytes(), Scheme::Pkcs1v15)
        .expect("encrypt");
    hsm.write_data("vault-unseal-0", &ct).expect("write");

    let (controller, terminal) = pty();
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["hsm", "reveal", "vault-root"])
        .stdout(Stdio::from(terminal));
    let refused = run(cmd, Duration::from_secs(60));
    assert_eq!(refused.code, Some(2), "{}", refused.text);
    assert!(
        refused
            .text
            .contains("refusing to print `vault-root` to a terminal without --yes"),
        "{}",
        refused.text
    );
    // Refused before the token was opened.
    assert!(
        !refused.text.contains("found RSA key pair"),
        "{}",
        refused.text
    );
    assert_eq!(drain(controller), "");

    let (controller, terminal) = pty();
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["hsm", "reveal", "vault-root", "--yes"])
        .stdout(Stdio::from(terminal));
    let shown = run(cmd, Duration::from_secs(60));
    assert_eq!(shown.code, Some(0), "{}", shown.text);
    // On a terminal a newline follows (the terminal shows it as CR LF).
    assert_eq!(drain(controller), format!("{root}\r\n"));
    assert!(!shown.text.contains(root), "{}", shown.text);

    let legacy = hsm_cmd(&hsm, &config, &["reveal", "vault-unseal-0"], None);
    assert_eq!(legacy.code, Some(0), "{}", legacy.text);
    assert_eq!(legacy.stdout, key);
    // Bank-Vaults' values are left as they are: reading is not migrating.
    assert_eq!(
        hsm.read_data("vault-root").expect("read").len(),
        256,
        "still bare ciphertext"
    );
}

#[test]
fn store_refuses_bad_input_with_its_reason_and_writes_nothing() {
    let hsm = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &hsm, "http://127.0.0.1:1", "");
    let cases: [(&[&str], Vec<u8>, &str); 6] = [
        (
            &["store", "vault-root"],
            b"".to_vec(),
            "is not a root token",
        ),
        (
            &["store", "vault-root"],
            b"s.short\n".to_vec(),
            "is not a root token",
        ),
        (
            &["store", "vault-unseal-0"],
            b"not hex at all, but long enough to pass".to_vec(),
            "is not an unseal key",
        ),
        (
            &["store", "vault-root"],
            vec![b'k'; 5000],
            "stdin holds more than 4096 bytes",
        ),
        (
            &["store", "vault-root"],
            vec![b'k'; 300],
            "holds at most 214",
        ),
        (
            &["store", "a/b"],
            b"s.7xWq0v3UJcYk2Ph9Lr4aQ8Zm".to_vec(),
            "`a/b` is not a name",
        ),
    ];
    for (args, input, reason) in cases {
        let r = hsm_cmd(&hsm, &config, args, Some(&input));
        assert_eq!(r.code, Some(1), "{args:?}: {}", r.text);
        assert!(r.text.contains(reason), "{args:?}: {}", r.text);
        assert!(r.text.lines().count() < 20, "{args:?}: {}", r.text);
    }
    assert!(hsm.data_labels().expect("labels").is_empty());
    // Stored and read back by another tool: the same format as the program's own values.
    let token = "hvs.CAESIJ7xWq0v3UJcYk2Ph9Lr4aQ8Zm";
    let ok = hsm_cmd(
        &hsm,
        &config,
        &["store", "vault-root"],
        Some(format!("{token}\r\n").as_bytes()),
    );
    assert_eq!(ok.code, Some(0), "{}", ok.text);
    assert_eq!(decrypt_on(&hsm, "vault-root"), token);
}
