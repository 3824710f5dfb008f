//! Preparing a claim, as pure decisions: which sticks an allocated ResourceClaim names
//! ([`plan`]), the CDI spec that hands them to the claim's containers ([`cdi_spec`]), what the
//! kubelet is told, and the checkpoint of prepared claims that lets a restarted driver
//! unprepare what an earlier run prepared ([`Checkpoint`]).
//!
//! The containers get the same device nodes and `NITROKEY_HSM_*` environment as from the
//! device plugin's `Allocate`, so that images work unchanged in either mode.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::ResourceClaim;
use serde::{Deserialize, Serialize};

use super::names::{CDI_KIND, CDI_SPEC_PREFIX, DRIVER_NAME};
use crate::cdi::CDI_VERSION;
use crate::inventory::Stick;
use crate::names::{ENV_DEVICES, ENV_SERIALS};

/// One allocated device of a prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// The claim's request it was allocated for.
    pub request: String,
    /// Its pool (the node's name).
    pub pool: String,
    /// Its device name in the slice.
    pub device: String,
    /// The inventory's stick ID.
    pub stick: String,
    /// The serial number handed to the container (the stick ID without one).
    pub serial: String,
    /// Its device node when prepared.
    pub dev_path: String,
}

/// A prepared claim, as checkpointed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedClaim {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// Its devices of this driver.
    pub devices: Vec<PreparedDevice>,
}

/// Why a claim cannot be prepared (the kubelet is told, and asks again later).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// The claim read from the API is another object than the kubelet's (deleted and
    /// recreated under the same name).
    #[error("claim {0} has UID {1}, not {2}: it was deleted and recreated")]
    OtherUid(String, String, String),
    /// The claim has no allocation yet.
    #[error("claim {0} is not allocated")]
    NotAllocated(String),
    /// The claim names a device of another node's pool.
    #[error("claim {0} names device {1} of pool {2}, not of this node's pool {3}")]
    OtherPool(String, String, String, String),
    /// The claim names a device this node does not have (any more).
    #[error("claim {0} names device {1}, which is not plugged in on this node")]
    Unplugged(String, String),
}

/// The sticks of the allocated `claim` on `node`, given the plugged-in sticks by device name.
/// `uid` is the claim the kubelet asked for.
pub fn plan(
    uid: &str,
    claim: &ResourceClaim,
    node: &str,
    plugged: &BTreeMap<String, Stick>,
) -> Result<PreparedClaim, PrepareError> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let name = claim.metadata.name.clone().unwrap_or_default();
    let shown = crate::text::shorten(&format!("{namespace}/{name}"), 300);
    let actual = claim.metadata.uid.clone().unwrap_or_default();
    if actual != uid {
        return Err(PrepareError::OtherUid(
            shown,
            crate::text::shorten(&actual, 64),
            crate::text::shorten(uid, 64),
        ));
    }
    let results = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .ok_or_else(|| PrepareError::NotAllocated(shown.clone()))?
        .devices
        .as_ref()
        .and_then(|d| d.results.clone())
        .unwrap_or_default();
    let mut devices = Vec::new();
    for result in results.iter().filter(|r| r.driver == DRIVER_NAME) {
        let device = crate::text::shorten(&result.device, 64);
        if result.pool != node {
            return Err(PrepareError::OtherPool(
                shown,
                device,
                crate::text::shorten(&result.pool, 253),
                node.to_owned(),
            ));
        }
        let stick = plugged
            .get(&result.device)
            .ok_or_else(|| PrepareError::Unplugged(shown.clone(), device))?;
        devices.push(PreparedDevice {
            request: result.request.clone(),
            pool: result.pool.clone(),
            device: result.device.clone(),
            stick: stick.id.clone(),
            serial: stick.serial_or_id().to_owned(),
            dev_path: stick.info.dev_path(),
        });
    }
    Ok(PreparedClaim {
        namespace,
        name,
        devices,
    })
}

/// Longest claim UID accepted (Kubernetes UIDs are 36-character UUIDs).
const MAX_UID_LEN: usize = 64;

/// Whether a claim UID from the kubelet can name files: letters, digits and `-` only (a UUID),
/// so that no UID reaches outside the CDI directory or collides with another file.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= MAX_UID_LEN
        && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Whether a namespace and a claim name from the kubelet are object names the API server
/// could hold (a DNS label; a DNS subdomain), so that neither can reach into another API path.
pub fn valid_claim_name(namespace: &str, name: &str) -> bool {
    let subdomain = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    subdomain(namespace, 63) && !namespace.contains('.') && subdomain(name, 253)
}

/// The CDI device name of a claim's device: unique per claim, so that two claims' specs
/// never declare the same device.
pub fn cdi_device_name(uid: &str, device: &str) -> String {
    format!("{uid}-{device}")
}

/// The fully qualified CDI device ID the kubelet passes to the runtime.
pub fn cdi_device_id(uid: &str, device: &str) -> String {
    format!("{CDI_KIND}={}", cdi_device_name(uid, device))
}

/// The claim's CDI spec file name.
pub fn cdi_file_name(uid: &str) -> String {
    format!("{CDI_SPEC_PREFIX}{uid}.json")
}

/// The claim's CDI spec: one device per stick with its device node; the environment (all the
/// claim's sticks, as `Allocate` sets it) applies whenever any of them is injected.
pub fn cdi_spec(uid: &str, claim: &PreparedClaim) -> String {
    let devices: Vec<serde_json::Value> = claim
        .devices
        .iter()
        .map(|d| {
            serde_json::json!({
                "name": cdi_device_name(uid, &d.device),
                "containerEdits": {
                    "deviceNodes": [{ "path": d.dev_path, "permissions": "rw" }],
                },
            })
        })
        .collect();
    let serials: Vec<&str> = claim.devices.iter().map(|d| d.serial.as_str()).collect();
    let paths: Vec<&str> = claim.devices.iter().map(|d| d.dev_path.as_str()).collect();
    serde_json::json!({
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "containerEdits": {
            "env": [
                format!("{ENV_SERIALS}={}", serials.join(",")),
                format!("{ENV_DEVICES}={}", paths.join(",")),
            ],
        },
        "devices": devices,
    })
    .to_string()
}

/// A device as the kubelet is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletDevice {
    /// The claim's requests it serves.
    pub request_names: Vec<String>,
    /// Its pool.
    pub pool_name: String,
    /// Its name.
    pub device_name: String,
    /// The CDI device IDs to inject.
    pub cdi_device_ids: Vec<String>,
}

/// What the kubelet is told about a prepared claim.
pub fn kubelet_devices(uid: &str, claim: &PreparedClaim) -> Vec<KubeletDevice> {
    claim
        .devices
        .iter()
        .map(|d| KubeletDevice {
            request_names: vec![d.request.clone()],
            pool_name: d.pool.clone(),
            device_name: d.device.clone(),
            cdi_device_ids: vec![cdi_device_id(uid, &d.device)],
        })
        .collect()
}

/// Prepared claims whose sticks are plugged in again at another device node (a replug), with
/// their devices pointing at the new nodes: their specs are to be rewritten, so that a
/// container started from now on (a restart within the pod) gets the stick's current node.
/// `plugged` maps stick IDs to the sticks plugged in now.
pub fn moved(
    checkpoint: &Checkpoint,
    plugged: &BTreeMap<String, Stick>,
) -> Vec<(String, PreparedClaim)> {
    checkpoint
        .claims
        .iter()
        .filter_map(|(uid, claim)| {
            let mut updated = claim.clone();
            let mut changed = false;
            for device in &mut updated.devices {
                if let Some(stick) = plugged.get(&device.stick) {
                    let path = stick.info.dev_path();
                    if path != device.dev_path {
                        device.dev_path = path;
                        changed = true;
                    }
                }
            }
            changed.then(|| (uid.clone(), updated))
        })
        .collect()
}

/// Current checkpoint format.
const CHECKPOINT_VERSION: u32 = 1;

/// The claims prepared on this node, by claim UID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Prepared claims by UID.
    pub claims: BTreeMap<String, PreparedClaim>,
}

/// Why a checkpoint cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Not the JSON this driver writes.
    #[error("not a checkpoint: {0}")]
    Syntax(String),
    /// Written by a newer version.
    #[error("checkpoint version {0} is newer than this driver's {CHECKPOINT_VERSION}")]
    Version(u32),
}

impl Checkpoint {
    /// Parses a checkpoint file's text.
    pub fn parse(text: &str) -> Result<Self, CheckpointError> {
        let checkpoint: Checkpoint = serde_json::from_str(text)
            .map_err(|e| CheckpointError::Syntax(crate::text::shorten(&e.to_string(), 200)))?;
        if checkpoint.version > CHECKPOINT_VERSION {
            return Err(CheckpointError::Version(checkpoint.version));
        }
        Ok(checkpoint)
    }

    /// The text to write.
    pub fn to_text(&self) -> String {
        let mut copy = self.clone();
        copy.version = CHECKPOINT_VERSION;
        serde_json::to_string_pretty(&copy).unwrap_or_default()
    }
}

/// Spec files (by file name) of this driver that no checkpointed claim owns: left by a run
/// that stopped between writing a spec and its checkpoint, to be removed at start.
pub fn orphan_specs<'a>(
    files: impl IntoIterator<Item = &'a str>,
    checkpoint: &Checkpoint,
) -> Vec<String> {
    files
        .into_iter()
        .filter(|f| f.starts_with(CDI_SPEC_PREFIX) && f.ends_with(".json"))
        .filter(|f| !checkpoint.claims.keys().any(|uid| cdi_file_name(uid) == *f))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::StickInfo;

    fn stick(id: &str, address: u8) -> Stick {
        Stick {
            id: id.into(),
            info: StickInfo {
                vendor: 0x20a0,
                product: 0x4230,
                serial: Some(id.into()),
                bus: 1,
                address,
                port_path: "1-1".into(),
            },
            unplugged_at: None,
        }
    }

    fn claim(uid: &str, results: serde_json::Value) -> ResourceClaim {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"namespace": "vault", "name": "hsm", "uid": uid},
            "spec": {},
            "status": {"allocation": {"devices": {"results": results}}},
        }))
        .unwrap()
    }

    fn plugged() -> BTreeMap<String, Stick> {
        BTreeMap::from([
            ("denk1".to_owned(), stick("DENK1", 2)),
            ("denk2".to_owned(), stick("DENK2", 5)),
        ])
    }

    #[test]
    fn plan_takes_this_drivers_devices_of_this_nodes_pool() {
        let c = claim(
            "u1",
            serde_json::json!([
                {"request": "hsm", "driver": "hsm.nitrokey.com", "pool": "node-a", "device": "denk2"},
                {"request": "gpu", "driver": "gpu.example.com", "pool": "node-a", "device": "g0"},
            ]),
        );
        let p = plan("u1", &c, "node-a", &plugged()).unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("vault", "hsm"));
        assert_eq!(
            p.devices,
            vec![PreparedDevice {
                request: "hsm".into(),
                pool: "node-a".into(),
                device: "denk2".into(),
                stick: "DENK2".into(),
                serial: "DENK2".into(),
                dev_path: "/dev/bus/usb/001/005".into(),
            }]
        );
        let devices = kubelet_devices("u1", &p);
        assert_eq!(
            devices[0].cdi_device_ids,
            vec!["hsm.nitrokey.com/hsm=u1-denk2"]
        );
        assert_eq!(devices[0].request_names, vec!["hsm"]);
    }

    #[test]
    fn plan_refuses_what_it_cannot_hand_out() {
        let ours = |pool: &str, device: &str| serde_json::json!([{"request": "r", "driver": "hsm.nitrokey.com", "pool": pool, "device": device}]);
        let c = claim("u1", ours("node-a", "denk1"));
        assert!(matches!(
            plan("u2", &c, "node-a", &plugged()),
            Err(PrepareError::OtherUid(..))
        ));
        let e = plan(
            "u1",
            &claim("u1", ours("node-b", "denk1")),
            "node-a",
            &plugged(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "claim vault/hsm names device denk1 of pool node-b, not of this node's pool node-a"
        );
        let e = plan(
            "u1",
            &claim("u1", ours("node-a", "gone")),
            "node-a",
            &plugged(),
        )
        .unwrap_err();
        assert!(matches!(e, PrepareError::Unplugged(..)), "{e}");
        let mut unallocated = claim("u1", serde_json::json!([]));
        unallocated.status = None;
        assert!(matches!(
            plan("u1", &unallocated, "node-a", &plugged()),
            Err(PrepareError::NotAllocated(..))
        ));
    }

    #[test]
    fn cdi_spec_names_the_node_and_the_device_plugins_environment() {
        let p = PreparedClaim {
            namespace: "vault".into(),
            name: "hsm".into(),
            devices: vec![
                PreparedDevice {
                    request: "a".into(),
                    pool: "n".into(),
                    device: "denk1".into(),
                    stick: "DENK1".into(),
                    serial: "DENK1".into(),
                    dev_path: "/dev/bus/usb/001/002".into(),
                },
                PreparedDevice {
                    request: "b".into(),
                    pool: "n".into(),
                    device: "denk2".into(),
                    stick: "DENK2".into(),
                    serial: "DENK2".into(),
                    dev_path: "/dev/bus/usb/001/005".into(),
                },
            ],
        };
        let spec: serde_json::Value = serde_json::from_str(&cdi_spec("u1", &p)).unwrap();
        assert_eq!(spec["kind"], "hsm.nitrokey.com/hsm");
        assert_eq!(spec["cdiVersion"], CDI_VERSION);
        assert_eq!(spec["devices"][0]["name"], "u1-denk1");
        assert_eq!(
            spec["devices"][1]["containerEdits"]["deviceNodes"][0]["path"],
            "/dev/bus/usb/001/005"
        );
        assert_eq!(
            spec["containerEdits"]["env"],
            serde_json::json!([
                "NITROKEY_HSM_SERIALS=DENK1,DENK2",
                "NITROKEY_HSM_DEVICES=/dev/bus/usb/001/002,/dev/bus/usb/001/005"
            ])
        );
        assert_eq!(cdi_file_name("u1"), "hsm.nitrokey.com-claim-u1.json");
    }

    #[test]
    fn a_replugged_stick_moves_its_claims_to_the_new_node() {
        let device = |stick: &str, path: &str| PreparedDevice {
            request: "r".into(),
            pool: "n".into(),
            device: stick.to_lowercase(),
            stick: stick.into(),
            serial: stick.into(),
            dev_path: path.into(),
        };
        let mut c = Checkpoint::default();
        c.claims.insert(
            "u1".into(),
            PreparedClaim {
                namespace: "ns".into(),
                name: "a".into(),
                devices: vec![device("DENK1", "/dev/bus/usb/001/002")],
            },
        );
        c.claims.insert(
            "u2".into(),
            PreparedClaim {
                namespace: "ns".into(),
                name: "b".into(),
                devices: vec![device("DENK2", "/dev/bus/usb/001/005")],
            },
        );
        let plugged = BTreeMap::from([
            ("DENK1".to_owned(), stick("DENK1", 9)),
            ("DENK2".to_owned(), stick("DENK2", 5)),
        ]);
        let moved = moved(&c, &plugged);
        assert_eq!(moved.len(), 1, "only DENK1 moved: {moved:?}");
        assert_eq!(moved[0].0, "u1");
        assert_eq!(moved[0].1.devices[0].dev_path, "/dev/bus/usb/001/009");
        assert!(
            super::moved(&c, &BTreeMap::new()).is_empty(),
            "unplugged: nothing to do yet"
        );
    }

    #[test]
    fn only_object_names_reach_the_api() {
        assert!(valid_claim_name("vault", "vault-0-hsm-x7k2p"));
        assert!(valid_claim_name("a", "a.b"));
        assert!(!valid_claim_name("vault", "../secrets/x"));
        assert!(!valid_claim_name("vault", "a/b"));
        assert!(!valid_claim_name("va.ult", "a"));
        assert!(!valid_claim_name("", "a"));
        assert!(!valid_claim_name("vault", "-a"));
        assert!(!valid_claim_name("vault", &"a".repeat(254)));
    }

    #[test]
    fn only_uuid_like_uids_name_files() {
        assert!(valid_uid("3f2c1a9e-0b7d-4c1e-9a55-2f1e0d6c7b8a"));
        assert!(!valid_uid(""));
        assert!(!valid_uid("../../etc/x"));
        assert!(!valid_uid("a/b"));
        assert!(!valid_uid(&"a".repeat(65)));
    }

    #[test]
    fn checkpoint_round_trip_and_orphans() {
        let mut c = Checkpoint::default();
        c.claims.insert(
            "u1".into(),
            PreparedClaim {
                namespace: "ns".into(),
                name: "c".into(),
                devices: vec![],
            },
        );
        let back = Checkpoint::parse(&c.to_text()).unwrap();
        assert_eq!(back.claims, c.claims);
        assert_eq!(back.version, 1);
        assert!(Checkpoint::parse("{").is_err());
        assert!(matches!(
            Checkpoint::parse(r#"{"version": 9, "claims": {}}"#),
            Err(CheckpointError::Version(9))
        ));
        let files = [
            "hsm.nitrokey.com-claim-u1.json",
            "hsm.nitrokey.com-claim-u2.json",
            "nitrokey.com-hsm.json",
            ".hsm.nitrokey.com-claim-u3.json.tmp",
        ];
        assert_eq!(
            orphan_specs(files, &back),
            vec!["hsm.nitrokey.com-claim-u2.json"]
        );
    }
}
