//! Tripwire's connectors: everything that talks to the outside world.
//!
//! # Layout
//!
//! - [`endpoints`]: addresses of Kafka, PostgreSQL, Redis and Prometheus, with
//!   their `TRIPWIRE_*` environment overrides.
//!
//! May depend on `tripwire-dataflow` and the client crates (rdkafka,
//! apache-avro, tokio-postgres, redis, prometheus); knows nothing of fraud
//! rules.

pub mod endpoints;

pub use endpoints::Endpoints;
