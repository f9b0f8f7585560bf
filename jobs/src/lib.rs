//! Shared pieces of Tripwire's job binaries.
//!
//! # Layout
//!
//! - [`generator`]: deterministic traffic for `txgen`: benign spending,
//!   labelled fraud scenarios, bad input, out-of-order and late records.
//! - [`layered`]: flags over environment over a TOML file over defaults.
//!
//! Depends on `tripwire-dataflow` and `tripwire-connectors`.

pub mod generator;
pub mod layered;
