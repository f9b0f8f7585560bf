//! `memory`: what a card costs the job and each store, at 1M and 5M active cards.
//!
//! ```text
//! ./tripwire stack up
//! cargo build --release -p tripwire-jobs --bins
//! cargo bench -p tripwire-jobs --bench memory      # TRIPWIRE_BENCH_CARDS=1000000,5000000
//! ```
//!
//! For each card count N: a topic of N events over N cards (txgen's bulk
//! generator, 1 ms apart, so all of them lie within the 24 h window; a card
//! drawn at random, so about 63 % of the cards get one or more), loaded once
//! and kept for later runs (`bench_memory_{N}cards`). The job runs bounded
//! over it (2 workers, exactly once into both stores, the default windows
//! and rules) and the benchmark reports:
//!
//! - the job's peak RSS (`VmHWM`, read from `/proc` until it exits);
//! - Redis: `used_memory` after the run less before it (the job's keys);
//! - PostgreSQL: `card_stats` on disk with its index (`pg_total_relation_size`);
//! - the active cards (rows of `card_stats`), and each figure per card.
//!
//! Prints a table and writes `bench/results/memory.json`.
//!
//! `TRIPWIRE_BENCH_BASELINE=/path/to/an/older/fraud-detector`: the job's peak
//! RSS only, the two builds in turn on the same topic, and their ratio (a
//! change's effect measured in one run); nothing is written.

mod support;

use std::time::Duration;

use support::{bulk_config, clean_up, load, postgres, records_in, unique, write_results, JobRun};
use tripwire_jobs::generator::{GenConfig, Generator};

/// A process's peak resident set so far, bytes (`VmHWM`).
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Redis's `used_memory`, bytes.
fn redis_used(con: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("memory").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO memory has used_memory")
}

struct Measured {
    cards: u64,
    events: i64,
    job_peak_rss: u64,
    redis_bytes: u64,
    pg_bytes: u64,
}

fn measure(cards: u64, bin: &std::path::Path) -> Measured {
    let endpoints = support::endpoints();
    let topic = format!("bench_memory_{cards}cards");
    if records_in(&endpoints.kafka_bootstrap, &topic) == 0 {
        let config = GenConfig { cards, ..bulk_config(3, cards) };
        load(&endpoints.kafka_bootstrap, &topic, &Generator::new(config).generate(cards));
    }
    let events = records_in(&endpoints.kafka_bootstrap, &topic);
    let job = unique("bench_memory");
    let mut con = redis::Client::open(endpoints.redis_url()).unwrap().get_connection().unwrap();
    let redis_before = redis_used(&mut con);
    let run = JobRun { topic: &topic, job: &job, processes: 1, workers: 2, args: vec![] };
    let mut children = run.bounded().spawn_binary(bin);
    assert_eq!(children.len(), 1);
    let child = &mut children[0];
    let mut peak = 0;
    loop {
        // Read while it runs: the last reading before it exits is its peak.
        if let Some(p) = peak_rss(child.id()) {
            peak = peak.max(p);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the job failed");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let redis_bytes = redis_used(&mut con).saturating_sub(redis_before);
    let (rt, client) = postgres(&job);
    let (rows, pg_bytes): (i64, i64) = rt.block_on(async {
        let r = client
            .query_one("SELECT count(*), pg_total_relation_size('card_stats') FROM card_stats", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    });
    drop(client);
    clean_up(&job, &[]);
    Measured {
        cards: rows as u64,
        events,
        job_peak_rss: peak,
        redis_bytes,
        pg_bytes: pg_bytes as u64,
    }
}

fn main() {
    let counts = support::env_list("TRIPWIRE_BENCH_CARDS", "1000000,5000000");
    let bin = support::binary("fraud-detector");
    if let Ok(baseline) = std::env::var("TRIPWIRE_BENCH_BASELINE") {
        println!("| cards drawn from | active cards | baseline peak RSS | this build | ratio |");
        println!("|---|---|---|---|---|");
        for &n in &counts {
            let old = measure(n, std::path::Path::new(&baseline));
            let new = measure(n, &bin);
            println!(
                "| {n} | {} | {:.0} MB | {:.0} MB | {:.2} |",
                new.cards,
                old.job_peak_rss as f64 / 1e6,
                new.job_peak_rss as f64 / 1e6,
                new.job_peak_rss as f64 / old.job_peak_rss as f64
            );
        }
        return;
    }
    let mut rows = Vec::new();
    let mut results = serde_json::Map::new();
    for &n in &counts {
        let m = measure(n, &bin);
        let per = |bytes: u64| bytes as f64 / m.cards.max(1) as f64;
        rows.push(format!(
            "| {n} | {} | {} | {:.0} MB | {:.0} | {:.0} MB | {:.0} | {:.0} MB | {:.0} |",
            m.events,
            m.cards,
            m.job_peak_rss as f64 / 1e6,
            per(m.job_peak_rss),
            m.redis_bytes as f64 / 1e6,
            per(m.redis_bytes),
            m.pg_bytes as f64 / 1e6,
            per(m.pg_bytes)
        ));
        results.insert(
            n.to_string(),
            serde_json::json!({
                "events": m.events, "active_cards": m.cards,
                "job_peak_rss_bytes": m.job_peak_rss, "redis_bytes": m.redis_bytes,
                "postgres_card_stats_bytes": m.pg_bytes,
                "job_bytes_per_card": per(m.job_peak_rss),
                "redis_bytes_per_card": per(m.redis_bytes),
                "postgres_bytes_per_card": per(m.pg_bytes),
            }),
        );
    }
    println!("\nbounded runs, 2 workers, default windows (1 min, 5 min, 1 h, 24 h) and rules; every event within the 24 h window\n");
    println!("| cards drawn from | events | active cards | job peak RSS | per card | Redis | per card | PostgreSQL card_stats | per card |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    write_results("memory", &serde_json::Value::Object(results));
}
