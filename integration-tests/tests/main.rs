//! feedloop's integration tests: one binary, real Postgres, real Kafka-compatible broker.

mod confluent_clients;
mod registry;
