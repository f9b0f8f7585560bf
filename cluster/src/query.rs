//! `tripwire query` and `tripwire status`: what PostgreSQL and the running processes say.
//!
//! Queries are the README's plain SQL, printed as tables. Values that go into
//! SQL are checked first (numbers, rule names, an interval like `2 hours`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::{NoTls, SimpleQueryMessage};
use tripwire_connectors::Endpoints;

use crate::launch::State;
use crate::stack::process;

/// Run `sql` and return the column names and the rows as text.
pub fn rows(endpoints: &Endpoints, sql: &str) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&endpoints.postgres_config(), NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(conn);
        let mut columns = Vec::new();
        let mut out = Vec::new();
        for m in client.simple_query(sql).await? {
            if let SimpleQueryMessage::Row(r) = m {
                if columns.is_empty() {
                    columns = r.columns().iter().map(|c| c.name().to_string()).collect();
                }
                out.push((0..r.len()).map(|i| r.get(i).unwrap_or("").to_string()).collect());
            }
        }
        Ok((columns, out))
    })
}

/// Print a table: a header, a rule, then the rows, columns padded to fit.
pub fn table(columns: &[String], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for r in rows {
        for (i, v) in r.iter().enumerate() {
            width[i] = width[i].max(v.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut s = line(columns);
    s.push_str(&line(&width.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>()));
    for r in rows {
        s.push_str(&line(r));
    }
    s.push_str(&format!("({} rows)\n", rows.len()));
    s
}

/// An interval PostgreSQL understands, checked: `N unit` (`30 minutes`, `2 hours`, `1 day`).
pub fn interval(text: &str) -> Result<String> {
    let mut words = text.split_whitespace();
    let (Some(n), Some(unit), None) = (words.next(), words.next(), words.next()) else {
        bail!("{text:?} is not an interval like \"2 hours\"");
    };
    let units = ["second", "minute", "hour", "day", "week"];
    if n.parse::<u32>().is_err() || !units.iter().any(|u| unit.trim_end_matches('s') == *u) {
        bail!("{text:?} is not an interval like \"2 hours\"");
    }
    Ok(format!("{n} {unit}"))
}

/// The SQL of each canned query (the README shows the same).
pub fn alerts_sql(
    since: &str,
    rule: Option<&str>,
    card: Option<u64>,
    limit: u32,
) -> Result<String> {
    let mut sql = format!(
        "SELECT event_time, rule, card_id, trigger_event, details FROM alerts \
         WHERE event_time > now() - interval '{}'",
        interval(since)?
    );
    if let Some(rule) = rule {
        let rules =
            ["velocity", "amount_spike", "impossible_travel", "card_testing", "country_hopping"];
        if !rules.contains(&rule) {
            bail!("no rule {rule:?}; rules: {}", rules.join(", "));
        }
        sql.push_str(&format!(" AND rule = '{rule}'"));
    }
    if let Some(card) = card {
        sql.push_str(&format!(" AND card_id = {card}"));
    }
    sql.push_str(&format!(" ORDER BY event_time DESC LIMIT {limit}"));
    Ok(sql)
}

/// The cards with the most alerts in the last `since`.
pub fn riskiest_sql(since: &str, limit: u32) -> Result<String> {
    Ok(format!(
        "SELECT card_id, count(*) AS alerts, string_agg(DISTINCT rule, ',') AS rules, \
                max(event_time) AS last_alert FROM alerts \
         WHERE event_time > now() - interval '{}' \
         GROUP BY card_id ORDER BY alerts DESC, last_alert DESC LIMIT {limit}",
        interval(since)?
    ))
}

/// One card's windows.
pub fn card_sql(card: u64) -> String {
    format!(
        "SELECT window_ms / 60000.0 AS window_min, count, sum_minor, max_amount_minor, \
                distinct_merchants, distinct_countries, to_timestamp(as_of / 1000.0) AS as_of \
         FROM window_stats WHERE card_id = {card} ORDER BY window_ms"
    )
}

/// "Results complete up to", per job.
pub const PROGRESS_SQL: &str =
    "SELECT job, complete_up_to, frontier_ms FROM results_complete_up_to ORDER BY job";

/// One `GET path` to `host:port`: the body of a 200 answer.
fn http_get(address: &str, path: &str) -> Option<String> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(address).ok()?.next()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The sum of every sample of `metric` in a Prometheus text exposition.
pub fn metric_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `tripwire status`: one line per process.
pub fn status(
    endpoints: &Endpoints,
    state: &State,
    workers: usize,
    metrics_port: u16,
) -> Result<String> {
    let sql = format!(
        "SELECT worker, frontier, to_char(updated_at, 'HH24:MI:SS.MS') FROM checkpoints \
         WHERE job = '{}' ORDER BY worker",
        state.job.replace('\'', "''")
    );
    let mut endpoints = endpoints.clone();
    if state.pg_schema.is_some() {
        endpoints.pg_schema = state.pg_schema.clone();
    }
    let (_, checkpoints) = rows(&endpoints, &sql).unwrap_or_default();
    // Events per second from two scrapes of each process's /metrics, a second apart.
    let address = |i: usize, host: &str| {
        let h = host.rsplit_once(':').map_or(host, |(h, _)| h);
        format!("{h}:{}", metrics_port as usize + i)
    };
    let scrape = |i: usize, host: &str| {
        http_get(&address(i, host), "/metrics")
            .map(|t| metric_sum(&t, "tripwire_source_events_total"))
    };
    let first: Vec<Option<f64>> =
        state.processes.iter().enumerate().map(|(i, (h, _))| scrape(i, h)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let columns: Vec<String> =
        ["process", "host", "state", "pid", "frontier", "events/s", "last commit", "restarts"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut out = Vec::new();
    for (i, (host, pid)) in state.processes.iter().enumerate() {
        let up = *pid > 0 && process::alive(*pid);
        let mine: Vec<&Vec<String>> = checkpoints
            .iter()
            .filter(|r| r[0].parse::<usize>().is_ok_and(|w| w / workers.max(1) == i))
            .collect();
        let frontier = mine.iter().filter_map(|r| r[1].parse::<i64>().ok()).min();
        let last = mine.iter().map(|r| r[2].clone()).max().unwrap_or_default();
        let rate = match (first[i], scrape(i, host)) {
            (Some(a), Some(b)) => format!("{:.0}", (b - a) / t0.elapsed().as_secs_f64()),
            _ => "-".into(),
        };
        out.push(vec![
            i.to_string(),
            host.clone(),
            if up { "up" } else { "down" }.to_string(),
            pid.to_string(),
            frontier.map_or("-".into(), |f| f.to_string()),
            rate,
            last,
            state.restarts.to_string(),
        ]);
    }
    Ok(table(&columns, &out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_rules_are_checked_before_they_reach_sql() {
        assert_eq!(interval("2 hours").unwrap(), "2 hours");
        assert!(interval("1 day; DROP TABLE alerts").is_err());
        assert!(interval("x hours").is_err());
        assert!(alerts_sql("1 hour", Some("velocity"), Some(7), 10)
            .unwrap()
            .contains("card_id = 7"));
        assert!(alerts_sql("1 hour", Some("v' OR '1'='1"), None, 10).is_err());
    }

    #[test]
    fn metric_samples_are_summed_by_exact_name() {
        let text = "# HELP x\ntripwire_source_events_total{partition=\"0\"} 10\n\
                    tripwire_source_events_total{partition=\"1\"} 5\n\
                    tripwire_source_events_total_other 99\n";
        assert_eq!(metric_sum(text, "tripwire_source_events_total"), 15.0);
    }

    #[test]
    fn tables_pad_columns_to_their_widest_cell() {
        let t = table(&["a".into(), "bb".into()], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "a    bb\n---  --\nxyz  1\n(1 rows)\n");
    }
}
