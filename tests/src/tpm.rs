//! A second, independent PKCS#11 token: a software TPM (`swtpm`) behind the TPM2 PKCS#11
//! module (`libtpm2_pkcs11.so`), both from Debian packages, set up like a freshly initialised
//! stick (token `bank-vaults`, the same user PIN as [`crate::softhsm`], RSA-2048 key pair
//! `bank-vaults`).
//!
//! SoftHSM2 is forgiving in ways a real stick is not; this token is not, and it shares several
//! of the Nitrokey HSM's traits under OpenSC: it decrypts RSA-OAEP with SHA-256, a failed
//! `C_Decrypt` leaves the operation active, every serial number is `0000000000000000`, an
//! extra blank slot is listed, data objects must be private, only three objects can be loaded
//! at a time without a resource manager, and after the TPM restarts the slot stays listed
//! while `C_Login` fails with `CKR_GENERAL_ERROR` until the module is initialised again.
//!
//! Each [`Tpm`] runs its own `swtpm` on unix sockets in a temporary directory (no ports, no
//! shared state) and is gone, process and files, when dropped. [`Tpm`] is a [`Token`], like
//! [`crate::softhsm::SoftHsm`], so a test can be written once for both; this module adds only
//! what a TPM alone has (extra slots, restarts, the swtpm process).

use crate::softhsm::{KEY_LABEL, SO_PIN, TOKEN_LABEL, USER_PIN, check};
use crate::token::Token;
use anyhow::{Context, bail};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The serial number the TPM2 PKCS#11 module reports for every token.
pub const TPM_SERIAL: &str = "0000000000000000";

/// Finds the TPM2 PKCS#11 module: `TPM2_PKCS11_MODULE`, else the file Debian's
/// `libtpm2-pkcs11-1` package installed (any architecture), else the usual multiarch paths.
pub fn module_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TPM2_PKCS11_MODULE") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(out) = Command::new("dpkg")
        .args(["-L", "libtpm2-pkcs11-1"])
        .output()
        && let Some(found) = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.ends_with("/libtpm2_pkcs11.so"))
            .map(PathBuf::from)
            .filter(|p| p.exists())
    {
        return Ok(found);
    }
    [
        "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
        "/usr/lib/pkcs11/libtpm2_pkcs11.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .context("libtpm2_pkcs11.so not found (install libtpm2-pkcs11-1 or set TPM2_PKCS11_MODULE)")
}

/// `tpm2_ptool` on `PATH`, where a distribution installs it as a command.
fn which_tpm2_ptool() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("tpm2_ptool"))
            .find(|p| p.is_file())
    })
}

/// One slot as `pkcs11-tool --list-slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotListing {
    /// Slot id.
    pub id: u64,
    /// Token label, empty for a blank token.
    pub label: String,
    /// Serial number, when printed (OpenSC prints none for an uninitialised token).
    pub serial: Option<String>,
}

/// Parses `pkcs11-tool --list-slots` output.
pub fn parse_slot_listing(text: &str) -> Vec<SlotListing> {
    let mut slots: Vec<SlotListing> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Slot ") {
            let id = rest
                .split_once("(0x")
                .and_then(|(_, r)| r.split_once(')'))
                .and_then(|(hex, _)| u64::from_str_radix(hex, 16).ok());
            if let Some(id) = id {
                slots.push(SlotListing {
                    id,
                    label: String::new(),
                    serial: None,
                });
            }
        } else if let Some(slot) = slots.last_mut()
            && let Some((key, value)) = line.split_once(':')
        {
            match key.trim() {
                "token label" => slot.label = value.trim().to_owned(),
                "serial num" => slot.serial = Some(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    slots
}

/// A software TPM with the TPM2 PKCS#11 module, in a temporary directory; killed and removed
/// on drop.
pub struct Tpm {
    dir: TempDir,
    module: PathBuf,
    slot: u64,
    swtpm: Option<Child>,
}

impl Tpm {
    /// A TPM token set up like a freshly initialised stick, with its RSA-2048 key pair.
    pub fn new() -> anyhow::Result<Self> {
        let tpm = Self::without_key()?;
        tpm.run_pkcs11_tool(
            true,
            &[
                "--keypairgen",
                "--key-type",
                "rsa:2048",
                "--label",
                KEY_LABEL,
            ],
        )?;
        Ok(tpm)
    }

    /// A TPM token set up like a freshly initialised stick, without a key pair.
    pub fn without_key() -> anyhow::Result<Self> {
        let module = module_path()?;
        let dir = tempfile::Builder::new().prefix("swtpm-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("state"))?;
        std::fs::create_dir_all(dir.path().join("store"))?;
        let mut tpm = Self {
            dir,
            module,
            slot: 0,
            swtpm: None,
        };
        tpm.start_swtpm()?;
        // Without this, three wrong PINs lock the whole TPM for 1000 s and the token flags
        // never say so.
        let out = Command::new("tpm2_dictionarylockout")
            .envs(tpm.env())
            .args([
                "--setup-parameters",
                "--max-tries=4294967295",
                "--recovery-time=0",
                "--lockout-recovery-time=0",
            ])
            .output()
            .context("running tpm2_dictionarylockout (install tpm2-tools)")?;
        check("tpm2_dictionarylockout", out)?;
        tpm.init_token(0, TOKEN_LABEL)?;
        tpm.slot = tpm.slot_of(TOKEN_LABEL)?;
        Ok(tpm)
    }

    /// Imports the RSA key pair in the PEM file `pem` (made off-token, e.g. by
    /// [`crate::token::generate_rsa_key_pem`]) as the pair [`KEY_LABEL`]. The TPM2 module
    /// refuses private keys through `C_CreateObject`, so this is the module's own import
    /// tool, `tpm2_ptool import` (Debian's `python3-tpm2-pkcs11-tools`, which installs no
    /// command: it is run as a Python module). Without a resource manager the tool leaves
    /// its objects loaded in the TPM, which then has no room for a login: they are flushed.
    pub fn import_key_pair(&self, pem: &Path) -> anyhow::Result<()> {
        let mut cmd = match which_tpm2_ptool() {
            Some(tool) => Command::new(tool),
            None => {
                let mut c = Command::new("/usr/bin/python3");
                c.args(["-m", "tpm2_pkcs11.tpm2_ptool"]);
                c
            }
        };
        self.flush_tpm_contexts()?;
        let out = cmd
            .envs(self.env())
            .args([
                "import",
                "--label",
                TOKEN_LABEL,
                "--key-label",
                KEY_LABEL,
                "--userpin",
                USER_PIN,
                "--algorithm",
                "rsa",
                "--privkey",
            ])
            .arg(pem)
            .arg("--path")
            .arg(self.dir.path().join("store"))
            .output()
            .context("running tpm2_ptool (install python3-tpm2-pkcs11-tools)")?;
        check("tpm2_ptool import", out)?;
        self.flush_tpm_contexts()
    }

    /// `tpm2_flushcontext` of transient objects and sessions.
    fn flush_tpm_contexts(&self) -> anyhow::Result<()> {
        for what in ["-t", "-s"] {
            let out = Command::new("tpm2_flushcontext")
                .envs(self.env())
                .arg(what)
                .output()
                .context("running tpm2_flushcontext (install tpm2-tools)")?;
            check("tpm2_flushcontext", out)?;
        }
        Ok(())
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("swtpm.sock")
    }

    fn start_swtpm(&mut self) -> anyhow::Result<()> {
        // The swtpm TCTI finds the control channel at the data socket's path + `.ctrl`.
        let ctrl = self.dir.path().join("swtpm.sock.ctrl");
        let _ = std::fs::remove_file(self.socket());
        let _ = std::fs::remove_file(&ctrl);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("swtpm.log"))?;
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", self.dir.path().join("state").display()))
            .arg("--server")
            .arg(format!("type=unixio,path={}", self.socket().display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting swtpm (install swtpm)")?;
        self.swtpm = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The control channel answering means the server socket is listening too (swtpm sets
        // both up before serving either).
        while UnixStream::connect(&ctrl).is_err() {
            if let Some(status) = self
                .swtpm
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "swtpm exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("swtpm.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("swtpm did not open {} within 10 s", ctrl.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop_swtpm(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.swtpm.take() {
            // SIGTERM lets swtpm write its state; SIGKILL only if it hangs.
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Stops swtpm and starts it again on the same state, as a TPM reset does. Processes that
    /// had the module loaded still see the slot, but `C_Login` fails with
    /// `CKR_GENERAL_ERROR` until they finalise and initialise the module again; a new
    /// process works at once.
    pub fn restart_tpm(&mut self) -> anyhow::Result<()> {
        self.stop_swtpm()?;
        self.start_swtpm()
    }

    /// Initialises the blank token in the slot at `index` (0-based, as `--slot-index` counts)
    /// with `label`, the SO PIN and the user PIN of [`crate::softhsm`].
    pub fn init_token(&self, index: usize, label: &str) -> anyhow::Result<()> {
        let index = index.to_string();
        self.raw_pkcs11_tool(&[
            "--slot-index",
            &index,
            "--init-token",
            "--label",
            label,
            "--so-pin",
            SO_PIN,
        ])?;
        self.raw_pkcs11_tool(&[
            "--token-label",
            label,
            "--login",
            "--login-type",
            "so",
            "--so-pin",
            SO_PIN,
            "--init-pin",
            "--new-pin",
            USER_PIN,
        ])
        .map(|_| ())
    }

    /// Every slot the module lists, as `pkcs11-tool --list-slots` prints it.
    pub fn slots(&self) -> anyhow::Result<Vec<SlotListing>> {
        Ok(parse_slot_listing(
            &self.raw_pkcs11_tool(&["--list-slots"])?,
        ))
    }

    /// The slot id of the token labelled `label`.
    pub fn slot_of(&self, label: &str) -> anyhow::Result<u64> {
        let slots = self.slots()?;
        slots
            .iter()
            .find(|s| s.label == label)
            .map(|s| s.id)
            .with_context(|| format!("token {label} not listed: {slots:?}"))
    }

    /// `pkcs11-tool` on this module without a slot chosen.
    fn raw_pkcs11_tool(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("pkcs11-tool")
            .envs(self.env())
            .arg("--module")
            .arg(&self.module)
            .args(args)
            .output()
            .context("running pkcs11-tool (install opensc)")?;
        check(&format!("pkcs11-tool {}", args.join(" ")), out)
    }

    /// The swtpm process id while it runs.
    pub fn swtpm_pid(&self) -> Option<u32> {
        self.swtpm.as_ref().map(Child::id)
    }
}

impl Token for Tpm {
    fn module(&self) -> &Path {
        &self.module
    }

    fn slot_id(&self) -> u64 {
        self.slot
    }

    fn env(&self) -> Vec<(String, String)> {
        let tcti = format!("swtpm:path={}", self.socket().display());
        vec![
            ("TPM2_PKCS11_TCTI".to_owned(), tcti.clone()),
            ("TPM2TOOLS_TCTI".to_owned(), tcti),
            (
                "TPM2_PKCS11_STORE".to_owned(),
                self.dir.path().join("store").display().to_string(),
            ),
            // The module logs every TSS warning to stderr otherwise.
            ("TSS2_LOG".to_owned(), "all+none".to_owned()),
        ]
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pkcs11_tool(&self) -> Command {
        let mut cmd = Command::new("pkcs11-tool");
        cmd.envs(self.env())
            .arg("--module")
            .arg(&self.module)
            .arg("--slot")
            .arg(self.slot.to_string());
        cmd
    }

    fn data_object_flags(&self) -> &'static [&'static str] {
        // The TPM2 module refuses public data objects (CKA_PRIVATE false).
        &["--private"]
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.swtpm.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_listing_is_parsed_with_ids_labels_and_serials() {
        let text = "Available slots:\nSlot 0 (0x1): bank-vaults\n  token label        : bank-vaults\n  serial num         : 0000000000000000\nSlot 1 (0x2): \n  token state:   uninitialized\n";
        assert_eq!(
            parse_slot_listing(text),
            vec![
                SlotListing {
                    id: 1,
                    label: "bank-vaults".into(),
                    serial: Some(TPM_SERIAL.into())
                },
                SlotListing {
                    id: 2,
                    label: String::new(),
                    serial: None
                },
            ]
        );
    }
}
