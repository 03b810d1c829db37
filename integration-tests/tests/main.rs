//! feedloop's integration tests: one binary, real Postgres, real Kafka-compatible broker.

mod auth;
mod cdc;
mod cdc_faults;
mod collector;
mod collector_faults;
mod confluent_clients;
mod demo;
mod eraser;
mod eraser_faults;
mod erasure_scan;
mod intake;
mod label_semantics;
mod labeler;
mod labeler_faults;
mod registry;
mod tls;
mod trigger;
