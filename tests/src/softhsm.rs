//! A SoftHSM2 token in a temporary directory, set up the way an operator sets up a NitroKey
//! HSM stick for Bank-Vaults: token label `bank-vaults`, user PIN `banzai`, SO PIN
//! `banzaicloud`, and an RSA-2048 key pair labelled `bank-vaults`, made with the same tools an
//! operator uses (`softhsm2-util`, OpenSC's `pkcs11-tool`).
//!
//! SoftHSM2 reads its configuration from `SOFTHSM2_CONF`, so every process that should see
//! this token (the program under test, `pkcs11-tool`) needs [`SoftHsm::env`]. After
//! initialisation the token moves to a large, hash-like slot id; [`SoftHsm::slot_id`] is that
//! id as looked up, never assumed.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

/// Token label, as Bank-Vaults' documentation sets it up.
pub const TOKEN_LABEL: &str = "bank-vaults";
/// User PIN, as Bank-Vaults' documentation sets it up.
pub const USER_PIN: &str = "banzai";
/// Security officer PIN, as Bank-Vaults' documentation sets it up.
pub const SO_PIN: &str = "banzaicloud";
/// RSA key pair label, as Bank-Vaults' documentation sets it up.
pub const KEY_LABEL: &str = "bank-vaults";

/// Finds SoftHSM2's PKCS#11 module (`SOFTHSM2_MODULE` overrides the search).
pub fn module_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        return Ok(PathBuf::from(p));
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
        "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .context("libsofthsm2.so not found (install softhsm2 or set SOFTHSM2_MODULE)")
}

/// Padding accepted by [`SoftHsm::encrypt_with_public_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// RSA-OAEP with SHA-1 and MGF1-SHA1 (what Bank-Vaults ≥ v1.33 writes).
    OaepSha1,
    /// RSA PKCS#1 v1.5 (what older Bank-Vaults wrote).
    Pkcs1v15,
}

/// A SoftHSM2 token living in a temporary directory, removed on drop.
pub struct SoftHsm {
    dir: TempDir,
    conf: PathBuf,
    module: PathBuf,
    slot: u64,
}

/// The stdout of a finished helper command, or an error with its status and output.
pub(crate) fn check(what: &str, out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl SoftHsm {
    /// A token with the RSA-2048 key pair `bank-vaults`.
    pub fn new() -> anyhow::Result<Self> {
        let hsm = Self::without_key()?;
        hsm.generate_key_pair(KEY_LABEL)?;
        Ok(hsm)
    }

    /// An initialised token with no key pair (for key-generation and missing-key tests).
    pub fn without_key() -> anyhow::Result<Self> {
        let module = module_path()?;
        let dir = tempfile::Builder::new().prefix("softhsm-").tempdir()?;
        let tokens = dir.path().join("tokens");
        // `tokens_dir` relies on this layout.
        std::fs::create_dir_all(&tokens)?;
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )?;
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                TOKEN_LABEL,
                "--pin",
                USER_PIN,
                "--so-pin",
                SO_PIN,
            ])
            .output()
            .context("running softhsm2-util (install softhsm2)")?;
        check("softhsm2-util --init-token", out)?;
        let mut hsm = Self {
            dir,
            conf,
            module,
            slot: 0,
        };
        hsm.slot = hsm.lookup_slot()?;
        Ok(hsm)
    }

    /// Reads the slot id of the token labelled [`TOKEN_LABEL`] from `softhsm2-util --show-slots`.
    fn lookup_slot(&self) -> anyhow::Result<u64> {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .arg("--show-slots")
            .output()?;
        let text = check("softhsm2-util --show-slots", out)?;
        let mut current: Option<u64> = None;
        for line in text.lines() {
            let t = line.trim();
            if let Some(id) = line.strip_prefix("Slot ") {
                current = id.trim().parse().ok();
            } else if let Some(label) = t.strip_prefix("Label:")
                && label.trim() == TOKEN_LABEL
            {
                return current.context("slot id missing before token label");
            }
        }
        bail!("token {TOKEN_LABEL} not listed by softhsm2-util --show-slots:\n{text}")
    }

    /// The PKCS#11 module to load.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The token's slot id (large and hash-like, looked up after initialisation).
    pub fn slot_id(&self) -> u64 {
        self.slot
    }

    /// The SoftHSM2 configuration file (the value of `SOFTHSM2_CONF`).
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// The directory SoftHSM2 keeps the token's files in (`directories.tokendir`).
    pub fn tokens_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// Makes the token vanish for every process using it, the way an unplugged stick does:
    /// its files are moved aside until [`SoftHsm::reinsert`].
    pub fn unplug(&self) -> anyhow::Result<()> {
        std::fs::rename(self.tokens_dir(), self.dir.path().join("tokens.unplugged"))
            .context("moving the token files aside")
    }

    /// Brings an [`SoftHsm::unplug`]ged token back.
    pub fn reinsert(&self) -> anyhow::Result<()> {
        std::fs::rename(self.dir.path().join("tokens.unplugged"), self.tokens_dir())
            .context("moving the token files back")
    }

    /// The temporary directory holding configuration and token files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Environment every process using this token needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".to_owned(), self.conf.display().to_string())]
    }

    /// A `pkcs11-tool` command bound to this module and slot; add arguments and run it.
    pub fn pkcs11_tool(&self) -> Command {
        let mut cmd = Command::new("pkcs11-tool");
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .arg("--module")
            .arg(&self.module)
            .arg("--slot")
            .arg(self.slot.to_string());
        cmd
    }

    /// Runs `pkcs11-tool` with `args` (logged in with the user PIN when `login`), returning
    /// stdout; fails on a non-zero exit.
    pub fn run_pkcs11_tool(&self, login: bool, args: &[&str]) -> anyhow::Result<String> {
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

    /// Generates an RSA-2048 key pair with `label` on the token (as an operator does with OpenSC).
    pub fn generate_key_pair(&self, label: &str) -> anyhow::Result<()> {
        self.run_pkcs11_tool(
            true,
            &[
                "--keypairgen",
                "--key-type",
                "rsa:2048",
                "--label",
                label,
                "--id",
                "01",
            ],
        )
        .map(|_| ())
    }

    /// Deletes the object of `kind` (`privkey`, `pubkey`, `data`) labelled `label`.
    pub fn delete_object(&self, kind: &str, label: &str) -> anyhow::Result<()> {
        self.run_pkcs11_tool(true, &["--delete-object", "--type", kind, "--label", label])
            .map(|_| ())
    }

    /// Labels of the data objects, one entry per object (duplicates show twice), as
    /// `pkcs11-tool --list-objects --type data` prints them.
    pub fn data_labels(&self) -> anyhow::Result<Vec<String>> {
        let text = self.run_pkcs11_tool(true, &["--list-objects", "--type", "data"])?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:"))
            .map(|l| l.trim().trim_matches('\'').to_owned())
            .collect())
    }

    /// The raw CKA_VALUE of the data object labelled `label`, read by `pkcs11-tool`.
    pub fn read_data(&self, label: &str) -> anyhow::Result<Vec<u8>> {
        let out = self.dir.path().join(format!("read-{label}.bin"));
        let path = out.display().to_string();
        self.run_pkcs11_tool(
            true,
            &[
                "--read-object",
                "--type",
                "data",
                "--label",
                label,
                "-o",
                &path,
            ],
        )?;
        let bytes = std::fs::read(&out)?;
        std::fs::remove_file(&out)?;
        Ok(bytes)
    }

    /// Writes a data object as Bank-Vaults did: CKA_LABEL only, no header on the value.
    pub fn write_data(&self, label: &str, value: &[u8]) -> anyhow::Result<()> {
        let file = self.dir.path().join(format!("write-{label}.bin"));
        std::fs::write(&file, value)?;
        let path = file.display().to_string();
        let result = self.run_pkcs11_tool(
            true,
            &["--write-object", &path, "--type", "data", "--label", label],
        );
        std::fs::remove_file(&file)?;
        result.map(|_| ())
    }

    /// Decrypts `ciphertext` with the key pair's private key on the token using
    /// `pkcs11-tool --decrypt` (an independent PKCS#11 client).
    pub fn decrypt(&self, ciphertext: &[u8], padding: Padding) -> anyhow::Result<Vec<u8>> {
        let input = self.dir.path().join("decrypt-in.bin");
        let output = self.dir.path().join("decrypt-out.bin");
        std::fs::write(&input, ciphertext)?;
        let (i, o) = (input.display().to_string(), output.display().to_string());
        let mut args = vec!["--decrypt", "--label", KEY_LABEL, "-i", &i, "-o", &o];
        match padding {
            Padding::OaepSha1 => args.extend([
                "-m",
                "RSA-PKCS-OAEP",
                "--hash-algorithm",
                "SHA-1",
                "--mgf",
                "MGF1-SHA1",
            ]),
            Padding::Pkcs1v15 => args.extend(["-m", "RSA-PKCS"]),
        }
        let result = self.run_pkcs11_tool(true, &args);
        let _ = std::fs::remove_file(&input);
        result?;
        let plain = std::fs::read(&output)?;
        std::fs::remove_file(&output)?;
        Ok(plain)
    }

    /// The key pair's public key as DER SubjectPublicKeyInfo, exported by `pkcs11-tool`.
    pub fn public_key_der(&self) -> anyhow::Result<Vec<u8>> {
        let out = self.dir.path().join("pub.der");
        let path = out.display().to_string();
        self.run_pkcs11_tool(
            false,
            &[
                "--read-object",
                "--type",
                "pubkey",
                "--label",
                KEY_LABEL,
                "-o",
                &path,
            ],
        )?;
        Ok(std::fs::read(&out)?)
    }

    /// Encrypts `plaintext` with the exported public key using `openssl pkeyutl`, giving the
    /// bare ciphertext Bank-Vaults stored (no header).
    pub fn encrypt_with_public_key(
        &self,
        plaintext: &[u8],
        padding: Padding,
    ) -> anyhow::Result<Vec<u8>> {
        let der = self.dir.path().join("pub.der");
        std::fs::write(&der, self.public_key_der()?)?;
        let input = self.dir.path().join("enc-in.bin");
        let output = self.dir.path().join("enc-out.bin");
        std::fs::write(&input, plaintext)?;
        let mut cmd = Command::new("openssl");
        cmd.args(["pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey"])
            .arg(&der)
            .arg("-in")
            .arg(&input)
            .arg("-out")
            .arg(&output);
        match padding {
            Padding::OaepSha1 => cmd.args([
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                "rsa_oaep_md:sha1",
                "-pkeyopt",
                "rsa_mgf1_md:sha1",
            ]),
            Padding::Pkcs1v15 => cmd.args(["-pkeyopt", "rsa_padding_mode:pkcs1"]),
        };
        let out = cmd.output().context("running openssl")?;
        std::fs::remove_file(&input)?;
        check("openssl pkeyutl -encrypt", out)?;
        let ct = std::fs::read(&output)?;
        std::fs::remove_file(&output)?;
        Ok(ct)
    }
}
