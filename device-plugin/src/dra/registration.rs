//! The kubelet's plugin registration (`pluginregistration.k8s.io/v1`): the driver serves
//! `Registration` on `plugins_registry/hsm.nitrokey.com-reg.sock`; the kubelet's plugin
//! watcher notices the socket (at once, or when the kubelet starts and finds it), asks
//! `GetInfo`, checks the answer and reports the outcome through `NotifyRegistrationStatus`.

use std::sync::Arc;

use nitrokey_proto::pluginregistration_v1 as pb;
use tonic::{Request, Response, Status};

use super::names::DRIVER_NAME;
use crate::metrics::Metrics;

/// The registration service.
#[derive(Clone)]
pub struct Registration {
    /// Absolute path of the node service's socket.
    pub endpoint: String,
    /// Where the outcome shows (`/readyz`, the `registered` gauge).
    pub metrics: Arc<Metrics>,
    /// Notified at each accepted registration (the kubelet may have wiped the slice).
    pub registered: Arc<tokio::sync::Notify>,
}

/// What the driver says about itself: a DRA plugin named after the driver, serving the v1 and
/// v1beta1 node services (the kubelet picks the newest it knows).
pub fn info(endpoint: &str) -> pb::PluginInfo {
    pb::PluginInfo {
        r#type: nitrokey_proto::DRA_PLUGIN_TYPE.to_owned(),
        name: DRIVER_NAME.to_owned(),
        endpoint: endpoint.to_owned(),
        supported_versions: vec![
            nitrokey_proto::DRA_V1_SERVICE.to_owned(),
            nitrokey_proto::DRA_V1BETA1_SERVICE.to_owned(),
        ],
    }
}

#[tonic::async_trait]
impl pb::registration_server::Registration for Registration {
    async fn get_info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        tracing::debug!("kubelet asked for the plugin's info");
        Ok(Response::new(info(&self.endpoint)))
    }

    async fn notify_registration_status(
        &self,
        request: Request<pb::RegistrationStatus>,
    ) -> Result<Response<pb::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        self.metrics.set_registered(status.plugin_registered);
        if status.plugin_registered {
            self.registered.notify_one();
            tracing::info!(driver = DRIVER_NAME, "registered with the kubelet");
        } else {
            tracing::error!(driver = DRIVER_NAME,
                error = %crate::text::shorten(&status.error, 500),
                "the kubelet refused the registration");
        }
        Ok(Response::new(pb::RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn announces_a_dra_plugin_with_both_node_services() {
        let info = super::info("/var/lib/kubelet/plugins/hsm.nitrokey.com/dra.sock");
        assert_eq!(info.r#type, "DRAPlugin");
        assert_eq!(info.name, "hsm.nitrokey.com");
        assert_eq!(
            info.supported_versions,
            ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
        );
    }
}
