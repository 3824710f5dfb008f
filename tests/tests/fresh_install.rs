//! The README's install step on fresh, minimal Debian roots.
//!
//! `scripts/check-fresh-install.sh` builds a minimal root with mmdebstrap (apt, ca-certificates,
//! python3 and the package lists, as a cloud image has them), brings its `libudev1` and
//! `libsystemd0` back to the security suite's version when that lags the point release, and runs
//! `scripts/install-deps.sh` in it under `chroot`. A set-up that pins a package to the host's
//! version, or leans on something this machine happens to have, fails here before it reaches a
//! user. The roots are cached as tarballs under the target directory; a run unpacks a copy and
//! removes it.
//!
//! It needs root (chroot and bind mounts) and the package mirrors. Without root it says so and
//! skips, except under CI (`CI` set), where a skipped proof would pass for one that ran.

use nitrokey_e2e::host::{self, repo};
use std::process::Command;

/// Runs the check for `suite` and fails with the script's own output when it fails.
fn installs_on(suite: &str) {
    if !host::is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the fresh-install check needs root (chroot, bind mounts) and CI runs as root"
        );
        println!("skipped: the fresh-install check needs root (chroot, bind mounts)");
        return;
    }
    let out = Command::new(repo().join("scripts/check-fresh-install.sh"))
        .arg(suite)
        .output()
        .expect("scripts/check-fresh-install.sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "install-deps.sh failed on a fresh {suite} root ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The proof is only as good as the state it ran in: the root must say which one it was,
    // and the install must have reached its own last step inside it.
    assert!(
        stdout.contains(&format!("fresh-install: {suite} root, ")),
        "the check did not report the root's libudev1 state:\n{stdout}"
    );
    assert!(
        stdout.contains("==> dependencies: all present"),
        "install-deps.sh did not finish inside the root:\n{stdout}"
    );
}

/// Debian 12, with libudev1 from bookworm-security behind the point release when the archive
/// has such a pair (it had on 2026-12-03: 252.38-1~deb12u1 against 252.39-1~deb12u2).
#[test]
fn installs_on_a_fresh_lagging_debian_12() {
    installs_on("bookworm");
}

/// Debian 13.
#[test]
fn installs_on_a_fresh_debian_13() {
    installs_on("trixie");
}
