//! `unseal-init` entry point: parse flags, load the configuration, start logging, and hand
//! over to the sidecar loop, the one-shot pass, or an `hsm` subcommand. Exit codes: 0 done,
//! 1 failure, 2 invalid configuration or usage, 3 PIN rejected or blocked (`--once` and
//! subcommands; the sidecar stays up and waits for a different PIN instead).

use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use unseal_init::cli::{Cli, Command};
use unseal_init::config::{self, Config, Env, FileConfig};
use unseal_init::runner::{self, Runner};
use unseal_init::telemetry::{self, Telemetry};
use unseal_init::vault::VaultClient;
use unseal_init::{ConfirmationRequired, exit, pcscd, pin, sidecar};

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load_config(cli: &Cli) -> Result<Config, config::ConfigError> {
    let file = match &cli.config {
        Some(path) => config::read_file(path)?,
        None => FileConfig::default(),
    };
    config::resolve(file, &cli.overrides, &Env::from_process())
}

async fn unseal(cfg: Config) -> anyhow::Result<()> {
    let telemetry = Telemetry::new();
    telemetry.heartbeat();
    if !cfg.once {
        let addr = telemetry::serve(cfg.metrics_address, telemetry.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {}: {e}", cfg.metrics_address))?;
        tracing::info!(address = %addr, "metrics, /healthz and /readyz listening");
    }
    if cfg.hsm.daemon {
        pcscd::start(cfg.hsm.daemon_socket.clone()).await?;
    }
    if cfg.once {
        let (_hsm, keyring) = runner::open_keyring(&cfg, Arc::clone(&telemetry)).await?;
        let vault = VaultClient::new(&cfg.vault.address, cfg.vault.ca_cert.as_deref())?
            .with_telemetry(Arc::clone(&telemetry));
        let runner = Runner::new(cfg, vault, keyring, telemetry);
        runner.preflight().await?;
        runner.pass(true).await?;
        return Ok(());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = sidecar::run(cfg, telemetry) => r,
        _ = term.recv() => {
            tracing::info!("SIGTERM received, stopping");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.overrides.log_format);
    let cfg = match load_config(&cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            return ExitCode::from(exit::CONFIG as u8);
        }
    };
    if cfg.hsm.daemon && cfg.hsm.daemon_socket != std::path::Path::new(config::DEFAULT_PCSCD_SOCKET)
    {
        // SAFETY: no other thread exists yet (the runtime starts below); the PC/SC client
        // library inside the PKCS#11 module reads this to find the supervised pcscd.
        unsafe { std::env::set_var("PCSCLITE_CSOCK_NAME", &cfg.hsm.daemon_socket) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE as u8);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Some(Command::Hsm { command }) => unseal_init::commands::run(&cfg, command).await,
            None => unseal(cfg).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if pin::pin_failure(&e).is_some() {
                exit::PIN
            } else if e.downcast_ref::<ConfirmationRequired>().is_some() {
                exit::CONFIG
            } else {
                exit::FAILURE
            };
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}
