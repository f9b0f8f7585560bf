//! The brute-force reference model: `SEMANTICS.md` as plain loops over the whole input.
//!
//! It shares nothing with the dataflow but the types of [`crate::event`],
//! [`crate::output`] and [`crate::config`]: the tick rounding, the alert ids and
//! the great-circle distance are re-implemented here from `SEMANTICS.md`, so
//! that a bug in either copy shows up as a disagreement between the two.
//! Everything is O(n²) or worse in a card's events on purpose (every rule and
//! statistic is per card, so events are only grouped by card); it is meant for
//! test inputs of a few hundred events per card.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::FraudConfig;
use crate::event::{Time, Transaction};
use crate::output::{Alert, Details, Metric, Rule, StatKey};

/// Earth radius of the haversine, km.
const EARTH_RADIUS_KM: f64 = 6371.0088;
/// Milliseconds in an hour, for speeds in km/h.
const MS_PER_HOUR: f64 = 3_600_000.0;
/// The seed every alert id's SplitMix64 chain starts from (`"TRIPWIRE"`).
const ALERT_ID_SEED: u64 = 0x5452_4950_5749_5245;

/// The reference model over one whole input: a config and all accepted events.
///
/// Alerts are computed once, in [`Reference::new`]; statistics on demand.
pub struct Reference<'a> {
    /// The configuration both implementations run with.
    config: &'a FraudConfig,
    /// All accepted events, in any order, grouped by card.
    by_card: BTreeMap<u64, Vec<&'a Transaction>>,
    /// Every alert the input ever raises, with its time τ(trigger).
    alerts: Vec<(Time, Alert)>,
}

impl<'a> Reference<'a> {
    /// Builds the model of `events` (in any order, unique event ids) under `config`,
    /// evaluating every rule on every event.
    pub fn new(config: &'a FraudConfig, events: &'a [Transaction]) -> Self {
        let mut by_card: BTreeMap<u64, Vec<&'a Transaction>> = BTreeMap::new();
        for x in events {
            by_card.entry(x.card_id).or_default().push(x);
        }
        let mut reference = Reference { config, by_card, alerts: Vec::new() };
        let mut alerts = Vec::new();
        for x in events {
            let t = reference.time_of(x.event_time_ms);
            for alert in reference.judge(x) {
                alerts.push((t, alert));
            }
        }
        reference.alerts = alerts;
        reference
    }

    /// The statistics at time `t` (accumulated, see SEMANTICS.md): every (StatKey, value) present.
    pub fn stats_at(&self, t: Time) -> BTreeMap<StatKey, i64> {
        let mut stats = BTreeMap::new();
        for (&card_id, events) in &self.by_card {
            for &window_ms in &self.config.windows {
                let mut count: i64 = 0;
                let mut sum: i128 = 0;
                let mut max: Option<i64> = None;
                let mut merchants = BTreeSet::new();
                let mut countries = BTreeSet::new();
                for &y in events {
                    if !self.in_window(y, window_ms, t) {
                        continue;
                    }
                    count += 1;
                    sum += i128::from(y.amount_minor);
                    max = Some(match max {
                        Some(m) if m >= y.amount_minor => m,
                        _ => y.amount_minor,
                    });
                    merchants.insert(y.merchant_id);
                    countries.insert(y.country);
                }
                let Some(max) = max else {
                    continue; // empty window: no statistic at all
                };
                let key = |metric| StatKey { card_id, window_ms, metric };
                stats.insert(key(Metric::Count), count);
                stats.insert(
                    key(Metric::Sum),
                    i64::try_from(sum).expect("window sum overflows i64"),
                );
                stats.insert(key(Metric::MaxAmount), max);
                stats.insert(key(Metric::DistinctMerchants), merchants.len() as i64);
                stats.insert(key(Metric::DistinctCountries), countries.len() as i64);
            }
        }
        stats
    }

    /// All alerts whose trigger has τ ≤ t.
    pub fn alerts_until(&self, t: Time) -> BTreeSet<Alert> {
        self.alerts.iter().filter(|(tau, _)| *tau <= t).map(|(_, alert)| alert.clone()).collect()
    }

    /// The timely time τ of an event time (its own re-implementation):
    /// `ceil(event_time_ms / tick) * tick` with `tick = max(config.tick_ms, 1)`.
    pub fn time_of(&self, event_time_ms: Time) -> Time {
        let tick = u128::from(if self.config.tick_ms == 0 { 1 } else { self.config.tick_ms });
        let e = u128::from(event_time_ms);
        let ticks = e.div_ceil(tick);
        Time::try_from(ticks * tick).expect("rounded event time overflows u64")
    }

    /// Whether `y` is in a window of length `window_ms` at time `t`: `τ(y) ≤ t < τ(y) + W`.
    fn in_window(&self, y: &Transaction, window_ms: Time, t: Time) -> bool {
        let tau = self.time_of(y.event_time_ms);
        // In u128 so that `τ + W` cannot overflow.
        tau <= t && u128::from(t) < u128::from(tau) + u128::from(window_ms)
    }

    /// The events of `card_id` in a window of length `window_ms` at time `t`.
    fn window(&self, card_id: u64, window_ms: Time, t: Time) -> Vec<&'a Transaction> {
        let events = self.by_card.get(&card_id).map_or(&[][..], |e| &e[..]);
        events.iter().copied().filter(|y| self.in_window(y, window_ms, t)).collect()
    }

    /// Every alert every rule raises on `x`, judged against the state at `τ(x)`.
    fn judge(&self, x: &Transaction) -> Vec<Alert> {
        let t = self.time_of(x.event_time_ms);
        let c = x.card_id;
        let cfg = self.config;
        let mut out = Vec::new();
        let mut alert = |rule: Rule, variant: u64, details: Details| {
            out.push(Alert {
                id: reference_alert_id(rule, x.card_id, x.event_id, variant),
                card_id: c,
                rule,
                trigger_event: x.event_id,
                event_time_ms: x.event_time_ms,
                details,
            });
        };

        // 1. Velocity.
        for &(window_ms, limit) in &cfg.velocity.limits {
            let n = self.window(c, window_ms, t).len() as u64;
            if n > limit {
                alert(Rule::Velocity, window_ms, Details::Velocity { window_ms, count: n, limit });
            }
        }

        // 2. Amount spike.
        {
            let history: Vec<&Transaction> = self
                .window(c, cfg.amount_spike.window_ms, t)
                .into_iter()
                .filter(|y| y.event_id != x.event_id)
                .collect();
            let n = history.len() as u64;
            let s: i128 = history.iter().map(|y| i128::from(y.amount_minor)).sum();
            let lhs = i128::from(x.amount_minor) * i128::from(n) * 100;
            let rhs = i128::from(cfg.amount_spike.factor_percent) * s;
            if n >= cfg.amount_spike.min_history && lhs > rhs {
                alert(
                    Rule::AmountSpike,
                    0,
                    Details::AmountSpike {
                        amount: x.amount_minor,
                        history_count: n,
                        history_sum: i64::try_from(s).expect("history sum overflows i64"),
                    },
                );
            }
        }

        // 3. Impossible travel.
        {
            let mut previous: Option<&Transaction> = None;
            for y in self.window(c, cfg.travel.lookback_ms, t) {
                if y.event_id == x.event_id
                    || (y.event_time_ms, y.event_id) >= (x.event_time_ms, x.event_id)
                {
                    continue;
                }
                let better = match previous {
                    None => true,
                    Some(p) => (y.event_time_ms, y.event_id) > (p.event_time_ms, p.event_id),
                };
                if better {
                    previous = Some(y);
                }
            }
            if let Some(p) = previous {
                let d = haversine_km(p.lat_e6, p.lon_e6, x.lat_e6, x.lon_e6);
                let dt = x.event_time_ms - p.event_time_ms;
                let speed = if dt == 0 {
                    if d > 0.0 {
                        f64::INFINITY
                    } else {
                        0.0
                    }
                } else {
                    d / (dt as f64 / MS_PER_HOUR)
                };
                if speed > cfg.travel.max_speed_kmh as f64 {
                    let speed_kmh = if speed.is_infinite() { u64::MAX } else { speed as u64 };
                    alert(
                        Rule::ImpossibleTravel,
                        0,
                        Details::ImpossibleTravel {
                            previous_event: p.event_id,
                            distance_km: d as u64,
                            speed_kmh,
                        },
                    );
                }
            }
        }

        // 4. Card testing, only for a small trigger.
        let small = cfg.card_testing.small_amount_minor;
        if x.amount_minor < small {
            let merchants: BTreeSet<u64> = self
                .window(c, cfg.card_testing.window_ms, t)
                .into_iter()
                .filter(|y| y.amount_minor < small)
                .map(|y| y.merchant_id)
                .collect();
            let m = merchants.len() as u64;
            if m >= cfg.card_testing.min_merchants {
                alert(Rule::CardTesting, 0, Details::CardTesting { merchants: m });
            }
        }

        // 5. Country hopping.
        {
            let countries: BTreeSet<[u8; 2]> = self
                .window(c, cfg.country_hopping.window_ms, t)
                .into_iter()
                .map(|y| y.country)
                .collect();
            let k = countries.len() as u64;
            if k >= cfg.country_hopping.min_countries {
                alert(Rule::CountryHopping, 0, Details::CountryHopping { countries: k });
            }
        }

        out
    }
}

/// Great-circle distance in km between two points in micro-degrees (haversine).
fn haversine_km(lat1_e6: i32, lon1_e6: i32, lat2_e6: i32, lon2_e6: i32) -> f64 {
    let phi1 = (f64::from(lat1_e6) / 1e6).to_radians();
    let phi2 = (f64::from(lat2_e6) / 1e6).to_radians();
    let lambda1 = (f64::from(lon1_e6) / 1e6).to_radians();
    let lambda2 = (f64::from(lon2_e6) / 1e6).to_radians();
    let half_dphi = ((phi2 - phi1) / 2.0).sin();
    let half_dlambda = ((lambda2 - lambda1) / 2.0).sin();
    let a = half_dphi * half_dphi + phi1.cos() * phi2.cos() * half_dlambda * half_dlambda;
    2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
}

/// The model's own alert id: SplitMix64 over seed ^ rule code, then ^ card, ^ event, ^ variant.
fn reference_alert_id(rule: Rule, card: u64, trigger_event: u64, variant: u64) -> u64 {
    let h = mix64(ALERT_ID_SEED ^ rule.code());
    let h = mix64(h ^ card);
    let h = mix64(h ^ trigger_event);
    mix64(h ^ variant)
}

/// One SplitMix64 step: add the golden gamma, then the three xor-shift-multiply rounds.
fn mix64(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        AmountSpikeConfig, CardTestingConfig, CountryHoppingConfig, TravelConfig, VelocityConfig,
        DAY, HOUR, MINUTE,
    };
    use crate::event::Channel;

    /// A config in which every rule is effectively off, to switch on one at a time.
    fn quiet() -> FraudConfig {
        FraudConfig {
            windows: vec![],
            tick_ms: 1,
            velocity: VelocityConfig { limits: vec![] },
            amount_spike: AmountSpikeConfig {
                window_ms: DAY,
                factor_percent: 500,
                min_history: u64::MAX,
            },
            travel: TravelConfig { max_speed_kmh: u64::MAX, lookback_ms: DAY },
            card_testing: CardTestingConfig {
                small_amount_minor: 500,
                min_merchants: u64::MAX,
                window_ms: 10 * MINUTE,
            },
            country_hopping: CountryHoppingConfig { min_countries: u64::MAX, window_ms: HOUR },
        }
    }

    /// A transaction with the fields the rules look at; the rest fixed.
    /// The card of the tests' alerts.
    const CARD: u64 = 1;

    fn tx(event_id: u64, card_id: u64, event_time_ms: Time, amount_minor: i64) -> Transaction {
        Transaction {
            event_id,
            card_id,
            account_id: 1,
            merchant_id: 1,
            mcc: 5411,
            amount_minor,
            currency: *b"GBP",
            country: *b"GB",
            lat_e6: 0,
            lon_e6: 0,
            channel: Channel::Pos,
            event_time_ms,
            device_id: None,
        }
    }

    fn at(mut x: Transaction, lat_e6: i32, lon_e6: i32) -> Transaction {
        x.lat_e6 = lat_e6;
        x.lon_e6 = lon_e6;
        x
    }

    fn merchant(mut x: Transaction, merchant_id: u64) -> Transaction {
        x.merchant_id = merchant_id;
        x
    }

    fn country(mut x: Transaction, country: &[u8; 2]) -> Transaction {
        x.country = *country;
        x
    }

    /// `(trigger, details)` of the alerts of `rule` up to `t`, by trigger.
    fn fired(reference: &Reference<'_>, rule: Rule, t: Time) -> Vec<(u64, Details)> {
        let mut alerts: Vec<(u64, Details)> = reference
            .alerts_until(t)
            .into_iter()
            .filter(|a| a.rule == rule)
            .map(|a| (a.trigger_event, a.details))
            .collect();
        alerts.sort();
        alerts
    }

    fn count(stats: &BTreeMap<StatKey, i64>, card_id: u64, window_ms: Time) -> Option<i64> {
        stats.get(&StatKey { card_id, window_ms, metric: Metric::Count }).copied()
    }

    // London (51.5074 N, 0.1278 W) and New York (40.7128 N, 74.0060 W): the
    // haversine on R = 6371.0088 km gives 5570.2 km.
    const LONDON: (i32, i32) = (51_507_400, -127_800);
    const NEW_YORK: (i32, i32) = (40_712_800, -74_006_000);

    #[test]
    fn window_boundary_event_present_until_tau_plus_w_minus_one() {
        let mut config = quiet();
        config.windows = vec![1000];
        let events = [tx(1, 7, 5000, 100)];
        let r = Reference::new(&config, &events);
        assert_eq!(count(&r.stats_at(4999), 7, 1000), None);
        assert_eq!(count(&r.stats_at(5000), 7, 1000), Some(1));
        assert_eq!(count(&r.stats_at(5999), 7, 1000), Some(1));
        assert_eq!(count(&r.stats_at(6000), 7, 1000), None);
        assert!(r.stats_at(6000).is_empty());
    }

    #[test]
    fn stats_values_per_card_and_window() {
        let mut config = quiet();
        config.windows = vec![MINUTE, HOUR];
        let events = [
            country(merchant(tx(1, 1, 0, 100), 7), b"GB"),
            country(merchant(tx(2, 1, 2 * MINUTE, 250), 7), b"FR"),
            country(merchant(tx(3, 1, 2 * MINUTE + 10, 50), 8), b"GB"),
            tx(4, 2, 2 * MINUTE, 999),
        ];
        let r = Reference::new(&config, &events);
        let stats = r.stats_at(2 * MINUTE + 10);
        let get = |card_id, window_ms, metric| stats[&StatKey { card_id, window_ms, metric }];
        // Card 1, 1 h: all three events.
        assert_eq!(get(1, HOUR, Metric::Count), 3);
        assert_eq!(get(1, HOUR, Metric::Sum), 400);
        assert_eq!(get(1, HOUR, Metric::MaxAmount), 250);
        assert_eq!(get(1, HOUR, Metric::DistinctMerchants), 2);
        assert_eq!(get(1, HOUR, Metric::DistinctCountries), 2);
        // Card 1, 1 min: event 1 (at 0) has left.
        assert_eq!(get(1, MINUTE, Metric::Count), 2);
        assert_eq!(get(1, MINUTE, Metric::Sum), 300);
        assert_eq!(get(1, MINUTE, Metric::MaxAmount), 250);
        assert_eq!(get(1, MINUTE, Metric::DistinctMerchants), 2);
        assert_eq!(get(1, MINUTE, Metric::DistinctCountries), 2);
        // Card 2 is on its own.
        assert_eq!(get(2, MINUTE, Metric::Count), 1);
        assert_eq!(get(2, MINUTE, Metric::Sum), 999);
        // 2 cards × 2 windows × 5 metrics.
        assert_eq!(stats.len(), 20);
    }

    #[test]
    fn tick_rounding_rounds_up_to_the_tick() {
        let mut config = quiet();
        config.tick_ms = 1000;
        config.windows = vec![1000];
        let events = [tx(1, 1, 1500, 100)];
        let r = Reference::new(&config, &events);
        assert_eq!(r.time_of(0), 0);
        assert_eq!(r.time_of(1), 1000);
        assert_eq!(r.time_of(999), 1000);
        assert_eq!(r.time_of(1000), 1000);
        assert_eq!(r.time_of(1001), 2000);
        // The event at 1500 lives at τ = 2000 for 1000 ms.
        assert_eq!(count(&r.stats_at(1999), 1, 1000), None);
        assert_eq!(count(&r.stats_at(2000), 1, 1000), Some(1));
        assert_eq!(count(&r.stats_at(2999), 1, 1000), Some(1));
        assert_eq!(count(&r.stats_at(3000), 1, 1000), None);

        // A tick of 0 means 1: no rounding.
        let mut zero = quiet();
        zero.tick_ms = 0;
        let r = Reference::new(&zero, &events);
        assert_eq!(r.time_of(1234), 1234);
        assert_eq!(r.time_of(0), 0);
    }

    #[test]
    fn alerts_belong_to_the_rounded_time_of_their_trigger() {
        let mut config = quiet();
        config.tick_ms = 1000;
        config.velocity.limits = vec![(MINUTE, 0)];
        let events = [tx(1, 1, 1500, 100)];
        let r = Reference::new(&config, &events);
        assert!(r.alerts_until(1999).is_empty());
        let alerts = r.alerts_until(2000);
        assert_eq!(alerts.len(), 1);
        let alert = alerts.into_iter().next().unwrap();
        // The alert carries the unrounded event time.
        assert_eq!(alert.event_time_ms, 1500);
        assert_eq!(alert.card_id, 1);
        assert_eq!(alert.trigger_event, 1);
    }

    #[test]
    fn velocity_fires_at_limit_plus_one_not_at_limit() {
        let mut config = quiet();
        config.velocity.limits = vec![(MINUTE, 3)];
        let events: Vec<Transaction> = (1..=4).map(|i| tx(i, 1, i * 1000, 100)).collect();
        let r = Reference::new(&config, &events);
        // Three events: count 3 = limit, nothing.
        assert!(r.alerts_until(3000).is_empty());
        // The fourth: count 4 > 3.
        assert_eq!(
            fired(&r, Rule::Velocity, 4000),
            vec![(4, Details::Velocity { window_ms: MINUTE, count: 4, limit: 3 })]
        );
        let alert = r.alerts_until(4000).into_iter().next().unwrap();
        assert_eq!(alert.id, reference_alert_id(Rule::Velocity, CARD, 4, MINUTE));
    }

    #[test]
    fn velocity_counts_only_the_window() {
        let mut config = quiet();
        config.velocity.limits = vec![(1000, 1)];
        // Two events 1000 ms apart: the first has left the window at the second's τ.
        let events = [tx(1, 1, 0, 100), tx(2, 1, 1000, 100), tx(3, 1, 1999, 100)];
        let r = Reference::new(&config, &events);
        // Event 3 at 1999 sees events 2 and 3 (count 2 > 1).
        assert_eq!(
            fired(&r, Rule::Velocity, u64::MAX),
            vec![(3, Details::Velocity { window_ms: 1000, count: 2, limit: 1 })]
        );
    }

    #[test]
    fn amount_spike_equal_to_factor_is_no_alert_above_is() {
        let mut config = quiet();
        config.amount_spike =
            AmountSpikeConfig { window_ms: DAY, factor_percent: 500, min_history: 2 };
        // History 100 + 100: average 100, factor 5: the bar is 500.
        let events = [
            tx(1, 1, 1000, 100),
            tx(2, 1, 2000, 100),
            tx(3, 1, 3000, 500), // 500 * 2 * 100 = 500 * 200: equal, no alert
            tx(11, 2, 1000, 100),
            tx(12, 2, 2000, 100),
            tx(13, 2, 3000, 501), // 501 * 2 * 100 > 500 * 200
        ];
        let r = Reference::new(&config, &events);
        assert_eq!(
            fired(&r, Rule::AmountSpike, u64::MAX),
            vec![(13, Details::AmountSpike { amount: 501, history_count: 2, history_sum: 200 })]
        );
    }

    #[test]
    fn amount_spike_needs_min_history() {
        let mut config = quiet();
        config.amount_spike =
            AmountSpikeConfig { window_ms: DAY, factor_percent: 500, min_history: 2 };
        // One event of history only: a huge amount does not fire.
        let events = [tx(1, 1, 1000, 100), tx(2, 1, 2000, 1_000_000)];
        let r = Reference::new(&config, &events);
        assert!(fired(&r, Rule::AmountSpike, u64::MAX).is_empty());
    }

    #[test]
    fn impossible_travel_london_new_york_in_one_hour_fires_in_ten_hours_not() {
        let mut config = quiet();
        config.travel = TravelConfig { max_speed_kmh: 900, lookback_ms: DAY };
        let events = [
            at(tx(1, 1, 0, 100), LONDON.0, LONDON.1),
            at(tx(2, 1, HOUR, 100), NEW_YORK.0, NEW_YORK.1),
            at(tx(11, 2, 0, 100), LONDON.0, LONDON.1),
            at(tx(12, 2, 10 * HOUR, 100), NEW_YORK.0, NEW_YORK.1),
        ];
        let r = Reference::new(&config, &events);
        // 5570.2 km in 1 h: 5570 km/h > 900. In 10 h: 557 km/h, no alert.
        assert_eq!(
            fired(&r, Rule::ImpossibleTravel, u64::MAX),
            vec![(
                2,
                Details::ImpossibleTravel { previous_event: 1, distance_km: 5570, speed_kmh: 5570 }
            )]
        );
    }

    #[test]
    fn impossible_travel_one_degree_of_latitude_is_111_km() {
        // One degree of arc is 6371.0088 * π / 180 = 111.195 km.
        assert_eq!(haversine_km(0, 0, 1_000_000, 0) as u64, 111);
        // Half the circumference: 6371.0088 * π = 20015.11 km.
        assert_eq!(haversine_km(0, 0, 0, 180_000_000) as u64, 20015);
        assert_eq!(haversine_km(LONDON.0, LONDON.1, LONDON.0, LONDON.1), 0.0);
    }

    #[test]
    fn impossible_travel_at_one_instant_is_infinite_speed_or_nothing() {
        let mut config = quiet();
        config.travel = TravelConfig { max_speed_kmh: 900, lookback_ms: DAY };
        let events = [
            // Card 1: two places at one instant; the previous of 2 is 1 by event id.
            at(tx(1, 1, 5000, 100), 0, 0),
            at(tx(2, 1, 5000, 100), 1_000_000, 0),
            // Card 2: one place twice at one instant: speed 0.
            at(tx(11, 2, 5000, 100), 0, 0),
            at(tx(12, 2, 5000, 100), 0, 0),
        ];
        let r = Reference::new(&config, &events);
        assert_eq!(
            fired(&r, Rule::ImpossibleTravel, u64::MAX),
            vec![(
                2,
                Details::ImpossibleTravel {
                    previous_event: 1,
                    distance_km: 111,
                    speed_kmh: u64::MAX
                }
            )]
        );
    }

    #[test]
    fn impossible_travel_previous_is_latest_earlier_by_time_then_id() {
        let mut config = quiet();
        config.travel = TravelConfig { max_speed_kmh: 900, lookback_ms: DAY };
        // Given in reverse order on purpose. Event 3 (New York, 1 h) follows
        // event 2 (London, 0), which follows event 1 (New York, 0) at the same
        // instant by event id. Event 4 (New York, 1 h + 1 ms) follows event 3:
        // no distance.
        let events = [
            at(tx(4, 1, HOUR + 1, 100), NEW_YORK.0, NEW_YORK.1),
            at(tx(3, 1, HOUR, 100), NEW_YORK.0, NEW_YORK.1),
            at(tx(2, 1, 0, 100), LONDON.0, LONDON.1),
            at(tx(1, 1, 0, 100), NEW_YORK.0, NEW_YORK.1),
        ];
        let r = Reference::new(&config, &events);
        let got = fired(&r, Rule::ImpossibleTravel, u64::MAX);
        assert_eq!(
            got,
            vec![
                (
                    2,
                    Details::ImpossibleTravel {
                        previous_event: 1,
                        distance_km: 5570,
                        speed_kmh: u64::MAX
                    }
                ),
                (
                    3,
                    Details::ImpossibleTravel {
                        previous_event: 2,
                        distance_km: 5570,
                        speed_kmh: 5570
                    }
                ),
            ]
        );
    }

    #[test]
    fn impossible_travel_looks_back_only_the_lookback() {
        let mut config = quiet();
        config.travel = TravelConfig { max_speed_kmh: 900, lookback_ms: HOUR };
        // The London event is exactly one lookback before: out of the window.
        let events = [
            at(tx(1, 1, 0, 100), LONDON.0, LONDON.1),
            at(tx(2, 1, HOUR, 100), NEW_YORK.0, NEW_YORK.1),
        ];
        let r = Reference::new(&config, &events);
        assert!(fired(&r, Rule::ImpossibleTravel, u64::MAX).is_empty());
    }

    #[test]
    fn card_testing_needs_small_amounts_at_distinct_merchants() {
        let mut config = quiet();
        config.card_testing =
            CardTestingConfig { small_amount_minor: 500, min_merchants: 3, window_ms: 10 * MINUTE };
        let events = [
            merchant(tx(1, 1, 1000, 100), 1),
            merchant(tx(2, 1, 2000, 100), 2),
            merchant(tx(3, 1, 3000, 100), 2), // still 2 merchants
            merchant(tx(4, 1, 4000, 499), 3), // 3 merchants: alert
            merchant(tx(5, 1, 5000, 500), 4), // not small: no alert although 3 small merchants
            // Card 2: large amounts at distinct merchants do not count.
            merchant(tx(11, 2, 1000, 600), 1),
            merchant(tx(12, 2, 2000, 600), 2),
            merchant(tx(13, 2, 3000, 600), 3),
            merchant(tx(14, 2, 4000, 100), 4), // 1 small merchant
        ];
        let r = Reference::new(&config, &events);
        assert_eq!(
            fired(&r, Rule::CardTesting, u64::MAX),
            vec![(4, Details::CardTesting { merchants: 3 })]
        );
    }

    #[test]
    fn country_hopping_fires_at_three_countries() {
        let mut config = quiet();
        config.country_hopping = CountryHoppingConfig { min_countries: 3, window_ms: HOUR };
        let events = [
            country(tx(1, 1, 1000, 100), b"GB"),
            country(tx(2, 1, 2000, 100), b"FR"), // 2 countries
            country(tx(3, 1, 3000, 100), b"DE"), // 3: alert
            country(tx(4, 1, 4000, 100), b"GB"), // still 3: alert
            // Card 2: three countries an hour apart each, never together.
            country(tx(11, 2, 0, 100), b"GB"),
            country(tx(12, 2, HOUR, 100), b"FR"),
            country(tx(13, 2, 2 * HOUR, 100), b"DE"),
        ];
        let r = Reference::new(&config, &events);
        assert_eq!(
            fired(&r, Rule::CountryHopping, u64::MAX),
            vec![
                (3, Details::CountryHopping { countries: 3 }),
                (4, Details::CountryHopping { countries: 3 }),
            ]
        );
        // Only event 3 is due at its own time.
        assert_eq!(
            fired(&r, Rule::CountryHopping, 3000),
            vec![(3, Details::CountryHopping { countries: 3 })]
        );
    }

    #[test]
    fn alerts_ignore_the_order_of_the_input() {
        let mut config = FraudConfig::default();
        config.velocity.limits = vec![(MINUTE, 2)];
        config.country_hopping.min_countries = 2;
        let events = vec![
            country(tx(1, 1, 1000, 100), b"GB"),
            country(tx(2, 1, 2000, 100), b"FR"),
            country(tx(3, 1, 3000, 100), b"DE"),
        ];
        let mut reversed = events.clone();
        reversed.reverse();
        let a = Reference::new(&config, &events);
        let b = Reference::new(&config, &reversed);
        assert_eq!(a.alerts_until(u64::MAX), b.alerts_until(u64::MAX));
        assert_eq!(a.stats_at(3000), b.stats_at(3000));
        // Velocity on event 3 only; country hopping on events 2 and 3.
        assert_eq!(a.alerts_until(u64::MAX).len(), 3);
    }

    #[test]
    fn alert_id_is_deterministic_and_tells_rules_cards_events_and_variants_apart() {
        // SplitMix64's first output from state 0 is the published 0xE220A8397B1DCDAF.
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
        let id = reference_alert_id(Rule::Velocity, CARD, 4, 60_000);
        assert_eq!(id, reference_alert_id(Rule::Velocity, CARD, 4, 60_000));
        // Worked out independently (Python) from the SEMANTICS.md recipe.
        assert_eq!(id, 0x1D1C_27E2_8F8E_24E8);
        assert_ne!(id, reference_alert_id(Rule::CardTesting, CARD, 4, 60_000));
        assert_ne!(id, reference_alert_id(Rule::Velocity, CARD, 5, 60_000));
        assert_ne!(id, reference_alert_id(Rule::Velocity, CARD, 4, 0));
        assert_ne!(id, reference_alert_id(Rule::Velocity, CARD + 1, 4, 60_000), "cards apart");
        // Same input twice: same alerts, ids included.
        let mut config = quiet();
        config.velocity.limits = vec![(MINUTE, 0), (HOUR, 0)];
        let events = [tx(9, 1, 1000, 100)];
        let a = Reference::new(&config, &events).alerts_until(u64::MAX);
        let b = Reference::new(&config, &events).alerts_until(u64::MAX);
        assert_eq!(a, b);
        let ids: BTreeSet<u64> = a.iter().map(|alert| alert.id).collect();
        assert_eq!(ids.len(), 2, "one velocity alert per window, distinct ids");
    }
}
