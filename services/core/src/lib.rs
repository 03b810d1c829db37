//! feedloop's shared library: the domain model, ports and adapters every service builds on.
//!
//! - [`avro`]: Confluent wire format, typed codec, schema normalization and compatibility.
//! - [`catalogue`]: the event catalogue (`schemas/`), topics and subjects.
//! - [`model`]: Rust types of the catalogue records.
//! - [`registry_client`]: a caching client of a Confluent-compatible schema registry.
//! - [`config`], [`telemetry`], [`retry`], [`http`], [`error`]: service plumbing.
//! - [`kafka`], [`postgres`]: adapters; [`intake`]: consuming a catalogue topic into state;
//!   [`crypto`]: crypto-shredding.

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
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// feedloop's version, as recorded in produced records.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
