//! Logging: `tracing` to stderr, as text or JSON lines, filtered by `RUST_LOG` (default
//! `info`). Both programs run in the same pods' log pipeline, so their lines look alike: one
//! JSON object per event with its fields at the top level, or plain text without module
//! paths, coloured only on a terminal.

use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// A program's own layer, installed next to the log output with whatever filter it carries.
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber: events matching `RUST_LOG` (default `info`) go to stderr,
/// except those of `quiet_targets`; `extra` sees events through its own filter. Call once per
/// process: a second call panics.
pub fn init(format: LogFormat, quiet_targets: &[&str], extra: Option<ExtraLayer>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::stderr().is_terminal();
    subscriber(
        format,
        quiet(filter, quiet_targets),
        extra,
        std::io::stderr,
        ansi,
    )
    .init();
}

/// Turns every target in `targets` off, whatever `RUST_LOG` says about it.
fn quiet(mut filter: EnvFilter, targets: &[&str]) -> EnvFilter {
    for target in targets {
        if let Ok(off) = format!("{target}=off").parse() {
            filter = filter.add_directive(off);
        }
    }
    filter
}

/// The subscriber [`init`] installs, writing to `writer` (tests capture it).
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    extra: Option<ExtraLayer>,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // The filter sits on the output layer alone, so `extra` can see events (h2's debug
    // lines, say) that are never printed.
    let registry = tracing_subscriber::registry().with(extra);
    match format {
        LogFormat::Text => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_filter(filter),
            ),
        ),
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(writer)
                    .with_ansi(false)
                    .with_filter(filter),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::Context;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().expect("not poisoned").clone();
            String::from_utf8(bytes)
                .expect("UTF-8")
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    fn log_with(
        format: LogFormat,
        quiet_targets: &[&str],
        extra: Option<ExtraLayer>,
    ) -> Vec<String> {
        let out = Captured::default();
        let writer = out.clone();
        let sub = subscriber(
            format,
            quiet(EnvFilter::new(DEFAULT_FILTER), quiet_targets),
            extra,
            move || writer.clone(),
            false,
        );
        tracing::subscriber::with_default(sub, || {
            tracing::info!(key = "k1", "stored");
            tracing::debug!("below the default level");
            tracing::error!(target: "cryptoki::mechanism", "vendor mechanism");
        });
        out.lines()
    }

    #[test]
    fn json_lines_carry_their_fields_at_the_top_level() {
        let lines = log_with(LogFormat::Json, &[], None);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let event: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
        assert_eq!(event["message"], "stored", "{event}");
        assert_eq!(event["key"], "k1", "{event}");
        assert_eq!(event["level"], "INFO", "{event}");
        assert!(event.get("fields").is_none(), "{event}");
        assert!(event.get("span").is_none(), "{event}");
    }

    #[test]
    fn text_lines_leave_out_the_target() {
        let lines = log_with(LogFormat::Text, &[], None);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("INFO") && lines[0].contains("stored key=\"k1\""),
            "{lines:?}"
        );
        assert!(!lines[0].contains("nitrokey_common"), "{lines:?}");
        assert!(!lines[1].contains("cryptoki"), "{lines:?}");
    }

    #[test]
    fn quiet_targets_are_silenced() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let lines = log_with(format, &["cryptoki::mechanism"], None);
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert!(lines[0].contains("stored"), "{lines:?}");
        }
    }

    /// Records the level of every event it sees.
    struct Levels(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> Layer<S> for Levels {
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
            let level = event.metadata().level().to_string();
            self.0.lock().expect("not poisoned").push(level);
        }
    }

    #[test]
    fn the_extra_layer_sees_what_its_own_filter_lets_through() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let extra = Levels(Arc::clone(&seen))
            .with_filter(Targets::new().with_target(module_path!(), tracing::Level::DEBUG));
        let lines = log_with(LogFormat::Text, &[], Some(Box::new(extra)));
        // The debug event reached the extra layer but was not printed.
        assert_eq!(*seen.lock().expect("not poisoned"), ["INFO", "DEBUG"]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines.iter().all(|l| !l.contains("below the default level")),
            "{lines:?}"
        );
    }
}
