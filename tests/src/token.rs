//! What every PKCS#11 token harness offers tests: [`Token`] names the module, slot and
//! environment to point the program under test at, and sets up and inspects the token from
//! outside that program, with OpenSC's `pkcs11-tool` and `openssl`, so a test never checks the
//! program with its own code. A harness supplies only what differs between tokens (module,
//! slot, environment, `pkcs11-tool` command); the rest is written once here, so a test can run
//! on any token.
//!
//! Every token is set up the Bank-Vaults way: user PIN [`USER_PIN`], RSA-2048 key pair
//! [`KEY_LABEL`].

use crate::softhsm::{KEY_LABEL, USER_PIN, check};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// RSA encryption schemes a test may ask a token (or `openssl`) to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// RSA-OAEP with SHA-256 and MGF1-SHA256 (what this program prefers when the token can).
    OaepSha256,
    /// RSA-OAEP with SHA-1 and MGF1-SHA1 (Bank-Vaults ≥ v1.33).
    OaepSha1,
    /// RSA PKCS#1 v1.5 (Bank-Vaults before v1.33).
    Pkcs1v15,
}

impl Scheme {
    fn pkcs11_tool_args(self) -> &'static [&'static str] {
        match self {
            Scheme::OaepSha256 => &[
                "-m",
                "RSA-PKCS-OAEP",
                "--hash-algorithm",
                "SHA256",
                "--mgf",
                "MGF1-SHA256",
            ],
            Scheme::OaepSha1 => &[
                "-m",
                "RSA-PKCS-OAEP",
                "--hash-algorithm",
                "SHA-1",
                "--mgf",
                "MGF1-SHA1",
            ],
            Scheme::Pkcs1v15 => &["-m", "RSA-PKCS"],
        }
    }

    fn openssl_args(self) -> &'static [&'static str] {
        match self {
            Scheme::OaepSha256 => &[
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                "rsa_oaep_md:sha256",
                "-pkeyopt",
                "rsa_mgf1_md:sha256",
            ],
            Scheme::OaepSha1 => &[
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                "rsa_oaep_md:sha1",
                "-pkeyopt",
                "rsa_mgf1_md:sha1",
            ],
            Scheme::Pkcs1v15 => &["-pkeyopt", "rsa_padding_mode:pkcs1"],
        }
    }
}

/// A unique file name in `dir` for one helper call (tests may share a token across threads).
fn scratch(dir: &Path, what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        "{what}-{}.bin",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A PKCS#11 token a test can point the program at and inspect with independent tools
/// (OpenSC's `pkcs11-tool`, `openssl`).
pub trait Token {
    /// The PKCS#11 module the program under test loads.
    fn module(&self) -> &Path;
    /// The token's slot id, looked up after set-up.
    fn slot_id(&self) -> u64;
    /// Environment every process using this token needs.
    fn env(&self) -> Vec<(String, String)>;
    /// A temporary directory owned by the token, removed with it.
    fn dir(&self) -> &Path;
    /// A `pkcs11-tool` command bound to the token itself (not through any wrapper module).
    fn pkcs11_tool(&self) -> Command;

    /// Extra `pkcs11-tool --write-object` flags the token needs for a data object.
    fn data_object_flags(&self) -> &'static [&'static str] {
        &[]
    }

    /// Runs `pkcs11-tool` with `args` (logged in with the user PIN when `login`), returning
    /// stdout; fails on a non-zero exit.
    fn run_pkcs11_tool(&self, login: bool, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.pkcs11_tool();
        if login {
            cmd.args(["--login", "--pin", USER_PIN]);
        }
        let out = cmd
            .args(args)
            .output()
            .context("running pkcs11-tool (install opensc)")?;
        check(&format!("pkcs11-tool {}", args.join(" ")), out)
    }

    /// Deletes the object of `kind` (`privkey`, `pubkey`, `data`) labelled `label`.
    fn delete_object(&self, kind: &str, label: &str) -> anyhow::Result<()> {
        self.run_pkcs11_tool(true, &["--delete-object", "--type", kind, "--label", label])
            .map(|_| ())
    }

    /// `pkcs11-tool --list-objects --type data` as printed (labels, applications, flags).
    fn data_listing(&self) -> anyhow::Result<String> {
        self.run_pkcs11_tool(true, &["--list-objects", "--type", "data"])
    }

    /// Labels of the data objects, one entry per object (duplicates show twice).
    fn data_labels(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .data_listing()?
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:"))
            .map(|l| l.trim().trim_matches('\'').to_owned())
            .collect())
    }

    /// The raw CKA_VALUE of the data object labelled `label`.
    fn read_data(&self, label: &str) -> anyhow::Result<Vec<u8>> {
        read_object(self, true, "data", label)
    }

    /// Writes a data object as Bank-Vaults did: CKA_LABEL only, no header on the value.
    fn write_data(&self, label: &str, value: &[u8]) -> anyhow::Result<()> {
        let file = scratch(self.dir(), "write");
        std::fs::write(&file, value)?;
        let path = file.display().to_string();
        let mut args = vec!["--write-object", &path, "--type", "data", "--label", label];
        args.extend(self.data_object_flags());
        let result = self.run_pkcs11_tool(true, &args);
        std::fs::remove_file(&file)?;
        result.map(|_| ())
    }

    /// Decrypts `ciphertext` with the key pair's private key on the token using
    /// `pkcs11-tool --decrypt`.
    fn decrypt(&self, ciphertext: &[u8], scheme: Scheme) -> anyhow::Result<Vec<u8>> {
        let input = scratch(self.dir(), "decrypt-in");
        let output = scratch(self.dir(), "decrypt-out");
        std::fs::write(&input, ciphertext)?;
        let (i, o) = (input.display().to_string(), output.display().to_string());
        let mut args = vec!["--decrypt", "--label", KEY_LABEL, "-i", &i, "-o", &o];
        args.extend(scheme.pkcs11_tool_args());
        let result = self.run_pkcs11_tool(true, &args);
        let _ = std::fs::remove_file(&input);
        result?;
        let plain = std::fs::read(&output)?;
        std::fs::remove_file(&output)?;
        Ok(plain)
    }

    /// The key pair's public key as DER SubjectPublicKeyInfo, exported by `pkcs11-tool`.
    fn public_key_der(&self) -> anyhow::Result<Vec<u8>> {
        read_object(self, false, "pubkey", KEY_LABEL)
    }

    /// Encrypts `plaintext` with the exported public key using `openssl pkeyutl`, giving the
    /// bare ciphertext Bank-Vaults stored (no header).
    fn encrypt_with_public_key(&self, plaintext: &[u8], scheme: Scheme) -> anyhow::Result<Vec<u8>> {
        let der = scratch(self.dir(), "pub-der");
        std::fs::write(&der, self.public_key_der()?)?;
        let input = scratch(self.dir(), "enc-in");
        let output = scratch(self.dir(), "enc-out");
        std::fs::write(&input, plaintext)?;
        let out = Command::new("openssl")
            .args(["pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey"])
            .arg(&der)
            .arg("-in")
            .arg(&input)
            .arg("-out")
            .arg(&output)
            .args(scheme.openssl_args())
            .output()
            .context("running openssl");
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_file(&der);
        check("openssl pkeyutl -encrypt", out?)?;
        let ct = std::fs::read(&output)?;
        std::fs::remove_file(&output)?;
        Ok(ct)
    }
}

/// The value of the object of `kind` labelled `label`, as `pkcs11-tool --read-object` writes
/// it to a file (logged in when `login`).
fn read_object<T: Token + ?Sized>(
    token: &T,
    login: bool,
    kind: &str,
    label: &str,
) -> anyhow::Result<Vec<u8>> {
    let out = scratch(token.dir(), "read");
    let path = out.display().to_string();
    let args = [
        "--read-object",
        "--type",
        kind,
        "--label",
        label,
        "-o",
        &path,
    ];
    token.run_pkcs11_tool(login, &args)?;
    let bytes = std::fs::read(&out)?;
    std::fs::remove_file(&out)?;
    Ok(bytes)
}

/// Generates an RSA-2048 key pair off any token with `openssl genpkey`, as the PEM private key
/// file `dir/NAME.pem`: a key pair to import into several tokens, so they hold the same pair
/// as sticks restored from one DKEK backup do.
pub fn generate_rsa_key_pem(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let pem = dir.join(format!("{name}.pem"));
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .output()
        .context("running openssl genpkey")?;
    check("openssl genpkey", out)?;
    Ok(pem)
}

/// The DER encodings of a PEM private key file: (PKCS#8 private key, SubjectPublicKeyInfo).
pub fn key_pair_der(pem: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let private = Command::new("openssl")
        .args(["pkey", "-outform", "DER", "-in"])
        .arg(pem)
        .output()
        .context("running openssl pkey")?;
    if !private.status.success() {
        anyhow::bail!(
            "openssl pkey failed: {}",
            String::from_utf8_lossy(&private.stderr)
        );
    }
    let public = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(pem)
        .output()
        .context("running openssl pkey -pubout")?;
    if !public.status.success() {
        anyhow::bail!(
            "openssl pkey -pubout failed: {}",
            String::from_utf8_lossy(&public.stderr)
        );
    }
    Ok((private.stdout, public.stdout))
}
