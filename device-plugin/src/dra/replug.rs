//! Who holds a replugged stick in DRA mode: the pods its prepared claims are reserved for
//! (their `status.reservedFor`, which the scheduler fills and the resource claim controller
//! empties once a pod is gone), where the device plugin asks the kubelet's pod-resources API.
//! What becomes of them (`onReplug`: Events or evictions, with the same rate limit, backoff
//! and budget handling) is [`crate::recovery`]'s, fed with [`replugs`] and [`ClaimHolders`].
//!
//! Which pods hold which stick is pure ([`holders`], [`holding`]); [`ClaimHolders`] reads the
//! claims.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::{Api, Client};

use super::node::NodeService;
use super::prepare::PreparedClaim;
use crate::recovery::{HolderSource, Holding};
use crate::replug::{Holder, Replug};

/// The pods `claim` is reserved for, with their UIDs (other consumers, of other API groups,
/// are left out; a claim is only reserved for pods of its own namespace).
pub fn holders(claim: &ResourceClaim) -> Vec<(Holder, String)> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    claim
        .status
        .iter()
        .flat_map(|s| s.reserved_for.iter().flatten())
        .filter(|r| r.resource == "pods" && r.api_group.as_deref().unwrap_or_default().is_empty())
        .map(|r| {
            (
                Holder {
                    namespace: namespace.clone(),
                    pod: r.name.clone(),
                },
                r.uid.clone(),
            )
        })
        .collect()
}

/// Who holds which stick: for each prepared claim (by UID) found in `claims` under the same
/// UID (one deleted, or deleted and recreated, holds nothing any more), the pods it is
/// reserved for, under each of its sticks.
pub fn holding(prepared: &BTreeMap<String, PreparedClaim>, claims: &[ResourceClaim]) -> Holding {
    let mut out = Holding::default();
    for claim in claims {
        let Some(uid) = claim.metadata.uid.as_deref() else {
            continue;
        };
        let Some(prepared) = prepared.get(uid) else {
            continue;
        };
        let pods = holders(claim);
        // A claim reserved for no pod, or holding no stick, holds nothing to recover.
        if pods.is_empty() || prepared.devices.is_empty() {
            continue;
        }
        for (holder, pod_uid) in &pods {
            if !pod_uid.is_empty() {
                out.uids.insert(holder.clone(), pod_uid.clone());
            }
        }
        for device in &prepared.devices {
            let list = out.by_stick.entry(device.stick.clone()).or_default();
            for (holder, _) in &pods {
                if !list.contains(holder) {
                    list.push(holder.clone());
                }
            }
        }
    }
    out
}

/// The claim's sticks that moved between `before` and `after`.
pub fn replugs(before: &PreparedClaim, after: &PreparedClaim) -> Vec<Replug> {
    before
        .devices
        .iter()
        .zip(&after.devices)
        .filter(|(b, a)| b.dev_path != a.dev_path)
        .map(|(b, a)| Replug {
            stick: a.stick.clone(),
            serial: a.serial.clone(),
            old_path: b.dev_path.clone(),
            new_path: a.dev_path.clone(),
        })
        .collect()
}

/// The holders of the node's prepared claims, read from the API server (one GET per claim:
/// the checkpoint names them, so the driver needs no list rights).
pub struct ClaimHolders {
    /// The node service, whose checkpoint lists the prepared claims.
    pub service: NodeService,
    /// The API client.
    pub client: Client,
}

impl HolderSource for ClaimHolders {
    fn holding(&self) -> futures::future::BoxFuture<'_, Result<Holding, String>> {
        Box::pin(async move {
            let prepared = self.service.prepared().await;
            let mut names: Vec<(&str, &str)> = prepared
                .values()
                .map(|c| (c.namespace.as_str(), c.name.as_str()))
                .collect();
            names.sort_unstable();
            names.dedup();
            let mut claims = Vec::new();
            for (namespace, name) in names {
                let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), namespace);
                match tokio::time::timeout(crate::api_client::ANSWER_TIMEOUT, api.get_opt(name))
                    .await
                {
                    Ok(Ok(Some(claim))) => claims.push(claim),
                    // Deleted: its pods are gone.
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        return Err(crate::text::shorten(
                            &format!("cannot read ResourceClaim {namespace}/{name}: {e}"),
                            500,
                        ));
                    }
                    Err(_) => {
                        return Err(format!(
                            "reading ResourceClaim {namespace}/{name}: the API server did not \
                             answer in time"
                        ));
                    }
                }
            }
            Ok(holding(&prepared, &claims))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dra::prepare::PreparedDevice;

    fn claim(uid: &str, name: &str, reserved: serde_json::Value) -> ResourceClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "vault", "name": name, "uid": uid},
            "spec": {},
            "status": {"reservedFor": reserved},
        }))
        .unwrap()
    }

    fn device(stick: &str, path: &str) -> PreparedDevice {
        PreparedDevice {
            request: "hsm".into(),
            pool: "n".into(),
            device: stick.to_lowercase(),
            stick: stick.into(),
            serial: stick.into(),
            dev_path: path.into(),
        }
    }

    fn prepared(name: &str, devices: Vec<PreparedDevice>) -> PreparedClaim {
        PreparedClaim {
            namespace: "vault".into(),
            name: name.into(),
            devices,
        }
    }

    fn h(pod: &str) -> Holder {
        Holder {
            namespace: "vault".into(),
            pod: pod.into(),
        }
    }

    #[test]
    fn pods_the_claim_is_reserved_for() {
        let c = claim(
            "u1",
            "c",
            serde_json::json!([
                {"resource": "pods", "name": "vault-0", "uid": "p0"},
                {"resource": "jobs", "apiGroup": "batch", "name": "j", "uid": "j0"},
            ]),
        );
        assert_eq!(holders(&c), vec![(h("vault-0"), "p0".to_owned())]);
    }

    #[test]
    fn holders_by_stick_from_the_prepared_claims_still_there_under_their_uid() {
        let prepared = BTreeMap::from([
            (
                "u1".to_owned(),
                prepared("a", vec![device("DENK1", "/dev/bus/usb/001/002")]),
            ),
            (
                "u2".to_owned(),
                prepared(
                    "shared",
                    vec![
                        device("DENK1", "/dev/bus/usb/001/002"),
                        device("DENK2", "/dev/bus/usb/001/003"),
                    ],
                ),
            ),
            (
                "u3".to_owned(),
                prepared("recreated", vec![device("DENK3", "/dev/bus/usb/001/004")]),
            ),
            (
                "u4".to_owned(),
                prepared("idle", vec![device("DENK4", "/dev/bus/usb/001/005")]),
            ),
        ]);
        let claims = [
            claim(
                "u1",
                "a",
                serde_json::json!([{"resource": "pods", "name": "vault-0", "uid": "p0"}]),
            ),
            claim(
                "u2",
                "shared",
                serde_json::json!([
                    {"resource": "pods", "name": "vault-0", "uid": "p0"},
                    {"resource": "pods", "name": "config", "uid": "p1"},
                ]),
            ),
            // The same name under another UID: another claim, not the one prepared.
            claim(
                "u3-new",
                "recreated",
                serde_json::json!([{"resource": "pods", "name": "other", "uid": "p2"}]),
            ),
            // Reserved for nobody (its pod is gone).
            claim("u4", "idle", serde_json::json!([])),
            // Never prepared here.
            claim(
                "u9",
                "elsewhere",
                serde_json::json!([{"resource": "pods", "name": "far", "uid": "p9"}]),
            ),
        ];
        let found = holding(&prepared, &claims);
        assert_eq!(
            found.by_stick,
            BTreeMap::from([
                ("DENK1".to_owned(), vec![h("vault-0"), h("config")]),
                ("DENK2".to_owned(), vec![h("vault-0"), h("config")]),
            ])
        );
        assert_eq!(found.uids[&h("vault-0")], "p0");
        assert_eq!(found.uids[&h("config")], "p1");
        assert_eq!(found.uids.len(), 2);
        assert_eq!(holding(&prepared, &[]), Holding::default());
    }

    #[test]
    fn moved_sticks_of_a_claim() {
        let at = |path: &str| prepared("c", vec![device("DENK1", path)]);
        let moved = replugs(&at("/dev/bus/usb/001/002"), &at("/dev/bus/usb/001/005"));
        assert_eq!(
            moved,
            vec![Replug {
                stick: "DENK1".into(),
                serial: "DENK1".into(),
                old_path: "/dev/bus/usb/001/002".into(),
                new_path: "/dev/bus/usb/001/005".into(),
            }]
        );
        assert_eq!(
            moved[0].message(),
            "stick DENK1 re-plugged at /dev/bus/usb/001/005; the pod still sees /dev/bus/usb/001/002; restart it"
        );
        assert!(replugs(&at("/a"), &at("/a")).is_empty());
    }
}
