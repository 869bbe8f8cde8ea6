//! tracing setup: human-readable text or JSON lines on stderr, filtered by `RUST_LOG` (default `info`).
//! Tokens and passwords are never passed to tracing in full; see the session code for what is logged. Libraries
//! that log SQL text are capped at `warn` regardless of `RUST_LOG`.

use std::io::IsTerminal;

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Directives that always apply: see [`init`].
const QUIET_LIBRARIES: &[&str] = &["sqlparser=warn"];

/// Installs the global subscriber. Calling it twice is harmless (the second call does nothing).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Libraries that log the SQL they are given (sqlparser at debug) would write tokens and password
    // literals to the log: they are capped at warn whatever RUST_LOG says.
    let filter = QUIET_LIBRARIES.iter().fold(filter, |f, d| {
        f.add_directive(d.parse().expect("a valid directive"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
