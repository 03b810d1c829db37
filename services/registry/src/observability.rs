//! Every metric the registry exports, described once.

use feedloop_core::http::HttpMetrics;
use metrics::{counter, describe_counter, describe_histogram};

pub const HTTP_REQUESTS: &str = "feedloop_registry_http_requests_total";
pub const HTTP_DURATION: &str = "feedloop_registry_http_request_duration_seconds";
pub const SCHEMAS_REGISTERED: &str = "feedloop_registry_schemas_registered_total";
pub const INCOMPATIBLE: &str = "feedloop_registry_incompatible_schemas_total";

/// The request metrics, for `feedloop_core::http::track`.
pub const HTTP: HttpMetrics = HttpMetrics {
    requests: HTTP_REQUESTS,
    duration: HTTP_DURATION,
};

pub fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request latency, by route."
    );
    describe_counter!(SCHEMAS_REGISTERED, "New subject versions registered.");
    describe_counter!(INCOMPATIBLE, "Registrations refused as incompatible.");
}

pub fn registered() {
    counter!(SCHEMAS_REGISTERED).increment(1);
}

pub fn incompatible() {
    counter!(INCOMPATIBLE).increment(1);
}
