//! PostgreSQL: the schema's migrations, the exactly-once sink, and where a restart resumes.

pub mod migrations;
pub mod resume;
pub mod sink;

pub use crate::commit::Committed;
pub use migrations::migrate;
pub use resume::{
    committed_frontier, fit_checkpoints, high_water, record_decisions, recorded_decisions,
    resume_point, ResumePoint,
};
pub use sink::{pg_committer, pg_sink, PgSinkConfig};
