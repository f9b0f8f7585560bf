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
use tripwire_connectors::postgres::{migrate, record_decisions, recorded_decisions};
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
/// columns queries find rows by: statistics on the six window arrays cost
/// most of each ANALYZE (270 of 340 ms for 450K cards), which ran about once
/// a minute beside the commits on two shared cores.
#[test]
fn analyze_gathers_no_statistics_on_the_window_arrays() {
    let (rt, e, name) = in_schema("analyze");
    let columns = rt.block_on(async {
        let (mut c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.unwrap();
        tokio::spawn(conn);
        migrate(&mut c).await.unwrap();
        c.batch_execute(
            "INSERT INTO card_stats
             SELECT i, ARRAY[60000, 300000], ARRAY[i % 7, i % 11], ARRAY[i * 100, i * 300],
                    ARRAY[i, i * 2], ARRAY[1, i % 3], ARRAY[1, 1], i * 1000
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
