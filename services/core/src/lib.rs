//! feedloop's shared library: the domain model, ports and adapters every service builds on.
//!
//! - [`avro`]: Confluent wire format, typed codec, schema normalization and compatibility.
//! - [`catalogue`]: the event catalogue (`schemas/`), topics and subjects.
//! - [`model`]: Rust types of the catalogue records.
//! - [`registry_client`]: a caching client of a Confluent-compatible schema registry.
//! - [`config`], [`telemetry`], [`retry`], [`http`], [`error`]: service plumbing.
//! - [`kafka`], [`postgres`]: adapters; [`intake`]: consuming a catalogue topic into state;
//!   [`crypto`]: crypto-shredding.

/// What a service's `start` returns: its start-up as a boxed future, so that the start-up is
/// compiled once, in the service's crate, and not again in every crate that awaits it (an async
/// function's body is instantiated where it is polled; the `feedloop` CLI awaits every service).
pub type Starting<T, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send + 'static>>;

pub mod avro;
pub mod catalogue;
pub mod config;
pub mod crypto;
pub mod error;
pub mod http;
#[cfg(feature = "kafka")]
pub mod intake;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod model;
pub mod postgres;
pub mod registry_client;
pub mod resume;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// feedloop's version, as recorded in produced records.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
