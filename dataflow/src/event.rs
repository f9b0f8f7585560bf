//! The transaction event, the one type the dataflow and its reference model share.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Event time in milliseconds since the Unix epoch, and the dataflow's timely timestamp.
pub type Time = u64;

/// The difference type of every Tripwire collection.
pub type Diff = i64;

/// How a card was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Channel {
    /// Card present at a point of sale.
    Pos,
    /// Card not present, online.
    Ecom,
    /// Cash withdrawal.
    Atm,
}

/// A card transaction, as accepted by the source (decoded and validated).
///
/// Mirrors `schemas/transaction` v2 (v1 lacks `device_id`). Coordinates are
/// kept in micro-degrees (about 0.1 m) so that the event is `Ord` and `Hash`
/// and every computation on it is deterministic across workers; the source
/// rounds the schema's `double`s once, after validating them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Transaction {
    /// Unique id of the event; alerts name their trigger by it.
    pub event_id: u64,
    /// Tokenised card id; every aggregate is keyed by it.
    pub card_id: u64,
    /// Account the card belongs to.
    pub account_id: u64,
    /// Merchant id.
    pub merchant_id: u64,
    /// ISO 18245 merchant category code.
    pub mcc: u16,
    /// Amount in minor units of `currency` (cents), always > 0.
    pub amount_minor: i64,
    /// ISO 4217 alphabetic code, upper case ASCII.
    pub currency: [u8; 3],
    /// ISO 3166-1 alpha-2 country of the merchant, upper case ASCII.
    pub country: [u8; 2],
    /// Latitude in micro-degrees, within ±90°.
    pub lat_e6: i32,
    /// Longitude in micro-degrees, within ±180°.
    pub lon_e6: i32,
    /// POS, ECOM or ATM.
    pub channel: Channel,
    /// When the transaction happened, in ms since the epoch.
    pub event_time_ms: Time,
    /// Device fingerprint (schema v2); `None` for v1 records.
    pub device_id: Option<u64>,
}

/// Where a bounded run's input ends: every output below it is final, and
/// none at or after it is wanted (the windows as they stand after the last
/// event, not closed at the end of time). Shared by the source that learns
/// it, the window operator that stops there, and the sinks that commit up to it.
#[derive(Clone, Debug)]
pub struct InputEnd(Arc<AtomicU64>);

impl Default for InputEnd {
    fn default() -> Self {
        InputEnd(Arc::new(AtomicU64::new(Time::MAX)))
    }
}

impl InputEnd {
    /// The input ends at `t`: every output below it is final, none at or after it is.
    pub fn set(&self, t: Time) {
        self.0.store(t, Ordering::Release);
    }

    /// Where the input ends, once known.
    pub fn get(&self) -> Option<Time> {
        Some(self.0.load(Ordering::Acquire)).filter(|t| *t != Time::MAX)
    }
}
