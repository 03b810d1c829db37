//! Every metric the registry exports, described once.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_histogram, histogram};

pub const HTTP_REQUESTS: &str = "feedloop_registry_http_requests_total";
pub const HTTP_DURATION: &str = "feedloop_registry_http_request_duration_seconds";
pub const SCHEMAS_REGISTERED: &str = "feedloop_registry_schemas_registered_total";
pub const INCOMPATIBLE: &str = "feedloop_registry_incompatible_schemas_total";

pub const LABEL_ROUTE: &str = "route";
pub const LABEL_STATUS: &str = "status";

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

pub fn http_request(route: &str, status: u16, elapsed: Duration) {
    counter!(HTTP_REQUESTS, LABEL_ROUTE => route.to_owned(), LABEL_STATUS => status.to_string())
        .increment(1);
    histogram!(HTTP_DURATION, LABEL_ROUTE => route.to_owned()).record(elapsed.as_secs_f64());
}

pub fn registered() {
    counter!(SCHEMAS_REGISTERED).increment(1);
}

pub fn incompatible() {
    counter!(INCOMPATIBLE).increment(1);
}
