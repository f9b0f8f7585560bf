//! Shared pieces of Tripwire's job binaries.
//!
//! # Layout
//!
//! - [`generator`]: deterministic traffic for `txgen`: benign spending,
//!   labelled fraud scenarios, bad input, out-of-order and late records.
//! - [`layered`]: flags over environment over a TOML file over defaults.
//! - [`wire_producer`]: a Kafka producer that sends a broker all its
//!   partitions' records in one request (txgen's fixed-rate mode).
//!
//! Depends on `tripwire-dataflow` and `tripwire-connectors`.

pub mod generator;
pub mod layered;
pub mod wire_producer;
