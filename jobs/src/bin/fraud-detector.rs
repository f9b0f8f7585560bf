//! `fraud-detector`: the main job. Kafka source → fraud dataflow → PostgreSQL and Redis, with dead letters to Kafka.
//!
//! ```text
//! fraud-detector [--config job.toml] [--topic transactions] [-w WORKERS] [-n PROCESSES -p INDEX -h HOSTFILE]
//! ```
//!
//! Timely's cluster arguments are accepted as timely spells them (`-w`, `-n`,
//! `-p`, `-h`), so `tripwire launch` can start one process per line of a hosts
//! file. Addresses come from the `TRIPWIRE_*` environment (see the README).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser};
use serde::{Deserialize, Serialize};
use tripwire_connectors::avro::Limits;
use tripwire_connectors::commit::{finish_current_commits, frontier_sinks, SinkInputs};
use tripwire_connectors::confluent_registry::ConfluentRegistry;
use tripwire_connectors::dead_letter_sink::{committed_late, dead_letter_sink, Confirm};
use tripwire_connectors::kafka_admin::{ensure_topic, partition_count};
use tripwire_connectors::kafka_source::{kafka_source, SourceConfig};
use tripwire_connectors::metrics::serve;
use tripwire_connectors::postgres::migrations::migrate;
use tripwire_connectors::postgres::{
    committed_frontier as pg_committed, fit_checkpoints, high_water as pg_high_water, pg_committer,
    record_decisions, recorded_decisions, resume_point, PgSinkConfig, ResumePoint,
};
use tripwire_connectors::redis_sink::{
    committed_frontier as redis_committed, fit_frontiers,
    record_decisions as record_redis_decisions, recorded_decisions as redis_decisions,
    redis_committer, RedisSinkConfig,
};
use tripwire_connectors::registry::{EmbeddedRegistry, SchemaRegistry};
use tripwire_connectors::Endpoints;
use tripwire_dataflow::{DetectFraud, FraudConfig, Time};
use tripwire_jobs::layered::file_args;

/// Tripwire's fraud detector.
///
/// Settings come from flags, then `TRIPWIRE_*` variables, then the `--config`
/// file's `[job]` table (keys are the flags' long names), then defaults.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(version, about, disable_help_flag = true, args_override_self = true)]
struct Args {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    #[serde(skip)]
    help: Option<bool>,
    /// A TOML file: `[job]` settings (any flag below by its long name) and a
    /// `[fraud]` table (windows, tick, rule thresholds).
    #[arg(long, env = "TRIPWIRE_JOB_CONFIG")]
    #[serde(skip)]
    config: Option<String>,
    /// Print the settings in effect, as a TOML file would hold them, and exit.
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
    /// The job's name in checkpoints.
    #[arg(long, env = "TRIPWIRE_JOB", default_value = "fraud-detector")]
    job: String,
    /// Topic of Avro transactions.
    #[arg(long, env = "TRIPWIRE_TOPIC", default_value = "transactions")]
    topic: String,
    /// Topic for dead letters.
    #[arg(long, env = "TRIPWIRE_DLQ_TOPIC", default_value = "transactions-dlq")]
    dlq_topic: String,
    /// Allowed out-of-orderness within a partition, ms.
    #[arg(long, default_value_t = 5_000)]
    lateness_ms: Time,
    /// Seconds after which a quiet partition stops holding results back; 0 = never.
    #[arg(long, default_value_t = 30)]
    idle_timeout_s: u64,
    /// Commit to PostgreSQL at most this often, ms.
    #[arg(long, default_value_t = 500)]
    commit_interval_ms: u64,
    /// Commit at most this often while results are more than a minute behind
    /// the wall clock (catching up), ms; larger batches mean far fewer rows
    /// (a card written once per batch, not once per change). What a batch
    /// holds meanwhile is bounded by the cards it changes.
    #[arg(long, default_value_t = 20_000)]
    catch_up_commit_interval_ms: u64,
    /// Read the topic to its current end, commit, and exit (bulk loads, demos, tests).
    #[arg(long)]
    bounded: bool,
    /// How far back in event time a copy of an accepted event id (on the same
    /// partition) is a duplicate, ms. A restart re-reads this much more.
    #[arg(long, default_value_t = 3_600_000)]
    dedup_horizon_ms: Time,
    /// librdkafka properties for the source's consumers, over Tripwire's
    /// own: `key=value`, comma-separated (e.g. `fetch.wait.max.ms=5`).
    #[arg(long, default_value = "")]
    consumer_properties: String,
    /// Accept event times of any age (a backfill of history); otherwise an
    /// event more than a week behind its Kafka timestamp is a dead letter.
    #[arg(long)]
    backfill: bool,
    /// Make every PostgreSQL commit wait for its flush to disk. Off by
    /// default: a commit a crash loses is noticed on reconnect (the store is
    /// behind what was acknowledged) and replayed, so results stay exact.
    #[arg(long, env = "TRIPWIRE_SYNCHRONOUS_COMMIT", default_value_t = false, action = clap::ArgAction::Set)]
    synchronous_commit: bool,
    /// Large PostgreSQL commits (a catch-up's batches, copied in) of this
    /// process's workers that may run at once; 0 for no limit. One by
    /// default: where the stores share the machine's cores, a catch-up's
    /// last batches copied side by side left Redis's readers (the
    /// authorisation service) waiting for a core, and one at a time took no
    /// longer on two cores.
    #[arg(long, env = "TRIPWIRE_PG_BULK_WRITERS", default_value_t = 1)]
    pg_bulk_writers: usize,
    /// Records per partition between two progress samples (restart points).
    #[arg(long, default_value_t = 5_000)]
    sample_every: u64,
    /// Archive every accepted event in PostgreSQL's `raw_transactions`.
    #[arg(long, env = "TRIPWIRE_ARCHIVE", default_value_t = true, action = clap::ArgAction::Set)]
    archive: bool,
    /// Backpressure: most of what memory may hold on a worker's account
    /// before its source pauses: events it read that have not yet passed the
    /// windows and rules (archived: that PostgreSQL has not committed), plus
    /// alerts PostgreSQL has not committed. Statistics waiting for a commit
    /// do not count (one row per card, however many events changed them).
    /// 0 = no bound.
    #[arg(long, default_value_t = 2_000_000)]
    max_uncommitted: u64,
    /// Timely: worker threads per process.
    #[arg(short = 'w', long, default_value_t = 1)]
    workers: usize,
    /// Timely: number of processes.
    #[arg(short = 'n', long, default_value_t = 1)]
    processes: usize,
    /// Timely: this process's index.
    #[arg(short = 'p', long, default_value_t = 0)]
    process: usize,
    /// Timely: hosts file, one `host:port` per process.
    #[arg(short = 'h', long)]
    hostfile: Option<String>,
    /// Look writer schemas up in the schema registry at `TRIPWIRE_REGISTRY_URL`
    /// (Confluent REST API) instead of the embedded `schemas/` manifest.
    #[arg(long, env = "TRIPWIRE_SCHEMA_REGISTRY")]
    schema_registry: bool,
    /// Serve /metrics, /health and /ready on this port plus the process index; 0 = not at all.
    #[arg(long, env = "TRIPWIRE_METRICS_PORT", default_value_t = 9250)]
    metrics_port: u16,
    /// Log as JSON lines.
    #[arg(long, env = "TRIPWIRE_LOG_JSON")]
    log_json: bool,
    /// CPU priority of the job's threads while it catches up (results more
    /// than a minute behind the wall clock): Linux nice, 0-19, never below
    /// what the job was started with. On a machine shared with PostgreSQL and
    /// Redis, their readers (an authorisation service) are then served before
    /// a catch-up's batches; in real time the job runs at the priority it was
    /// started with. Going back needs CAP_SYS_NICE or RLIMIT_NICE (systemd:
    /// `AmbientCapabilities=CAP_SYS_NICE` or `LimitNICE=`); without either the
    /// job keeps this priority after its first catch-up. 0 = never lowered.
    #[arg(long, env = "TRIPWIRE_NICE", default_value_t = 10,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    nice: i32,
}

#[derive(Deserialize, Default)]
struct FileConfig {
    #[serde(default)]
    job: Option<toml::Table>,
    #[serde(default)]
    fraud: Option<FraudConfig>,
}

/// What `--print-config` prints.
#[derive(Serialize)]
struct Effective<'a> {
    job: &'a Args,
    fraud: &'a FraudConfig,
}

/// `key=value,key=value` as pairs; empty for an empty text.
fn key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().into(), v.trim().into())),
            _ => Err(format!("`{kv}` is not key=value")),
        })
        .collect()
}

fn main() -> Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let file = match Args::parse_from(&argv).config {
        Some(path) => {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            toml::from_str::<FileConfig>(&text).with_context(|| format!("parsing {path}"))?
        }
        None => FileConfig::default(),
    };
    let layered = file_args(&Args::command(), &argv, &file.job.unwrap_or_default(), |var| {
        std::env::var(var).ok()
    })
    .map_err(|e| anyhow::anyhow!("config file: {e}"))?;
    let args = Args::parse_from(layered);
    let fraud = file.fraud.unwrap_or_default();
    if let Err(e) = fraud.validate() {
        bail!("invalid [fraud] config: {e}");
    }
    let consumer_properties = key_values(&args.consumer_properties)
        .map_err(|e| anyhow::anyhow!("--consumer-properties: {e}"))?;
    if args.print_config {
        print!("{}", toml::to_string(&Effective { job: &args, fraud: &fraud })?);
        return Ok(());
    }
    // Before any thread starts: a thread probes whether the job may raise
    // its priority again after a catch-up.
    let priority = tripwire_connectors::priority::configure(args.nice);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    // Every line of this process carries its index; worker threads add theirs.
    let _process = tracing::info_span!("job", process = args.process).entered();
    match priority {
        Ok(plan) if plan.catching_up > plan.usual && !plan.can_raise => tracing::warn!(
            nice = plan.catching_up,
            "this process may not raise its CPU priority again (that needs CAP_SYS_NICE or RLIMIT_NICE >= {}): \
             after its first catch-up it keeps nice {}",
            20 - plan.usual,
            plan.catching_up
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "the job's CPU priority is left as it is"),
    }
    let endpoints = Endpoints::from_env()?;
    // SIGTERM / SIGINT: finish the commits under way, start no new one, exit.
    // What was not committed is replayed by the next run.
    std::thread::spawn(|| {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let signal = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        });
        let clean = finish_current_commits(Duration::from_secs(30));
        tracing::info!(signal, clean, "stopping: commits under way finished");
        std::process::exit(if signal == "SIGTERM" { 143 } else { 130 });
    });
    // The supervisor (`tripwire launch`) says how often it restarted the group.
    let restarts = std::env::var("TRIPWIRE_RESTARTS").ok().and_then(|v| v.parse().ok());
    tripwire_connectors::metrics::group_restarts().set(restarts.unwrap_or(0));
    let source_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if args.metrics_port > 0 {
        let port = args.metrics_port as usize + args.process;
        let ready = source_ready.clone();
        // Ready: the source is assigned and no sink's circuit breaker is open.
        let served = serve(&format!("0.0.0.0:{port}"), args.process, move || {
            ready.load(std::sync::atomic::Ordering::Acquire) && no_breaker_open()
        });
        match served {
            Ok(addr) => tracing::info!(%addr, "serving /metrics, /health, /ready"),
            Err(e) => tracing::warn!(port, error = %e, "cannot serve metrics"),
        }
    }
    let communication = if args.processes > 1 {
        let Some(path) = &args.hostfile else { bail!("-n {} needs -h HOSTFILE", args.processes) };
        let addresses: Vec<String> = std::fs::read_to_string(path)
            .with_context(|| format!("reading hosts file {path}"))?
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default().trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if addresses.len() != args.processes {
            bail!(
                "hosts file {path} names {} processes, -n says {}",
                addresses.len(),
                args.processes
            );
        }
        timely::CommunicationConfig::Cluster {
            threads: args.workers,
            process: args.process,
            addresses,
            report: false,
            zerocopy: false,
        }
    } else {
        timely::CommunicationConfig::Process(args.workers)
    };
    // Resume where the job's sinks have committed, if they ever did: each sink
    // drops what it already has, the source re-reads what the slower one needs.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Both stores' checkpoints decide where the source starts, so a start
    // during an outage waits for the store to answer (a running job keeps
    // committing to PostgreSQL through a Redis outage; a starting one cannot
    // know what Redis lacks until it can ask).
    let mut wait = Duration::from_millis(200);
    let (pg_frontier, redis_frontier, mut resume, pg_high_water) = loop {
        match rt.block_on(read_checkpoints(
            &endpoints,
            &args.job,
            &args.topic,
            &fraud,
            args.workers * args.processes,
            args.dedup_horizon_ms,
        )) {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    retry_in_ms = wait.as_millis() as u64,
                    "cannot read the job's checkpoints yet; waiting for the stores"
                );
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    if let Some(r) = resume.as_mut() {
        // Late letters committed past the restart points record decisions the
        // stores may not have recorded yet (a crash between the two commits):
        // the replay finds those records late again.
        let late = tripwire_connectors::kafka_admin::while_starting(|| {
            committed_late(
                &endpoints.kafka_bootstrap,
                &args.dlq_topic,
                &args.topic,
                &args.job,
                &r.start_offsets,
            )
        })
        .context("reading the dead-letter topic's committed late letters")?;
        for (p, offsets) in late {
            tracing::info!(
                partition = p,
                records = offsets.len(),
                "late again: their letters are committed"
            );
            r.resume.partitions.entry(p).or_default().late = offsets;
        }
    }
    if let Some(r) = &resume {
        tracing::info!(
            frontier = r.frontier,
            ?pg_frontier,
            ?redis_frontier,
            skip_below = r.resume.skip_below,
            partitions_resumed = r.start_offsets.len(),
            "resuming from checkpoints"
        );
    }
    let source = SourceConfig {
        start_offsets: resume.as_ref().map(|r| r.start_offsets.clone()).unwrap_or_default(),
        resume: resume.map(|r| r.resume),
        group_id: args.job.clone(),
        lateness_ms: args.lateness_ms,
        idle_timeout: (args.idle_timeout_s > 0).then(|| Duration::from_secs(args.idle_timeout_s)),
        bounded: args.bounded,
        sample_every: args.sample_every,
        max_in_flight: (args.max_uncommitted > 0).then_some(args.max_uncommitted),
        dedup_horizon_ms: args.dedup_horizon_ms,
        consumer_properties,
        limits: Limits {
            max_age_ms: (!args.backfill).then_some(7 * 24 * 3_600_000),
            ..Limits::default()
        },
        ..SourceConfig::new(&endpoints.kafka_bootstrap, &args.topic)
    };
    let sink = PgSinkConfig {
        conninfo: endpoints.postgres_config(),
        job: args.job.clone(),
        commit_interval: Duration::from_millis(args.commit_interval_ms),
        catch_up_interval: Duration::from_millis(args.catch_up_commit_interval_ms),
        progress: None,
        progress_settled: None,
        late: None,
        resume_from: pg_frontier.unwrap_or(0),
        report_to: None,
        produce_times: None,
        decisions: None,
        topic: args.topic.clone(),
        end: None,
        synchronous_commit: args.synchronous_commit,
        high_water: pg_high_water,
        bulk_writers: (args.pg_bulk_writers > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(args.pg_bulk_writers))),
    };
    let read_model = RedisSinkConfig {
        commit_interval: Duration::from_millis(args.commit_interval_ms),
        catch_up_interval: Duration::from_millis(args.catch_up_commit_interval_ms),
        resume_from: redis_frontier.unwrap_or(0),
        topic: args.topic.clone(),
        ..RedisSinkConfig::new(endpoints.redis_url(), args.job.clone())
    };
    tracing::info!(job = %args.job, topic = %args.topic, workers = args.workers,
        processes = args.processes, process = args.process, "starting");
    let bootstrap = endpoints.kafka_bootstrap.clone();
    let dlq = args.dlq_topic.clone();
    let archive = args.archive;
    // The dead-letter topic is the job's own output: it creates it, with as
    // many partitions as the input (a missing input is the source's error to report).
    let partitions = partition_count(&bootstrap, &args.topic)
        .with_context(|| format!("reading topic {}", args.topic))?
        .unwrap_or(1);
    let topic = args.topic.clone();
    let job = args.job.clone();
    ensure_topic(&bootstrap, &dlq, partitions as i32)
        .with_context(|| format!("creating topic {dlq}"))?;
    let registry: Arc<dyn SchemaRegistry> = if args.schema_registry {
        Arc::new(ConfluentRegistry::new(&endpoints.registry_url))
    } else {
        Arc::new(EmbeddedRegistry::new().context("embedded schemas")?)
    };
    let source_ready = source_ready.clone();
    let process = args.process;
    let guards = timely::execute(
        timely::Config { communication, worker: timely::WorkerConfig::default() },
        move |worker| {
            let _span = tracing::info_span!("worker", process, worker = worker.index()).entered();
            let registry = registry.clone();
            let (state, coalesce) = worker.dataflow::<Time, _, _>(|scope| {
                let input = match kafka_source(scope, &source, &fraud, registry) {
                    Ok(input) => input,
                    Err(e) => {
                        // Not an invariant broken in the code: the input cannot be read as the job needs.
                        tracing::error!(error = %e, "cannot start the Kafka source");
                        eprintln!("fraud-detector: {e}");
                        std::process::exit(2);
                    }
                };
                source_ready.store(true, std::sync::atomic::Ordering::Release);
                // Restart points reach PostgreSQL once the dead letters before them are delivered.
                let confirmed = tripwire_connectors::kafka_source::Progress::default();
                let confirm = Confirm {
                    taken: input.progress.clone(),
                    confirmed: confirmed.clone(),
                    settled: Default::default(),
                };
                let settled = confirm.settled.clone();
                if let Err(e) = dead_letter_sink(
                    input.dead_letters,
                    &bootstrap,
                    &dlq,
                    &topic,
                    &job,
                    partitions,
                    Some(confirm),
                    Some(Box::new(|e| cannot_start_dead_letters(e))),
                ) {
                    cannot_start_dead_letters(&e);
                }
                let archived = archive.then(|| input.events.clone());
                // A bounded run computes nothing past its input's end.
                let out = input.events.detect_fraud_to(&fraud, input.end.clone());
                // The source's restart points and late records go with the
                // PostgreSQL commits, which also release its backpressure.
                let sink = PgSinkConfig {
                    progress: Some(confirmed),
                    progress_settled: Some(settled),
                    late: Some(input.late),
                    report_to: Some(input.feedback),
                    produce_times: Some(input.produce_times),
                    decisions: Some(input.decisions.clone()),
                    end: Some(input.end.clone()),
                    ..sink.clone()
                };
                // Redis is the read model: it keeps up on its own, folding
                // batches while it is behind, and never holds the source back.
                let read_model = RedisSinkConfig {
                    end: Some(input.end),
                    decisions: Some(input.decisions),
                    ..read_model.clone()
                };
                // One commit operator for both stores: it consolidates each
                // change once for both, and each store's committer commits on
                // its own.
                let index = scope.index();
                let committers = vec![
                    pg_committer(index, &sink, archived.is_some()),
                    redis_committer(index, &read_model),
                ];
                let inputs = SinkInputs {
                    stats: out.stats,
                    alerts: out.alerts,
                    archive: archived,
                    coalesce: Some(out.coalesce.clone()),
                };
                frontier_sinks(inputs, committers);
                (out.state, out.coalesce)
            });
            // Drive the worker here, to publish its state's size as it goes.
            let index = worker.index().to_string();
            let gauge = |what: &str| {
                tripwire_connectors::metrics::state_size().with_label_values(&[&index, what])
            };
            let (cards, entries, due) = (gauge("cards"), gauge("entries"), gauge("due"));
            let coalesced =
                tripwire_connectors::metrics::coalesced_changes().with_label_values(&[&index]);
            while worker.step_or_park(Some(Duration::from_millis(100))) {
                let s = state.get();
                cards.set(s.cards as i64);
                entries.set(s.entries as i64);
                due.set(s.due as i64);
                coalesced.inc_by(coalesce.folded().saturating_sub(coalesced.get()));
            }
        },
    )
    .map_err(|e| anyhow::anyhow!("timely: {e}"))?;
    for r in guards.join() {
        r.map_err(|e| anyhow::anyhow!("worker failed: {e}"))?;
    }
    tracing::info!("finished");
    Ok(())
}

/// The dead-letter sink cannot start, before the dataflow runs or on its
/// own thread after: the job cannot keep its promise that no bad record is
/// lost, so it stops as it does when its input cannot be read.
fn cannot_start_dead_letters(e: &tripwire_connectors::dead_letter_sink::DeadLetterError) -> ! {
    tracing::error!(error = %e, "cannot start the dead-letter sink");
    eprintln!("fraud-detector: cannot start the dead-letter sink: {e}");
    std::process::exit(2);
}

/// Both stores' committed frontiers and, if either ever committed, where to resume.
async fn read_checkpoints(
    endpoints: &Endpoints,
    job: &str,
    topic: &str,
    fraud: &FraudConfig,
    workers: usize,
    dedup_horizon: Time,
) -> Result<(Option<Time>, Option<Time>, Option<ResumePoint>, Time)> {
    let (mut client, conn) =
        tokio_postgres::connect(&endpoints.postgres_config(), tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL")?;
    tokio::spawn(conn);
    migrate(&mut client).await.context("migrating PostgreSQL")?;
    // The tables of a schema hold one job's results: a second job there would
    // overwrite them. Jobs side by side get schemas of their own.
    let others: Vec<String> = client
        .query("SELECT DISTINCT job FROM checkpoints WHERE job <> $1", &[&job])
        .await
        .context("reading the schema's jobs")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !others.is_empty() {
        eprintln!(
            "fraud-detector: this PostgreSQL schema already holds the results of job {}; give job {job} a schema of its own (TRIPWIRE_PG_SCHEMA)",
            others.join(", ")
        );
        std::process::exit(2);
    }
    fit_checkpoints(&mut client, job, workers)
        .await
        .context("fitting PostgreSQL checkpoints (a rescale waits for the sessions of the job's earlier run to end)")?;
    fit_frontiers(&endpoints.redis_url(), job, workers).await.context("fitting Redis frontiers")?;
    let high_water = pg_high_water(&client, job).await.context("PostgreSQL high water")?;
    let pg = pg_committed(&client, job).await.context("PostgreSQL checkpoints")?;
    let redis = redis_committed(&endpoints.redis_url(), job).await.context("Redis frontiers")?;
    // A store that never committed (a new Redis, say) needs everything: then
    // the source replays from the start, and each sink still drops what its
    // own store already holds.
    let from = match (pg, redis) {
        (None, None) => return Ok((pg, redis, None, high_water)),
        (pg, redis) => pg.unwrap_or(0).min(redis.unwrap_or(0)),
    };
    // The source's decisions, as far as either store knows them (each
    // records those its results depend on), recorded again in both, so that
    // neither store's loss can make a replay decide differently from what
    // the other holds.
    let mut decisions =
        recorded_decisions(&client, job, topic).await.context("PostgreSQL source decisions")?;
    decisions.merge(
        redis_decisions(&endpoints.redis_url(), job, topic)
            .await
            .context("Redis source decisions")?,
    );
    record_decisions(&client, job, topic, &decisions)
        .await
        .context("recording source decisions in PostgreSQL")?;
    record_redis_decisions(&endpoints.redis_url(), job, topic, &decisions)
        .await
        .context("recording source decisions in Redis")?;
    let reach = (fraud.max_window(), fraud.tick_ms, dedup_horizon);
    let resume = resume_point(&client, job, topic, from, reach, &decisions)
        .await
        .context("restart offsets")?;
    Ok((pg, redis, Some(resume), high_water))
}

/// Whether every sink's circuit breaker in this process is closed.
fn no_breaker_open() -> bool {
    prometheus::gather()
        .iter()
        .filter(|f| f.name() == "tripwire_sink_breaker_state")
        .flat_map(|f| f.get_metric())
        .all(|m| m.get_gauge().get_value() == 0.0)
}

#[cfg(test)]
mod tests {
    use super::key_values;

    #[test]
    fn consumer_properties_are_comma_separated_key_values() {
        assert_eq!(key_values("").unwrap(), Vec::<(String, String)>::new());
        assert_eq!(
            key_values("fetch.wait.max.ms=5, fetch.min.bytes = 1024,").unwrap(),
            vec![
                ("fetch.wait.max.ms".to_string(), "5".to_string()),
                ("fetch.min.bytes".to_string(), "1024".to_string())
            ]
        );
        assert!(key_values("fetch.wait.max.ms").unwrap_err().contains("not key=value"));
        assert!(key_values("=5").is_err());
    }
}
