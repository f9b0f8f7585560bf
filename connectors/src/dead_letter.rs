//! Why a record did not enter the dataflow, and what goes to the dead-letter topic about it.

use std::fmt;

/// The class of a rejected record; the `reason` header and the counter label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeadLetterReason {
    /// Fewer bytes than the wire format or the record needs.
    Truncated,
    /// The first byte is not the Confluent magic byte 0.
    WrongMagic,
    /// The schema id is not in the registry.
    UnknownSchemaId,
    /// The writer schema is not a transaction schema, or the bytes do not fit it.
    WrongSchema,
    /// A field is missing or out of its domain (amount, coordinates, codes).
    InvalidField,
    /// Event time too far ahead of the record's Kafka timestamp.
    TooFarInFuture,
    /// Event time further behind the record's Kafka timestamp than the job looks back.
    TooFarInPast,
    /// Larger than the configured maximum message size.
    Oversize,
    /// Older than its partition's watermark allows (beyond the lateness bound).
    Late,
    /// The event id of an earlier accepted record of the partition, with other fields.
    DuplicateId,
}

impl DeadLetterReason {
    /// Every reason, for metrics that should show zeros too.
    pub const ALL: [DeadLetterReason; 10] = [
        DeadLetterReason::Truncated,
        DeadLetterReason::WrongMagic,
        DeadLetterReason::UnknownSchemaId,
        DeadLetterReason::WrongSchema,
        DeadLetterReason::InvalidField,
        DeadLetterReason::TooFarInFuture,
        DeadLetterReason::TooFarInPast,
        DeadLetterReason::Oversize,
        DeadLetterReason::Late,
        DeadLetterReason::DuplicateId,
    ];

    /// The stable name used in headers, metrics and the late-events table.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Truncated => "truncated",
            DeadLetterReason::WrongMagic => "wrong_magic",
            DeadLetterReason::UnknownSchemaId => "unknown_schema_id",
            DeadLetterReason::WrongSchema => "wrong_schema",
            DeadLetterReason::InvalidField => "invalid_field",
            DeadLetterReason::TooFarInFuture => "too_far_in_future",
            DeadLetterReason::TooFarInPast => "too_far_in_past",
            DeadLetterReason::Oversize => "oversize",
            DeadLetterReason::Late => "late",
            DeadLetterReason::DuplicateId => "duplicate_id",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection: the reason class and a human-readable explanation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejected {
    /// The class.
    pub reason: DeadLetterReason,
    /// What exactly was wrong.
    pub detail: String,
    /// The record's event id, when it could be read (for log correlation).
    pub event_id: Option<i64>,
}

impl Rejected {
    /// A rejection of class `reason`.
    pub fn new(reason: DeadLetterReason, detail: impl Into<String>) -> Self {
        Rejected { reason, detail: detail.into(), event_id: None }
    }

    /// The same rejection, naming the record's event id.
    pub fn of_event(mut self, event_id: i64) -> Self {
        self.event_id = Some(event_id);
        self
    }
}
