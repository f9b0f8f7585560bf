//! One input partition's decisions as plain code: lateness, floors, duplicates.
//!
//! Everything the source decides about a record is a function of the
//! partition's own records before it (in log order) and of *recorded* floors,
//! never of the wall clock, so that a replay decides exactly as the first run:
//!
//! - **Watermark basis**: the *second* largest `min(event_time, log_time)`
//!   of the partition's accepted records, where `log_time` is the Kafka
//!   record's timestamp. A record is late when its event time is more than `L`
//!   behind the basis. One record, whatever event time it claims, cannot move
//!   the basis (it takes a second one), so no single outlier can make the
//!   records after it late; and clamping by the log time keeps even several
//!   records claiming a future time from moving it beyond the log's own time.
//! - **Floors**: when the source lets the frontier pass a partition that is not
//!   holding it (idle, or read to its end), the partition's floor rises to the
//!   new frontier at its current read position, and a record read after that
//!   point with a time below the floor is late. Each such decision is recorded
//!   with the PostgreSQL commit that covers it (`source_floors`) and applied
//!   again at the same offset by a replay ([`Partition::judge`]).
//! - **Duplicates**: a record with the `event_id` of an earlier accepted record
//!   of the partition whose event time is at most `H` (the dedup horizon)
//!   before its own is a duplicate: identical (same decoded fields) it counts
//!   once and is dropped (counted in `tripwire_duplicates_total`); different,
//!   it is a dead letter `duplicate_id`. First in log order wins.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{Hash, Hasher};

use tripwire_dataflow::open_map::{OpenMap, Value};
use tripwire_dataflow::{Time, Transaction};

use crate::dead_letter::{DeadLetterReason, Rejected};

/// Settings every partition of a source shares.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Allowed out-of-orderness `L`, ms.
    pub lateness_ms: Time,
    /// How far back in event time an earlier copy still makes a duplicate, ms.
    pub dedup_horizon_ms: Time,
}

/// What happens to one decoded, valid record.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: it enters the dataflow.
    Accept,
    /// An identical copy of an accepted record: counted once, dropped.
    Duplicate,
}

/// One partition's state.
#[derive(Debug)]
pub struct Partition {
    /// The partition number.
    pub partition: i32,
    /// Largest `min(event_time, log_time)` of accepted records.
    pub top: Option<Time>,
    /// The second largest of them: the watermark's basis.
    pub basis: Option<Time>,
    /// Largest event time of accepted records (where a restart may begin depends on it).
    pub max_event: Option<Time>,
    /// Records at a (ticked) time below this are late.
    pub floor: Time,
    /// Recorded floors not yet reached: `(offset, floor)`, ascending.
    recorded: VecDeque<(i64, Time)>,
    /// The next offset to read.
    pub next_offset: i64,
    /// A replay must not decide anything new before reading up to here.
    pub replay_until: i64,
    /// Offsets to reject as late (an earlier run's committed dead letters), ascending.
    late: VecDeque<i64>,
    /// Where an earlier run last let the frontier pass this partition, if it
    /// had read nothing after that by its last commit: the partition was
    /// quiet at its end and is taken as still quiet until it reads past it.
    quiet_at: Option<i64>,
    /// Accepted ids within the horizon: their fingerprint and event time.
    /// Probed once per record: with the default horizon (an hour) a
    /// catch-up holds millions here, each probe a miss of the caches, so
    /// the source asks for a record's place ([`Partition::prefetch`]) while
    /// it still decodes the records before it (SipHash, then a SwissTable
    /// without prefetching, were a tenth of a worker's time).
    seen: OpenMap<Seen>,
    /// Accepted ids with their event times, by granule of event time
    /// ([`GRANULE_MS`]), forgotten a granule at a time: never before their
    /// own time leaves the horizon, at most a granule after. Appending to
    /// the latest granule's list, where a heap by event time cost a
    /// logarithmic, cache-missing pop per record.
    expiry: BTreeMap<Time, Vec<(u64, Time)>>,
    /// A forgotten granule's list, emptied, for the next granule: a list
    /// grown anew for each granule was an allocation every few records.
    spare: Vec<(u64, Time)>,
}

/// How many ids ahead a forgotten granule's places are prefetched.
const EXPIRY_AHEAD: usize = 8;

/// The span of event time whose accepted ids are forgotten together, ms.
const GRANULE_MS: Time = 1_024;

/// The first accepted copy of an id: its fingerprint and event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    fingerprint: u64,
    time: Time,
}

/// A place of `seen` that holds no id: no accepted event's time (see [`kept_time`]).
impl Value for Seen {
    const VACANT: Self = Seen { fingerprint: 0, time: Time::MAX };
    #[inline]
    fn is_vacant(&self) -> bool {
        self.time == Time::MAX
    }
}

/// An event time as duplicate detection keeps it: `Time::MAX` marks a
/// vacant place (event times come from Avro `long`s, so none is that late;
/// one would be kept a millisecond earlier).
fn kept_time(e: Time) -> Time {
    e.min(Time::MAX - 1)
}

/// A 64-bit fingerprint of every field of an event (identical resends match).
fn fingerprint(x: &Transaction) -> u64 {
    let mut h = tripwire_dataflow::fxhash::FxHasher::default();
    x.hash(&mut h);
    h.finish()
}

impl Partition {
    /// A partition read from `next_offset`, with what a restart restores.
    pub fn new(partition: i32, next_offset: i64, restored: Restored) -> Self {
        let mut recorded: Vec<(i64, Time)> = restored.floors;
        recorded.sort_unstable();
        let quiet_at = recorded
            .last()
            .map(|f| f.0)
            .filter(|o| *o >= restored.replay_until && *o >= next_offset);
        let mut p = Partition {
            partition,
            top: restored.top,
            basis: restored.basis,
            max_event: restored.max_event,
            floor: 0,
            recorded: recorded.into(),
            next_offset,
            replay_until: restored.replay_until,
            late: {
                let mut late = restored.late;
                late.sort_unstable();
                late.into()
            },
            quiet_at,
            // The partitions of a worker fill alike: grown at once, they
            // stopped it for 100-250 ms at 50K events/s.
            seen: OpenMap::staggered(partition as u64),
            expiry: BTreeMap::new(),
            spare: Vec::new(),
        };
        p.apply_recorded(next_offset);
        p
    }

    fn apply_recorded(&mut self, offset: i64) {
        while let Some(&(o, f)) = self.recorded.front() {
            if o > offset {
                break;
            }
            self.floor = self.floor.max(f);
            self.recorded.pop_front();
        }
    }

    /// Whether the partition is still replaying what an earlier run had read
    /// when it last committed: until then it decides nothing new (a floor
    /// recorded at an offset not yet read applies to the record read there).
    pub fn replaying(&self) -> bool {
        self.next_offset < self.replay_until
    }

    /// Whether an earlier run ended with this partition released and nothing
    /// has been read past that point since: quiet without waiting anew for
    /// the idle timeout (a restart does not stall on partitions that were
    /// already quiet).
    pub fn still_quiet(&self) -> bool {
        self.quiet_at.is_some_and(|o| self.next_offset <= o) && !self.replaying()
    }

    /// The log holds records up to `end` (exclusive): records past where the
    /// partition was released mean it is not quiet any more.
    pub fn log_ends_at(&mut self, end: i64) {
        if self.quiet_at.is_some_and(|o| end > o) {
            self.quiet_at = None;
        }
    }

    /// Decide a valid record at `offset` whose (ticked) time is `t`.
    pub fn judge(
        &mut self,
        rules: &Rules,
        offset: i64,
        log_time: Option<i64>,
        x: &Transaction,
        t: Time,
    ) -> Result<Verdict, Rejected> {
        self.next_offset = offset + 1;
        self.apply_recorded(offset);
        let e = x.event_time_ms;
        while self.late.front().is_some_and(|&o| o < offset) {
            self.late.pop_front();
        }
        if self.late.front() == Some(&offset) {
            self.late.pop_front();
            return Err(Rejected::new(
                DeadLetterReason::Late,
                format!(
                    "event_time {e} was late in an earlier run, whose dead letter for it is committed"
                ),
            )
            .of_event(x.event_id as i64));
        }
        let fp = fingerprint(x);
        if let Some(first) = self.seen.get(x.event_id) {
            if first.time.saturating_add(rules.dedup_horizon_ms) >= e {
                if first.fingerprint == fp {
                    return Ok(Verdict::Duplicate);
                }
                return Err(Rejected::new(
                    DeadLetterReason::DuplicateId,
                    format!(
                        "event_id {} was already accepted on this partition with other fields",
                        x.event_id
                    ),
                )
                .of_event(x.event_id as i64));
            }
        }
        if let Some(b) = self.basis {
            if e.saturating_add(rules.lateness_ms) < b {
                return Err(Rejected::new(
                    DeadLetterReason::Late,
                    format!(
                        "event_time {e} is more than {} ms behind its partition's watermark basis {b}",
                        rules.lateness_ms
                    ),
                )
                .of_event(x.event_id as i64));
            }
        }
        if t < self.floor {
            return Err(Rejected::new(
                DeadLetterReason::Late,
                format!(
                    "event_time {e} is behind the frontier {} that passed its partition while it was idle or read to its end",
                    self.floor
                ),
            )
            .of_event(x.event_id as i64));
        }
        let clamped = match log_time {
            Some(l) if l >= 0 => e.min(l as Time),
            _ => e,
        };
        match self.top {
            Some(top) if clamped >= top => {
                self.basis = Some(top);
                self.top = Some(clamped);
            }
            Some(_) => self.basis = Some(self.basis.map_or(clamped, |b| b.max(clamped))),
            None => self.top = Some(clamped),
        }
        self.max_event = Some(self.max_event.map_or(e, |m| m.max(e)));
        let kept = kept_time(e);
        self.seen.insert(x.event_id, Seen { fingerprint: fp, time: kept });
        let granule = e / GRANULE_MS;
        match self.expiry.last_entry() {
            Some(mut last) if *last.key() == granule => last.get_mut().push((x.event_id, kept)),
            _ => {
                let spare = &mut self.spare;
                let ids = self.expiry.entry(granule).or_insert_with(|| std::mem::take(spare));
                ids.push((x.event_id, kept));
            }
        }
        self.expire(rules);
        Ok(Verdict::Accept)
    }

    /// A record at `offset` that was rejected before judging (undecodable, invalid).
    pub fn skipped(&mut self, offset: i64) {
        self.next_offset = offset + 1;
        self.apply_recorded(offset);
    }

    /// Forget ids no later record can be a duplicate of: every record still
    /// to be accepted has an event time of at least `basis - L` and `floor`.
    fn expire(&mut self, rules: &Rules) {
        let lowest = self.basis.unwrap_or(0).saturating_sub(rules.lateness_ms).max(self.floor);
        let forget_below = lowest.saturating_sub(rules.dedup_horizon_ms);
        while let Some(first) = self.expiry.first_entry() {
            if first.key().saturating_add(1).saturating_mul(GRANULE_MS) > forget_below {
                break;
            }
            let mut ids = first.remove();
            for &(id, _) in ids.iter().take(EXPIRY_AHEAD) {
                self.seen.prefetch(id);
            }
            for (n, &(id, e)) in ids.iter().enumerate() {
                if let Some(&(ahead, _)) = ids.get(n + EXPIRY_AHEAD) {
                    self.seen.prefetch(ahead);
                }
                // Unless a later copy, accepted past the horizon, replaced it.
                self.seen.remove_if(id, |s| s.time == e);
            }
            ids.clear();
            if ids.capacity() > self.spare.capacity() {
                self.spare = ids;
            }
        }
    }

    /// Ask for the place duplicate detection will look `event_id` up in
    /// (the source calls this for a polled chunk's records before judging them).
    #[inline]
    pub fn prefetch(&self, event_id: u64) {
        self.seen.prefetch(event_id);
    }

    /// Ids remembered for duplicate detection.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// The least time this partition's future records can still have (unticked
    /// basis less `L`, or the floor, whichever is later); `None` before any record.
    pub fn watermark(&self, rules: &Rules, tick: impl Fn(Time) -> Time) -> Option<Time> {
        let own = self.basis.map(|b| tick(b.saturating_sub(rules.lateness_ms)));
        match own {
            Some(w) => Some(w.max(self.floor)),
            None if self.floor > 0 => Some(self.floor),
            None => None,
        }
    }

    /// The frontier passes this partition (idle or at its end) to `frontier`:
    /// raise its floor. Returns the decision to record, if it is new.
    pub fn release_to(&mut self, frontier: Time) -> Option<(i64, Time)> {
        if frontier > self.floor {
            self.floor = frontier;
            Some((self.next_offset, frontier))
        } else {
            None
        }
    }
}

/// What a restart restores for one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// The largest `min(event_time, log_time)` before the start offset.
    pub top: Option<Time>,
    /// The watermark basis (the second largest) before the start offset.
    pub basis: Option<Time>,
    /// The largest event time before the start offset.
    pub max_event: Option<Time>,
    /// Recorded floors: `(offset, floor)`.
    pub floors: Vec<(i64, Time)>,
    /// How far an earlier run had read and recorded.
    pub replay_until: i64,
    /// Offsets an earlier run rejected as late whose dead letters are
    /// committed: late again, whatever this run's timing
    /// ([`crate::dead_letter_sink::committed_late`]).
    pub late: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules { lateness_ms: 1_000, dedup_horizon_ms: 10_000 };

    fn tx(id: u64, e: Time, amount: i64) -> Transaction {
        Transaction {
            event_id: id,
            card_id: 7,
            account_id: 1,
            merchant_id: 2,
            mcc: 5411,
            amount_minor: amount,
            currency: *b"EUR",
            country: *b"DE",
            lat_e6: 0,
            lon_e6: 0,
            channel: tripwire_dataflow::Channel::Pos,
            event_time_ms: e,
            device_id: None,
        }
    }

    fn judge(p: &mut Partition, o: i64, log: i64, x: &Transaction) -> Result<Verdict, String> {
        p.judge(&RULES, o, Some(log), x, x.event_time_ms).map_err(|r| r.reason.as_str().to_string())
    }

    #[test]
    fn one_record_ahead_of_the_rest_cannot_make_later_records_late() {
        let mut p = Partition::new(0, 0, Restored::default());
        // History loaded long after it happened: event times far behind log times.
        assert_eq!(judge(&mut p, 0, 900_000, &tx(1, 100_000, 5)), Ok(Verdict::Accept));
        assert_eq!(judge(&mut p, 1, 900_000, &tx(2, 100_500, 5)), Ok(Verdict::Accept));
        assert_eq!(p.basis, Some(100_000));
        // Ten minutes ahead of its log time: accepted, moves only the top, clamped.
        assert_eq!(judge(&mut p, 2, 900_100, &tx(3, 1_500_000, 5)), Ok(Verdict::Accept));
        assert_eq!((p.top, p.basis), (Some(900_100), Some(100_500)));
        // The history after it is on time.
        assert_eq!(judge(&mut p, 3, 900_200, &tx(4, 99_600, 5)), Ok(Verdict::Accept));
        // One more than L behind the basis is late.
        assert_eq!(judge(&mut p, 4, 900_300, &tx(5, 99_400, 5)), Err("late".into()));
        // A second record far ahead does move the basis, to the log time at most.
        assert_eq!(judge(&mut p, 5, 900_400, &tx(6, 2_000_000, 5)), Ok(Verdict::Accept));
        assert_eq!(p.basis, Some(900_100));
    }

    #[test]
    fn duplicates_count_once_and_conflicting_ids_are_dead_letters() {
        let mut p = Partition::new(0, 0, Restored::default());
        assert_eq!(judge(&mut p, 0, 1_000, &tx(1, 1_000, 5)), Ok(Verdict::Accept));
        assert_eq!(judge(&mut p, 1, 1_000, &tx(1, 1_000, 5)), Ok(Verdict::Duplicate));
        assert_eq!(judge(&mut p, 2, 1_000, &tx(1, 1_000, 6)), Err("duplicate_id".into()));
        // Beyond the horizon after the first copy, the id is new again.
        let far = 1_000 + RULES.dedup_horizon_ms + 1;
        assert_eq!(judge(&mut p, 3, far as i64, &tx(1, far, 6)), Ok(Verdict::Accept));
    }

    #[test]
    fn recorded_floors_apply_from_their_offset_on() {
        let restored = Restored {
            floors: vec![(5, 50_000), (2, 20_000)],
            replay_until: 6,
            ..Restored::default()
        };
        let mut p = Partition::new(0, 0, restored);
        assert!(p.replaying());
        assert_eq!(judge(&mut p, 1, 10_000, &tx(1, 10_000, 5)), Ok(Verdict::Accept));
        assert_eq!(judge(&mut p, 2, 10_000, &tx(2, 10_500, 5)), Err("late".into()));
        assert_eq!(judge(&mut p, 3, 20_000, &tx(3, 20_000, 5)), Ok(Verdict::Accept));
        assert_eq!(judge(&mut p, 5, 40_000, &tx(4, 40_000, 5)), Err("late".into()));
        assert!(!p.replaying());
        assert_eq!(p.release_to(60_000), Some((6, 60_000)));
        assert_eq!(p.release_to(60_000), None, "nothing new to record");
    }

    #[test]
    fn records_whose_late_letters_are_committed_are_late_again() {
        // An earlier run rejected offsets 3 and 5 against a floor it never
        // got to record; their letters are committed. Nothing else here would
        // make them late.
        let restored = Restored { late: vec![5, 3], ..Restored::default() };
        let mut p = Partition::new(0, 2, restored);
        assert_eq!(judge(&mut p, 2, 10_000, &tx(1, 10_000, 5)), Ok(Verdict::Accept));
        assert_eq!(judge(&mut p, 3, 10_000, &tx(2, 10_000, 5)), Err("late".into()));
        assert_eq!(judge(&mut p, 4, 10_000, &tx(3, 10_000, 5)), Ok(Verdict::Accept));
        assert_eq!(judge(&mut p, 5, 10_000, &tx(4, 10_000, 5)), Err("late".into()));
        assert_eq!(judge(&mut p, 6, 10_000, &tx(5, 10_000, 5)), Ok(Verdict::Accept));
        // A late record moves no watermark: the basis is that of the accepted ones.
        assert_eq!(p.basis, Some(10_000));
    }

    #[test]
    fn a_restart_at_a_later_offset_starts_from_the_floors_before_it() {
        let restored = Restored {
            floors: vec![(2, 20_000), (9, 90_000)],
            replay_until: 10,
            ..Restored::default()
        };
        let p = Partition::new(0, 4, restored);
        assert_eq!(p.floor, 20_000);
        assert!(p.replaying(), "an earlier run read up to 10");
    }

    #[test]
    fn a_partition_released_at_its_end_is_quiet_after_a_restart_until_it_reads_on() {
        let restored =
            Restored { floors: vec![(8, 80_000)], replay_until: 8, ..Restored::default() };
        let mut p = Partition::new(0, 3, restored);
        assert!(!p.still_quiet(), "replaying up to 8 first");
        for o in 3..8 {
            p.skipped(o);
        }
        assert!(p.still_quiet(), "caught up to where it was released");
        p.skipped(8);
        assert!(!p.still_quiet(), "it read past it");
        let read_on =
            Restored { floors: vec![(8, 80_000)], replay_until: 12, ..Restored::default() };
        assert!(!Partition::new(0, 12, read_on).still_quiet(), "it had read on before");
        let restored =
            Restored { floors: vec![(8, 80_000)], replay_until: 8, ..Restored::default() };
        let mut grown = Partition::new(0, 8, restored);
        grown.log_ends_at(20);
        assert!(!grown.still_quiet(), "the log grew since");
    }

    #[test]
    fn ids_are_forgotten_once_no_later_record_can_repeat_them() {
        let mut p = Partition::new(0, 0, Restored::default());
        for i in 0..100u64 {
            let e = i * 1_000;
            judge(&mut p, i as i64, e as i64, &tx(i, e, 5)).unwrap();
        }
        // Basis 98 s, L 1 s, horizon 10 s: ids of events before 87 s are gone.
        assert_eq!(p.remembered(), 13);
    }

    /// The latest possible event time is remembered like any other (the
    /// map of ids reserves a time no accepted event can have for its empty
    /// places), so a copy of it is a duplicate.
    #[test]
    fn an_event_at_the_end_of_time_is_remembered() {
        let mut p = Partition::new(0, 0, Restored::default());
        let x = tx(7, Time::MAX, 5);
        assert_eq!(p.judge(&RULES, 0, None, &x, Time::MAX).ok(), Some(Verdict::Accept));
        assert_eq!(p.judge(&RULES, 1, None, &x, Time::MAX).ok(), Some(Verdict::Duplicate));
        assert_eq!(p.remembered(), 1);
    }

    /// Seeded streams out of order by up to L (none late), one record far
    /// ahead, ids repeated within and beyond the horizon, as identical
    /// copies or not: every verdict is the one a model that forgets nothing
    /// gives, and what is remembered stays within the ids of the last
    /// `H + L` and a granule.
    #[test]
    fn out_of_order_ids_are_judged_as_if_nothing_were_ever_forgotten() {
        let mut next = tripwire_dataflow::seeded(0x5851_F42D_4C95_7F2D);
        let (l, h) = (RULES.lateness_ms, RULES.dedup_horizon_ms);
        for _ in 0..50 {
            let mut p = Partition::new(0, 0, Restored::default());
            // id -> (amount, event time) of its last accepted copy.
            let mut model: std::collections::HashMap<u64, (i64, Time)> = Default::default();
            let mut accepted: Vec<(u64, i64, Time)> = Vec::new();
            // The two largest accepted event times; a record at `e` is late
            // if `e + L` is below the second.
            let mut top2: (Time, Time) = (0, 0);
            let mut base: Time = 100_000;
            for o in 0..3_000i64 {
                base += next(40);
                let (mut e, mut amount) = (base - next(l + 1), 5 + next(2) as i64);
                let id = match accepted.len() {
                    n if n > 0 && next(4) == 0 => {
                        let (id, a, first) = accepted[n - 1 - next(n.min(600) as u64) as usize];
                        // An identical copy, where it would not be late.
                        if next(2) == 0 && first + l >= top2.1 {
                            (e, amount) = (first, a);
                        }
                        id
                    }
                    _ => 1_000_000 + o as u64,
                };
                let id = if o == 1_000 {
                    // One record far ahead, new, which must not hold ids back.
                    e = base + 100 * h;
                    1_000_000 + o as u64
                } else {
                    id
                };
                let want = match model.get(&id) {
                    Some(&(a, first)) if first + h >= e && (a, first) == (amount, e) => {
                        Ok(Verdict::Duplicate)
                    }
                    Some(&(_, first)) if first + h >= e => Err("duplicate_id".to_string()),
                    _ => Ok(Verdict::Accept),
                };
                let got = p
                    .judge(&RULES, o, None, &tx(id, e, amount), e)
                    .map_err(|r| r.reason.as_str().to_string());
                assert_eq!(got, want, "record {o}: id {id} at {e}");
                if got == Ok(Verdict::Accept) {
                    model.insert(id, (amount, e));
                    accepted.push((id, amount, e));
                    top2 = if e >= top2.0 { (e, top2.0) } else { (top2.0, top2.1.max(e)) };
                }
                let recent = accepted.iter().filter(|a| a.2 + h + l + GRANULE_MS >= top2.1).count();
                assert!(p.remembered() <= recent, "{} remembered, {recent} recent", p.remembered());
            }
        }
    }
}
