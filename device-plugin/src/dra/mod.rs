//! Dynamic Resource Allocation mode (`mode: dra`, Kubernetes ≥ 1.34): the same discovery and
//! inventory as the device plugin, published as a ResourceSlice and handed to pods through
//! ResourceClaims and CDI instead of an extended resource.
//!
//! - [`names`]: the driver name, socket and file names (imports nothing of the crate).
//! - [`facts`]: a stick's firmware and model, read from sysfs.
//! - [`slice`]: pure: the node's ResourceSlice and its pool generation.
//! - [`prepare`]: pure: an allocated claim's sticks, its CDI spec, the checkpoint.
//! - [`publish`]: applies the slice on every inventory change.
//! - [`registration`]: the kubelet's plugin registration service.
//! - [`node`]: the DRA node service (prepare, unprepare) with its checkpoint and CDI specs.
//! - [`run`]: wires them together with discovery and the inventory.

pub mod facts;
pub mod names;
pub mod node;
pub mod prepare;
pub mod publish;
pub mod registration;
pub mod run;
pub mod slice;
