//! `device-plugin`: advertises NitroKey HSM USB sticks to the kubelet.
//!
//! Exit codes: 0 after SIGTERM/SIGINT, 1 on a runtime failure (libusb unavailable, registration
//! rejected, socket or port unusable, USB discovery stopped), 2 on invalid configuration or
//! flags, 70 after a panic in any thread or task (a bug: the process ends rather than carry on
//! with a part of it dead).

use std::process::ExitCode;

use nitrokey_device_plugin::config::{Cli, Config, Mode};
use nitrokey_device_plugin::{daemon, telemetry};

/// Exit code after a panic (EX_SOFTWARE).
const EXIT_PANIC: i32 = 70;

fn main() -> ExitCode {
    let cli = match Cli::parse_from_env_aware(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let config = match Config::from_cli(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.log_format);
    install_panic_hook();
    tune_allocator();
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
    let result = match config.mode {
        Mode::DevicePlugin => runtime
            .block_on(daemon::run(config))
            .map_err(|e| e.to_string()),
        Mode::Dra => runtime
            .block_on(nitrokey_device_plugin::dra::run::run(config))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "device plugin stopped");
            ExitCode::FAILURE
        }
    }
}

/// Ends the process on a panic anywhere. Tokio would otherwise catch a panicking task and keep
/// the process (and its health endpoints) up with that part of the plugin gone.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let message = nitrokey_device_plugin::text::shorten(&payload, 500);
        tracing::error!(thread, location, message, "internal error (panic); exiting");
        eprintln!("device-plugin: panic in thread {thread} at {location}: {message}");
        std::process::exit(EXIT_PANIC);
    }));
}

/// Keeps glibc's heap small for a daemon that idles on a node: one arena for all threads (it is
/// barely concurrent, and every extra arena keeps its own free memory), and freed memory above
/// 128 KiB handed back at once rather than kept for reuse (glibc raises that threshold on its
/// own after large frees, which would pin memory after a burst of clients).
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before other threads allocate
    // much, and valid at any time anyway.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
