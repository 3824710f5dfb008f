//! Keeps the node's ResourceSlice in step with the plugged-in sticks: every change of the
//! inventory is applied at once (server-side apply, field manager `nitrokey-device-plugin`,
//! without forcing: a field another manager owns is a conflict that is logged, not taken
//! over), with the next pool generation; a failed apply is retried with a growing pause.
//!
//! The slice stays when the driver stops, so that a restart does not take the sticks away
//! from the scheduler (the kubelet plugin helper of `k8s.io/dynamic-resource-allocation` does
//! not delete its slices either); the kubelet removes a driver's slices of its node once the
//! driver stays unregistered (30 s, `defaultWipingDelay` in `pkg/kubelet/cm/dra`), which is
//! what cleans up after an uninstall, and all of its node's slices when it starts
//! (`wipeResourceSlices` in `pkg/kubelet/cm/dra/plugin`). So the slice is looked up again
//! whenever the kubelet (re)registers the driver, and every [`RESYNC`] besides, and applied
//! anew when it is gone.
//!
//! The slice names its Node as owner, by the UID read from the API at start (as that helper's
//! ResourceSlice controller does), so that it goes with a deleted Node even when no kubelet is
//! left to remove it. Without the UID (no `get` on nodes), it is published without an owner,
//! and the lookup is tried again with every look at the slice.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::facts::{self, StickFacts};
use super::names::FIELD_MANAGER;
use super::slice::{Pool, slice_name};
use crate::state::PluginState;

/// First pause after a failed apply; doubled up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest pause between attempts.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often the slice is looked up to see whether someone deleted it.
pub const RESYNC: Duration = Duration::from_secs(30);

/// The plugged-in sticks with their sysfs facts, in stick-ID order.
pub fn plugged_facts(state: &PluginState) -> Vec<StickFacts> {
    let sticks: Vec<_> = state
        .inventory()
        .sticks()
        .filter(|s| s.unplugged_at.is_none())
        .cloned()
        .collect();
    sticks
        .iter()
        .map(|s| facts::read(&s.id, &s.info, &crate::usb::sysfs_dir(&s.info.port_path)))
        .collect()
}

/// The UID of Node `node`, or `None` (said in the log) when it cannot be read.
async fn node_uid(nodes: &Api<Node>, node: &str) -> Option<String> {
    let why =
        match tokio::time::timeout(crate::api_client::ANSWER_TIMEOUT, nodes.get_opt(node)).await {
            Ok(Ok(Some(found))) => match found.metadata.uid {
                Some(uid) => return Some(uid),
                None => "the Node has no uid".to_owned(),
            },
            Ok(Ok(None)) => "no such Node".to_owned(),
            Ok(Err(e)) => crate::text::shorten(&e.to_string(), 500),
            Err(_) => "the API server did not answer in time".to_owned(),
        };
    tracing::warn!(node = %node, error = %why,
        "cannot read the Node's uid; the ResourceSlice is published without the Node as owner");
    None
}

/// Publishes until `shutdown`.
pub async fn run(
    client: Client,
    node: String,
    state: Arc<PluginState>,
    registered: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let api: Api<ResourceSlice> = Api::all(client);
    let name = slice_name(&node);
    // Continue the generation of a slice an earlier run published.
    let mut pool =
        match tokio::time::timeout(crate::api_client::ANSWER_TIMEOUT, api.get_opt(&name)).await {
            Ok(Ok(Some(existing))) => Pool::after(existing.spec.pool.generation),
            Ok(Ok(None)) => Pool::default(),
            Ok(Err(e)) => {
                tracing::warn!(slice = %name, error = %e, "cannot read the node's ResourceSlice");
                Pool::default()
            }
            Err(_) => {
                tracing::warn!(slice = %name, "the API server did not answer in time");
                Pool::default()
            }
        };
    if let Some(uid) = node_uid(&nodes, &node).await {
        pool.owned_by(&uid);
    }
    let params = PatchParams::apply(FIELD_MANAGER);
    let mut units = state.subscribe();
    let mut retry: Option<Duration> = None;
    loop {
        units.borrow_and_update();
        let sticks = plugged_facts(&state);
        if let Some(slice) = pool.update(&node, &sticks) {
            let devices: Vec<&str> = slice
                .spec
                .devices
                .iter()
                .flatten()
                .map(|d| d.name.as_str())
                .collect();
            let devices = devices.join(",");
            let applied = tokio::time::timeout(
                crate::api_client::ANSWER_TIMEOUT,
                api.patch(&name, &params, &Patch::Apply(&slice)),
            )
            .await;
            match applied {
                Ok(Ok(_)) => {
                    tracing::info!(slice = %name, generation = pool.generation(), devices = %devices,
                        "ResourceSlice published");
                    retry = None;
                }
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "the API server did not answer in time".to_owned(),
                    };
                    let pause = retry.map_or(FIRST_RETRY, |p| (p * 2).min(MAX_RETRY));
                    tracing::warn!(slice = %name, error = %crate::text::shorten(&error, 500),
                        retry_in = ?pause, "cannot publish the ResourceSlice");
                    pool.unpublished();
                    retry = Some(pause);
                }
            }
        }
        let pause = retry.unwrap_or(RESYNC);
        let look = tokio::select! {
            () = shutdown.cancelled() => break,
            changed = units.changed() => if changed.is_err() { break } else { false },
            () = registered.notified() => true,
            () = tokio::time::sleep(pause) => retry.is_none(),
        };
        if look {
            if !pool.has_owner()
                && let Some(uid) = node_uid(&nodes, &node).await
            {
                pool.owned_by(&uid);
            }
            let found =
                tokio::time::timeout(crate::api_client::ANSWER_TIMEOUT, api.get_opt(&name)).await;
            if let Ok(Ok(None)) = found {
                tracing::info!(slice = %name, "the ResourceSlice is gone; publishing it again");
                pool.unpublished();
            }
        }
    }
}
