//! PostgreSQL: the schema's migrations and the exactly-once sink.

pub mod migrations;
pub mod sink;

pub use crate::commit::Committed;
pub use migrations::migrate;
pub use sink::{pg_sink, PgSinkConfig};
