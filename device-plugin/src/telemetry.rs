//! Logging: `tracing` to stderr, as text or JSON lines, filtered by `RUST_LOG` (default `info`),
//! set up the way unseal-init's is ([`nitrokey_common::logging`]).
//!
//! One more thing is watched here: kubelets before 1.26 dial plugins with the socket path as
//! HTTP/2 `:authority`, which the HTTP/2 server under tonic refuses (RST_STREAM
//! PROTOCOL_ERROR) before any handler of ours runs. All it leaves is a debug event of the h2
//! crate, so a small layer listens for exactly that event and turns it into an error line
//! that says what to do.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::Context;

use crate::config::LogFormat;

/// Oldest kubelet whose dial-back the plugin's gRPC server accepts.
pub const MIN_KUBELET_VERSION: &str = "1.26";

/// What h2 logs when it refuses a request's `:authority`.
const MALFORMED_AUTHORITY: &str = "malformed authority";

/// Requests refused for their `:authority` so far.
static AUTHORITY_REFUSALS: AtomicU64 = AtomicU64::new(0);

/// Number of requests refused because their HTTP/2 `:authority` was not a host name (the
/// mark of a kubelet older than [`MIN_KUBELET_VERSION`]).
pub fn authority_refusals() -> u64 {
    AUTHORITY_REFUSALS.load(Ordering::Relaxed)
}

/// Installs the global subscriber (see [`nitrokey_common::logging::init`]), with the layer
/// that explains refusals of old kubelets. Call once per process.
pub fn init(format: LogFormat) {
    let old_kubelet = OldKubeletLayer
        .with_filter(Targets::new().with_target("h2::server", tracing::Level::DEBUG));
    nitrokey_common::logging::init(format, &[], Some(Box::new(old_kubelet)));
}

/// Turns h2's refusal of a path-like `:authority` into an error naming the kubelet version.
struct OldKubeletLayer;

impl<S: tracing::Subscriber> Layer<S> for OldKubeletLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut message = MessageText(String::new());
        event.record(&mut message);
        if !is_authority_refusal(&message.0) {
            return;
        }
        let n = AUTHORITY_REFUSALS.fetch_add(1, Ordering::Relaxed) + 1;
        // Every refusal would repeat the same advice; log the 1st, 2nd, 4th, 8th, ...
        if n.is_power_of_two() {
            tracing::error!(
                refusals = n,
                detail = %crate::text::shorten(&message.0, 300),
                "a client sent the socket path as HTTP/2 :authority, as kubelets before {} do; \
                 this plugin's gRPC server cannot accept that: the kubelet must be {} or newer",
                MIN_KUBELET_VERSION,
                MIN_KUBELET_VERSION
            );
        }
    }
}

/// Whether an h2 debug message is the refusal of a request's `:authority`.
fn is_authority_refusal(message: &str) -> bool {
    message.contains(MALFORMED_AUTHORITY)
}

struct MessageText(String);

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_h2s_authority_refusal() {
        assert!(is_authority_refusal(
            "stream error PROTOCOL_ERROR -- malformed headers: malformed authority \
             (b\"/var/lib/kubelet/device-plugins/x.sock\"): invalid uri character;"
        ));
        assert!(!is_authority_refusal(
            "connection error PROTOCOL_ERROR -- other"
        ));
    }
}
