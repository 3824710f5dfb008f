//! A SoftHSM2 token in a temporary directory, set up the way an operator sets up a NitroKey
//! HSM stick for Bank-Vaults: token label `bank-vaults`, user PIN `banzai`, SO PIN
//! `banzaicloud`, and an RSA-2048 key pair labelled `bank-vaults`, made with the same tools an
//! operator uses (`softhsm2-util`, OpenSC's `pkcs11-tool`).
//!
//! [`SoftHsm`] is a [`Token`], so reading, writing and decrypting go through that trait; this
//! module adds only what the SoftHSM2 harness alone offers: a token without a key pair, key
//! pairs generated later, and unplugging by moving the token's files aside.
//!
//! SoftHSM2 reads its configuration from `SOFTHSM2_CONF`, so every process that should see
//! this token (the program under test, `pkcs11-tool`) needs [`Token::env`]. After
//! initialisation the token moves to a large, hash-like slot id; [`Token::slot_id`] is that
//! id as looked up, never assumed.

use crate::token::Token;
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
}

impl SoftHsm {
    /// Imports the RSA key pair in the PEM file `pem` (made off-token, e.g. by
    /// [`crate::token::generate_rsa_key_pem`]) as the pair [`KEY_LABEL`], with OpenSC's
    /// `pkcs11-tool --write-object`: the private key sensitive, the public key beside it.
    pub fn import_key_pair(&self, pem: &Path) -> anyhow::Result<()> {
        let (private, public) = crate::token::key_pair_der(pem)?;
        for (kind, der) in [("privkey", private), ("pubkey", public)] {
            let file = self.dir.path().join(format!("import-{kind}.der"));
            std::fs::write(&file, &der)?;
            let path = file.display().to_string();
            let result = self.run_pkcs11_tool(
                true,
                &[
                    "--write-object",
                    &path,
                    "--type",
                    kind,
                    "--label",
                    KEY_LABEL,
                    "--id",
                    "01",
                    "--usage-decrypt",
                ],
            );
            std::fs::remove_file(&file)?;
            result?;
        }
        Ok(())
    }
}

impl Token for SoftHsm {
    fn module(&self) -> &Path {
        &self.module
    }

    fn slot_id(&self) -> u64 {
        self.slot
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".to_owned(), self.conf.display().to_string())]
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pkcs11_tool(&self) -> Command {
        let mut cmd = Command::new("pkcs11-tool");
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .arg("--module")
            .arg(&self.module)
            .arg("--slot")
            .arg(self.slot.to_string());
        cmd
    }
}
