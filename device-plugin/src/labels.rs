//! Node labels saying what the node has: `nitrokey.com/hsm.present=true` and
//! `nitrokey.com/hsm.count=N` (plugged-in sticks), kept in sync with hotplug and removed when
//! the last stick goes and when the plugin exits.
//!
//! Two ways, chosen by `nodeLabels`:
//!
//! - `nfd` (default): a Node Feature Discovery local feature file; NFD's worker turns it into
//!   labels. Needs no API access at all.
//! - `api`: the plugin patches its own Node object (name from `NODE_NAME`) through the API
//!   server; needs `get`/`patch` on nodes.
//!
//! What the labels should be is pure ([`labels_for`], [`nfd_file`]); [`run`] writes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::api_client::{self, Retries};
use crate::config::NodeLabels;
use crate::inventory::Health;
use crate::metrics::Metrics;
use crate::state::PluginState;

/// Label set while at least one stick is plugged in.
pub const PRESENT_LABEL: &str = "nitrokey.com/hsm.present";
/// Label holding the number of plugged-in sticks.
pub const COUNT_LABEL: &str = "nitrokey.com/hsm.count";
/// Name of the NFD feature file the plugin owns.
pub const NFD_FILE_NAME: &str = "nitrokey-hsm";

/// The labels for `count` plugged-in sticks: a value to set, or `None` to remove the label.
pub fn labels_for(count: usize) -> BTreeMap<&'static str, Option<String>> {
    let present = (count > 0).then(|| "true".to_owned());
    let count = (count > 0).then(|| count.to_string());
    BTreeMap::from([(PRESENT_LABEL, present), (COUNT_LABEL, count)])
}

/// The NFD feature file's text for `count` sticks (`None`: no file).
pub fn nfd_file(count: usize) -> Option<String> {
    (count > 0).then(|| {
        format!(
            "# Written by nitrokey-device-plugin: NitroKey HSM sticks plugged into this node.\n\
             {PRESENT_LABEL}=true\n{COUNT_LABEL}={count}\n"
        )
    })
}

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct Publisher {
    /// The way.
    pub mode: NodeLabels,
    /// This node's name (required for `api`).
    pub node_name: Option<String>,
    /// NFD's local feature directory (for `nfd`).
    pub nfd_dir: PathBuf,
    /// Metrics to count into.
    pub metrics: Arc<Metrics>,
}

impl Publisher {
    async fn publish(&self, count: usize, client: &mut Option<Client>) -> bool {
        let ok = match self.mode {
            NodeLabels::None => true,
            NodeLabels::Nfd => write_nfd(&self.nfd_dir, count)
                .map_err(|e| {
                    tracing::warn!(dir = %self.nfd_dir.display(), error = %e,
                        "cannot write the node feature file")
                })
                .is_ok(),
            NodeLabels::Api => self.patch(count, client).await,
        };
        Metrics::count(&self.metrics.node_labels, if ok { "ok" } else { "error" });
        if ok && self.mode != NodeLabels::None {
            tracing::info!(count, mode = ?self.mode, "node labels updated");
        }
        ok
    }

    async fn patch(&self, count: usize, client: &mut Option<Client>) -> bool {
        let Some(node) = &self.node_name else {
            return false;
        };
        if client.is_none() {
            match api_client::connect(Retries::Client).await {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "no Kubernetes API access for node labels");
                    return false;
                }
            }
        }
        let Some(api) = client.clone() else {
            return false;
        };
        let nodes: Api<Node> = Api::all(api);
        let patch = serde_json::json!({ "metadata": { "labels": labels_for(count) } });
        match nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(node, error = %e, "cannot label the node");
                false
            }
        }
    }
}

/// Writes (or, for 0 sticks, removes) the feature file, atomically.
fn write_nfd(dir: &Path, count: usize) -> std::io::Result<()> {
    let path = dir.join(NFD_FILE_NAME);
    match nfd_file(count) {
        Some(text) => {
            let tmp = dir.join(format!(".{NFD_FILE_NAME}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Keeps the labels in step with the plugged-in sticks until `shutdown`, then removes them.
pub async fn run(publisher: Publisher, state: Arc<PluginState>, shutdown: CancellationToken) {
    if publisher.mode == NodeLabels::None {
        return;
    }
    if publisher.mode == NodeLabels::Nfd && !publisher.nfd_dir.is_dir() {
        // No NFD here (the DaemonSet creates the directory): nothing would read the file.
        tracing::info!(dir = %publisher.nfd_dir.display(),
            "no Node Feature Discovery directory; node labels are not published");
        return;
    }
    let mut units = state.subscribe();
    let mut client = None;
    let shares = state.inventory().shares().max(1) as usize;
    let mut published: Option<usize> = None;
    loop {
        let healthy = units
            .borrow_and_update()
            .iter()
            .filter(|u| u.health == Health::Healthy)
            .count()
            / shares;
        if published != Some(healthy) && publisher.publish(healthy, &mut client).await {
            published = Some(healthy);
        }
        let retry = async {
            if published == Some(healthy) {
                std::future::pending::<()>().await;
            } else {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = units.changed() => if changed.is_err() { break },
            () = retry => {}
        }
    }
    if publisher.publish(0, &mut client).await {
        tracing::info!("node labels removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_count_and_vanish_at_zero() {
        assert_eq!(
            labels_for(2),
            BTreeMap::from([
                (PRESENT_LABEL, Some("true".into())),
                (COUNT_LABEL, Some("2".into()))
            ])
        );
        assert_eq!(
            labels_for(0),
            BTreeMap::from([(PRESENT_LABEL, None), (COUNT_LABEL, None)])
        );
        // As a JSON merge patch, removal is `null`.
        let patch = serde_json::json!({ "metadata": { "labels": labels_for(0) } });
        assert_eq!(
            patch.to_string(),
            r#"{"metadata":{"labels":{"nitrokey.com/hsm.count":null,"nitrokey.com/hsm.present":null}}}"#
        );
    }

    #[test]
    fn nfd_file_lists_the_labels() {
        assert_eq!(nfd_file(0), None);
        let text = nfd_file(3).unwrap();
        assert!(text.contains("\nnitrokey.com/hsm.present=true\n"));
        assert!(text.ends_with("\nnitrokey.com/hsm.count=3\n"));
    }

    #[test]
    fn nfd_file_is_written_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        write_nfd(dir.path(), 1).unwrap();
        let text = std::fs::read_to_string(dir.path().join(NFD_FILE_NAME)).unwrap();
        assert!(text.contains("count=1"));
        write_nfd(dir.path(), 0).unwrap();
        assert!(!dir.path().join(NFD_FILE_NAME).exists());
        write_nfd(dir.path(), 0).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
