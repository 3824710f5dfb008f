//! `device-plugin`: advertises NitroKey HSM USB sticks to the kubelet.
//!
//! Exit codes: 0 after SIGTERM/SIGINT, 1 on a runtime failure (libusb unavailable, registration
//! rejected, socket or port unusable), 2 on invalid configuration or flags.

use std::process::ExitCode;

use clap::Parser;
use nitrokey_device_plugin::config::{Cli, Config};
use nitrokey_device_plugin::{daemon, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_cli(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "device plugin stopped");
            ExitCode::FAILURE
        }
    }
}
