//! Tripwire's connectors: everything that talks to the outside world.
//!
//! # Layout
//!
//! - [`endpoints`]: addresses of Kafka, PostgreSQL, Redis and Prometheus, with
//!   their `TRIPWIRE_*` environment overrides.
//! - [`registry`]: writer schemas by id, embedded from `schemas/`.
//! - [`avro`]: the transaction codec (Confluent wire format, serde decoding,
//!   validation into the dataflow's event).
//! - [`confluent_registry`]: a Confluent Schema Registry REST client with a cache.
//! - [`ceiling`]: reading a topic as fast as one consumer can (the benchmarks' limit).
//! - [`codes`]: the currency and country codes the source accepts.
//! - [`commit`]: the frontier-driven commit operator every sink shares.
//! - [`dead_letter`]: why a record was rejected.
//! - [`kafka_admin`]: creating topics on purpose.
//! - [`kafka_source`]: the timely source over statically assigned partitions.
//! - [`partition`]: one partition's decisions (lateness, floors, duplicates) as plain code.
//! - [`dead_letter_sink`]: rejected records to the dead-letter topic, with headers.
//! - [`metrics`]: the Prometheus metrics of the connectors.
//! - [`readback`]: a job's results read back from PostgreSQL and Redis, for comparisons.
//! - [`redis_sink`]: the Redis read model for an authorisation service.
//! - [`postgres`]: the schema's migrations and the exactly-once PostgreSQL sink.
//!
//! May depend on `tripwire-dataflow` and the client crates (rdkafka,
//! apache-avro, tokio-postgres, redis, prometheus); knows nothing of fraud
//! rules.

pub mod avro;
pub mod ceiling;
pub mod codes;
pub mod commit;
pub mod confluent_registry;
pub mod dead_letter;
pub mod dead_letter_sink;
pub mod endpoints;
pub mod fetch_queue;
pub mod kafka_admin;
pub mod kafka_source;
pub mod metrics;
pub mod partition;
pub mod postgres;
pub mod priority;
pub mod readback;
pub mod redis_sink;
pub mod registry;

pub use endpoints::Endpoints;
