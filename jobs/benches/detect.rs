//! `detect`: recall and precision per rule against txgen's labels, and false positives on benign traffic.
//!
//! ```text
//! ./tripwire stack up
//! cargo build --release -p tripwire-jobs --bins
//! cargo bench -p tripwire-jobs --bench detect      # TRIPWIRE_BENCH_EVENTS, default 1,000,000
//! ```
//!
//! The generator (txgen's engine, seed 7, 1,000,000 cards with spending
//! profiles) makes benign traffic with labelled
//! fraud scenarios of every type (`TRIPWIRE_BENCH_FRAUD_PER_10K`, default 5
//! per 10,000 events each) and benign near misses of every rule (5 per 10,000
//! each: legitimate traffic just short of a threshold). The job reads it all
//! with the shipped fraud configuration (24 h, 1 h, 5 min, 1 min windows) and
//! commits its alerts to PostgreSQL; the alerts are then judged against the
//! labels:
//! - a scenario instance (one card carrying one injected scenario) is
//!   detected when an alert of the scenario's rule names its card: recall;
//! - an alert is a true positive when its card carries a scenario of the
//!   alert's rule: precision;
//! - a benign event (unlabelled, near misses included) that triggers any
//!   alert is a false positive: false-positive rate = such events / benign events.
//!
//! Prints a table and writes `bench/results/detect.json`.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};

use support::{clean_up, env_or, load, now_ms, postgres, unique, write_results, JobRun};
use tripwire_jobs::generator::{Expect, GenConfig, Generator, Scenario};

fn main() {
    let events = env_or("TRIPWIRE_BENCH_EVENTS", 1_000_000);
    let fraud_per_10k = env_or("TRIPWIRE_BENCH_FRAUD_PER_10K", 5);
    let bootstrap = support::endpoints().kafka_bootstrap;
    let now = now_ms();
    let plan = Generator::new(GenConfig {
        seed: 7,
        // A card pays every 17 minutes on average: the rate a million
        // active cards give at 1,000 payments/s.
        cards: support::BULK_CARDS,
        partitions: 12,
        spacing_ms: 1,
        start_ms: now - events as i64 - 3_600_000,
        fraud_per_10k,
        near_miss_per_10k: 5,
        bad_per_10k: 0,
        now_ms: now,
        ..GenConfig::default()
    })
    .generate(events);
    let topic = unique("bench_detect");
    load(&bootstrap, &topic, &plan);

    // The truth, from the plan: each accepted event's label and card.
    let mut label_of_card: HashMap<i64, Scenario> = HashMap::new();
    let mut benign: HashSet<i64> = HashSet::new();
    for p in &plan {
        let Expect::Accept(id) = p.expect else { continue };
        let card: i64 = p.key.parse().unwrap();
        match p.label {
            Some(s) => {
                let before = label_of_card.insert(card, s);
                assert!(before.is_none_or(|b| b == s), "card {card} carries two scenarios");
            }
            None => {
                benign.insert(id as i64);
            }
        }
    }
    let benign_cards: HashSet<i64> = plan
        .iter()
        .filter(|p| p.label.is_none() && matches!(p.expect, Expect::Accept(_)))
        .map(|p| p.key.parse().unwrap())
        .collect();
    assert!(
        benign_cards.iter().all(|c| !label_of_card.contains_key(c)),
        "a scenario card also carries benign traffic: labels would be ambiguous"
    );

    let job = unique("bench_detect");
    let args = vec!["--archive".to_string(), "false".to_string()];
    let secs = JobRun { topic: &topic, job: &job, processes: 1, workers: 2, args }.run_bounded();
    println!("job read {} records in {secs:.1} s", plan.len());

    let (rt, client) = postgres(&job);
    let alerts: Vec<(i64, String, i64)> = rt
        .block_on(client.query("SELECT card_id, rule, trigger_event FROM alerts", &[]))
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    drop(client);
    clean_up(&job, &[&topic]);

    let mut rows = BTreeMap::new();
    for s in Scenario::ALL {
        let rule = s.rule_name();
        let instances: HashSet<i64> =
            label_of_card.iter().filter(|(_, l)| **l == s).map(|(c, _)| *c).collect();
        let of_rule: Vec<&(i64, String, i64)> = alerts.iter().filter(|a| a.1 == rule).collect();
        let detected: HashSet<i64> =
            of_rule.iter().map(|a| a.0).filter(|c| instances.contains(c)).collect();
        let true_positives = of_rule.iter().filter(|a| label_of_card.get(&a.0) == Some(&s)).count();
        let recall = detected.len() as f64 / instances.len().max(1) as f64;
        let precision = true_positives as f64 / of_rule.len().max(1) as f64;
        rows.insert(
            rule,
            serde_json::json!({
                "instances": instances.len(),
                "detected": detected.len(),
                "alerts": of_rule.len(),
                "true_positive_alerts": true_positives,
                "recall": recall,
                "precision": precision,
            }),
        );
    }
    let false_positive_events: HashSet<i64> =
        alerts.iter().map(|a| a.2).filter(|e| benign.contains(e)).collect();
    // Near misses ride on cards of their own, above the scenarios' range.
    let near_miss_cards: HashSet<i64> = benign_cards
        .iter()
        .copied()
        .filter(|c| *c >= 2_000_000_000 + support::BULK_CARDS as i64)
        .collect();
    let near_miss_alerts = alerts.iter().filter(|a| near_miss_cards.contains(&a.0)).count();
    let fpr = false_positive_events.len() as f64 / benign.len().max(1) as f64;

    println!("\n{} records, {} benign events, {} alerts\n", plan.len(), benign.len(), alerts.len());
    println!("| rule | scenarios | detected | recall | alerts | precision |");
    println!("|---|---|---|---|---|---|");
    for (rule, r) in &rows {
        println!(
            "| {rule} | {} | {} | {:.2} % | {} | {:.2} % |",
            r["instances"],
            r["detected"],
            100.0 * r["recall"].as_f64().unwrap(),
            r["alerts"],
            100.0 * r["precision"].as_f64().unwrap(),
        );
    }
    println!(
        "\nfalse positives: {} of {} benign events ({:.4} %)",
        false_positive_events.len(),
        benign.len(),
        100.0 * fpr
    );
    println!(
        "near misses: {} cards of benign traffic just short of a threshold, {near_miss_alerts} alerted",
        near_miss_cards.len()
    );
    write_results(
        "detect",
        &serde_json::json!({
            "records": plan.len(),
            "benign_events": benign.len(),
            "alerts": alerts.len(),
            "rules": rows,
            "false_positive_events": false_positive_events.len(),
            "false_positive_rate": fpr,
            "near_miss_cards": near_miss_cards.len(),
            "near_miss_alerts": near_miss_alerts,
        }),
    );
}
