//! labeler: joins impressions with their outcomes inside label windows and writes labeled
//! examples to Kafka and to Parquet datasets, committed exactly once with lineage manifests.
//!
//! - `spec`: the declarative label spec (TOML);
//! - `window`: the pure window, label and watermark logic;

pub mod spec;
pub mod window;
