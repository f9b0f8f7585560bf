//! Reading a job's results back out of its stores, in one comparable shape.
//!
//! The sink tests and the chaos test compare these against the reference
//! model; PostgreSQL statistics and Redis card hashes come back as the same
//! `StatKey → value` map, alerts as [`AlertRow`]s with canonical JSON details.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;
use tripwire_dataflow::{Alert, Metric, StatKey, Time};

use crate::redis_sink::Keys;

/// An alert as stored: id, rule, trigger event, details as canonical JSON.
pub type AlertRow = (i64, String, i64, String);

/// A PostgreSQL client at `endpoints` and the runtime that drives it, for
/// tests and benchmarks that read results from outside the job. Panics if
/// PostgreSQL cannot be reached.
pub fn pg_client(endpoints: &crate::Endpoints) -> (tokio::runtime::Runtime, Client) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = rt.block_on(async {
        let (c, conn) =
            tokio_postgres::connect(&endpoints.postgres_config(), tokio_postgres::NoTls)
                .await
                .expect("PostgreSQL; is the stack up?");
        tokio::spawn(conn);
        c
    });
    (rt, client)
}

/// JSON with sorted keys, so that jsonb's and serde's spellings compare.
pub fn canonical(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json).map(|v| v.to_string()).unwrap_or_default()
}

/// The row an alert should have become.
pub fn alert_row(a: &Alert) -> AlertRow {
    let details = canonical(&serde_json::to_string(&a.details).expect("details serialize"));
    (a.id as i64, a.rule.name().to_string(), a.trigger_event as i64, details)
}

/// `window_stats`, one entry per metric.
pub async fn pg_stats(c: &Client) -> Result<BTreeMap<StatKey, i64>, tokio_postgres::Error> {
    let mut stats = BTreeMap::new();
    for r in c
        .query(
            "SELECT card_id, window_ms, count, sum_minor, max_amount_minor, distinct_merchants,
                    distinct_countries FROM window_stats",
            &[],
        )
        .await?
    {
        let (card_id, window_ms) = (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64);
        for (i, metric) in Metric::ALL.into_iter().enumerate() {
            stats.insert(StatKey { card_id, window_ms, metric }, r.get::<_, i64>(2 + i));
        }
    }
    Ok(stats)
}

/// `alerts`, as rows.
pub async fn pg_alerts(c: &Client) -> Result<BTreeSet<AlertRow>, tokio_postgres::Error> {
    Ok(c.query("SELECT alert_id, rule, trigger_event, details::text FROM alerts", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), canonical(r.get(3))))
        .collect())
}

/// The job's checkpoint frontiers, by worker.
pub async fn pg_frontiers(c: &Client, job: &str) -> Result<Vec<i64>, tokio_postgres::Error> {
    Ok(c.query("SELECT frontier FROM checkpoints WHERE job = $1 ORDER BY worker", &[&job])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Event ids in `raw_transactions`.
pub async fn pg_archive(c: &Client) -> Result<BTreeSet<i64>, tokio_postgres::Error> {
    Ok(c.query("SELECT event_id FROM raw_transactions", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Redis: every card record of `job` (found by `SCAN`, so a stray key shows), as stored.
pub fn redis_cards(
    con: &mut redis::Connection,
    job: &str,
) -> Result<BTreeMap<u64, String>, redis::RedisError> {
    let keys = Keys::new(job);
    let pattern = format!("{}*", keys.card_prefix());
    let cards: Vec<String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("MATCH")
        .arg(&pattern)
        .arg("COUNT")
        .arg(1_000)
        .clone()
        .iter(con)?
        .collect::<Result<_, _>>()?;
    let mut out = BTreeMap::new();
    for chunk in cards.chunks(1_000) {
        // A key of another type reads as nothing here: shown as an unparsable record.
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query(con)?;
        for (key, value) in chunk.iter().zip(values) {
            let Some(card_id) = key.strip_prefix(&keys.card_prefix()).and_then(|c| c.parse().ok())
            else {
                continue;
            };
            out.insert(card_id, value.unwrap_or_default());
        }
    }
    Ok(out)
}

/// Redis: per card of `job`, its newest alert's order key (event time and alert id).
pub fn redis_last_alerts(
    con: &mut redis::Connection,
    job: &str,
) -> Result<BTreeMap<u64, String>, redis::RedisError> {
    redis::cmd("HGETALL").arg(Keys::new(job).last_alert_order()).query(con)
}

/// Redis: the statistics in every card hash of `job`.
pub fn redis_stats(
    con: &mut redis::Connection,
    job: &str,
) -> Result<BTreeMap<StatKey, i64>, redis::RedisError> {
    let mut stats = BTreeMap::new();
    for (card_id, record) in redis_cards(con, job)? {
        // `{"<window ms>": [count, sum, max, merchants, countries], ...}`.
        let windows: BTreeMap<String, Vec<i64>> = match serde_json::from_str(&record) {
            Ok(w) => w,
            Err(_) => BTreeMap::from([(String::new(), Vec::new())]),
        };
        for (window, values) in windows {
            let window_ms = window.parse().unwrap_or(0);
            if values.len() != Metric::ALL.len() {
                // Shown to the comparison as a value no reference has.
                stats.insert(StatKey { card_id, window_ms, metric: Metric::Count }, i64::MIN);
                continue;
            }
            // In the order the sink writes them, which is `Metric::ALL`'s.
            for (metric, v) in Metric::ALL.into_iter().zip(values) {
                stats.insert(StatKey { card_id, window_ms, metric }, v);
            }
        }
    }
    Ok(stats)
}

/// Redis: the alert ids in `job`'s stream, in stream order.
pub fn redis_alert_ids(
    con: &mut redis::Connection,
    job: &str,
) -> Result<Vec<i64>, redis::RedisError> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(Keys::new(job).alerts()).arg("-").arg("+").query(con)?;
    Ok(entries
        .iter()
        .filter_map(|(_, kv)| kv.iter().find(|(k, _)| k == "alert_id"))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .map(|id| id as i64)
        .collect())
}

/// Redis: the frontier each of `workers` workers stored, if it did.
pub fn redis_frontiers(
    con: &mut redis::Connection,
    job: &str,
    workers: usize,
) -> Result<Vec<Option<Time>>, redis::RedisError> {
    let keys = Keys::new(job);
    (0..workers)
        .map(|w| {
            let v: Option<String> = redis::cmd("HGET").arg(keys.frontiers()).arg(w).query(con)?;
            Ok(v.and_then(|v| v.parse().ok()))
        })
        .collect()
}
