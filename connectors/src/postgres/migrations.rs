//! The PostgreSQL schema, as versioned migrations the job applies on start.
//!
//! Each migration runs once, in order, in a transaction of its own, recorded
//! in `tripwire_migrations`; an advisory lock keeps concurrent workers and
//! processes from applying one twice.

use tokio_postgres::Client;

/// `(version, what, SQL)`, in order. Never edit a shipped migration: add one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "stats, alerts, late events, archive, checkpoints, progress",
        r#"
CREATE TABLE window_stats (
    card_id            bigint NOT NULL,
    window_ms          bigint NOT NULL,
    count              bigint NOT NULL,
    sum_minor          bigint NOT NULL,
    max_amount_minor   bigint NOT NULL,
    distinct_merchants bigint NOT NULL,
    distinct_countries bigint NOT NULL,
    -- Event time (ms) of the change this row reflects; upserts only move it forward.
    as_of              bigint NOT NULL,
    PRIMARY KEY (card_id, window_ms)
);

CREATE TABLE alerts (
    alert_id        bigint PRIMARY KEY,
    card_id         bigint NOT NULL,
    rule            text   NOT NULL,
    trigger_event   bigint NOT NULL,
    event_time      timestamptz NOT NULL,
    detected_at     timestamptz NOT NULL DEFAULT now(),
    details         jsonb  NOT NULL
);
CREATE INDEX alerts_by_time ON alerts (event_time);
CREATE INDEX alerts_by_card ON alerts (card_id, event_time);
CREATE INDEX alerts_by_rule ON alerts (rule, event_time);

CREATE TABLE late_events (
    topic       text   NOT NULL,
    partition   int    NOT NULL,
    "offset"    bigint NOT NULL,
    reason      text   NOT NULL,
    detail      text   NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);

CREATE TABLE raw_transactions (
    event_id     bigint PRIMARY KEY,
    card_id      bigint NOT NULL,
    event_time   timestamptz NOT NULL,
    amount_minor bigint NOT NULL,
    record       jsonb  NOT NULL
);

CREATE TABLE checkpoints (
    job        text   NOT NULL,
    worker     int    NOT NULL,
    -- Every output at event time < frontier is committed.
    frontier   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, worker)
);

CREATE TABLE source_progress (
    job            text   NOT NULL,
    topic          text   NOT NULL,
    partition      int    NOT NULL,
    "offset"       bigint NOT NULL,
    -- Largest event time among the partition's records before "offset".
    max_event_time bigint NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, topic, partition, "offset")
);

-- "Results complete up to": the least frontier over a job's sink workers.
CREATE VIEW results_complete_up_to AS
SELECT job, min(frontier) AS frontier_ms,
       to_timestamp(least(min(frontier), 253402300799000) / 1000.0) AS complete_up_to
FROM checkpoints GROUP BY job;
"#,
    ),
    (
        2,
        "archive: typed columns instead of a jsonb record",
        // Version 1 created the archive but never wrote it: typed columns are
        // cheaper to write than a jsonb per event and plain to query. NOT NULL
        // without a default fails loudly should rows exist after all.
        r#"
ALTER TABLE raw_transactions
    DROP COLUMN record,
    ADD COLUMN account_id   bigint NOT NULL,
    ADD COLUMN merchant_id  bigint NOT NULL,
    ADD COLUMN mcc          int    NOT NULL,
    ADD COLUMN currency     text   NOT NULL,
    ADD COLUMN country      text   NOT NULL,
    ADD COLUMN lat_e6       int    NOT NULL,
    ADD COLUMN lon_e6       int    NOT NULL,
    ADD COLUMN channel      text   NOT NULL,
    ADD COLUMN device_id    bigint;
CREATE INDEX raw_transactions_card_time ON raw_transactions (card_id, event_time);
"#,
    ),
    (
        3,
        "window_stats: room on each page for updates in place",
        // Nearly every write to window_stats updates a row without touching
        // its key; with free space on the page PostgreSQL updates it in place
        // (a heap-only tuple: no new index entry, less WAL, less vacuum).
        "ALTER TABLE window_stats SET (fillfactor = 70);",
    ),
    (
        4,
        "source decisions: watermark basis, floors and read positions, for deterministic replay",
        // The source's decisions that depend on timing (a quiet partition
        // released, the end of a bounded run) are stored with the commit that
        // covers them and applied again by a replay (reclocking); `basis` and
        // `top` are the second largest and largest clamped event times the
        // lateness rule uses (`max_event_time` stays the true maximum, which
        // decides where a restart may begin).
        r#"
ALTER TABLE source_progress ADD COLUMN basis bigint, ADD COLUMN top bigint;
CREATE TABLE source_floors (
    job        text   NOT NULL,
    topic      text   NOT NULL,
    partition  int    NOT NULL,
    -- From this offset on, records at a time below "floor" are late.
    "offset"   bigint NOT NULL,
    floor      bigint NOT NULL,
    PRIMARY KEY (job, topic, partition, "offset")
);
CREATE TABLE source_positions (
    job        text   NOT NULL,
    topic      text   NOT NULL,
    partition  int    NOT NULL,
    -- How far the source had read when a commit was stored.
    "offset"   bigint NOT NULL,
    PRIMARY KEY (job, topic, partition)
);
"#,
    ),
    (
        5,
        "high water: the greatest frontier any worker stored before a rescale",
        // Rows written by workers of an earlier worker count may lie beyond
        // the frontier a rescale starts every worker at: a sink skips the
        // deletes of windows that came and went within a batch only from here on.
        "CREATE TABLE job_high_water (job text PRIMARY KEY, frontier bigint NOT NULL);",
    ),
    (
        6,
        "card_stats: one row per card holding every window; window_stats becomes a view of it",
        // An arrival changes every window of its card: one row per card is
        // one row to write where there were four (and one index entry). The
        // arrays hold the card's non-empty windows, ascending by length,
        // position by position; `window_stats` keeps its shape for readers.
        r#"
CREATE TABLE card_stats (
    card_id            bigint PRIMARY KEY,
    window_ms          bigint[] NOT NULL,
    count              bigint[] NOT NULL,
    sum_minor          bigint[] NOT NULL,
    max_amount_minor   bigint[] NOT NULL,
    distinct_merchants bigint[] NOT NULL,
    distinct_countries bigint[] NOT NULL,
    -- Event time (ms) of the change this row reflects; upserts only move it forward.
    as_of              bigint NOT NULL
) WITH (fillfactor = 70);
INSERT INTO card_stats
SELECT card_id, array_agg(window_ms ORDER BY window_ms), array_agg(count ORDER BY window_ms),
       array_agg(sum_minor ORDER BY window_ms), array_agg(max_amount_minor ORDER BY window_ms),
       array_agg(distinct_merchants ORDER BY window_ms),
       array_agg(distinct_countries ORDER BY window_ms), max(as_of)
FROM window_stats GROUP BY card_id;
DROP TABLE window_stats;
CREATE VIEW window_stats AS
SELECT c.card_id, w.window_ms, w.count, w.sum_minor, w.max_amount_minor, w.distinct_merchants,
       w.distinct_countries, c.as_of
FROM card_stats c,
     unnest(c.window_ms, c.count, c.sum_minor, c.max_amount_minor, c.distinct_merchants,
            c.distinct_countries)
         AS w(window_ms, count, sum_minor, max_amount_minor, distinct_merchants, distinct_countries);
"#,
    ),
    (
        7,
        "card_stats: no planner statistics on the window arrays",
        // Autovacuum analyzes the table about once a minute while cards
        // change; statistics on the six arrays (their most common elements)
        // made each ANALYZE take 270 ms of CPU for 450K cards (75 ms without
        // them), and on two shared cores the commits waited behind it (the
        // p99 of real time at 50K events/s). No query plan uses them: rows
        // are found by card_id, and a filter on one window's figure is an
        // expression those statistics do not describe.
        r#"
ALTER TABLE card_stats
    ALTER COLUMN window_ms SET STATISTICS 0,
    ALTER COLUMN count SET STATISTICS 0,
    ALTER COLUMN sum_minor SET STATISTICS 0,
    ALTER COLUMN max_amount_minor SET STATISTICS 0,
    ALTER COLUMN distinct_merchants SET STATISTICS 0,
    ALTER COLUMN distinct_countries SET STATISTICS 0;
"#,
    ),
    (
        8,
        "card_stats: a card's windows in one two-dimensional array",
        // Six arrays a row cost PostgreSQL six array constructions per row
        // read (`COPY`, the upsert) and six array headers per row stored: a
        // bulk load's last commit, 433K new cards copied straight in, took
        // 2.2-2.5 s of a backend with six arrays and 1.6-2.0 s with one
        // (the table 226 MB against 161 MB). Each row of the array is one
        // window, ascending by length: [window_ms, count, sum_minor,
        // max_amount_minor, distinct_merchants, distinct_countries].
        r#"
DROP VIEW window_stats;
CREATE TABLE card_stats_8 (
    card_id bigint PRIMARY KEY,
    windows bigint[] NOT NULL,
    -- Event time (ms) of the change this row reflects; upserts only move it forward.
    as_of   bigint NOT NULL
) WITH (fillfactor = 70);
ALTER TABLE card_stats_8 ALTER COLUMN windows SET STATISTICS 0;
INSERT INTO card_stats_8
SELECT c.card_id,
       coalesce((SELECT array_agg(ARRAY[w.window_ms, w.count, w.sum_minor, w.max_amount_minor,
                                        w.distinct_merchants, w.distinct_countries]
                                  ORDER BY w.window_ms)
                 FROM unnest(c.window_ms, c.count, c.sum_minor, c.max_amount_minor,
                             c.distinct_merchants, c.distinct_countries)
                      AS w(window_ms, count, sum_minor, max_amount_minor, distinct_merchants,
                           distinct_countries)), '{}'),
       c.as_of
FROM card_stats c;
DROP TABLE card_stats;
ALTER TABLE card_stats_8 RENAME TO card_stats;
ALTER INDEX card_stats_8_pkey RENAME TO card_stats_pkey;
CREATE VIEW window_stats AS
SELECT c.card_id, c.windows[i][1] AS window_ms, c.windows[i][2] AS count,
       c.windows[i][3] AS sum_minor, c.windows[i][4] AS max_amount_minor,
       c.windows[i][5] AS distinct_merchants, c.windows[i][6] AS distinct_countries, c.as_of
FROM card_stats c, generate_subscripts(c.windows, 1) AS i;
"#,
    ),
    (
        9,
        "advance_checkpoint: move a worker's checkpoint on from where it is expected, or fail",
        // A commit that knows where its worker's last commit left the
        // checkpoint sends this first, in the same round trip as its writes
        // and its `COMMIT`, instead of reading the checkpoint (under lock)
        // in a round trip of its own: if the checkpoint is elsewhere (a store
        // that lost commits, another run of the job), the error aborts the
        // transaction, the `COMMIT` behind it rolls back, and the sink
        // commits again the way that reads the checkpoint first.
        r#"
CREATE FUNCTION advance_checkpoint(p_job text, p_worker int, p_from bigint, p_to bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE checkpoints SET frontier = p_to, updated_at = now()
    WHERE job = p_job AND worker = p_worker AND frontier = p_from;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the checkpoint of job % worker % is not at %', p_job, p_worker, p_from
            USING ERRCODE = 'TW001';
    END IF;
END $$;
"#,
    ),
];

/// Apply every migration `client`'s database lacks; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    migrate_up_to(client, i32::MAX).await
}

/// [`migrate`], but only the migrations up to version `last` (a store as an
/// older release left it, for testing the migrations after it).
pub async fn migrate_up_to(
    client: &mut Client,
    last: i32,
) -> Result<Vec<i32>, tokio_postgres::Error> {
    // A schema named in search_path (TRIPWIRE_PG_SCHEMA) is created on first use.
    let path: String = client.query_one("SHOW search_path", &[]).await?.get(0);
    if let Some(first) = path.split(',').map(str::trim).next() {
        if !first.is_empty() && !first.starts_with('"') && first != "public" {
            // PostgreSQL folds an unquoted name in search_path to lower case
            // (ASCII only) when it resolves it: create the schema it will look for.
            let ident = first.to_ascii_lowercase();
            // IF NOT EXISTS alone races between processes starting together.
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(7342001)", &[]).await?;
            tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{ident}\"")).await?;
            tx.commit().await?;
        }
    }
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7342001)", &[]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tripwire_migrations (
             version int PRIMARY KEY, description text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    tx.commit().await?;
    let mut applied = Vec::new();
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 <= last) {
        let tx = client.transaction().await?;
        // Serialises concurrent starts (every worker of every process migrates).
        tx.execute("SELECT pg_advisory_xact_lock(7342001)", &[]).await?;
        let done = tx
            .query_opt("SELECT 1 FROM tripwire_migrations WHERE version = $1", &[version])
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO tripwire_migrations (version, description) VALUES ($1, $2)",
                &[version, description],
            )
            .await?;
            applied.push(*version);
        }
        tx.commit().await?;
    }
    Ok(applied)
}
