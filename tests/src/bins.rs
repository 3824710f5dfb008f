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

/// Path of the `nitrokey-pkcs11-shim` PKCS#11 module (the OpenSC stand-in).
///
/// `cargo test` builds no `cdylib`, so the first call in a process brings the module up to date
/// with `cargo build -p nitrokey-pkcs11-shim` (same profile, same target directory) when Cargo
/// runs the tests; with `NITROKEY_BIN_DIR` the module is taken from there as built.
pub fn pkcs11_shim() -> anyhow::Result<PathBuf> {
    const FILE: &str = "libnitrokey_pkcs11_shim.so";
    if let Some(dir) = std::env::var_os("NITROKEY_BIN_DIR") {
        let candidate = PathBuf::from(dir).join(FILE);
        anyhow::ensure!(
            candidate.is_file(),
            "PKCS#11 shim not found at {} (cargo build -p nitrokey-pkcs11-shim)",
            candidate.display()
        );
        return Ok(candidate);
    }
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let dir = profile_dir()?;
    let built = BUILT.get_or_init(|| build_shim(&dir));
    let candidate = dir.join(FILE);
    // Without Cargo (a test binary run by hand) an earlier build still serves.
    anyhow::ensure!(
        candidate.is_file(),
        "PKCS#11 shim not found at {} ({})",
        candidate.display(),
        built
            .as_ref()
            .err()
            .map_or("built elsewhere?", String::as_str)
    );
    Ok(candidate)
}

fn build_shim(profile_dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").ok_or("not run by Cargo ($CARGO unset)")?;
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "nitrokey-pkcs11-shim"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name() == Some("release".as_ref()) {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo build -p nitrokey-pkcs11-shim failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
