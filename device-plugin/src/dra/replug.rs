//! `onReplug: event` in DRA mode: when a stick held by prepared claims comes back at another
//! device node, each pod the claim is reserved for (its `status.reservedFor`, which the
//! scheduler and kubelet keep) gets a Warning Event saying that it still sees the old node and
//! should be restarted, as the device plugin does for the pods the pod-resources API names.
//! Which pods and what they are told is pure ([`holders`], [`replugs`]); [`notify`](fn@notify) reads the
//! claims and creates the Events.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::api::resource::v1::ResourceClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::PostParams;
use kube::{Api, Client};

use super::prepare::PreparedClaim;
use crate::recovery::{COMPONENT, EVENT_REASON};
use crate::replug::Replug;

/// A pod a claim is reserved for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Its namespace (the claim's: a claim is only reserved for pods of its namespace).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID, so that `kubectl describe pod` lists the Event.
    pub uid: String,
}

/// The pods `claim` is reserved for (other consumers, of other API groups, are left out).
pub fn holders(claim: &ResourceClaim) -> Vec<PodRef> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    claim
        .status
        .iter()
        .flat_map(|s| s.reserved_for.iter().flatten())
        .filter(|r| r.resource == "pods" && r.api_group.as_deref().unwrap_or_default().is_empty())
        .map(|r| PodRef {
            namespace: namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        })
        .collect()
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

/// The Event telling `pod` about `replug`.
pub fn event(pod: &PodRef, replug: &Replug, node: &str) -> Event {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", pod.name)),
            namespace: Some(pod.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()).filter(|u| !u.is_empty()),
            ..ObjectReference::default()
        },
        reason: Some(EVENT_REASON.into()),
        message: Some(replug.message()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(node.to_owned()),
        }),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(node.to_owned()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Event::default()
    }
}

/// Creates the Events for claims whose sticks moved (`uid`, before, after).
pub async fn notify(
    client: Client,
    node: &str,
    moved: Vec<(String, PreparedClaim, PreparedClaim)>,
) {
    for (uid, before, after) in moved {
        let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &after.namespace);
        let claim =
            match tokio::time::timeout(crate::api_client::ANSWER_TIMEOUT, claims.get(&after.name))
                .await
            {
                Ok(Ok(claim)) if claim.metadata.uid.as_deref() == Some(uid.as_str()) => claim,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    tracing::warn!(namespace = %after.namespace, claim = %after.name, error = %e,
                    "cannot read the claim of a replugged stick");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(namespace = %after.namespace, claim = %after.name,
                    "the API server did not answer in time");
                    continue;
                }
            };
        let pods = holders(&claim);
        for replug in replugs(&before, &after) {
            for pod in &pods {
                let events: Api<Event> = Api::namespaced(client.clone(), &pod.namespace);
                let created = tokio::time::timeout(
                    crate::api_client::ANSWER_TIMEOUT,
                    events.create(&PostParams::default(), &event(pod, &replug, node)),
                )
                .await;
                match created {
                    Ok(Ok(_)) => tracing::info!(namespace = %pod.namespace, pod = %pod.name,
                        stick = %replug.stick, "Event created on a pod holding the re-plugged stick"),
                    Ok(Err(e)) => tracing::warn!(namespace = %pod.namespace, pod = %pod.name,
                        error = %e, "cannot create the Event"),
                    Err(_) => tracing::warn!(namespace = %pod.namespace, pod = %pod.name,
                        "the API server did not answer in time"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dra::prepare::PreparedDevice;

    #[test]
    fn pods_the_claim_is_reserved_for_and_what_they_are_told() {
        let claim: ResourceClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "vault", "name": "c", "uid": "u1"},
            "spec": {},
            "status": {"reservedFor": [
                {"resource": "pods", "name": "vault-0", "uid": "p0"},
                {"resource": "jobs", "apiGroup": "batch", "name": "j", "uid": "j0"},
            ]},
        }))
        .unwrap();
        assert_eq!(
            holders(&claim),
            vec![PodRef {
                namespace: "vault".into(),
                name: "vault-0".into(),
                uid: "p0".into()
            }]
        );
        let device = |path: &str| PreparedDevice {
            request: "hsm".into(),
            pool: "n".into(),
            device: "denk1".into(),
            stick: "DENK1".into(),
            serial: "DENK1".into(),
            dev_path: path.into(),
        };
        let claim_at = |path: &str| PreparedClaim {
            namespace: "vault".into(),
            name: "c".into(),
            devices: vec![device(path)],
        };
        let moved = replugs(
            &claim_at("/dev/bus/usb/001/002"),
            &claim_at("/dev/bus/usb/001/005"),
        );
        assert_eq!(moved.len(), 1);
        assert_eq!(
            moved[0].message(),
            "stick DENK1 re-plugged at /dev/bus/usb/001/005; the pod still sees /dev/bus/usb/001/002; restart it"
        );
        let e = event(&holders(&claim)[0], &moved[0], "node-a");
        assert_eq!(e.involved_object.uid.as_deref(), Some("p0"));
        assert_eq!(e.reason.as_deref(), Some(EVENT_REASON));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert!(replugs(&claim_at("/a"), &claim_at("/a")).is_empty());
    }
}
