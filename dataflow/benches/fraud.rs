//! In-process throughput of the whole fraud computation (all windows, aggregates and rules), no Kafka.
//!
//! `cargo bench -p tripwire-dataflow --bench fraud [-- EVENTS [CARDS]]`
//! (`TRIPWIRE_BENCH_EVENT_RATE`: events per event-time second, default 10,000)
//!
//! Runs 1 and 2 workers at the default tick (1 ms) and at a 100 ms tick, each
//! in a child process of its own so that its peak memory (VmHWM) is its own,
//! prints a table, and ends with `events_per_sec=<n>` for 2 workers at the
//! default tick. One more row runs 2 workers as a job's bounded catch-up
//! does: coalescing the statistics in epochs (closed every 20 s, the job's
//! default catch-up interval, and at the end) and stopping at the end of the
//! input instead of closing every window.

use std::process::Command;
use std::time::Instant;

use differential_dataflow::input::Input;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::probe::Probe;
use timely::dataflow::ProbeHandle;
use tripwire_dataflow::{Channel, DetectFraud, Diff, FraudConfig, InputEnd, Time, Transaction};

/// Event-time rate of the generated stream (`TRIPWIRE_BENCH_EVENT_RATE`,
/// default 10,000: a mid-size issuer's peak). The bulk topic of the job's
/// benchmarks has 1,000 (one event per tick).
static EVENTS_PER_EVENT_SECOND: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    std::env::var("TRIPWIRE_BENCH_EVENT_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
});
/// Input time advances (and the worker catches up) every this many events.
const BATCH: u64 = 2_000;
/// The longest a catch-up's epoch stays open: the default of the job's
/// `--catch-up-commit-interval-ms` (which this crate cannot read).
const CATCH_UP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if args.first().map(String::as_str) == Some("child") {
        let workers: usize = args[1].parse().unwrap();
        let events: u64 = args[2].parse().unwrap();
        let cards: u64 = args[3].parse().unwrap();
        let tick: u64 = args[4].parse().unwrap();
        let catch_up = args.get(5).is_some_and(|a| a == "catch-up");
        child(workers, events, cards, tick, catch_up);
        return;
    }
    let events: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let cards: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    println!(
        "fraud dataflow, in-process: {events} events, {cards} cards, \
         {} events per event-time second",
        *EVENTS_PER_EVENT_SECOND
    );
    println!("windows 1m/5m/1h/24h, 5 aggregates, 5 rules\n");
    println!("| tick ms | workers | as | seconds | events/s | peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    let mut default_two = 0.0;
    let runs =
        [(1u64, 1usize, false), (1, 2, false), (1, 2, true), (100, 1, false), (100, 2, false)];
    for (tick, workers, catch_up) in runs {
        let exe = std::env::current_exe().unwrap();
        let mode = if catch_up { "catch-up" } else { "real time" };
        let args = [workers.to_string(), events.to_string(), cards.to_string(), tick.to_string()];
        let out = Command::new(exe).arg("child").args(args).arg(mode).output().expect("run child");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
        let field = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(f64::NAN)
        };
        let secs = field("seconds");
        let eps = events as f64 / secs;
        let mib = field("peak_kib") / 1024.0;
        println!("| {tick} | {workers} | {mode} | {secs:.2} | {eps:.0} | {mib:.0} |");
        if (tick, workers, catch_up) == (1, 2, false) {
            default_two = eps;
        }
    }
    println!("\nevents_per_sec={default_two:.0}");
}

/// One run. As a `catch_up`, the statistics are coalesced as the job's
/// commit operator has them while results are behind (epochs of at most
/// [`CATCH_UP_INTERVAL`]), and a stand-in for that operator drops them; the
/// input's end is known, so no window is closed after it.
fn child(workers: usize, events: u64, cards: u64, tick: u64, catch_up: bool) {
    let start = Instant::now();
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index() as u64, worker.peers() as u64);
        let config = FraudConfig { tick_ms: tick, ..FraudConfig::default() };
        let base: Time = 1_700_000_000_000;
        let end = InputEnd::default();
        if catch_up {
            end.set(config.time_of(base + events * 1000 / *EVENTS_PER_EVENT_SECOND) + 1);
        }
        // `paced` paces the input: both outputs, but in a catch-up only the
        // alerts (while an epoch is open, the statistics' frontier stays at
        // its start).
        let (probe, paced) = (ProbeHandle::new(), ProbeHandle::new());
        let mut input = worker.dataflow::<Time, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Transaction, Diff>();
            let out = if catch_up {
                events.detect_fraud_to(&config, end.clone())
            } else {
                events.detect_fraud(&config)
            };
            if catch_up {
                let stats = out.stats.inner.clone();
                let mut builder = OperatorBuilder::new("Committer".to_owned(), stats.scope());
                let activator = stats.scope().activator_for(builder.operator_info().address);
                let mut changes = builder.new_input(stats, Pipeline);
                builder.build(|_| move |_| changes.for_each(|_, data| data.clear()));
                out.coalesce.enable(0, activator, CATCH_UP_INTERVAL);
                out.coalesce.catching_up(true);
            }
            if !catch_up {
                out.stats.inner.clone().probe_with(&paced);
            }
            out.stats.inner.probe_with(&probe);
            out.alerts.inner.clone().probe_with(&probe);
            out.alerts.inner.probe_with(&paced);
            input
        });
        let mut n = index;
        while n < events {
            let end = (n + BATCH * peers).min(events);
            while n < end {
                let x = transaction(n, cards, base);
                let t = config.time_of(x.event_time_ms);
                input.update_at(x, t, 1);
                n += peers;
            }
            input.advance_to(config.time_of(base + n * 1000 / *EVENTS_PER_EVENT_SECOND));
            input.flush();
            // Stay within a few batches of the input, as a source under backpressure would.
            let behind =
                base + n.saturating_sub(4 * BATCH * peers) * 1000 / *EVENTS_PER_EVENT_SECOND;
            worker.step_while(|| paced.less_than(&behind));
        }
        input.close();
        worker.step_while(|| !probe.done());
    })
    .expect("timely")
    .join();
    let secs = start.elapsed().as_secs_f64();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    println!("seconds={secs}");
    println!("peak_kib={peak}");
}

/// The `n`-th generated transaction: cards drawn by a hash of `n`, amounts mostly
/// ordinary, locations from a handful of cities, mostly the card's home.
fn transaction(n: u64, cards: u64, base: Time) -> Transaction {
    let h = mix(n);
    let card = h % cards;
    let home = mix(card) % 6;
    let city = if h >> 60 == 0 { (h >> 20) % 6 } else { home };
    const CITIES: [(i32, i32, [u8; 2]); 6] = [
        (51_507_400, -127_800, *b"GB"),
        (40_712_800, -74_006_000, *b"US"),
        (48_856_600, 2_352_200, *b"FR"),
        (35_676_200, 139_650_300, *b"JP"),
        (-33_868_800, 151_209_300, *b"AU"),
        (52_520_000, 13_405_000, *b"DE"),
    ];
    let (lat, lon, country) = CITIES[city as usize];
    Transaction {
        event_id: n,
        card_id: card,
        account_id: card / 2,
        merchant_id: (h >> 8) % 5_000,
        mcc: 5411,
        amount_minor: 100 + ((h >> 32) % 20_000) as i64,
        currency: *b"EUR",
        country,
        lat_e6: lat,
        lon_e6: lon,
        channel: Channel::Pos,
        event_time_ms: base + n * 1000 / *EVENTS_PER_EVENT_SECOND,
        device_id: None,
    }
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
