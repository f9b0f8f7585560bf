//! The PostgreSQL and Redis sinks against the real servers: a 2-worker fraud
//! dataflow commits into a PostgreSQL schema and a Redis key prefix of its
//! own; while the input is held at a time `T`, both hold exactly the reference
//! model's statistics and alerts below `T` and their frontiers say `T`; once
//! the input ends (every window empties) no statistics are left and the alerts
//! are all of the reference's, each once.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use differential_dataflow::input::Input;
use tokio_postgres::NoTls;
use tripwire_connectors::commit::SinkInputs;
use tripwire_connectors::postgres::{pg_sink, PgSinkConfig};
use tripwire_connectors::readback::{self, AlertRow};
use tripwire_connectors::redis_sink::{redis_sink, RedisSinkConfig};
use tripwire_connectors::Endpoints;
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::{Channel, DetectFraud, Diff, FraudConfig, StatKey, Time, Transaction};

fn events() -> Vec<Transaction> {
    let cities = [
        (51_507_400, -127_800, *b"GB"),
        (40_712_800, -74_006_000, *b"US"),
        (48_856_600, 2_352_200, *b"FR"),
    ];
    let mut z: u64 = 42;
    let mut next = move |n: u64| {
        z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (z >> 33) % n
    };
    let mut t: Time = 1_700_000_000_000;
    (0..400u64)
        .map(|id| {
            t += next(400);
            let (lat, lon, country) = cities[next(3) as usize];
            Transaction {
                event_id: id,
                card_id: next(6),
                account_id: 1,
                merchant_id: next(5),
                mcc: 5411,
                amount_minor: if next(4) == 0 {
                    100 + next(300) as i64
                } else {
                    500 + next(5_000) as i64
                },
                currency: *b"EUR",
                country,
                lat_e6: lat,
                lon_e6: lon,
                channel: Channel::Pos,
                event_time_ms: t,
                device_id: None,
            }
        })
        .collect()
}

/// The tables' contents: statistics per metric, alerts, checkpoint frontiers.
type Tables = (BTreeMap<StatKey, i64>, BTreeSet<AlertRow>, Vec<i64>);

fn read_tables(conninfo: &str) -> Tables {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await.unwrap();
        tokio::spawn(conn);
        let stats = readback::pg_stats(&client).await.unwrap();
        let alerts = readback::pg_alerts(&client).await.unwrap();
        (stats, alerts, readback::pg_frontiers(&client, "test").await.unwrap())
    })
}

/// Redis: statistics per metric from the card hashes, alert ids in the stream, frontiers.
type ReadModel = (BTreeMap<StatKey, i64>, Vec<i64>, Vec<Option<Time>>);

fn read_redis(url: &str, job: &str) -> ReadModel {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let stats = readback::redis_stats(&mut con, job).unwrap();
    let mut ids = readback::redis_alert_ids(&mut con, job).unwrap();
    ids.sort_unstable();
    (stats, ids, readback::redis_frontiers(&mut con, job, 2).unwrap())
}

fn expected_alerts(r: &Reference, t: Time) -> BTreeSet<AlertRow> {
    r.alerts_until(t).iter().map(readback::alert_row).collect()
}

#[test]
fn sink_holds_exactly_the_reference_below_the_frontier_and_empties_with_the_windows() {
    let endpoints = Endpoints::from_env().unwrap();
    let schema = format!(
        "pgsink_{}_{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
    );
    let admin = endpoints.postgres_config();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&admin, NoTls)
            .await
            .expect("connect; is the stack up? (./tripwire stack up)");
        tokio::spawn(conn);
        c.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    });
    // The job's tables live in a schema of their own, so test runs never meet.
    let conninfo = format!("{admin} options='-c search_path={schema}'");

    let events = events();
    let fraud = FraudConfig::seconds();
    // Hold the input at the time of the 250th event: a point in the middle of windows.
    let hold = fraud.time_of(events[250].event_time_ms);
    let sink_config = PgSinkConfig {
        conninfo: conninfo.clone(),
        job: "test".into(),
        commit_interval: Duration::from_millis(50),
        catch_up_interval: Duration::ZERO,
        progress: None,
        progress_settled: None,
        late: None,
        resume_from: 0,
        report_to: None,
        produce_times: None,
        decisions: None,
        topic: "none".into(),
        end: None,
        high_water: 0,
        synchronous_commit: false,
        // As the job runs: one large commit at a time per process.
        bulk_writers: Some(std::sync::Arc::new(tokio::sync::Semaphore::new(1))),
    };
    let redis_config = RedisSinkConfig {
        commit_interval: Duration::from_millis(50),
        catch_up_interval: Duration::ZERO,
        ..RedisSinkConfig::new(endpoints.redis_url(), schema.clone())
    };
    let at_hold: Arc<Mutex<Option<(Tables, ReadModel)>>> = Arc::default();
    let barrier = Arc::new(Barrier::new(2));
    {
        let (events, fraud, at_hold, barrier, conninfo) =
            (events.clone(), fraud.clone(), at_hold.clone(), barrier.clone(), conninfo.clone());
        let (url, job) = (endpoints.redis_url(), schema.clone());
        timely::execute(timely::Config::process(2), move |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let (mut input, committed, in_redis) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, events) = scope.new_collection::<Transaction, Diff>();
                let out = events.detect_fraud(&fraud);
                let (stats, alerts) = (out.stats, out.alerts);
                let to_pg = SinkInputs {
                    stats: stats.clone(),
                    alerts: alerts.clone(),
                    archive: None,
                    coalesce: None,
                };
                let pg = pg_sink(to_pg, &sink_config);
                (
                    input,
                    pg,
                    redis_sink(
                        SinkInputs { stats, alerts, archive: None, coalesce: None },
                        &redis_config,
                    ),
                )
            });
            for x in events.iter().filter(|x| x.event_id as usize % peers == index) {
                let t = fraud.time_of(x.event_time_ms);
                if t < hold {
                    input.update_at(x.clone(), t, 1);
                }
            }
            input.advance_to(hold);
            input.flush();
            let deadline = Instant::now() + Duration::from_secs(60);
            while committed.frontier() < hold || in_redis.frontier() < hold {
                assert!(Instant::now() < deadline, "worker {index} committed up to {hold}");
                worker.step_or_park(Some(Duration::from_millis(5)));
            }
            barrier.wait();
            if index == 0 {
                let read = (read_tables(&conninfo), read_redis(&url, &job));
                *at_hold.lock().unwrap() = Some(read);
            }
            barrier.wait();
            // Then the rest of the stream, and the end of input.
            for x in events.iter().filter(|x| x.event_id as usize % peers == index) {
                let t = fraud.time_of(x.event_time_ms);
                if t >= hold {
                    input.update_at(x.clone(), t, 1);
                }
            }
        })
        .unwrap()
        .join()
        .into_iter()
        .for_each(|r| r.unwrap());
    }

    let reference = Reference::new(&fraud, &events);
    let alert_ids = |t: Time| -> Vec<i64> {
        let mut ids: Vec<i64> = reference.alerts_until(t).iter().map(|a| a.id as i64).collect();
        ids.sort_unstable();
        ids
    };
    let ((stats, alerts, frontiers), (r_stats, r_alerts, r_frontiers)) =
        at_hold.lock().unwrap().take().expect("stores read at the hold");
    assert_eq!(frontiers, vec![hold as i64, hold as i64], "both workers' checkpoints at the hold");
    assert!(
        !stats.is_empty() && !alerts.is_empty(),
        "the hold is mid-stream: something to compare"
    );
    assert_eq!(stats, reference.stats_at(hold - 1), "PostgreSQL statistics below the hold");
    assert_eq!(alerts, expected_alerts(&reference, hold - 1), "PostgreSQL alerts below the hold");
    assert_eq!(r_frontiers, vec![Some(hold); 2], "Redis frontiers at the hold");
    assert_eq!(r_stats, reference.stats_at(hold - 1), "Redis statistics below the hold");
    assert_eq!(r_alerts, alert_ids(hold - 1), "Redis alert stream below the hold");

    let (stats, alerts, frontiers) = read_tables(&conninfo);
    assert!(stats.is_empty(), "every window emptied, every row deleted: {} left", stats.len());
    assert_eq!(alerts, expected_alerts(&reference, Time::MAX), "all alerts, once each");
    assert_eq!(frontiers, vec![i64::MAX, i64::MAX], "end of input committed");
    let (r_stats, r_alerts, _) = read_redis(&endpoints.redis_url(), &schema);
    assert!(r_stats.is_empty(), "Redis: every window's fields deleted: {} left", r_stats.len());
    assert_eq!(r_alerts, alert_ids(Time::MAX), "Redis: every alert in the stream once");
}
