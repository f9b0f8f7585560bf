//! A Redis batch lands whole or not at all as far as its frontier says: one
//! that fails (a key of the wrong type) leaves the frontier where it was.
//! A key every part's guard checks before its writes (the source's floors)
//! fails the batch before anything is written; a key only the alerts' script
//! checks (in the last part) fails a larger batch after its cards landed, and
//! those stand, rewritten when the batch is retried. Retried once the key is fixed, the
//! whole batch lands, frontier last, and the frontier is published.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::time::{Duration, Instant};

use tripwire_connectors::readback;
use tripwire_connectors::redis_sink::{Keys, RedisSinkConfig, PART_CARDS};
use tripwire_connectors::Endpoints;
use tripwire_dataflow::{alert_id, Alert, Details, Rule, StatKey, WindowStats};

fn failures() -> f64 {
    prometheus::gather()
        .iter()
        .filter(|f| f.name() == "tripwire_commit_failures_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == "RedisSink"))
        .map(|m| m.get_counter().get_value())
        .sum()
}

#[test]
fn a_batch_failing_midway_leaves_nothing_and_lands_whole_once_retried() {
    fails_then_lands(20, Keys::floors, false);
}

#[test]
fn a_batch_of_several_parts_stores_its_frontier_only_once_all_landed() {
    let cards = 3_000;
    assert!(cards as usize > 2 * PART_CARDS, "the cards take several parts, the alert the last");
    fails_then_lands(cards, Keys::last_alert_order, true);
}

/// The failure counter is the process's: one test at a time reads it.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A batch of `cards` cards and one alert, the key `bad` names holding a
/// string at first; `after_cards`: the failure comes after the cards landed.
fn fails_then_lands(cards: u64, bad: fn(&Keys) -> String, after_cards: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let endpoints = Endpoints::from_env().unwrap();
    let job = common::unique(&format!("batches_{cards}"));
    let keys = Keys::new(&job);
    let mut con = redis::Client::open(endpoints.redis_url())
        .unwrap()
        .get_connection()
        .expect("Redis; is the stack up? (./tripwire stack up)");
    // A hash the batch writes holds a string: the batch fails on it.
    let _: () = redis::cmd("SET").arg(bad(&keys)).arg("not a hash").query(&mut con).unwrap();
    let alert = Alert {
        id: alert_id(Rule::Velocity, 0, 1, 60_000),
        card_id: 0,
        rule: Rule::Velocity,
        trigger_event: 1,
        event_time_ms: 10,
        details: Details::Velocity { window_ms: 60_000, count: 9, limit: 8 },
    };

    let config = RedisSinkConfig {
        commit_interval: Duration::from_millis(10),
        ..common::eager_redis(&endpoints, &job)
    };
    let stats = |card: u64| WindowStats {
        count: card as i64 + 1,
        sum: 100 * (card as i64 + 1),
        max_amount: 100,
        distinct_merchants: 1,
        distinct_countries: 1,
    };
    let (url, job2) = (endpoints.redis_url(), job.clone());
    timely::execute(timely::Config::thread(), move |worker| {
        // Readers learn of each stored frontier on the progress channel.
        let mut listener = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        let mut progress = listener.as_pubsub();
        progress.subscribe(Keys::new(&job2).progress()).unwrap();
        let (mut input, mut alerts, committed) = common::redis_sink_alone(worker, &config);
        for card in 0..cards {
            input.update_at((card, common::arrival(60_000, stats(card))), 10, 1);
        }
        alerts.update_at(alert.clone(), 10, 1);
        input.advance_to(20);
        input.flush();
        alerts.advance_to(20);
        alerts.flush();
        let before = failures();
        let deadline = Instant::now() + Duration::from_secs(60);
        while failures() <= before {
            assert!(Instant::now() < deadline, "the batch never failed");
            worker.step_or_park(Some(Duration::from_millis(5)));
        }
        // Failed: the frontier did not move (and, failing before the cards,
        // not one card of it is in Redis).
        let mut con = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        let keys = Keys::new(&job2);
        let written: Vec<u64> = (0..cards)
            .filter(|c| {
                redis::cmd("EXISTS").arg(keys.card(*c)).query::<i64>(&mut con).unwrap() == 1
            })
            .collect();
        if after_cards {
            assert_eq!(written.len() as u64, cards, "the card parts landed before the alert's");
        } else {
            assert!(written.is_empty(), "no half batch: cards {written:?} written");
        }
        let frontiers = readback::redis_frontiers(&mut con, &job2, 1).unwrap();
        assert!(frontiers[0].is_none_or(|f| f < 20), "the frontier stayed: {frontiers:?}");
        assert!(committed.frontier() < 20);
        progress.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        while let Ok(m) = progress.get_message() {
            let published: String = m.get_payload().unwrap();
            assert!(published.as_str() < "0 00000000000000000020", "{published} not stored");
        }

        // Fixed: the retry lands the whole batch, with its frontier.
        let _: () = redis::cmd("DEL").arg(bad(&keys)).query(&mut con).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while committed.frontier() < 20 {
            assert!(Instant::now() < deadline, "the retried batch never landed");
            worker.step_or_park(Some(Duration::from_millis(5)));
        }
        let written = readback::redis_stats(&mut con, &job2).unwrap();
        for card in 0..cards {
            let key = |metric| StatKey { card_id: card, window_ms: 60_000, metric };
            assert_eq!(
                written.get(&key(tripwire_dataflow::Metric::Count)),
                Some(&(card as i64 + 1)),
                "card {card} written"
            );
        }
        assert_eq!(readback::redis_frontiers(&mut con, &job2, 1).unwrap(), vec![Some(20)]);
        assert_eq!(readback::redis_alert_ids(&mut con, &job2).unwrap(), vec![alert.id as i64]);
        progress.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let published: String = progress.get_message().expect("published").get_payload().unwrap();
        assert_eq!(published, format!("0 {:020}", 20), "worker 0 stored frontier 20");
        drop((input, alerts));
    })
    .unwrap()
    .join()
    .into_iter()
    .for_each(|r| r.unwrap());
}
