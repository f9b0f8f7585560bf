//! The library behind the `tripwire` CLI, shared with tests that drive the stack.
//!
//! - [`stack`]: the local Kafka, PostgreSQL, Redis and Prometheus on loopback,
//!   installed when missing, started, stopped and restarted (the chaos and
//!   outage tests restart services through it).
//! - [`launch`]: `tripwire launch` / `submit`: a job as one process per line of
//!   a hosts file, supervised as a group that restarts together.
//! - [`forward`]: a TCP relay, for jobs in network namespaces of their own.
//! - [`query`]: `tripwire query` and `tripwire status`.
//!
//! Depends on `tripwire-connectors` (addresses and clients), never on the
//! dataflow: the CLI runs jobs, it does not compute.

pub mod forward;
pub mod launch;
pub mod query;
pub mod stack;
