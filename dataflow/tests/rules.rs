//! Each rule, through the dataflow with the shipped defaults: one scenario that
//! must alert and one near miss that must not. Expected values are worked out
//! by hand in each test.

mod common;

use std::collections::BTreeMap;

use common::{run_dataflow, tx, Scenario, Topology, CITIES};
use tripwire_dataflow::config::{HOUR, MINUTE};
use tripwire_dataflow::{Alert, Details, FraudConfig, Rule, Transaction};

const T0: u64 = 1_700_000_000_000;

/// The alerts of `rule` the dataflow (2 workers) raises on `events`.
fn alerts(rule: Rule, events: Vec<Transaction>) -> Vec<Alert> {
    let scenario = Scenario::in_order(FraudConfig::default(), events);
    let out = run_dataflow(&scenario, Topology { processes: 1, workers: 2 }, 1);
    let mut acc: BTreeMap<Alert, i64> = BTreeMap::new();
    for (a, _, d) in out.alerts {
        *acc.entry(a).or_default() += d;
    }
    acc.into_iter().filter(|(a, d)| *d != 0 && a.rule == rule).map(|(a, _)| a).collect()
}

#[test]
fn velocity_fires_on_the_sixth_transaction_in_a_minute() {
    let events = (0..6).map(|i| tx(i, 7, T0 + i * 10_000)).collect();
    let got = alerts(Rule::Velocity, events);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].trigger_event, 5);
    assert_eq!(got[0].details, Details::Velocity { window_ms: MINUTE, count: 6, limit: 5 });
}

#[test]
fn velocity_near_miss_five_in_a_minute_or_six_spread_over_more() {
    let five = (0..5).map(|i| tx(i, 7, T0 + i * 10_000)).collect();
    assert!(alerts(Rule::Velocity, five).is_empty());
    // Six, but the first has left the 1-minute window (exactly 60 s) when the sixth arrives.
    let spread = (0..6).map(|i| tx(i, 7, T0 + i * 12_000)).collect();
    assert!(alerts(Rule::Velocity, spread).is_empty());
}

fn history_then(amount: i64) -> Vec<Transaction> {
    let mut events: Vec<Transaction> =
        (0..5).map(|i| Transaction { amount_minor: 1_000, ..tx(i, 9, T0 + i * HOUR) }).collect();
    events.push(Transaction { amount_minor: amount, ..tx(5, 9, T0 + 5 * HOUR) });
    events
}

#[test]
fn amount_spike_fires_above_five_times_the_average() {
    // History: five of 1000 (average 1000); 5001 > 5 × 1000.
    let got = alerts(Rule::AmountSpike, history_then(5_001));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].details,
        Details::AmountSpike { amount: 5_001, history_count: 5, history_sum: 5_000 }
    );
}

#[test]
fn amount_spike_near_miss_at_exactly_five_times_or_with_short_history() {
    assert!(alerts(Rule::AmountSpike, history_then(5_000)).is_empty());
    // Four transactions of history are too few to judge.
    let mut short = history_then(1_000_000);
    short.remove(0);
    assert!(alerts(Rule::AmountSpike, short).is_empty());
}

fn at(mut x: Transaction, city: usize) -> Transaction {
    (x.lat_e6, x.lon_e6, x.country) = CITIES[city];
    x
}

#[test]
fn impossible_travel_london_to_new_york_in_an_hour() {
    // About 5570 km in one hour.
    let events = vec![at(tx(1, 3, T0), 0), at(tx(2, 3, T0 + HOUR), 1)];
    let got = alerts(Rule::ImpossibleTravel, events);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].trigger_event, 2);
    match got[0].details {
        Details::ImpossibleTravel { previous_event, distance_km, speed_kmh } => {
            assert_eq!(previous_event, 1);
            assert!((5_560..5_580).contains(&distance_km), "{distance_km}");
            assert_eq!(speed_kmh, distance_km, "one hour apart: km/h equals km");
        }
        ref d => panic!("{d:?}"),
    }
}

#[test]
fn impossible_travel_near_miss_london_to_paris_in_an_hour() {
    // About 344 km in one hour, and London to New York in seven hours (~796 km/h).
    let paris = vec![at(tx(1, 3, T0), 0), at(tx(2, 3, T0 + HOUR), 2)];
    assert!(alerts(Rule::ImpossibleTravel, paris).is_empty());
    let slow = vec![at(tx(1, 3, T0), 0), at(tx(2, 3, T0 + 7 * HOUR), 1)];
    assert!(alerts(Rule::ImpossibleTravel, slow).is_empty());
}

fn small(id: u64, merchant: u64, minute: u64) -> Transaction {
    Transaction { amount_minor: 199, merchant_id: merchant, ..tx(id, 4, T0 + minute * MINUTE) }
}

#[test]
fn card_testing_fires_on_five_small_payments_at_five_merchants() {
    let events = (0..5).map(|i| small(i, 100 + i, i)).collect();
    let got = alerts(Rule::CardTesting, events);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].trigger_event, 4);
    assert_eq!(got[0].details, Details::CardTesting { merchants: 5 });
}

#[test]
fn card_testing_near_miss_four_merchants_or_one_large_payment() {
    let four = (0..5).map(|i| small(i, 100 + i.min(3), i)).collect();
    assert!(alerts(Rule::CardTesting, four).is_empty());
    let mut one_large: Vec<Transaction> = (0..5).map(|i| small(i, 100 + i, i)).collect();
    one_large[2].amount_minor = 500; // not small: only four small ones remain
    assert!(alerts(Rule::CardTesting, one_large).is_empty());
}

fn in_country(id: u64, country: &[u8; 2], minutes: u64) -> Transaction {
    // One place, three country codes: only the codes differ, so travel stays quiet.
    Transaction { country: *country, ..tx(id, 5, T0 + minutes * MINUTE) }
}

#[test]
fn country_hopping_fires_at_the_third_country_within_an_hour() {
    let events = vec![in_country(1, b"GB", 0), in_country(2, b"FR", 20), in_country(3, b"DE", 40)];
    let got = alerts(Rule::CountryHopping, events);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].trigger_event, 3);
    assert_eq!(got[0].details, Details::CountryHopping { countries: 3 });
}

#[test]
fn country_hopping_near_miss_three_countries_over_more_than_an_hour() {
    let events = vec![in_country(1, b"GB", 0), in_country(2, b"FR", 30), in_country(3, b"DE", 60)];
    assert!(alerts(Rule::CountryHopping, events).is_empty());
}
