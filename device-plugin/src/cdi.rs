//! Container Device Interface: with `cdi: true`, `Allocate` also names each stick as a CDI
//! device (`nitrokey.com/hsm=<stick>`), and the plugin keeps the matching CDI spec in
//! `cdiSpecDir` (default `/var/run/cdi`), so that runtimes with CDI enabled inject the device
//! node and environment the standard way. The spec is written atomically (temporary file and
//! rename), rewritten on every change of the sticks, and removed when the plugin exits.
//!
//! What the spec says is pure ([`spec`]); [`run`] keeps the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::inventory::Stick;
use crate::names::{ENV_DEVICES, ENV_SERIALS};
use crate::state::PluginState;

/// CDI specification version written (the oldest that has everything used here).
pub const CDI_VERSION: &str = "0.5.0";

/// The qualified CDI name of a stick: `<resource>=<stick id>`.
pub fn device_name(resource: &str, stick: &str) -> String {
    format!("{resource}={stick}")
}

/// The spec's file name for a resource: `nitrokey.com-hsm.json`.
pub fn file_name(resource: &str) -> String {
    format!("{}.json", resource.replace('/', "-"))
}

/// The CDI spec (JSON) for these plugged-in sticks: one device per stick, named by its ID,
/// with its device node and the same environment `Allocate` sets.
pub fn spec<'a>(resource: &str, sticks: impl IntoIterator<Item = &'a Stick>) -> String {
    let devices: Vec<serde_json::Value> = sticks
        .into_iter()
        .map(|stick| {
            let path = stick.info.dev_path();
            serde_json::json!({
                "name": stick.id,
                "containerEdits": {
                    "deviceNodes": [{ "path": path, "permissions": "rw" }],
                    "env": [
                        format!("{ENV_SERIALS}={}", stick.serial_or_id()),
                        format!("{ENV_DEVICES}={path}"),
                    ],
                },
            })
        })
        .collect();
    serde_json::json!({
        "cdiVersion": CDI_VERSION,
        "kind": resource,
        "devices": devices,
    })
    .to_string()
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Keeps the spec file in step with the plugged-in sticks until `shutdown`, then removes it.
pub async fn run(
    resource: String,
    dir: PathBuf,
    state: Arc<PluginState>,
    shutdown: CancellationToken,
) {
    let path = dir.join(file_name(&resource));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot create the CDI spec directory");
    }
    let mut units = state.subscribe();
    let mut written: Option<String> = None;
    loop {
        units.borrow_and_update();
        let text = {
            let inventory = state.inventory();
            spec(
                &resource,
                inventory.sticks().filter(|s| s.unplugged_at.is_none()),
            )
        };
        if written.as_ref() != Some(&text) {
            match write_atomically(&path, &text) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), "CDI spec written");
                    written = Some(text);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the CDI spec")
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = units.changed() => if changed.is_err() { break },
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "CDI spec removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove the CDI spec"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::StickInfo;

    fn stick(id: &str, serial: Option<&str>, address: u8) -> Stick {
        Stick {
            id: id.into(),
            info: StickInfo {
                vendor: 0x20a0,
                product: 0x4230,
                serial: serial.map(Into::into),
                bus: 1,
                address,
                port_path: "1-1".into(),
            },
            unplugged_at: None,
        }
    }

    #[test]
    fn one_device_per_stick_with_node_and_environment() {
        let sticks = [stick("DENK1", Some("DENK1"), 2), stick("usb-1-2", None, 7)];
        let spec: serde_json::Value =
            serde_json::from_str(&spec("nitrokey.com/hsm", &sticks)).unwrap();
        assert_eq!(spec["cdiVersion"], "0.5.0");
        assert_eq!(spec["kind"], "nitrokey.com/hsm");
        assert_eq!(spec["devices"][0]["name"], "DENK1");
        let edits = &spec["devices"][0]["containerEdits"];
        assert_eq!(edits["deviceNodes"][0]["path"], "/dev/bus/usb/001/002");
        assert_eq!(edits["deviceNodes"][0]["permissions"], "rw");
        assert_eq!(
            edits["env"],
            serde_json::json!([
                "NITROKEY_HSM_SERIALS=DENK1",
                "NITROKEY_HSM_DEVICES=/dev/bus/usb/001/002"
            ])
        );
        assert_eq!(
            spec["devices"][1]["containerEdits"]["env"][0],
            "NITROKEY_HSM_SERIALS=usb-1-2"
        );
        let empty: serde_json::Value =
            serde_json::from_str(&super::spec("nitrokey.com/hsm", [])).unwrap();
        assert_eq!(empty["devices"], serde_json::json!([]));
    }

    #[test]
    fn names() {
        assert_eq!(
            device_name("nitrokey.com/hsm", "DENK1"),
            "nitrokey.com/hsm=DENK1"
        );
        assert_eq!(file_name("nitrokey.com/hsm"), "nitrokey.com-hsm.json");
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_atomically(&path, "{}").unwrap();
        write_atomically(&path, "{\"a\":1}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
