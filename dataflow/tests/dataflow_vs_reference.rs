//! The dataflow against the brute-force reference model, over many seeded random
//! streams with out-of-order and late events, bursts, window-boundary events,
//! single-event cards and very large amounts, on 1, 2 and 4 workers and on
//! 2 processes × 2 workers.

mod common;

use common::{
    assert_matches_reference, run_dataflow, run_dataflow_to, Rng, Scenario, Topology, CITIES,
};
use tripwire_dataflow::{Channel, FraudConfig, Time, Transaction};

/// The seconds-scale windows, at `tick_ms`.
fn compact_config(tick_ms: Time) -> FraudConfig {
    FraudConfig { tick_ms, ..FraudConfig::seconds() }
}

/// A random stream: a few cards so windows fill, bursts, boundary hits, huge amounts.
fn random_scenario(seed: u64, config: FraudConfig, events: usize, partitions: usize) -> Scenario {
    let mut rng = Rng::new(seed);
    let cards = 2 + rng.below(12);
    let windows = config.windows.clone();
    let mut t: Time = 1_000_000 + rng.below(10_000);
    let mut made: Vec<Transaction> = Vec::with_capacity(events);
    for id in 0..events as u64 {
        // Time moves on in gaps, bursts (same ms or a few ms), or lands exactly
        // one window length after an earlier event.
        let gap = match rng.below(10) {
            0..=2 => 0,
            3..=4 => rng.below(5),
            5..=7 => rng.below(2_000),
            8 => rng.below(30_000),
            _ => 0,
        };
        t += gap;
        let mut event_time = t;
        if rng.chance(10) && !made.is_empty() {
            let earlier = &made[rng.below(made.len() as u64) as usize];
            let w = windows[rng.below(windows.len() as u64) as usize];
            event_time = (earlier.event_time_ms + w).max(t.saturating_sub(500));
        }
        let card = if rng.chance(5) { 1_000 + id } else { rng.below(cards) };
        let spread = if rng.chance(70) { 2 } else { 6 };
        let (lat, lon, country) = CITIES[rng.below(spread) as usize];
        let amount = match rng.below(20) {
            0 => 1 + rng.below(10_000_000_000_000) as i64,
            1..=6 => 1 + rng.below(499) as i64,
            _ => 500 + rng.below(20_000) as i64,
        };
        made.push(Transaction {
            event_id: seed * 1_000_000 + id,
            card_id: card,
            account_id: card / 3,
            merchant_id: rng.below(6),
            mcc: 5411,
            amount_minor: amount,
            currency: *b"EUR",
            country,
            lat_e6: lat + rng.below(1000) as i32,
            lon_e6: lon,
            channel: [Channel::Pos, Channel::Ecom, Channel::Atm][rng.below(3) as usize],
            event_time_ms: event_time,
            device_id: rng.chance(50).then(|| rng.below(100)),
        });
    }
    // Arrival order: event time plus a random delay, mostly within the
    // lateness bound, a few beyond it (late).
    let lateness_ms = 3_000;
    let mut arrivals: Vec<(Time, Transaction)> = made
        .into_iter()
        .map(|x| {
            let delay = if rng.chance(3) {
                lateness_ms + 1 + rng.below(5_000)
            } else {
                rng.below(lateness_ms)
            };
            (x.event_time_ms + delay, x)
        })
        .collect();
    arrivals.sort_by_key(|(a, x)| (*a, x.event_id));
    let mut parts = vec![Vec::new(); partitions];
    for (_, x) in arrivals {
        let p = (x.card_id as usize * 7 + x.event_id as usize % 2) % partitions;
        parts[p].push(x);
    }
    Scenario { config, partitions: parts, lateness_ms }
}

fn check(seed: u64, scenario: &Scenario, topology: Topology) {
    let outputs = run_dataflow(scenario, topology, seed);
    let label = format!("seed {seed}, {topology:?}, tick {}", scenario.config.tick_ms);
    assert_matches_reference(scenario, &outputs, &label);
}

/// Each seed's random stream (300 events over `partitions` partitions, 1 ms tick) on `topology`.
fn check_seeds(seeds: std::ops::Range<u64>, partitions: usize, processes: usize, workers: usize) {
    for seed in seeds {
        let scenario = random_scenario(seed, compact_config(1), 300, partitions);
        check(seed, &scenario, Topology { processes, workers });
    }
}

#[test]
fn one_worker_matches_reference_on_random_streams() {
    check_seeds(0..30, 4, 1, 1);
}

#[test]
fn two_workers_match_reference_on_random_streams() {
    check_seeds(100..130, 4, 1, 2);
}

#[test]
fn four_workers_match_reference_on_random_streams() {
    check_seeds(200..220, 6, 1, 4);
}

#[test]
fn two_processes_match_reference_on_random_streams() {
    check_seeds(300..308, 6, 2, 2);
}

#[test]
fn tick_rounding_matches_reference() {
    for (i, tick) in [7, 250, 1_000].into_iter().enumerate() {
        let seed = 400 + i as u64;
        let scenario = random_scenario(seed, compact_config(tick), 300, 4);
        check(seed, &scenario, Topology { processes: 1, workers: 2 });
    }
}

#[test]
fn default_windows_match_reference_over_two_days() {
    // The shipped windows (1 min .. 24 h) and rule settings, on a stream spread
    // over two days so the 24 h window both fills and empties.
    for seed in 500..503 {
        let mut scenario = random_scenario(seed, FraudConfig::default(), 250, 4);
        for part in &mut scenario.partitions {
            for x in part.iter_mut() {
                x.event_time_ms = 1_000_000 + (x.event_time_ms - 1_000_000) * 700;
            }
        }
        scenario.lateness_ms = 3_000 * 700;
        check(seed, &scenario, Topology { processes: 1, workers: 2 });
    }
}

#[test]
fn streams_have_late_events_and_the_harness_drops_them() {
    // Guards the generator: the streams above exercise lateness at all.
    let scenario = random_scenario(7, compact_config(1), 300, 4);
    assert!(scenario.late_count() > 0, "some events arrive beyond the lateness bound");
    assert!(scenario.accepted().len() > 250);
}

#[test]
fn random_streams_exercise_every_rule() {
    // Guards the generator: a comparison over streams that never fire a rule proves little.
    use std::collections::BTreeSet;
    use tripwire_dataflow::reference::Reference;
    let mut fired = BTreeSet::new();
    for seed in 0..12 {
        let scenario = random_scenario(seed, compact_config(1), 300, 4);
        let accepted = scenario.accepted();
        let reference = Reference::new(&scenario.config, &accepted);
        fired.extend(reference.alerts_until(Time::MAX).into_iter().map(|a| a.rule));
    }
    assert_eq!(fired.len(), 5, "rules fired: {fired:?}");
}

/// A bounded run (`detect_fraud_to`) stops at its input's end: its outputs
/// are the unbounded run's before the end, update for update, and nothing at
/// or after it (where the unbounded run closes every window).
#[test]
fn a_bounded_run_outputs_what_the_unbounded_run_does_before_its_end_and_nothing_after() {
    for seed in 0..6 {
        let scenario = random_scenario(seed, compact_config(1), 300, 3);
        let cfg = &scenario.config;
        let end =
            scenario.accepted().iter().map(|x| cfg.time_of(x.event_time_ms)).max().unwrap() + 1;
        for (processes, workers) in [(1, 1), (1, 2), (2, 1)] {
            let topology = Topology { processes, workers };
            let full = run_dataflow(&scenario, topology, seed);
            let bounded = run_dataflow_to(&scenario, topology, seed, Some(end));
            let label = format!("seed {seed}, {topology:?}, end {end}");
            assert!(full.stats.iter().any(|u| u.1 >= end), "{label}: windows close after the end");
            // Updates before the end, accumulated per (record, time): equal.
            fn before<D: Ord + Clone>(
                updates: &[(D, Time, i64)],
                end: Time,
            ) -> Vec<(D, Time, i64)> {
                let mut acc: std::collections::BTreeMap<(D, Time), i64> = Default::default();
                for (d, t, r) in updates.iter().filter(|u| u.1 < end) {
                    *acc.entry((d.clone(), *t)).or_default() += r;
                }
                acc.into_iter().filter(|(_, r)| *r != 0).map(|((d, t), r)| (d, t, r)).collect()
            }
            assert_eq!(
                before(&bounded.stats, end),
                before(&full.stats, end),
                "{label}: statistics"
            );
            assert_eq!(before(&bounded.alerts, end), before(&full.alerts, end), "{label}: alerts");
            assert!(
                bounded.stats.iter().all(|u| u.1 < end),
                "{label}: no statistics from the end on"
            );
            assert!(bounded.alerts.iter().all(|u| u.1 < end), "{label}: no alerts from the end on");
        }
    }
}
