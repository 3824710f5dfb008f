//! Dynamic Resource Allocation mode (`mode: dra`, Kubernetes ≥ 1.34): the same discovery and
//! inventory as the device plugin, published as a ResourceSlice and handed to pods through
//! ResourceClaims and CDI instead of an extended resource.
//!
//! - [`names`]: the driver name, socket and file names (imports nothing of the crate).
//! - [`facts`]: a stick's firmware and model, read from sysfs.
//! - [`slice`](mod@slice): pure: the node's ResourceSlice and its pool generation.
//! - [`prepare`]: pure: an allocated claim's sticks, its CDI spec, the checkpoint.
//! - [`publish`]: applies the slice on every inventory change.
//! - [`registration`]: the kubelet's plugin registration service; [`registrar`] keeps its
//!   socket served (bound again should it be removed).
//! - [`replug`]: who holds a moved stick: the pods its claims are reserved for, for
//!   `onReplug` (Events or evictions, carried out by [`crate::recovery`]).
//! - [`node`]: the DRA node service (prepare, unprepare) with its checkpoint and CDI specs.
//! - [`run`]: wires them together with discovery and the inventory.

pub mod facts;
pub mod names;
pub mod node;
pub mod prepare;
pub mod publish;
pub mod registrar;
pub mod registration;
pub mod replug;
pub mod run;
pub mod slice;

#[cfg(test)]
mod tests {
    use crate::config::{Cli, Config, FileConfig, Mode};

    fn merge(yaml: &str, node: Option<&str>) -> Result<Config, String> {
        let cli = Cli {
            node_name: node.map(Into::into),
            ..Cli::default()
        };
        Config::merge(
            FileConfig::from_yaml(yaml).map_err(|e| e.to_string())?,
            &cli,
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_mode_is_chosen_by_config_and_dra_needs_the_node_name() {
        assert_eq!(merge("", None).unwrap().mode, Mode::DevicePlugin);
        let dra = merge("mode: dra\nkubeletDir: /k\n", Some("n1")).unwrap();
        assert_eq!(dra.mode, Mode::Dra);
        assert_eq!(dra.kubelet_dir, std::path::PathBuf::from("/k"));
        assert_eq!(
            merge("mode: dra\n", Some("n1")).unwrap().kubelet_dir,
            std::path::PathBuf::from("/var/lib/kubelet")
        );
        let e = merge("mode: dra\n", None).unwrap_err();
        assert!(e.contains("mode") && e.contains("NODE_NAME"), "{e}");
        let evict = merge("mode: dra\nonReplug: evict\n", Some("n1")).unwrap();
        assert_eq!(evict.on_replug, crate::config::OnReplug::Evict);
        assert!(merge("mode: bogus\n", None).unwrap_err().contains("bogus"));
        assert!(merge("mode: device-plugin\nonReplug: evict\n", None).is_ok());
    }
}
