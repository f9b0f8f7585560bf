//! The source's decisions are recorded in both stores, and a restart can take
//! them from either.
//!
//! A store whose results depend on a decision (a floor set when a quiet
//! partition was released) must hold it: the other store may lose it (an
//! older copy restored, or never stored while it was down). Here: the Redis
//! sink records what the source decided with its commit; both stores keep
//! the greater floor and the further position whatever order records arrive
//! in; and what one recorded, the other can be given back.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tripwire_connectors::kafka_source::{Decisions, SourceDecisions};
use tripwire_connectors::postgres::{migrate, migrate_up_to, record_decisions, recorded_decisions};
use tripwire_connectors::redis_sink::{self, RedisSinkConfig};
use tripwire_connectors::Endpoints;
use tripwire_dataflow::{Time, WindowStats};

fn decisions(floors: &[((i32, i64), Time)], positions: &[(i32, i64)]) -> SourceDecisions {
    SourceDecisions {
        floors: floors.iter().copied().collect(),
        positions: positions.iter().copied().collect(),
    }
}

#[test]
fn the_redis_sink_records_the_source_decisions_with_its_commit() {
    let endpoints = Endpoints::from_env().unwrap();
    let (job, topic) = (common::unique("decisions_sink"), "card-transactions".to_string());
    let decided = Decisions::default();
    decided.floor(2, 40, 1_000);
    decided.floor(2, 40, 1_500);
    decided.floor(3, 7, 900);
    decided.positions([(2, 41), (3, 9)].into_iter());
    let config = RedisSinkConfig {
        decisions: Some(decided.clone()),
        topic: topic.clone(),
        ..common::eager_redis(&endpoints, &job)
    };
    timely::execute(timely::Config::thread(), move |worker| {
        let (mut input, mut alerts, committed) = common::redis_sink_alone(worker, &config);
        let stats = WindowStats {
            count: 1,
            sum: 5,
            max_amount: 5,
            distinct_merchants: 1,
            distinct_countries: 1,
        };
        input.update_at((1, common::arrival(60_000, stats)), 3, 1);
        input.advance_to(10);
        alerts.advance_to(10);
        input.flush();
        alerts.flush();
        let deadline = Instant::now() + Duration::from_secs(60);
        while committed.frontier() < 10 {
            assert!(Instant::now() < deadline, "the batch never landed");
            worker.step_or_park(Some(Duration::from_millis(5)));
        }
        drop((input, alerts));
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let got =
        rt.block_on(redis_sink::recorded_decisions(&endpoints.redis_url(), &job, &topic)).unwrap();
    let want = decisions(&[((2, 40), 1_500), ((3, 7), 900)], &[(2, 41), (3, 9)]);
    assert_eq!(got, want, "Redis holds what the source decided, with the commit");
    let other = rt
        .block_on(redis_sink::recorded_decisions(&endpoints.redis_url(), &job, "another-topic"))
        .unwrap();
    assert_eq!(other, SourceDecisions::default(), "decisions are per topic");
    assert_eq!(
        decided.take(tripwire_connectors::kafka_source::DecisionStore::Redis),
        Default::default()
    );
}

#[test]
fn both_stores_keep_the_greater_floor_and_the_further_position() {
    let endpoints = Endpoints::from_env().unwrap();
    let job = common::unique("decisions_merge");
    let topic = "card-transactions";
    let first = decisions(&[((0, 10), 500), ((1, 4), 300)], &[(0, 12), (1, 4)]);
    // Recorded later by a store that saw less: nothing goes back.
    let older = decisions(&[((0, 10), 400), ((1, 4), 300)], &[(0, 11), (1, 2)]);
    let newer = decisions(&[((0, 10), 600), ((0, 20), 700)], &[(0, 20)]);
    let mut want = first.clone();
    want.merge(older.clone());
    want.merge(newer.clone());
    assert_eq!(
        want,
        decisions(&[((0, 10), 600), ((0, 20), 700), ((1, 4), 300)], &[(0, 20), (1, 4)]),
        "the union keeps the greater floor per offset and the further position"
    );

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut e = endpoints.clone();
    e.pg_schema = Some(job.clone());
    let pg = rt.block_on(async {
        let (mut c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.unwrap();
        tokio::spawn(conn);
        migrate(&mut c).await.unwrap();
        for d in [&first, &older, &newer] {
            record_decisions(&c, &job, topic, d).await.unwrap();
        }
        recorded_decisions(&c, &job, topic).await.unwrap()
    });
    assert_eq!(pg, want, "PostgreSQL");
    let url = endpoints.redis_url();
    let redis = rt.block_on(async {
        for d in [&first, &older, &newer] {
            redis_sink::record_decisions(&url, &job, topic, d).await.unwrap();
        }
        redis_sink::recorded_decisions(&url, &job, topic).await.unwrap()
    });
    assert_eq!(redis, want, "Redis");
}

/// A runtime, and endpoints whose PostgreSQL connections use a new schema
/// named `{prefix}_{pid}_{nanos}` (its name also returned).
fn in_schema(prefix: &str) -> (tokio::runtime::Runtime, Endpoints, String) {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let name = format!("{prefix}_{}_{nanos}", std::process::id());
    let mut e = Endpoints::from_env().unwrap();
    e.pg_schema = Some(name.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    (rt, e, name)
}

/// A schema named in mixed case (`TRIPWIRE_PG_SCHEMA=Bench1`) is the one
/// PostgreSQL resolves the unquoted name to (`bench1`): the job's tables are
/// created there, not in a case-preserved schema its connections never see
/// (which left the job waiting for the stores forever).
#[test]
fn a_mixed_case_schema_name_is_created_as_postgresql_resolves_it() {
    let (rt, e, name) = in_schema("Mixed_Case");
    let (schema, rows) = rt.block_on(async {
        let (mut c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.unwrap();
        tokio::spawn(conn);
        migrate(&mut c).await.expect("migrations apply in a mixed-case schema");
        let schema: String = c.query_one("SELECT current_schema()", &[]).await.unwrap().get(0);
        let rows: i64 = c.query_one("SELECT count(*) FROM card_stats", &[]).await.unwrap().get(0);
        (schema, rows)
    });
    assert_eq!(schema, name.to_ascii_lowercase());
    assert_eq!(rows, 0, "a fresh schema's card_stats is empty");
}

/// Autovacuum's ANALYZE of `card_stats` gathers statistics only for the
/// columns queries find rows by: statistics on the window arrays cost most
/// of each ANALYZE (270 of 340 ms for 450K cards), which ran about once a
/// minute beside the commits on two shared cores.
#[test]
fn analyze_gathers_no_statistics_on_the_window_arrays() {
    let (rt, e, name) = in_schema("analyze");
    let columns = rt.block_on(async {
        let (mut c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.unwrap();
        tokio::spawn(conn);
        migrate(&mut c).await.unwrap();
        c.batch_execute(
            "INSERT INTO card_stats
             SELECT i, ARRAY[[60000, i % 7, i * 100, i, 1, 1], [300000, i % 11, i * 300, i * 2, i % 3, 1]],
                    i * 1000
             FROM generate_series(1, 2000) AS i;
             ANALYZE card_stats;",
        )
        .await
        .unwrap();
        let rows = c
            .query(
                "SELECT attname::text FROM pg_stats
                 WHERE schemaname = current_schema() AND tablename = 'card_stats'
                 ORDER BY attname",
                &[],
            )
            .await
            .unwrap();
        c.batch_execute(&format!("DROP SCHEMA \"{name}\" CASCADE")).await.unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    });
    assert_eq!(columns, ["as_of", "card_id"], "columns ANALYZE gathered statistics for");
}

/// Migration 8 (a card's windows in one two-dimensional array) keeps every
/// card's windows as analysts read them: a store as migration 7 left it,
/// with cards of one to four windows, reads the same through `window_stats`
/// before and after, and `card_stats` holds each card's windows as rows,
/// ascending by length.
#[test]
fn one_array_of_windows_keeps_what_six_arrays_held() {
    let (rt, e, name) = in_schema("windows_8");
    let (before, after, one, ndims) = rt.block_on(async {
        let (mut c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.unwrap();
        tokio::spawn(conn);
        migrate_up_to(&mut c, 7).await.unwrap();
        // Card i has the first 1 + i % 4 of the four windows, values from i.
        c.batch_execute(
            "INSERT INTO card_stats
             SELECT i, (ARRAY[60000, 300000, 3600000, 86400000])[1 : n],
                    (SELECT array_agg(i + w) FROM generate_series(1, n) w),
                    (SELECT array_agg(i * 100 + w) FROM generate_series(1, n) w),
                    (SELECT array_agg(i * 10 + w) FROM generate_series(1, n) w),
                    (SELECT array_agg(w) FROM generate_series(1, n) w),
                    (SELECT array_agg(1 + w % 2) FROM generate_series(1, n) w),
                    i * 1000
             FROM generate_series(1, 500) AS i, LATERAL (SELECT 1 + i % 4 AS n) AS k",
        )
        .await
        .unwrap();
        let read = "SELECT card_id, window_ms, count, sum_minor, max_amount_minor,
                           distinct_merchants, distinct_countries, as_of
                    FROM window_stats ORDER BY card_id, window_ms";
        let rows = |rows: Vec<tokio_postgres::Row>| -> Vec<Vec<i64>> {
            rows.iter().map(|r| (0..8).map(|i| r.get::<_, i64>(i)).collect()).collect()
        };
        let before = rows(c.query(read, &[]).await.unwrap());
        assert_eq!(migrate_up_to(&mut c, 8).await.unwrap(), vec![8], "only migration 8 was left");
        let after = rows(c.query(read, &[]).await.unwrap());
        let one: Vec<Vec<i64>> = c
            .query_one(
                "SELECT ARRAY(SELECT unnest(windows)) FROM card_stats WHERE card_id = 6",
                &[],
            )
            .await
            .map(|r| {
                let flat: Vec<i64> = r.get(0);
                flat.chunks(6).map(<[i64]>::to_vec).collect()
            })
            .unwrap();
        let ndims: i32 = c
            .query_one("SELECT array_ndims(windows) FROM card_stats WHERE card_id = 6", &[])
            .await
            .unwrap()
            .get(0);
        c.batch_execute(&format!("DROP SCHEMA \"{name}\" CASCADE")).await.unwrap();
        (before, after, one, ndims)
    });
    // Cards 1..=500 with 1 + i % 4 windows each.
    let windows: usize = (1..=500).map(|i| 1 + i % 4).sum();
    assert_eq!(before.len(), windows, "the old layout read through the view");
    assert_eq!(after, before, "every card's windows, as analysts read them");
    assert_eq!(ndims, 2, "one row per window");
    // Card 6: 1 + 6 % 4 = 3 windows, each [window_ms, count, sum, max, merchants, countries].
    assert_eq!(
        one,
        vec![
            vec![60000, 7, 601, 61, 1, 2],
            vec![300000, 8, 602, 62, 2, 1],
            vec![3600000, 9, 603, 63, 3, 2]
        ]
    );
}
