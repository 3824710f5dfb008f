//! Builds each image's root filesystem here, without a container engine, and runs the programs
//! in it the way the image runs them.
//!
//! No Docker engine runs on build machines, but the images are Debian plus a package list plus
//! a setup script (`deploy/image/<target>.packages`, `deploy/image/setup.sh`), the very files
//! the Dockerfile installs from. `mmdebstrap` builds the same root filesystem from Debian's
//! packages; the workspace's binaries (this build's debug binaries: a release build would cost
//! CI minutes and link against the same libraries) are placed where the Dockerfile puts them,
//! and everything runs under `chroot` as the image's non-root user 65532:
//!
//! - device-plugin: starts (`--help`), which needs libusb and libudev from the image;
//! - unseal-init: starts; `hsm info` loads OpenSC's module at `/usr/lib/opensc-pkcs11.so` and
//!   SoftHSM2's (copied in, as a stand-in for the stick); pcscd starts as that user; and
//!   `unseal-init --once` initialises and unseals a real OpenBao server on 127.0.0.1 (outside
//!   the root filesystem) with the keys on the token.
//!
//! `scripts/build-images.sh --rootfs-only` builds each root filesystem, the same tarball the
//! images are assembled from (tests/tests/images.rs), cached under the target directory and keyed
//! by the package list, the setup script and the mmdebstrap options, so only a changed list pays
//! for `mmdebstrap` (about 30 s); the size of each is printed. Without `mmdebstrap`, `chroot` or
//! root the tests say so and skip.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nitrokey_e2e::bins;
use nitrokey_e2e::host::{self, repo};
use nitrokey_e2e::openbao::{self, OpenBao};

/// The images' non-root user (`USER` in the Dockerfile, created by setup.sh).
const IMAGE_USER: &str = "65532:65532";
/// Debian release of the Dockerfile's runtime stages.
const SUITE: &str = "bookworm";

/// Why these tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    host::unavailable(
        &["mmdebstrap", "chroot", "tar"],
        "chroot and unpacking device nodes",
    )
}

/// The packages of one image, as the Dockerfile reads its list: comments and blanks dropped.
fn packages(target: &str) -> Vec<String> {
    let path = repo().join(format!("deploy/image/{target}.packages"));
    let text = std::fs::read_to_string(&path).expect("read the package list");
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The cached tarball of `target`'s root filesystem, built by mmdebstrap when missing, by the
/// same script (and cache) that builds the images (`scripts/build-images.sh --rootfs-only`).
fn rootfs_tarball(target: &str) -> PathBuf {
    let started = Instant::now();
    let out = run(
        &format!("scripts/build-images.sh --rootfs-only {target}"),
        Command::new(repo().join("scripts/build-images.sh"))
            .arg("--rootfs-only")
            .arg("--cache")
            .arg(Path::new(env!("CARGO_TARGET_TMPDIR")).join("image-rootfs"))
            .arg(target),
    );
    let tarball = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );
    assert!(
        tarball.is_file(),
        "the script named no root filesystem tarball: {}",
        tarball.display()
    );
    if String::from_utf8_lossy(&out.stderr).contains("mmdebstrap") {
        println!(
            "{target}: root filesystem built by mmdebstrap in {:.1?}",
            started.elapsed()
        );
    }
    tarball
}

/// Bytes under `dir`, not following symlinks.
fn size_of(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// An unpacked root filesystem with one program installed, removed on drop.
struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    /// Unpacks `target`'s root filesystem and installs its program at /usr/local/bin, as the
    /// Dockerfile's `COPY --from=build` does; prints the sizes.
    fn new(target: &str) -> Self {
        let tarball = rootfs_tarball(target);
        let dir = tempfile::Builder::new()
            .prefix(&format!("rootfs-{target}-"))
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("rootfs directory");
        run(
            "tar -x",
            Command::new("tar")
                .arg("-xf")
                .arg(&tarball)
                .arg("-C")
                .arg(dir.path()),
        );
        let base = size_of(dir.path());
        let binary = bins::path(target).expect("the workspace's binaries are built");
        let dest = dir.path().join("usr/local/bin").join(target);
        // A hard link spares copying a debug binary of a few hundred MB; unpacking elsewhere
        // falls back to a copy.
        if std::fs::hard_link(&binary, &dest).is_err() {
            std::fs::copy(&binary, &dest).expect("copy the binary in");
        }
        let program = std::fs::metadata(&dest).expect("binary").len();
        println!(
            "{target}: root filesystem {:.1} MiB (Debian {SUITE} + {}), plus the {target} \
             binary {:.1} MiB (debug build)",
            base as f64 / 1048576.0,
            packages(target).join(" "),
            program as f64 / 1048576.0
        );
        Rootfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A command run inside the root filesystem as the image's user, with a clean environment
    /// (what the image's config provides, nothing from this machine).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(format!("--userspec={IMAGE_USER}"))
            .arg(self.path())
            .arg("/usr/bin/env")
            .arg("-i")
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("HOME=/tmp")
            .arg(program);
        cmd
    }

    /// A directory inside the root filesystem that the image's user owns, like the emptyDir
    /// volumes the manifests mount (e.g. /run/pcscd).
    fn writable_dir(&self, inside: &str) -> PathBuf {
        let path = self.path().join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(&path).expect("create directory");
        chown_to_image_user(&path);
        path
    }
}

fn chown_to_image_user(path: &Path) {
    run(
        "chown",
        Command::new("chown").arg("-R").arg(IMAGE_USER).arg(path),
    );
}

/// Kills and reaps a child on drop, so a failing assertion leaves nothing running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn device_plugin_image_runs_its_program_without_the_smart_card_stack() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let rootfs = Rootfs::new("device-plugin");
    let out = run(
        "device-plugin --help in the image",
        rootfs.command("/usr/local/bin/device-plugin").arg("--help"),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Usage:"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The smaller image: nothing of the smart-card stack is in it.
    for absent in [
        "usr/sbin/pcscd",
        "usr/lib/opensc-pkcs11.so",
        "usr/bin/pkcs11-tool",
    ] {
        assert!(
            !rootfs.path().join(absent).exists(),
            "the device plugin's image must not carry {absent}"
        );
    }
}

/// A SoftHSM2 token inside the root filesystem, at /opt/softhsm: the module copied from this
/// machine (its libraries, OpenSSL and libstdc++, are in the image already), a token with the
/// RSA key pair made by the same tools an operator uses, owned by the image's user.
fn softhsm_inside(rootfs: &Rootfs) -> (String, u64) {
    let module = nitrokey_e2e::softhsm::module_path().expect("SoftHSM2 is installed");
    let opt = rootfs.path().join("opt/softhsm");
    let tokens = opt.join("tokens");
    std::fs::create_dir_all(&tokens).expect("token directory");
    std::fs::copy(&module, opt.join("libsofthsm2.so")).expect("copy the module in");
    let config = |tokendir: &Path| {
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokendir.display()
        )
    };
    std::fs::write(
        opt.join("softhsm2.conf"),
        config(Path::new("/opt/softhsm/tokens")),
    )
    .expect("config inside");
    let outside = opt.join("outside.conf");
    std::fs::write(&outside, config(&tokens)).expect("config outside");
    let init = run(
        "softhsm2-util --init-token",
        Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &outside)
            .args([
                "--init-token",
                "--free",
                "--label",
                "bank-vaults",
                "--pin",
                "banzai",
                "--so-pin",
                "banzaicloud",
            ]),
    );
    let slot: u64 = String::from_utf8_lossy(&init.stdout)
        .rsplit("slot ")
        .next()
        .and_then(|s| s.trim().parse().ok())
        .expect("softhsm2-util names the token's slot");
    run(
        "pkcs11-tool --keypairgen",
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &outside)
            .arg("--module")
            .arg(&module)
            .args([
                "--token-label",
                "bank-vaults",
                "--login",
                "--pin",
                "banzai",
                "--keypairgen",
                "--key-type",
                "rsa:2048",
                "--label",
                "bank-vaults",
                "--id",
                "01",
            ]),
    );
    std::fs::remove_file(&outside).expect("remove the outside config");
    // The PIN as the manifests provide it: a file only the user can read.
    std::fs::write(opt.join("pin"), "banzai").expect("PIN file");
    chown_to_image_user(&opt);
    ("/opt/softhsm".to_owned(), slot)
}

#[test]
fn unseal_init_image_runs_pcscd_opensc_and_unseals_openbao_as_its_user() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let rootfs = Rootfs::new("unseal-init");
    let out = run(
        "unseal-init --help in the image",
        rootfs.command("/usr/local/bin/unseal-init").arg("--help"),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"));

    // pcscd starts as the image's user, with its socket where the manifests mount an emptyDir.
    let pcscd_dir = rootfs.writable_dir("/run/pcscd");
    let pcscd = rootfs
        .command("/usr/sbin/pcscd")
        .args(["--foreground", "--info"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pcscd");
    let mut pcscd = Reaped(pcscd);
    let socket = pcscd_dir.join("pcscd.comm");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(status)) = pcscd.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = pcscd.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("pcscd exited ({status}) as user {IMAGE_USER}:\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "pcscd did not open its socket as user {IMAGE_USER}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let owner = run("stat", Command::new("stat").args(["-c", "%u"]).arg(&socket));
    assert_eq!(
        String::from_utf8_lossy(&owner.stdout).trim(),
        "65532",
        "pcscd runs as the image's user"
    );

    // OpenSC's module at the path Bank-Vaults configs use loads, and talks to that pcscd,
    // which has no reader: the library is shown, then the missing token is the error.
    let out = rootfs
        .command("/usr/local/bin/unseal-init")
        .args([
            "hsm",
            "info",
            "--hsm-module-path",
            "/usr/lib/opensc-pkcs11.so",
        ])
        .output()
        .expect("run unseal-init hsm info");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("OpenSC") && (out.status.success() || err.contains("slot")),
        "OpenSC's module did not load ({}):\n{text}{err}",
        out.status
    );
    drop(pcscd);

    // SoftHSM2's module loads and shows the token.
    let (softhsm, slot) = softhsm_inside(&rootfs);
    let module = format!("{softhsm}/libsofthsm2.so");
    let softhsm_env = format!("SOFTHSM2_CONF={softhsm}/softhsm2.conf");
    let out = run(
        "unseal-init hsm info with SoftHSM2 in the image",
        rootfs
            .command("/usr/bin/env")
            .arg(&softhsm_env)
            .args([
                "/usr/local/bin/unseal-init",
                "hsm",
                "info",
                "--hsm-module-path",
            ])
            .arg(&module),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SoftHSM") && text.contains("bank-vaults"),
        "SoftHSM2's token not shown:\n{text}"
    );

    // An unseal from inside against OpenBao outside, over 127.0.0.1.
    let bao = OpenBao::start().expect("start OpenBao");
    let out = run(
        "unseal-init --once in the image",
        rootfs
            .command("/usr/bin/env")
            .arg(&softhsm_env)
            .arg("NO_COLOR=1")
            .args(["/usr/local/bin/unseal-init", "--once", "--vault-addr"])
            .arg(bao.address())
            .arg("--hsm-module-path")
            .arg(&module)
            .arg("--hsm-slot-id")
            .arg(slot.to_string())
            .args(["--hsm-key-label", "bank-vaults", "--hsm-pin-file"])
            .arg(format!("{softhsm}/pin"))
            .arg("--metrics-address")
            .arg(format!(
                "127.0.0.1:{}",
                openbao::free_port().expect("free port")
            )),
    );
    let status = bao.seal_status().expect("seal status");
    assert!(
        status.initialized && !status.sealed,
        "OpenBao not initialised and unsealed from inside the image: {status:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
