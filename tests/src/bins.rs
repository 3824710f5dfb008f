//! Locates the workspace's own binaries (`device-plugin`, `unseal-init`) for tests and the demo
//! that live outside the binaries' packages, where Cargo's `CARGO_BIN_EXE_*` is not set.

use std::path::{Path, PathBuf};

/// Path of the workspace binary `name`, built into the same target directory as the running
/// executable. `NITROKEY_BIN_DIR` overrides the directory (e.g. for a release build).
pub fn path(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("NITROKEY_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => profile_dir()?,
    };
    let candidate = dir.join(name);
    anyhow::ensure!(
        candidate.is_file(),
        "binary {name} not found in {} (build it first: cargo build --bins)",
        dir.display()
    );
    Ok(candidate)
}

/// The `target/<profile>` directory that holds the running executable: test executables sit in
/// its `deps/` subdirectory, other binaries directly in it.
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let parent = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("executable {} has no directory", exe.display()))?;
    Ok(if parent.file_name() == Some("deps".as_ref()) {
        parent.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        parent.to_path_buf()
    })
}
