//! What the host offers the tests: the repository's root, and whether the tools and the root
//! privileges a test needs are there (a test that cannot run says why and skips).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root (the tests crate sits one level inside it).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the repository")
        .to_path_buf()
}

/// Why a test needing `tools` on PATH and root (for `root_for`, e.g. "chroot") cannot run
/// here, if it cannot.
pub fn unavailable(tools: &[&str], root_for: &str) -> Option<String> {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "`{tool}` is not installed (scripts/install-deps.sh installs it)"
            ));
        }
    }
    if !is_root() {
        return Some(format!("{root_for} needs root"));
    }
    None
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
