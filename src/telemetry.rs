//! Logging: JSON lines by default, human-readable on a terminal. Per-request events are
//! at DEBUG; ERROR means an operator must act. Every line logged while a request is
//! handled carries its `request_id` (the `x-request-id` answered to the client).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber once; later calls are no-ops (tests build many apps).
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let pretty = match format {
        LogFormat::Pretty => true,
        LogFormat::Json => false,
        LogFormat::Auto => std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if pretty {
        builder.try_init()
    } else {
        // The current span carries the request id: `"span":{"request_id":"...","name":"request"}`.
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
    };
}
