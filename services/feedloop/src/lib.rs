//! The feedloop CLI as a library: the dev stack (also used by the integration tests) and the
//! schema tooling.

pub mod bench;
pub mod datasets;
pub mod demo;
pub mod dev;
pub mod erase;
pub mod schemas;
