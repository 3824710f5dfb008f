//! The API stand-in's Dynamic Resource Allocation objects (`resource.k8s.io/v1`): the
//! cluster-scoped ResourceSlices a DRA driver publishes and the namespaced ResourceClaims it
//! reads when the kubelet asks it to prepare one. [`crate::kube_api::KubeApi`] routes their
//! paths here; tests put claims in (as the scheduler would have allocated them) and read the
//! published slices back.
//!
//! Behaviour follows kube-apiserver's, as far as a driver can tell:
//! - server-side apply (`PATCH` with `application/apply-patch+yaml`) of a ResourceSlice
//!   creates it or replaces what the applying manager set; the name in the body must be the
//!   name in the URL (`staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go` answers
//!   400 BadRequest otherwise) and apiVersion/kind must be given (apply requires them);
//! - the object is validated as `pkg/apis/resource/validation/validation.go` does for what
//!   this driver sets: the driver name, the pool's name and a generation ≥ 0, device names
//!   that are DNS labels, at most 128 devices per slice, and owner references with
//!   apiVersion, kind, name and uid, at most one of them the controller (`ValidateOwnerReferences`
//!   in `staging/src/k8s.io/apimachinery/pkg/api/validation/objectmeta.go`); a violation is
//!   422 Invalid;
//! - `GET` of a missing object is 404 NotFound with a `Status` body;
//! - every write bumps `metadata.resourceVersion`, and the stored object gets a `uid`;
//! - a pod evicted through the API stand-in leaves the `status.reservedFor` of the claims
//!   reserved for it ([`DraObjects::pod_gone`]): on a real cluster the eviction deletes the
//!   pod, and kube-controller-manager's resource claim controller
//!   (`pkg/controller/resourceclaim/controller.go`, `syncClaim`) then drops reservations for
//!   pods that no longer exist. Here that happens at once rather than after the pod's grace
//!   period;
//! - deleting a Node deletes the slices whose `metadata.ownerReferences` name it by UID
//!   ([`DraObjects::delete_owned_by`]), as the garbage collector does with dependents of a deleted
//!   owner (`pkg/controller/garbagecollector`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{Value, json};

const GROUP: &str = "/apis/resource.k8s.io/v1/";
/// Most devices the API server accepts in one ResourceSlice.
const MAX_DEVICES: usize = 128;

/// The stored objects.
#[derive(Debug, Default)]
pub struct DraObjects {
    slices: Mutex<BTreeMap<String, Value>>,
    claims: Mutex<BTreeMap<(String, String), Value>>,
    version: Mutex<u64>,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, String) {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (code, body.to_string())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// What validation finds wrong with a slice, as the API server lists it.
fn invalid_slice(slice: &Value) -> Option<String> {
    let owners = slice["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (i, owner) in owners.iter().enumerate() {
        for field in ["apiVersion", "kind", "name", "uid"] {
            if owner[field].as_str().is_none_or(str::is_empty) {
                return Some(format!(
                    "metadata.ownerReferences[{i}].{field}: Invalid value: \"\": {field} must not be empty"
                ));
            }
        }
    }
    if owners.iter().filter(|o| o["controller"] == true).count() > 1 {
        return Some("metadata.ownerReferences: Invalid value: only one reference can have Controller set to true".into());
    }
    let spec = &slice["spec"];
    if spec["driver"].as_str().is_none_or(str::is_empty) {
        return Some("spec.driver: Required value".into());
    }
    if spec["pool"]["name"].as_str().is_none_or(str::is_empty) {
        return Some("spec.pool.name: Required value".into());
    }
    if spec["pool"]["generation"].as_i64().is_none_or(|g| g < 0) {
        return Some(
            "spec.pool.generation: Invalid value: must be greater than or equal to 0".into(),
        );
    }
    let devices = spec["devices"].as_array().cloned().unwrap_or_default();
    if devices.len() > MAX_DEVICES {
        return Some(format!(
            "spec.devices: Too many: {}: must have at most {MAX_DEVICES} items",
            devices.len()
        ));
    }
    for (i, d) in devices.iter().enumerate() {
        let name = d["name"].as_str().unwrap_or_default();
        if !is_dns_label(name) {
            return Some(format!(
                "spec.devices[{i}].name: Invalid value: {name:?}: a lowercase RFC 1123 label"
            ));
        }
    }
    None
}

impl DraObjects {
    fn bump(&self) -> String {
        let mut v = self.version.lock().unwrap_or_else(|e| e.into_inner());
        *v += 1;
        v.to_string()
    }

    /// The answer to a request on a DRA path; `None` for any other path.
    pub fn answer(&self, method: &str, path: &str, body: &Value) -> Option<(u16, String)> {
        let rest = path.strip_prefix(GROUP)?;
        if let Some(name) = rest.strip_prefix("resourceslices/") {
            return Some(self.slice_request(method, name, body));
        }
        let (ns, name) = rest
            .strip_prefix("namespaces/")?
            .split_once("/resourceclaims/")?;
        Some(match method {
            "GET" => match self.claim(ns, name) {
                Some(claim) => (200, claim.to_string()),
                None => status(
                    404,
                    "NotFound",
                    &format!("resourceclaims.resource.k8s.io \"{name}\" not found"),
                ),
            },
            _ => status(405, "MethodNotAllowed", "not served by the stand-in"),
        })
    }

    fn slice_request(&self, method: &str, name: &str, body: &Value) -> (u16, String) {
        let mut slices = self.slices.lock().unwrap_or_else(|e| e.into_inner());
        let not_found = || {
            status(
                404,
                "NotFound",
                &format!("resourceslices.resource.k8s.io \"{name}\" not found"),
            )
        };
        match method {
            "GET" => match slices.get(name) {
                Some(slice) => (200, slice.to_string()),
                None => not_found(),
            },
            "DELETE" => match slices.remove(name) {
                Some(_) => (200, status(200, "", "").1),
                None => not_found(),
            },
            "PATCH" => {
                if body["apiVersion"] != "resource.k8s.io/v1" || body["kind"] != "ResourceSlice" {
                    return status(400, "BadRequest", "apiVersion and kind must be set");
                }
                if body["metadata"]["name"] != name {
                    return status(
                        400,
                        "BadRequest",
                        &format!(
                            "the name of the object ({}) does not match the name on the URL ({name})",
                            body["metadata"]["name"]
                        ),
                    );
                }
                if let Some(message) = invalid_slice(body) {
                    return status(
                        422,
                        "Invalid",
                        &format!("ResourceSlice.resource.k8s.io \"{name}\" is invalid: {message}"),
                    );
                }
                let uid = slices
                    .get(name)
                    .map(|s| s["metadata"]["uid"].clone())
                    .unwrap_or_else(|| json!(format!("slice-uid-{name}")));
                let mut stored = body.clone();
                stored["metadata"]["uid"] = uid;
                stored["metadata"]["resourceVersion"] = json!(self.bump());
                let created = !slices.contains_key(name);
                slices.insert(name.to_owned(), stored.clone());
                (if created { 201 } else { 200 }, stored.to_string())
            }
            _ => status(405, "MethodNotAllowed", "not served by the stand-in"),
        }
    }

    /// Deletes every slice of `node` (`spec.nodeName`), as the kubelet does at its start;
    /// returns how many there were.
    pub fn delete_node_slices(&self, node: &str) -> usize {
        let mut slices = self.slices.lock().unwrap_or_else(|e| e.into_inner());
        let before = slices.len();
        slices.retain(|_, s| s["spec"]["nodeName"] != node);
        before - slices.len()
    }

    /// Deletes every slice one of whose `metadata.ownerReferences` has `uid`, as the garbage
    /// collector does once that owner is deleted; returns how many there were.
    pub fn delete_owned_by(&self, uid: &str) -> usize {
        let mut slices = self.slices.lock().unwrap_or_else(|e| e.into_inner());
        let before = slices.len();
        slices.retain(|_, s| {
            !s["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|owners| owners.iter().any(|o| o["uid"] == uid))
        });
        before - slices.len()
    }

    /// The stored slice `name`.
    pub fn slice(&self, name: &str) -> Option<Value> {
        self.slices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Stores (or replaces) a ResourceClaim, as the scheduler leaves it once allocated.
    pub fn put_claim(&self, claim: Value) {
        let ns = claim["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = claim["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((ns, name), claim);
    }

    /// Pod `namespace/name` is gone: every claim of its namespace stops being reserved for it
    /// (see the module's notes). Returns how many claims were reserved for it.
    pub fn pod_gone(&self, namespace: &str, pod: &str) -> usize {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = 0;
        for ((ns, _), claim) in claims.iter_mut() {
            if ns != namespace {
                continue;
            }
            let Some(reserved) = claim["status"]["reservedFor"].as_array_mut() else {
                continue;
            };
            let before = reserved.len();
            reserved.retain(|r| !(r["resource"] == "pods" && r["name"] == pod));
            if reserved.len() != before {
                changed += 1;
                claim["metadata"]["resourceVersion"] = json!(self.bump());
            }
        }
        changed
    }

    /// The stored claim `namespace/name`.
    pub fn claim(&self, namespace: &str, name: &str) -> Option<Value> {
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
}

/// A ResourceClaim allocated as the scheduler writes it: `request` got `device` of `driver`'s
/// pool `pool`, reserved for pod `pod`.
pub fn allocated_claim(
    namespace: &str,
    name: &str,
    uid: &str,
    allocated: &[(&str, &str, &str, &str)],
    pod: &str,
) -> Value {
    let results: Vec<Value> = allocated
        .iter()
        .map(|(request, driver, pool, device)| {
            json!({"request": request, "driver": driver, "pool": pool, "device": device})
        })
        .collect();
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
        "spec": {"devices": {"requests": allocated.iter().map(|(r, ..)| json!({
            "name": r, "exactly": {"deviceClassName": "nitrokey-hsm"}})).collect::<Vec<_>>()}},
        "status": {
            "allocation": {"devices": {"results": results}},
            "reservedFor": [{"resource": "pods", "name": pod, "uid": format!("{pod}-uid")}],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_applied_validated_and_read_back() {
        let objects = DraObjects::default();
        let path = "/apis/resource.k8s.io/v1/resourceslices/n-x";
        assert_eq!(objects.answer("GET", path, &Value::Null).unwrap().0, 404);
        let slice = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": "n-x"},
            "spec": {"driver": "x", "nodeName": "n", "pool": {"name": "n", "generation": 1, "resourceSliceCount": 1},
                     "devices": [{"name": "a"}]}});
        assert_eq!(objects.answer("PATCH", path, &slice).unwrap().0, 201);
        assert_eq!(objects.answer("PATCH", path, &slice).unwrap().0, 200);
        let mut bad = slice.clone();
        bad["spec"]["devices"][0]["name"] = json!("DENK1");
        let (code, body) = objects.answer("PATCH", path, &bad).unwrap();
        assert_eq!(code, 422, "{body}");
        let mut other = slice.clone();
        other["metadata"]["name"] = json!("y");
        assert_eq!(objects.answer("PATCH", path, &other).unwrap().0, 400);
        assert_eq!(
            objects.slice("n-x").unwrap()["metadata"]["resourceVersion"],
            "2"
        );
        assert!(
            objects
                .answer("GET", "/api/v1/nodes/n", &Value::Null)
                .is_none()
        );
    }

    #[test]
    fn owner_references_are_validated_and_a_deleted_owner_takes_its_slices() {
        let objects = DraObjects::default();
        let path = "/apis/resource.k8s.io/v1/resourceslices/n-x";
        let slice = |owners: Value| {
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
                "metadata": {"name": "n-x", "ownerReferences": owners},
                "spec": {"driver": "x", "nodeName": "n",
                         "pool": {"name": "n", "generation": 1, "resourceSliceCount": 1}}})
        };
        let node = |uid: &str| json!({"apiVersion": "v1", "kind": "Node", "name": "n", "uid": uid, "controller": true});
        let (code, body) = objects
            .answer("PATCH", path, &slice(json!([node("")])))
            .unwrap();
        assert_eq!(code, 422, "{body}");
        assert!(body.contains("ownerReferences[0].uid"), "{body}");
        let two = json!([node("a"), node("b")]);
        assert_eq!(objects.answer("PATCH", path, &slice(two)).unwrap().0, 422);
        let owned = slice(json!([node("n-uid")]));
        assert_eq!(objects.answer("PATCH", path, &owned).unwrap().0, 201);
        assert_eq!(objects.delete_owned_by("other-uid"), 0);
        assert!(objects.slice("n-x").is_some());
        assert_eq!(objects.delete_owned_by("n-uid"), 1);
        assert!(objects.slice("n-x").is_none());
    }

    #[test]
    fn claims_are_served_by_namespace_and_name() {
        let objects = DraObjects::default();
        objects.put_claim(allocated_claim(
            "ns",
            "c",
            "u1",
            &[("hsm", "d", "p", "x")],
            "pod",
        ));
        let path = "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/c";
        let (code, body) = objects.answer("GET", path, &Value::Null).unwrap();
        assert_eq!(code, 200);
        let claim: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            claim["status"]["allocation"]["devices"]["results"][0]["device"],
            "x"
        );
        let missing = "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/d";
        assert_eq!(objects.answer("GET", missing, &Value::Null).unwrap().0, 404);
        // Its pod evicted: the claim is reserved for nobody any more.
        assert_eq!(objects.pod_gone("other", "pod"), 0);
        assert_eq!(objects.pod_gone("ns", "pod"), 1);
        assert_eq!(
            objects.claim("ns", "c").unwrap()["status"]["reservedFor"],
            json!([])
        );
    }
}
