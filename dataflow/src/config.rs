//! Thresholds, windows and tick of the fraud computation, with documented defaults.

use serde::{Deserialize, Serialize};

use crate::event::Time;

/// One minute in ms.
pub const MINUTE: Time = 60_000;
/// One hour in ms.
pub const HOUR: Time = 60 * MINUTE;
/// One day in ms.
pub const DAY: Time = 24 * HOUR;

/// Everything that shapes the fraud computation's output.
///
/// Two runs with equal configs over equal accepted input produce equal output,
/// whatever the worker count, process count or batching.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudConfig {
    /// Window lengths in ms for the per-card statistics. Default 1 min, 5 min, 1 h, 24 h.
    pub windows: Vec<Time>,
    /// Event times are rounded up to a multiple of this many ms before they
    /// become timely times (default 1: no rounding). A coarser tick means fewer
    /// distinct times, so more work consolidates per time and throughput rises,
    /// at the price of results (and commits) that move in steps of one tick,
    /// and window edges that are only tick-accurate: an event at `e` counts in
    /// a window from `ceil(e / tick) * tick` for exactly `W` ms.
    pub tick_ms: Time,
    /// Velocity rule.
    pub velocity: VelocityConfig,
    /// Amount-spike rule.
    pub amount_spike: AmountSpikeConfig,
    /// Impossible-travel rule.
    pub travel: TravelConfig,
    /// Card-testing rule.
    pub card_testing: CardTestingConfig,
    /// Country-hopping rule.
    pub country_hopping: CountryHoppingConfig,
}

/// More than `limit` transactions of one card within a window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VelocityConfig {
    /// `(window ms, limit)` pairs; an alert when the window's count exceeds the limit.
    /// Default: more than 5 in 1 min, more than 20 in 1 h.
    pub limits: Vec<(Time, u64)>,
}

/// A transaction far above the card's average over the last 24 h.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmountSpikeConfig {
    /// The window the average is taken over. Default 24 h.
    pub window_ms: Time,
    /// Alert when amount > `factor_percent / 100` × average of the other
    /// transactions in the window. Default 500 (five times). An integer, so the
    /// comparison is exact.
    pub factor_percent: u64,
    /// How many other transactions the window must hold before the rule speaks. Default 5.
    pub min_history: u64,
}

/// Two consecutive transactions further apart than a plane could fly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TravelConfig {
    /// Speed above which travel is impossible, km/h. Default 900.
    pub max_speed_kmh: u64,
    /// How far back the previous transaction is looked for. Default 24 h:
    /// half the earth's circumference in 24 h is about 835 km/h, so no pair
    /// further apart in time can break 900 km/h, and nothing is missed.
    pub lookback_ms: Time,
}

/// Many small transactions at distinct merchants in a short time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardTestingConfig {
    /// A transaction is small below this amount in minor units. Default 500.
    pub small_amount_minor: i64,
    /// Alert when the small transactions span at least this many merchants. Default 5.
    pub min_merchants: u64,
    /// Within this window. Default 10 min.
    pub window_ms: Time,
}

/// Transactions in many countries in a short time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountryHoppingConfig {
    /// Alert at this many distinct countries. Default 3.
    pub min_countries: u64,
    /// Within this window. Default 1 h.
    pub window_ms: Time,
}

impl Default for FraudConfig {
    fn default() -> Self {
        FraudConfig {
            windows: vec![MINUTE, 5 * MINUTE, HOUR, DAY],
            tick_ms: 1,
            velocity: VelocityConfig { limits: vec![(MINUTE, 5), (HOUR, 20)] },
            amount_spike: AmountSpikeConfig { window_ms: DAY, factor_percent: 500, min_history: 5 },
            travel: TravelConfig { max_speed_kmh: 900, lookback_ms: DAY },
            card_testing: CardTestingConfig {
                small_amount_minor: 500,
                min_merchants: 5,
                window_ms: 10 * MINUTE,
            },
            country_hopping: CountryHoppingConfig { min_countries: 3, window_ms: HOUR },
        }
    }
}

/// `event_time_ms` rounded up to a multiple of `tick` (0 counts as 1): an
/// event's timely time. The usual tick, 1 ms, without a division.
#[inline]
pub(crate) fn round_up_to_tick(event_time_ms: Time, tick: Time) -> Time {
    if tick <= 1 {
        event_time_ms
    } else {
        event_time_ms.div_ceil(tick) * tick
    }
}

impl FraudConfig {
    /// Windows of seconds instead of hours (1 s, 5 s, 20 s, 60 s), thresholds to
    /// match: for tests and demos whose input spans minutes, so that windows
    /// fill, slide and empty many times over.
    pub fn seconds() -> Self {
        FraudConfig {
            windows: vec![1_000, 5_000, 20_000, 60_000],
            tick_ms: 1,
            velocity: VelocityConfig { limits: vec![(1_000, 3), (20_000, 8)] },
            amount_spike: AmountSpikeConfig {
                window_ms: 60_000,
                factor_percent: 300,
                min_history: 3,
            },
            travel: TravelConfig { max_speed_kmh: 900, lookback_ms: 30_000 },
            card_testing: CardTestingConfig {
                small_amount_minor: 500,
                min_merchants: 3,
                window_ms: 10_000,
            },
            country_hopping: CountryHoppingConfig { min_countries: 3, window_ms: 20_000 },
        }
    }

    /// The timely time of an event time: rounded up to the tick.
    pub fn time_of(&self, event_time_ms: Time) -> Time {
        round_up_to_tick(event_time_ms, self.tick_ms)
    }

    /// Check what the computation relies on: at least one statistics window,
    /// no window of length 0, at most [`crate::card_state::MAX_STAT_WINDOWS`]
    /// statistics windows, none longer than [`crate::output::MAX_STAT_WINDOW_MS`]
    /// (49 days), and at most
    /// [`crate::card_windows::MAX_RULE_WINDOWS`] distinct rule windows.
    pub fn validate(&self) -> Result<(), String> {
        if self.windows.is_empty() {
            return Err("no statistics windows configured".into());
        }
        if self.windows.len() > crate::card_state::MAX_STAT_WINDOWS {
            return Err(format!(
                "{} statistics windows, at most {} supported",
                self.windows.len(),
                crate::card_state::MAX_STAT_WINDOWS
            ));
        }
        if let Some(w) = self.windows.iter().find(|w| **w > crate::output::MAX_STAT_WINDOW_MS) {
            return Err(format!(
                "a statistics window of {w} ms; at most {} ms (49 days) supported",
                crate::output::MAX_STAT_WINDOW_MS
            ));
        }
        let mut rule: Vec<Time> = self.velocity.limits.iter().map(|(w, _)| *w).collect();
        rule.extend([self.amount_spike.window_ms, self.country_hopping.window_ms]);
        let others = [self.card_testing.window_ms, self.travel.lookback_ms];
        if self.windows.iter().chain(&rule).chain(&others).any(|w| *w == 0) {
            return Err("a window of length 0 ms holds nothing; every window must be > 0".into());
        }
        rule.sort_unstable();
        rule.dedup();
        if rule.len() > crate::card_windows::MAX_RULE_WINDOWS {
            return Err(format!(
                "{} distinct rule windows, at most {} supported",
                rule.len(),
                crate::card_windows::MAX_RULE_WINDOWS
            ));
        }
        Ok(())
    }

    /// The longest window any statistic or rule looks back over; what replay must re-read.
    pub fn max_window(&self) -> Time {
        let rules = [
            self.amount_spike.window_ms,
            self.travel.lookback_ms,
            self.card_testing.window_ms,
            self.country_hopping.window_ms,
        ];
        let velocity = self.velocity.limits.iter().map(|(w, _)| *w);
        self.windows.iter().copied().chain(rules).chain(velocity).max().unwrap_or(0)
    }
}
