//! The node's ResourceSlice: one pool per node, named after the node, holding one device per
//! plugged-in stick with its attributes. Pure: [`Pool::update`] turns the current sticks into
//! the slice to apply, or `None` when nothing a scheduler sees has changed; every change
//! bumps the pool's generation, which is how the scheduler tells a newer slice from an older
//! one of the same pool. The slice names the Node as its owner (by UID, once known), as the
//! kubelet plugin helper of `k8s.io/dynamic-resource-allocation` does, so that the garbage
//! collector deletes it with the Node.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::facts::StickFacts;
use super::names::{
    ATTR_FIRMWARE, ATTR_MODEL, ATTR_PRODUCT_ID, ATTR_SERIAL, ATTR_USB_PATH, ATTR_VENDOR_ID,
    DRIVER_NAME,
};

/// Longest device name the API accepts (a DNS label).
const MAX_DEVICE_NAME_LEN: usize = 63;
/// Longest string attribute value the API accepts.
const MAX_ATTRIBUTE_LEN: usize = 64;

/// A stick ID as a device name: a DNS label (lowercase letters, digits and `-`, at most 63),
/// e.g. `denk0000001` for stick `DENK0000001`.
pub fn device_name(stick_id: &str) -> String {
    let mapped: String = stick_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let mut name: String = trimmed.chars().take(MAX_DEVICE_NAME_LEN).collect();
    name.truncate(name.trim_end_matches('-').len());
    if name.is_empty() {
        "stick".to_owned()
    } else {
        name
    }
}

/// Device names of these stick IDs (given in a stable order): [`device_name`], with `-2`,
/// `-3`… appended to later IDs that map to a name already taken (IDs differing only in case).
pub fn device_names<'a>(ids: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, String> {
    let mut taken = std::collections::BTreeSet::new();
    let mut names = BTreeMap::new();
    for id in ids {
        let base = device_name(id);
        let mut name = base.clone();
        let mut n = 2;
        while taken.contains(&name) {
            let suffix = format!("-{n}");
            let keep = MAX_DEVICE_NAME_LEN - suffix.len();
            name = format!("{}{suffix}", &base[..base.len().min(keep)]);
            n += 1;
        }
        taken.insert(name.clone());
        names.insert(id.to_owned(), name);
    }
    names
}

/// The slice's object name: `<node>-hsm.nitrokey.com` (one slice per node).
pub fn slice_name(node: &str) -> String {
    format!("{node}-{DRIVER_NAME}")
}

fn string(value: &str) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(value.chars().take(MAX_ATTRIBUTE_LEN).collect()),
        ..DeviceAttribute::default()
    }
}

/// The published devices of these plugged-in sticks, in stick-ID order.
pub fn devices(sticks: &[StickFacts]) -> Vec<Device> {
    let names = device_names(sticks.iter().map(|s| s.id.as_str()));
    let mut devices: Vec<Device> = sticks
        .iter()
        .map(|stick| {
            let info = &stick.info;
            let mut attributes = BTreeMap::new();
            let serial = info.serial.as_deref().unwrap_or(&stick.id);
            attributes.insert(ATTR_SERIAL.to_owned(), string(serial));
            attributes.insert(
                ATTR_VENDOR_ID.to_owned(),
                string(&format!("{:04x}", info.vendor)),
            );
            attributes.insert(
                ATTR_PRODUCT_ID.to_owned(),
                string(&format!("{:04x}", info.product)),
            );
            attributes.insert(ATTR_USB_PATH.to_owned(), string(&info.port_path));
            if let Some(firmware) = &stick.firmware {
                attributes.insert(
                    ATTR_FIRMWARE.to_owned(),
                    DeviceAttribute {
                        version: Some(firmware.clone()),
                        ..DeviceAttribute::default()
                    },
                );
            }
            if let Some(model) = &stick.model {
                attributes.insert(ATTR_MODEL.to_owned(), string(model));
            }
            Device {
                name: names
                    .get(&stick.id)
                    .cloned()
                    .unwrap_or_else(|| device_name(&stick.id)),
                attributes: Some(attributes),
                ..Device::default()
            }
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
}

/// The slice's owner: the Node `node` with UID `uid`, as controller (no `blockOwnerDeletion`,
/// which would need delete rights on the Node).
pub fn node_owner(node: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Node".to_owned(),
        name: node.to_owned(),
        uid: uid.to_owned(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The whole slice for `node` at pool generation `generation`, owned by the Node with UID
/// `node_uid` when known.
pub fn slice(
    node: &str,
    devices: Vec<Device>,
    generation: i64,
    node_uid: Option<&str>,
) -> ResourceSlice {
    ResourceSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(node)),
            owner_references: node_uid.map(|uid| vec![node_owner(node, uid)]),
            ..ObjectMeta::default()
        },
        spec: ResourceSliceSpec {
            driver: DRIVER_NAME.to_owned(),
            node_name: Some(node.to_owned()),
            pool: ResourcePool {
                name: node.to_owned(),
                generation,
                resource_slice_count: 1,
            },
            devices: Some(devices),
            ..ResourceSliceSpec::default()
        },
    }
}

/// The pool as last published.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    generation: i64,
    published: Option<Vec<Device>>,
    node_uid: Option<String>,
}

impl Pool {
    /// A pool whose slice was last published at `generation` by an earlier run (0: never), so
    /// that the next one is newer.
    pub fn after(generation: i64) -> Self {
        Self {
            generation: generation.max(0),
            published: None,
            node_uid: None,
        }
    }

    /// Names the Node with UID `uid` as the slice's owner from now on; a slice published
    /// without it (or with another) is published again.
    pub fn owned_by(&mut self, uid: &str) {
        if self.node_uid.as_deref() != Some(uid) {
            self.node_uid = Some(uid.to_owned());
            self.published = None;
        }
    }

    /// Whether the owner's UID is known.
    pub fn has_owner(&self) -> bool {
        self.node_uid.is_some()
    }

    /// The generation of the last slice handed out.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// The slice to apply for these plugged-in sticks, with the next generation, or `None`
    /// when the devices are those already handed out.
    pub fn update(&mut self, node: &str, sticks: &[StickFacts]) -> Option<ResourceSlice> {
        let devices = devices(sticks);
        if self.published.as_ref() == Some(&devices) {
            return None;
        }
        self.generation += 1;
        self.published = Some(devices.clone());
        Some(slice(
            node,
            devices,
            self.generation,
            self.node_uid.as_deref(),
        ))
    }

    /// Forgets what was handed out (its apply failed), so that the next update publishes
    /// again even without a change.
    pub fn unpublished(&mut self) {
        self.published = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::StickInfo;

    fn stick(id: &str, serial: Option<&str>, port: &str) -> StickFacts {
        StickFacts {
            id: id.into(),
            info: StickInfo {
                vendor: 0x20a0,
                product: 0x4230,
                serial: serial.map(Into::into),
                bus: 1,
                address: 2,
                port_path: port.into(),
            },
            firmware: Some("1.1.0".into()),
            model: Some("Nitrokey HSM".into()),
        }
    }

    #[test]
    fn device_names_are_dns_labels_and_unique() {
        assert_eq!(device_name("DENK0000001"), "denk0000001");
        assert_eq!(device_name("usb-1-1.4"), "usb-1-1-4");
        assert_eq!(device_name("--"), "stick");
        assert_eq!(device_name(&"A".repeat(80)).len(), 63);
        assert_eq!(
            device_name(&format!("{}-b", "a".repeat(62))),
            "a".repeat(62)
        );
        let names = device_names(["ABC", "abc", "aBc"]);
        assert_eq!(names["ABC"], "abc");
        assert_eq!(names["abc"], "abc-2");
        assert_eq!(names["aBc"], "abc-3");
        let long = "x".repeat(63);
        let names = device_names([long.as_str(), &"X".repeat(63)]);
        assert_eq!(names[&"X".repeat(63)], format!("{}-2", "x".repeat(61)));
    }

    #[test]
    fn one_pool_per_node_one_device_per_stick_with_attributes() {
        let mut pool = Pool::default();
        let sticks = [
            stick("DENK2", Some("DENK2"), "1-2"),
            stick("DENK1", Some("DENK1"), "1-1.4"),
        ];
        let slice = pool.update("node-a", &sticks).unwrap();
        assert_eq!(
            slice.metadata.name.as_deref(),
            Some("node-a-hsm.nitrokey.com")
        );
        let spec = &slice.spec;
        assert_eq!(spec.driver, "hsm.nitrokey.com");
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec.pool.name, "node-a");
        assert_eq!(spec.pool.generation, 1);
        assert_eq!(spec.pool.resource_slice_count, 1);
        let devices = spec.devices.as_ref().unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].name, "denk1");
        let json = serde_json::to_value(&devices[0]).unwrap();
        assert_eq!(
            json["attributes"],
            serde_json::json!({
                "serial": {"string": "DENK1"},
                "vendorId": {"string": "20a0"},
                "productId": {"string": "4230"},
                "firmware": {"version": "1.1.0"},
                "usbPath": {"string": "1-1.4"},
                "model": {"string": "Nitrokey HSM"},
            })
        );
    }

    #[test]
    fn generation_bumps_on_every_change_only() {
        let mut pool = Pool::after(41);
        let one = [stick("DENK1", Some("DENK1"), "1-1")];
        assert_eq!(pool.update("n", &one).unwrap().spec.pool.generation, 42);
        assert!(pool.update("n", &one).is_none(), "unchanged");
        let gone = pool.update("n", &[]).unwrap();
        assert_eq!(gone.spec.pool.generation, 43);
        assert_eq!(gone.spec.devices.as_deref(), Some(&[][..]), "stick removed");
        let moved = [stick("DENK1", Some("DENK1"), "1-2")];
        assert_eq!(pool.update("n", &moved).unwrap().spec.pool.generation, 44);
        pool.unpublished();
        assert_eq!(pool.update("n", &moved).unwrap().spec.pool.generation, 45);
    }

    #[test]
    fn the_node_owns_the_slice_once_its_uid_is_known() {
        let mut pool = Pool::default();
        let one = [stick("DENK1", Some("DENK1"), "1-1")];
        let unowned = pool.update("node-a", &one).unwrap();
        assert_eq!(unowned.metadata.owner_references, None);
        assert!(!pool.has_owner());
        pool.owned_by("0b1c-uid");
        assert!(pool.has_owner());
        // Published again, unchanged devices or not.
        let owned = pool.update("node-a", &one).unwrap();
        assert_eq!(
            serde_json::to_value(&owned.metadata.owner_references).unwrap(),
            serde_json::json!([{
                "apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "0b1c-uid",
                "controller": true,
            }])
        );
        pool.owned_by("0b1c-uid");
        assert!(
            pool.update("node-a", &one).is_none(),
            "same owner: nothing new"
        );
    }

    #[test]
    fn a_stick_without_serial_or_facts() {
        let mut bare = stick("usb-1-3", None, "1-3");
        bare.firmware = None;
        bare.model = None;
        let devices = devices(&[bare]);
        let json = serde_json::to_value(&devices[0]).unwrap();
        assert_eq!(json["name"], "usb-1-3");
        assert_eq!(json["attributes"]["serial"]["string"], "usb-1-3");
        assert!(json["attributes"].get("firmware").is_none());
        assert!(json["attributes"].get("model").is_none());
    }
}
