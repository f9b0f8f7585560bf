//! PostgreSQL: the schema's migrations, the exactly-once sink, and where a restart resumes.

pub mod migrations;
pub mod resume;
pub mod sink;

pub use crate::commit::Committed;
pub use migrations::{migrate, migrate_up_to};
pub use resume::{
    committed_frontier, fit_checkpoints, high_water, record_decisions, recorded_decisions,
    resume_point, ResumePoint,
};
pub use sink::{pg_committer, pg_sink, PgSinkConfig};

use tripwire_dataflow::Time;

/// A time as PostgreSQL's bigint (times past its range are clamped).
fn as_i64(t: Time) -> i64 {
    t.min(i64::MAX as u64) as i64
}
