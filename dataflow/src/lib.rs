//! The fraud computation of Tripwire as pure timely/differential operators.
//!
//! This crate does no I/O: it depends on timely and differential only, so that
//! the computation can be judged in-process against its reference model.
