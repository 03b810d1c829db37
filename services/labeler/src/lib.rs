//! labeler: joins impressions with their outcomes inside label windows and writes labeled
//! examples to Kafka and to Parquet datasets, committed exactly once with lineage manifests.
//!
//! - `spec`: the declarative label spec (TOML);
//! - `window`: the pure window, label and watermark logic;
//! - `dataset`: Parquet files, manifests and the object store root;
//! - `state`: the `StateStore` port for join state and its adapters;

pub mod dataset;
pub mod spec;
pub mod state;
pub mod window;
