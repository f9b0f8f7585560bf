//! Test harness: seeded random streams, a driver that feeds them to the dataflow
//! over several workers and processes, and the comparison with the reference model.
#![allow(dead_code, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use timely::communication::Config as CommConfig;
use timely::dataflow::operators::capture::{Capture, Extract};
use timely::{Config, WorkerConfig};

use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::{
    Alert, CardChange, CardStats, Channel, DetectFraud, Diff, FraudConfig, InputEnd, StatKey, Time,
    Transaction,
};

/// SplitMix64: small, seedable, good enough for test streams.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x0123_4567_89AB_CDEF)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Cities (micro-degrees) far enough apart that hopping between them is impossible travel.
pub const CITIES: [(i32, i32, [u8; 2]); 6] = [
    (51_507_400, -127_800, *b"GB"),     // London
    (40_712_800, -74_006_000, *b"US"),  // New York
    (48_856_600, 2_352_200, *b"FR"),    // Paris
    (35_676_200, 139_650_300, *b"JP"),  // Tokyo
    (-33_868_800, 151_209_300, *b"AU"), // Sydney
    (52_520_000, 13_405_000, *b"DE"),   // Berlin
];

/// A test transaction with sensible defaults; tests override what matters.
pub fn tx(event_id: u64, card_id: u64, event_time_ms: Time) -> Transaction {
    let (lat_e6, lon_e6, country) = CITIES[0];
    Transaction {
        event_id,
        card_id,
        account_id: card_id / 2,
        merchant_id: 1,
        mcc: 5411,
        amount_minor: 2_000,
        currency: *b"EUR",
        country,
        lat_e6,
        lon_e6,
        channel: Channel::Pos,
        event_time_ms,
        device_id: None,
    }
}

/// An input as a source sees it: partitions, each in arrival order, and the lateness bound.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub config: FraudConfig,
    pub partitions: Vec<Vec<Transaction>>,
    pub lateness_ms: Time,
}

impl Scenario {
    /// One partition holding `events` in the given order, with a generous lateness bound.
    pub fn in_order(config: FraudConfig, mut events: Vec<Transaction>) -> Self {
        events.sort_by_key(|x| (x.event_time_ms, x.event_id));
        Scenario { config, partitions: vec![events], lateness_ms: 0 }
    }

    /// The events the source accepts: per partition, those not older than the
    /// partition's largest earlier event time minus the lateness bound.
    pub fn accepted(&self) -> Vec<Transaction> {
        let mut out = Vec::new();
        for part in &self.partitions {
            let mut max_seen: Option<Time> = None;
            for x in part {
                let late = max_seen.is_some_and(|m| x.event_time_ms + self.lateness_ms < m);
                if !late {
                    out.push(x.clone());
                }
                max_seen = Some(max_seen.map_or(x.event_time_ms, |m| m.max(x.event_time_ms)));
            }
        }
        out
    }

    pub fn late_count(&self) -> usize {
        self.partitions.iter().map(|p| p.len()).sum::<usize>() - self.accepted().len()
    }
}

/// What the dataflow emitted, as raw updates.
#[derive(Default, Debug)]
pub struct Outputs {
    pub stats: Vec<((u64, CardChange), Time, Diff)>,
    pub alerts: Vec<(Alert, Time, Diff)>,
}

/// How the dataflow runs: `processes` × `workers` (threads per process).
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub processes: usize,
    pub workers: usize,
}

/// Run the dataflow on `scenario` and collect every output update.
pub fn run_dataflow(scenario: &Scenario, topology: Topology, seed: u64) -> Outputs {
    run_dataflow_to(scenario, topology, seed, None)
}

/// [`run_dataflow`] as a bounded run whose input ends at `end`
/// ([`DetectFraud::detect_fraud_to`]), when given.
pub fn run_dataflow_to(
    scenario: &Scenario,
    topology: Topology,
    seed: u64,
    end: Option<Time>,
) -> Outputs {
    let (stats_tx, stats_rx) = mpsc::channel();
    let (alerts_tx, alerts_rx) = mpsc::channel();
    let stats_tx = Arc::new(Mutex::new(stats_tx));
    let alerts_tx = Arc::new(Mutex::new(alerts_tx));
    let addresses: Vec<String> =
        (0..topology.processes).map(|_| format!("127.0.0.1:{}", free_port())).collect();

    let mut handles = Vec::new();
    for process in 0..topology.processes {
        let communication = if topology.processes == 1 {
            CommConfig::Process(topology.workers)
        } else {
            CommConfig::Cluster {
                threads: topology.workers,
                process,
                addresses: addresses.clone(),
                report: false,
                zerocopy: false,
            }
        };
        let config = Config { communication, worker: WorkerConfig::default() };
        let scenario = scenario.clone();
        let (stats_tx, alerts_tx) = (stats_tx.clone(), alerts_tx.clone());
        handles.push(std::thread::spawn(move || {
            timely::execute(config, move |worker| {
                let stats_tx = stats_tx.lock().unwrap().clone();
                let alerts_tx = alerts_tx.lock().unwrap().clone();
                let fraud = scenario.config.clone();
                let input = worker.dataflow::<Time, _, _>(|scope| {
                    let (input, events) = scope.new_collection::<Transaction, Diff>();
                    let out = match end {
                        Some(t) => {
                            let input_end = InputEnd::default();
                            input_end.set(t);
                            events.detect_fraud_to(&fraud, input_end)
                        }
                        None => events.detect_fraud(&fraud),
                    };
                    out.stats.inner.capture_into(stats_tx);
                    out.alerts.inner.capture_into(alerts_tx);
                    input
                });
                feed(worker, input, &scenario, seed);
            })
            .expect("timely runs")
            .join()
            .into_iter()
            .for_each(|r| r.expect("worker finished"));
        }));
    }
    for h in handles {
        h.join().expect("process thread");
    }
    drop(stats_tx);
    drop(alerts_tx);
    Outputs {
        stats: stats_rx.extract().into_iter().flat_map(|(_, b)| b).collect(),
        alerts: alerts_rx.extract().into_iter().flat_map(|(_, b)| b).collect(),
    }
}

/// Feed the partitions this worker owns (`p % peers == index`) in arrival order,
/// in random batch sizes, holding the input at the partitions' common watermark.
fn feed(
    worker: &mut timely::worker::Worker,
    mut input: differential_dataflow::input::InputSession<Time, Transaction, Diff>,
    scenario: &Scenario,
    seed: u64,
) {
    let (index, peers) = (worker.index(), worker.peers());
    let cfg = &scenario.config;
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(index as u64));
    let owned: Vec<usize> = (0..scenario.partitions.len()).filter(|p| p % peers == index).collect();
    let mut pos = vec![0usize; owned.len()];
    let mut max_seen: Vec<Option<Time>> = vec![None; owned.len()];
    loop {
        let live: Vec<usize> =
            (0..owned.len()).filter(|&i| pos[i] < scenario.partitions[owned[i]].len()).collect();
        if live.is_empty() {
            break;
        }
        let i = live[rng.below(live.len() as u64) as usize];
        let part = &scenario.partitions[owned[i]];
        let batch = 1 + rng.below(8) as usize;
        for x in part[pos[i]..(pos[i] + batch).min(part.len())].iter() {
            let late = max_seen[i].is_some_and(|m| x.event_time_ms + scenario.lateness_ms < m);
            if !late {
                input.update_at(x.clone(), cfg.time_of(x.event_time_ms), 1);
            }
            max_seen[i] = Some(max_seen[i].map_or(x.event_time_ms, |m| m.max(x.event_time_ms)));
        }
        pos[i] = (pos[i] + batch).min(part.len());
        // Watermark: min over unfinished owned partitions of (max seen - L); a
        // partition not yet started holds it at its start.
        let watermark = (0..owned.len())
            .filter(|&i| pos[i] < scenario.partitions[owned[i]].len())
            .map(|i| max_seen[i].map_or(0, |m| m.saturating_sub(scenario.lateness_ms)))
            .min();
        if let Some(w) = watermark {
            let t = cfg.time_of(w);
            if t > *input.time() {
                input.advance_to(t);
            }
        }
        if rng.chance(30) {
            input.flush();
            worker.step();
        }
    }
    // Closing the input lets the frontier run out; timely steps the worker
    // until the dataflow completes once this closure returns.
    input.close();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Compare accumulated outputs with the reference at every time where
/// anything changes (every event time, every window exit) and just after.
pub fn assert_matches_reference(scenario: &Scenario, outputs: &Outputs, label: &str) {
    let accepted = scenario.accepted();
    let cfg = &scenario.config;
    let reference = Reference::new(cfg, &accepted);
    let mut queries: BTreeSet<Time> = BTreeSet::new();
    let mut lengths: Vec<Time> = cfg.windows.clone();
    lengths.extend([
        cfg.amount_spike.window_ms,
        cfg.card_testing.window_ms,
        cfg.country_hopping.window_ms,
        cfg.travel.lookback_ms,
    ]);
    for x in &accepted {
        let t = cfg.time_of(x.event_time_ms);
        queries.insert(t);
        queries.insert(t.saturating_sub(1));
        for w in &lengths {
            queries.insert(t + w - 1);
            queries.insert(t + w);
        }
    }
    let mut stats = outputs.stats.clone();
    stats.sort_by_key(|(_, t, _)| *t);
    let changes: BTreeSet<(u64, Time)> =
        stats.iter().map(|((card, _), t, _)| (*card, *t)).collect();
    assert_eq!(changes.len(), stats.len(), "{label}: a card changed twice at one time");
    let mut alerts = outputs.alerts.clone();
    alerts.sort_by_key(|(_, t, _)| *t);
    let (mut si, mut ai) = (0, 0);
    // Each card's statistics as of the query time: its latest change.
    let mut latest: BTreeMap<u64, CardStats> = BTreeMap::new();
    let mut acc_alerts: BTreeMap<Alert, Diff> = BTreeMap::new();
    let mut configured = cfg.windows.clone();
    configured.sort_unstable();
    configured.dedup();
    for q in queries {
        while si < stats.len() && stats[si].1 <= q {
            let ((card, change), t, d) = stats[si];
            assert_eq!(d, 1, "{label}: card {card}'s change at {t} has multiplicity {d}");
            let before = latest.get(&card).copied().unwrap_or_default();
            assert_eq!(
                change.existed,
                !before.is_empty(),
                "{label}: card {card}'s change at {t} misstates whether it had statistics"
            );
            let windows: Vec<Time> = change.stats.windows().map(|(w, _)| w).collect();
            assert_eq!(
                windows, configured,
                "{label}: card {card}'s change at {t} lists {windows:?}"
            );
            let same = |a: &CardStats, b: &CardStats| a.non_empty().eq(b.non_empty());
            assert!(
                !same(&before, &change.stats),
                "{label}: card {card}'s change at {t} changes nothing"
            );
            latest.insert(card, change.stats);
            si += 1;
        }
        while ai < alerts.len() && alerts[ai].1 <= q {
            *acc_alerts.entry(alerts[ai].0.clone()).or_default() += alerts[ai].2;
            ai += 1;
        }
        acc_alerts.retain(|_, d| *d != 0);
        let got: BTreeMap<StatKey, i64> =
            latest.iter().flat_map(|(card, s)| s.stat_keys(*card)).collect();
        let want = reference.stats_at(q);
        if got != want {
            let missing: Vec<_> =
                want.iter().filter(|(k, v)| got.get(k) != Some(v)).take(5).collect();
            let extra: Vec<_> =
                got.iter().filter(|(k, v)| want.get(k) != Some(v)).take(5).collect();
            panic!("{label}: stats differ at time {q}: missing {missing:?}, extra {extra:?}");
        }
        let bad_alerts: Vec<_> = acc_alerts.iter().filter(|(_, d)| **d != 1).collect();
        assert!(
            bad_alerts.is_empty(),
            "{label}: alerts with multiplicity != 1 at {q}: {bad_alerts:?}"
        );
        let got: BTreeSet<Alert> = acc_alerts.keys().cloned().collect();
        let want = reference.alerts_until(q);
        if got != want {
            let missing: Vec<_> = want.difference(&got).take(5).collect();
            let extra: Vec<_> = got.difference(&want).take(5).collect();
            panic!("{label}: alerts differ at time {q}: missing {missing:?}, extra {extra:?}");
        }
    }
}
