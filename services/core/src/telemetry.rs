//! Logs (structured `tracing`) and metrics (the `metrics` crate, rendered for Prometheus).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global tracing subscriber writing JSON lines to `file` (a program that owns the
/// terminal, like the demo, keeps its services' logs there); the filter comes from `RUST_LOG`
/// (default `default_filter`).
pub fn init_tracing_to_file(file: std::fs::File, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .json()
                .with_current_span(false)
                .with_writer(std::sync::Mutex::new(file)),
        )
        .try_init();
    drop(result);
}

/// Installs the global tracing subscriber: JSON lines when `json`, human-readable otherwise
/// (colored on a terminal only, so that a log file holds no escape codes); the filter comes
/// from `RUST_LOG` (default `info`). Calling it twice is harmless.
pub fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    // Already installed (several services in one process, or tests): keep the first.
    drop(result);
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use. Several services running in
/// one process (the dev stack, tests) share it. `None` if another recorder was installed first.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref()
}

/// Installs the process's Prometheus recorder (once) and then describes a service's metrics.
/// Every service does this first when it starts, as a binary or as a library (the dev stack,
/// tests): a metric counted before the recorder exists is lost for good.
pub fn install_metrics(describe: impl FnOnce()) {
    prometheus();
    describe();
}

/// Renders all metrics in the Prometheus text format.
pub fn render_metrics() -> String {
    prometheus()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}
