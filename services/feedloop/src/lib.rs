//! The feedloop CLI as a library: its commands (`cli`), the dev stack (also used by the
//! integration tests), the demo, the benchmarks and the schema tooling.

pub mod bench;
pub mod cli;
pub mod datasets;
pub mod deadletters;
pub mod demo;
pub mod dev;
pub mod erase;
pub mod schemas;
