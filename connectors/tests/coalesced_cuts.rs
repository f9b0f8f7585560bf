//! While results are caught up on, the window operator coalesces each card's
//! changes within an epoch into one, and the commit operator cuts batches
//! around epochs. Every batch must still be exact: after it, a store holds
//! exactly the reference model's statistics just below the batch's
//! frontier, and the batch says correctly which of its cards the store had
//! no statistics for before it.
//!
//! Seeded random streams far behind the wall clock (so results are always
//! being caught up on), on 1 to 3 workers, with catch-up intervals from
//! nothing to an hour, unbounded and bounded runs. Each worker commits to two
//! stores through one commit operator: one starts empty, one resumes in the
//! middle of the stream (holding the reference's statistics there), so that
//! epochs must not open below the higher resume point.
//!
//! In process, no stack needed: the stores are recordings.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use differential_dataflow::input::Input;
use tripwire_connectors::commit::{committer, frontier_sinks, Batch, CommitOptions, SinkInputs};
use tripwire_connectors::commit::{InputEnd, Store};
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::{
    CardStats, Channel, DetectFraud, Diff, FraudConfig, StatKey, Time, Transaction,
};

// The dataflow tests' harness, for its seeded random numbers.
#[path = "../../dataflow/tests/common/mod.rs"]
mod harness;
use harness::Rng;

/// A batch as a store saw it.
#[derive(Clone, Debug)]
struct Recorded {
    frontier: Time,
    upserts: Vec<(u64, CardStats)>,
    deletes: Vec<u64>,
    absent_before: Vec<u64>,
}

/// A store that records its batches and holds the frontier it is told to.
#[derive(Clone)]
struct Recording {
    batches: Arc<Mutex<Vec<Recorded>>>,
    held: Option<Time>,
}

impl Store for Recording {
    type Conn = ();
    async fn connect(&mut self) -> Result<(), String> {
        Ok(())
    }
    async fn stored_frontier(&mut self, _: &mut ()) -> Result<Option<Time>, String> {
        Ok(self.held)
    }
    async fn commit(&mut self, _: &mut (), batch: &Batch) -> Result<(), String> {
        self.batches.lock().unwrap().push(Recorded {
            frontier: batch.frontier,
            upserts: batch.upserts.iter().map(|(c, s, _)| (*c, *s)).collect(),
            deletes: batch.deletes.iter().map(|(c, _)| *c).collect(),
            absent_before: batch.absent_before.clone(),
        });
        Ok(())
    }
}

/// Events over a few minutes of event time in 1970 (far behind the wall
/// clock), a few cards so that windows fill and empty, bursts and gaps.
fn stream(seed: u64) -> Vec<Transaction> {
    let mut rng = Rng::new(seed);
    let events = 300 + rng.below(600);
    let cards = 2 + rng.below(12);
    let mut t: Time = 1_000_000 + rng.below(10_000);
    (0..events)
        .map(|id| {
            t += match rng.below(10) {
                0..=2 => 0,
                3..=4 => rng.below(5),
                5..=8 => rng.below(3_000),
                _ => rng.below(40_000),
            };
            let card = if rng.below(20) == 0 { 1_000 + id } else { rng.below(cards) };
            Transaction {
                event_id: seed * 1_000_000 + id,
                card_id: card,
                account_id: card,
                merchant_id: rng.below(5),
                mcc: 5411,
                amount_minor: 1 + rng.below(20_000) as i64,
                currency: *b"EUR",
                country: [*b"GB", *b"FR", *b"DE"][rng.below(3) as usize],
                lat_e6: 51_507_400,
                lon_e6: -127_800,
                channel: Channel::Pos,
                event_time_ms: t,
                device_id: None,
            }
        })
        .collect()
}

/// What one worker's stores and window operator did.
struct WorkerRun {
    fresh: Vec<Recorded>,
    resumed: Vec<Recorded>,
    folded: u64,
}

/// Run `events` on `workers` workers, each committing to a fresh store and
/// to one resuming at `resume`, with `catch_up` as the catch-up interval and
/// the input ending at `end` (a bounded run) if given.
fn run(
    config: &FraudConfig,
    events: &[Transaction],
    workers: usize,
    catch_up: Duration,
    resume: Time,
    end: Option<Time>,
    seed: u64,
) -> Vec<WorkerRun> {
    let (config, events) = (config.clone(), events.to_vec());
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let stores = [None, Some(resume)].map(|held| Recording { batches: Arc::default(), held });
        let input_end = InputEnd::default();
        if let Some(e) = end {
            input_end.set(e);
        }
        let (mut input, coalesce) = worker.dataflow::<Time, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Transaction, Diff>();
            let out = match end {
                Some(_) => events.detect_fraud_to(&config, input_end.clone()),
                None => events.detect_fraud(&config),
            };
            let committers = stores
                .iter()
                .map(|store| {
                    let options = CommitOptions {
                        interval: Duration::ZERO,
                        resume_from: store.held.unwrap_or(0),
                        report_to: None,
                        catch_up_interval: catch_up,
                        end: end.map(|_| input_end.clone()),
                    };
                    let name = if store.held.is_some() { "resumed" } else { "fresh" };
                    committer(name, index, store.clone(), options, false)
                })
                .collect();
            let coalesce = out.coalesce.clone();
            let inputs = SinkInputs {
                stats: out.stats,
                alerts: out.alerts,
                archive: None,
                coalesce: Some(out.coalesce),
            };
            frontier_sinks(inputs, committers);
            (input, coalesce)
        });
        // Every worker walks the stream in the same random batches, giving
        // its share, and steps its dataflow a random number of times.
        let mut rng = Rng::new(seed);
        let mut at = 0;
        while at < events.len() {
            let next = (at + 1 + rng.below(12) as usize).min(events.len());
            let time = config.time_of(events[at].event_time_ms);
            if time > *input.time() {
                input.advance_to(time);
            }
            for (i, x) in events[at..next].iter().enumerate() {
                if (at + i) % peers == index {
                    input.update_at(x.clone(), config.time_of(x.event_time_ms), 1);
                }
            }
            at = next;
            input.flush();
            for _ in 0..1 + rng.below(6) {
                worker.step();
            }
        }
        input.close();
        while worker.step() {}
        let [fresh, resumed] = stores.map(|s| s.batches.lock().unwrap().clone());
        WorkerRun { fresh, resumed, folded: coalesce.folded() }
    })
    .unwrap()
    .join()
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

/// Applies `batches` to a store holding `held`, checking each against the reference.
fn check(
    label: &str,
    batches: &[Recorded],
    mut held: BTreeMap<u64, Vec<(StatKey, i64)>>,
    owned: &[u64],
    want_at: &mut impl FnMut(Time) -> BTreeMap<StatKey, i64>,
) {
    for (n, b) in batches.iter().enumerate() {
        let cards = b.upserts.iter().map(|(c, _)| *c).chain(b.deletes.iter().copied());
        for card in cards {
            assert_eq!(
                b.absent_before.contains(&card),
                !held.contains_key(&card),
                "{label}: batch {n} (to {}) misstates whether the store had card {card}",
                b.frontier
            );
        }
        for (card, stats) in &b.upserts {
            held.insert(*card, stats.stat_keys(*card).collect());
        }
        for card in &b.deletes {
            held.remove(card);
        }
        let got: BTreeMap<StatKey, i64> = held.values().flatten().copied().collect();
        let want: BTreeMap<StatKey, i64> = want_at(b.frontier - 1)
            .into_iter()
            .filter(|(k, _)| owned.binary_search(&k.card_id).is_ok())
            .collect();
        if got != want {
            let missing: Vec<_> =
                want.iter().filter(|(k, v)| got.get(k) != Some(v)).take(5).collect();
            let extra: Vec<_> =
                got.iter().filter(|(k, v)| want.get(k) != Some(v)).take(5).collect();
            panic!(
                "{label}: after batch {n} (to {}): missing {missing:?}, extra {extra:?}",
                b.frontier
            );
        }
    }
}

/// The reference's statistics as a store holds them: by card.
fn by_card(stats: BTreeMap<StatKey, i64>) -> BTreeMap<u64, Vec<(StatKey, i64)>> {
    let mut cards: BTreeMap<u64, Vec<(StatKey, i64)>> = BTreeMap::new();
    for (k, v) in stats {
        cards.entry(k.card_id).or_default().push((k, v));
    }
    cards
}

#[test]
fn every_batch_cut_around_coalesced_changes_holds_the_reference_statistics_below_its_frontier() {
    let config = FraudConfig::seconds();
    let mut folded = 0;
    for seed in 0..20u64 {
        let events = stream(seed);
        let reference = Reference::new(&config, &events);
        let mut cache: HashMap<Time, BTreeMap<StatKey, i64>> = HashMap::new();
        let mut want_at = |t: Time| cache.entry(t).or_insert_with(|| reference.stats_at(t)).clone();
        let workers = 1 + (seed % 3) as usize;
        let catch_up = [Duration::ZERO, Duration::from_millis(1), Duration::from_secs(3600)]
            [(seed / 3 % 3) as usize];
        let times: Vec<Time> = events.iter().map(|x| config.time_of(x.event_time_ms)).collect();
        let resume = times[times.len() / 2 + (seed as usize % 7)];
        let end = (seed % 2 == 1).then(|| times[times.len() * 3 / 4] + 1);
        let label = format!("seed {seed}, {workers} workers, catch-up {catch_up:?}, end {end:?}");
        let runs = run(&config, &events, workers, catch_up, resume, end, seed);
        for (w, r) in runs.iter().enumerate() {
            let mut owned: Vec<u64> = r
                .fresh
                .iter()
                .flat_map(|b| b.upserts.iter().map(|(c, _)| *c).chain(b.deletes.iter().copied()))
                .collect();
            owned.sort_unstable();
            owned.dedup();
            let last = |batches: &[Recorded]| batches.last().map(|b| b.frontier);
            let finish = end.unwrap_or(Time::MAX);
            assert_eq!(last(&r.fresh), Some(finish), "{label}: worker {w}'s fresh store ends");
            assert_eq!(last(&r.resumed), Some(finish), "{label}: worker {w}'s resumed store ends");
            check(
                &format!("{label}, worker {w}, fresh"),
                &r.fresh,
                BTreeMap::new(),
                &owned,
                &mut want_at,
            );
            let held = by_card(want_at(resume - 1))
                .into_iter()
                .filter(|(c, _)| owned.binary_search(c).is_ok())
                .collect();
            check(&format!("{label}, worker {w}, resumed"), &r.resumed, held, &owned, &mut want_at);
            folded += r.folded;
        }
        if catch_up > Duration::from_secs(1) {
            assert!(
                runs.iter().map(|r| r.folded).sum::<u64>() > 0,
                "{label}: no change was coalesced in an hour-long catch-up"
            );
        }
        assert!(
            runs.iter().map(|r| r.fresh.len()).sum::<usize>() >= workers,
            "{label}: every worker committed"
        );
    }
    assert!(folded > 0, "no change was ever coalesced: the test judged nothing");
}
