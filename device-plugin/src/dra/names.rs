//! Names the DRA mode shares with the kubelet, the API server and the container runtime. At
//! the bottom of the DRA modules: imports nothing of the crate.

/// The driver name in ResourceSlices, DeviceClass selectors and allocation results.
pub const DRIVER_NAME: &str = "hsm.nitrokey.com";
/// Field manager of the driver's server-side applies.
pub const FIELD_MANAGER: &str = "nitrokey-device-plugin";
/// The registration socket's file name in the kubelet's plugins_registry directory.
pub const REGISTRATION_SOCKET: &str = "hsm.nitrokey.com-reg.sock";
/// The node service's socket file name in the driver's own directory.
pub const DRA_SOCKET: &str = "dra.sock";
/// The file, in the driver's own directory, listing the claims prepared on this node.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
/// CDI kind of the devices the driver's specs declare (`<vendor>/<class>`).
pub const CDI_KIND: &str = "hsm.nitrokey.com/hsm";
/// Prefix of the CDI spec files the driver writes, one per prepared claim.
pub const CDI_SPEC_PREFIX: &str = "hsm.nitrokey.com-claim-";
/// Attribute names of each published device (qualified by the driver's domain, as the API
/// server does with unqualified names).
pub const ATTR_SERIAL: &str = "serial";
/// See [`ATTR_SERIAL`].
pub const ATTR_VENDOR_ID: &str = "vendorId";
/// See [`ATTR_SERIAL`].
pub const ATTR_PRODUCT_ID: &str = "productId";
/// See [`ATTR_SERIAL`].
pub const ATTR_FIRMWARE: &str = "firmware";
/// See [`ATTR_SERIAL`].
pub const ATTR_USB_PATH: &str = "usbPath";
/// See [`ATTR_SERIAL`].
pub const ATTR_MODEL: &str = "model";
