//! Deterministic transaction traffic: benign spending, labelled fraud scenarios, and bad input.
//!
//! A [`Generator`] turns a seed into a plan of Kafka records in produce order,
//! each with its partition, key, bytes and what the source must make of it:
//! accept it as an event, or reject it with a given reason. The expectations
//! are worked out here from the same per-partition rules the design states
//! (lateness against the partition's own prefix), independently of the source.

use std::sync::Arc;

use apache_avro::Schema;
use tripwire_connectors::avro::{encode, AvroChannel, AvroTransaction};
use tripwire_connectors::dead_letter::DeadLetterReason;
use tripwire_connectors::registry::{EmbeddedRegistry, SchemaRegistry};

/// Fraud patterns txgen injects, one per rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// Seven payments within 40 s.
    Velocity,
    /// Five ordinary payments, then one twenty times as large.
    AmountSpike,
    /// A payment in New York 30 min after one in London.
    ImpossibleTravel,
    /// Six payments under 5.00 at six merchants within 3 min.
    CardTesting,
    /// Payments in three countries within 30 min.
    CountryHopping,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 5] = [
        Scenario::Velocity,
        Scenario::AmountSpike,
        Scenario::ImpossibleTravel,
        Scenario::CardTesting,
        Scenario::CountryHopping,
    ];

    /// The rule's name, as alerts carry it.
    pub fn rule_name(self) -> &'static str {
        match self {
            Scenario::Velocity => "velocity",
            Scenario::AmountSpike => "amount_spike",
            Scenario::ImpossibleTravel => "impossible_travel",
            Scenario::CardTesting => "card_testing",
            Scenario::CountryHopping => "country_hopping",
        }
    }
}

/// What the source must do with a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Accept it as the event with this id.
    Accept(u64),
    /// An identical copy of the accepted event with this id: counted once, not again.
    Duplicate(u64),
    /// Reject it for this reason.
    Reject(DeadLetterReason),
}

/// One record to produce.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Target partition.
    pub partition: i32,
    /// Record key: the card id, decimal.
    pub key: String,
    /// Wire-format bytes.
    pub payload: Vec<u8>,
    /// What the source must make of it.
    pub expect: Expect,
    /// The fraud scenario the event belongs to, if any (its label).
    pub label: Option<Scenario>,
}

/// How much of what txgen makes.
#[derive(Clone, Debug)]
pub struct GenConfig {
    /// Seed: equal seeds give equal plans.
    pub seed: u64,
    /// Distinct cards of benign traffic.
    pub cards: u64,
    /// Partitions of the topic.
    pub partitions: i32,
    /// Event-time start, ms; every event is at or after it.
    pub start_ms: i64,
    /// Event-time spacing between consecutive benign events, ms.
    pub spacing_ms: i64,
    /// Fixed-rate traffic: this many benign events per second of event time
    /// (overrides `spacing_ms`, so that rates above 1,000/s keep event time
    /// in step with the wall clock).
    pub rate_per_s: Option<u64>,
    /// Fraud scenarios per 10,000 benign events, each scenario type.
    pub fraud_per_10k: u64,
    /// Bad records per 10,000 events, each bad-input class.
    pub bad_per_10k: u64,
    /// Share of records written with schema v1 (the rest v2), per cent.
    pub v1_percent: u64,
    /// Lateness bound the source uses, ms; late records are made beyond it.
    pub lateness_ms: i64,
    /// Out-of-order records per 10,000, arriving within the bound.
    pub out_of_order_per_10k: u64,
    /// Late records per 10,000, beyond the bound.
    pub late_per_10k: u64,
    /// Resends per 10,000 benign events, each kind: an identical copy right
    /// after the original (counted once), and a copy with another amount under
    /// the same event id (a `duplicate_id` dead letter).
    pub duplicates_per_10k: u64,
    /// Benign amounts follow a spending profile per card (a typical amount,
    /// each payment half to twice it); without, they are uniform over
    /// 5.00..155.00 for every card, which makes amount spikes (and, with few
    /// cards, velocity) fire on benign traffic: tests that need rules to fire
    /// often use that.
    pub spending_profiles: bool,
    /// Benign near misses per 10,000 events, each kind: legitimate traffic
    /// that comes close to a rule's threshold without crossing it (five
    /// payments in a minute, a purchase four times the usual, a trip across a
    /// nearby border, four small payments at four shops). They measure false
    /// positives; each uses a card of its own, so labels stay clean.
    pub near_miss_per_10k: u64,
    /// Wall-clock time the consumer will judge event times against.
    pub now_ms: i64,
    /// The ids records are framed with: the embedded registry's, or those a
    /// schema registry assigned when txgen registered the schemas.
    pub schema_ids: SchemaIds,
}

/// Wire-format schema ids of the three schemas the generator writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemaIds {
    /// Transaction v1.
    pub v1: u32,
    /// Transaction v2.
    pub v2: u32,
    /// The alert record (written to the transactions topic as the wrong-schema class).
    pub alert: u32,
}

impl SchemaIds {
    /// The ids of `schemas/manifest.json`, which the embedded registry serves.
    pub const EMBEDDED: SchemaIds = SchemaIds { v1: 1, v2: 2, alert: 3 };
    /// An id no registry here hands out: the unknown-schema-id class.
    pub const UNKNOWN: u32 = 0x7fff_fff0;
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 1,
            cards: 100_000,
            partitions: 12,
            start_ms: 0,
            spacing_ms: 1,
            rate_per_s: None,
            fraud_per_10k: 2,
            bad_per_10k: 2,
            v1_percent: 30,
            lateness_ms: 5_000,
            out_of_order_per_10k: 100,
            late_per_10k: 20,
            duplicates_per_10k: 0,
            spending_profiles: true,
            near_miss_per_10k: 0,
            now_ms: 0,
            schema_ids: SchemaIds::EMBEDDED,
        }
    }
}

const CITIES: [(f64, f64, &str); 6] = [
    (51.5074, -0.1278, "GB"),
    (40.7128, -74.0060, "US"),
    (48.8566, 2.3522, "FR"),
    (35.6762, 139.6503, "JP"),
    (-33.8688, 151.2093, "AU"),
    (52.5200, 13.4050, "DE"),
];

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A card's typical payment, minor units: 1,000..=8,000, fixed per card (half of
/// it stays above the 5.00 of "small" payments card testing looks for).
fn typical_amount(card: u64) -> i64 {
    1_000 + (Rng(card).next() % 7_001) as i64
}

/// Makes the plan.
pub struct Generator {
    config: GenConfig,
    rng: Rng,
    v1: Arc<Schema>,
    v2: Arc<Schema>,
    alert_schema: Arc<Schema>,
    next_id: u64,
    /// Per partition, the largest event time planned so far (for late records).
    /// Per partition, the largest and second largest accepted event times.
    max_seen: Vec<[Option<i64>; 2]>,
    clock_ms: i64,
    /// Benign events planned so far.
    planned: u64,
    /// Scenario events waiting for the clock to reach their event time, so that
    /// they arrive in time order with the benign traffic (not hours ahead of it,
    /// which would make their partition's later records late).
    waiting: std::collections::BinaryHeap<std::cmp::Reverse<(i64, u64, WaitingEvent)>>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct WaitingEvent {
    record: OrdRecord,
    label: Option<Scenario>,
}

/// An `AvroTransaction` with the ordering the waiting queue needs (by id; times are in the key).
#[derive(Clone, Debug)]
struct OrdRecord(AvroTransaction);

impl PartialEq for OrdRecord {
    fn eq(&self, other: &Self) -> bool {
        self.0.event_id == other.0.event_id
    }
}
impl Eq for OrdRecord {}
impl PartialOrd for OrdRecord {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdRecord {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.event_id.cmp(&other.0.event_id)
    }
}

impl Generator {
    /// A generator for `config`.
    pub fn new(config: GenConfig) -> Self {
        let registry = EmbeddedRegistry::new().expect("embedded schemas parse");
        let schema = |id| registry.schema(id).expect("registered");
        Generator {
            rng: Rng(config.seed ^ 0x7472_6970_7769_7265),
            v1: schema(1),
            v2: schema(2),
            alert_schema: schema(3),
            next_id: config.seed << 40,
            max_seen: vec![[None; 2]; config.partitions.max(1) as usize],
            clock_ms: config.start_ms,
            planned: 0,
            waiting: Default::default(),
            config,
        }
    }

    fn partition_of(&self, card: u64) -> i32 {
        (card % self.config.partitions.max(1) as u64) as i32
    }

    fn record(&mut self, card: u64, event_time: i64) -> AvroTransaction {
        let (lat, lon, country) = CITIES[(card % CITIES.len() as u64) as usize];
        self.next_id += 1;
        AvroTransaction {
            event_id: self.next_id as i64,
            card_id: card as i64,
            account_id: (card / 2) as i64,
            merchant_id: (card.wrapping_mul(31) + self.rng.below(20)) as i64 % 50_000,
            mcc: [5411, 5812, 5999, 4111][self.rng.below(4) as usize],
            amount_minor: if self.config.spending_profiles {
                // A typical amount per card between 10.00 and 80.00, each
                // payment half to twice that.
                typical_amount(card) * (50 + self.rng.below(151) as i64) / 100
            } else {
                500 + self.rng.below(15_000) as i64
            },
            currency: "EUR".into(),
            country: country.into(),
            lat,
            lon,
            channel: [AvroChannel::POS, AvroChannel::ECOM, AvroChannel::ATM]
                [self.rng.below(3) as usize],
            event_time,
            device_id: Some(self.rng.below(1_000_000) as i64),
        }
    }

    /// Encode `r` with v1 or v2 and decide acceptance against its partition's prefix.
    fn plan(&mut self, r: AvroTransaction, label: Option<Scenario>, out: &mut Vec<Planned>) {
        let partition = self.partition_of(r.card_id as u64);
        let v1 = self.rng.below(100) < self.config.v1_percent;
        let ids = self.config.schema_ids;
        let (id, schema) = if v1 { (ids.v1, self.v1.clone()) } else { (ids.v2, self.v2.clone()) };
        let payload = encode(&r, id, &schema).expect("generated records encode");
        // Late against the partition's second largest event time (the source's rule).
        let seen = &mut self.max_seen[partition as usize];
        let late = seen[1].is_some_and(|m| r.event_time + self.config.lateness_ms < m);
        if !late {
            match seen[0] {
                Some(top) if r.event_time >= top => *seen = [Some(r.event_time), Some(top)],
                Some(_) => seen[1] = Some(seen[1].map_or(r.event_time, |m| m.max(r.event_time))),
                None => seen[0] = Some(r.event_time),
            }
        }
        let expect = if late {
            Expect::Reject(DeadLetterReason::Late)
        } else {
            Expect::Accept(r.event_id as u64)
        };
        out.push(Planned { partition, key: r.card_id.to_string(), payload, expect, label });
    }

    fn bad(&mut self, reason: DeadLetterReason, out: &mut Vec<Planned>) {
        let card = self.rng.below(self.config.cards);
        let mut r = self.record(card, self.clock_ms);
        let v2 = |g: &Generator, r: &AvroTransaction| {
            encode(r, g.config.schema_ids.v2, &g.v2).expect("encodes")
        };
        let payload = match reason {
            DeadLetterReason::Truncated => {
                let b = v2(self, &r);
                b[..b.len() - 3].to_vec()
            }
            DeadLetterReason::WrongMagic => {
                let mut b = v2(self, &r);
                b[0] = 0x7b; // '{': someone wrote JSON to the topic
                b
            }
            DeadLetterReason::UnknownSchemaId => {
                let mut b = v2(self, &r);
                b[1..5].copy_from_slice(&SchemaIds::UNKNOWN.to_be_bytes());
                b
            }
            DeadLetterReason::WrongSchema => {
                // A record of the alert schema, framed with its own (valid) id.
                use apache_avro::types::Value;
                let alert = Value::Record(vec![
                    ("alert_id".into(), Value::Long(1)),
                    ("card_id".into(), Value::Long(card as i64)),
                    ("rule".into(), Value::Enum(0, "velocity".into())),
                    ("trigger_event_id".into(), Value::Long(1)),
                    ("event_time".into(), Value::TimestampMillis(self.clock_ms)),
                    ("details".into(), Value::String("{}".into())),
                ]);
                let datum =
                    apache_avro::writer::datum::GenericDatumWriter::builder(&self.alert_schema)
                        .build()
                        .and_then(|w| w.write_value_to_vec(alert))
                        .expect("alert encodes");
                let mut b = vec![0];
                b.extend(self.config.schema_ids.alert.to_be_bytes());
                b.extend(datum);
                b
            }
            DeadLetterReason::InvalidField => {
                match self.rng.below(4) {
                    0 => r.amount_minor = 0,
                    1 => r.lat = f64::NAN,
                    2 => r.currency = "XXQ".into(),
                    _ => r.country = "QQ".into(),
                }
                v2(self, &r)
            }
            DeadLetterReason::TooFarInFuture => {
                r.event_time = self.config.now_ms + 86_400_000;
                v2(self, &r)
            }
            DeadLetterReason::TooFarInPast => {
                r.event_time = self.config.now_ms - 30 * 86_400_000;
                v2(self, &r)
            }
            DeadLetterReason::Oversize => vec![0u8; 100_000],
            DeadLetterReason::Late => unreachable!("late records are made by plan()"),
            DeadLetterReason::DuplicateId => unreachable!("duplicates are made by plan()"),
        };
        let partition = self.partition_of(card);
        out.push(Planned {
            partition,
            key: card.to_string(),
            payload,
            expect: Expect::Reject(reason),
            label: None,
        });
    }

    fn scenario(&mut self, s: Scenario) {
        // Fraud uses cards of its own (beyond the benign range), so labels are clean.
        let card = self.config.cards + self.rng.below(1_000_000_000);
        let t = self.clock_ms;
        let at = |g: &mut Generator, dt: i64, f: &dyn Fn(&mut AvroTransaction)| {
            let mut r = g.record(card, t + dt);
            f(&mut r);
            g.wait(r, Some(s));
        };
        match s {
            Scenario::Velocity => (0..7).for_each(|i| at(self, i * 6_000, &|_| {})),
            Scenario::AmountSpike => {
                (0..5).for_each(|i| at(self, i * 60_000, &|r| r.amount_minor = 1_000));
                at(self, 300_000, &|r| r.amount_minor = 20_000);
            }
            Scenario::ImpossibleTravel => {
                at(self, 0, &|r| (r.lat, r.lon, r.country) = (51.5074, -0.1278, "GB".into()));
                at(self, 1_800_000, &|r| {
                    (r.lat, r.lon, r.country) = (40.7128, -74.0060, "US".into())
                });
            }
            Scenario::CardTesting => (0..6).for_each(|i| {
                at(self, i * 30_000, &|r| {
                    r.amount_minor = 99;
                    r.merchant_id = 900_000 + r.event_id % 1_000;
                })
            }),
            Scenario::CountryHopping => {
                for (i, (lat, lon, c)) in
                    [(48.8566, 2.3522, "FR"), (48.86, 2.36, "BE"), (48.87, 2.37, "LU")]
                        .into_iter()
                        .enumerate()
                {
                    at(self, i as i64 * 600_000, &|r| {
                        (r.lat, r.lon, r.country) = (lat, lon, c.into())
                    });
                }
            }
        }
    }

    /// Queue `r` until the clock reaches its event time.
    fn wait(&mut self, r: AvroTransaction, label: Option<Scenario>) {
        let (time, seq) = (r.event_time, r.event_id as u64);
        self.waiting.push(std::cmp::Reverse((
            time,
            seq,
            WaitingEvent { record: OrdRecord(r), label },
        )));
    }

    /// Benign traffic just short of rule `s`'s threshold (see
    /// [`GenConfig::near_miss_per_10k`]), on a card of its own.
    fn near_miss(&mut self, s: Scenario) {
        let card = self.config.cards + 2_000_000_000 + self.rng.below(1_000_000_000);
        let t = self.clock_ms;
        let at = |g: &mut Generator, dt: i64, f: &dyn Fn(&mut AvroTransaction)| {
            let mut r = g.record(card, t + dt);
            f(&mut r);
            g.wait(r, None);
        };
        match s {
            // Five payments within a minute: velocity needs more than five.
            Scenario::Velocity => (0..5).for_each(|i| at(self, i * 10_000, &|_| {})),
            // Five of 1,000, then 4,000: four times the average, not five.
            Scenario::AmountSpike => {
                (0..5).for_each(|i| at(self, i * 60_000, &|r| r.amount_minor = 1_000));
                at(self, 300_000, &|r| r.amount_minor = 4_000);
            }
            // Strasbourg, then Kehl across the Rhine 20 min later: another
            // country, a few km, walking speed.
            Scenario::ImpossibleTravel => {
                at(self, 0, &|r| (r.lat, r.lon, r.country) = (48.5734, 7.7521, "FR".into()));
                at(self, 1_200_000, &|r| {
                    (r.lat, r.lon, r.country) = (48.5790, 7.8150, "DE".into())
                });
            }
            // Four small payments at four shops: card testing needs five.
            Scenario::CardTesting => (0..4).for_each(|i| {
                at(self, i * 30_000, &|r| {
                    r.amount_minor = 250;
                    r.merchant_id = 800_000 + r.event_id % 1_000;
                })
            }),
            // Two countries within the hour: hopping needs three.
            Scenario::CountryHopping => {
                at(self, 0, &|r| (r.lat, r.lon, r.country) = (48.5734, 7.7521, "FR".into()));
                at(self, 600_000, &|r| (r.lat, r.lon, r.country) = (48.5790, 7.8150, "DE".into()));
                at(self, 1_200_000, &|r| {
                    (r.lat, r.lon, r.country) = (48.5740, 7.7530, "FR".into())
                });
            }
        }
    }

    /// The plan for `events` benign events, with scenarios, bad records,
    /// out-of-order and late records mixed in, in produce order; scenario
    /// records still ahead of the last benign event are planned up to the
    /// wall clock ([`GenConfig::now_ms`]).
    pub fn generate(&mut self, events: u64) -> Vec<Planned> {
        let mut out = self.generate_more(events);
        self.release_waiting(self.config.now_ms, &mut out);
        out
    }

    /// The plan for the next `events` benign events, continuing where the
    /// last call ended (fixed-rate traffic is planned a slice at a time);
    /// scenario records ahead of the last one stay queued for the next call.
    pub fn generate_more(&mut self, events: u64) -> Vec<Planned> {
        let mut out = Vec::with_capacity(events as usize + events as usize / 100);
        let c = self.config.clone();
        for n in self.planned..self.planned + events {
            self.clock_ms = match c.rate_per_s {
                Some(rate) => c.start_ms + (n as i128 * 1000 / rate.max(1) as i128) as i64,
                None => c.start_ms + n as i64 * c.spacing_ms,
            };
            let card = self.rng.below(c.cards);
            let roll = self.rng.below(10_000);
            let mut event_time = self.clock_ms;
            if roll < c.out_of_order_per_10k {
                // Behind, but within the bound: accepted.
                event_time -= self.rng.below(c.lateness_ms as u64 / 2) as i64;
            } else if roll < c.out_of_order_per_10k + c.late_per_10k {
                // Beyond the bound: late.
                event_time -= c.lateness_ms + 1 + self.rng.below(60_000) as i64;
            }
            let r = self.record(card, event_time);
            let copy = r.clone();
            self.plan(r, None, &mut out);
            if c.duplicates_per_10k > 0
                && matches!(out.last().map(|p| &p.expect), Some(Expect::Accept(_)))
            {
                let original = out.last().expect("just planned").clone();
                if self.rng.below(10_000) < c.duplicates_per_10k {
                    let id = copy.event_id as u64;
                    out.push(Planned {
                        expect: Expect::Duplicate(id),
                        label: None,
                        ..original.clone()
                    });
                }
                if self.rng.below(10_000) < c.duplicates_per_10k {
                    let mut other = copy;
                    other.amount_minor += 1;
                    let ids = self.config.schema_ids;
                    let payload =
                        encode(&other, ids.v2, &self.v2).expect("generated records encode");
                    out.push(Planned {
                        payload,
                        expect: Expect::Reject(DeadLetterReason::DuplicateId),
                        label: None,
                        ..original
                    });
                }
            }
            self.release_waiting(self.clock_ms, &mut out);
            for s in Scenario::ALL {
                if self.rng.below(10_000) < c.fraud_per_10k {
                    self.scenario(s);
                }
            }
            if c.near_miss_per_10k > 0 {
                for s in Scenario::ALL {
                    if self.rng.below(10_000) < c.near_miss_per_10k {
                        self.near_miss(s);
                    }
                }
            }
            for reason in DeadLetterReason::ALL {
                let planned_elsewhere =
                    matches!(reason, DeadLetterReason::Late | DeadLetterReason::DuplicateId);
                if !planned_elsewhere && self.rng.below(10_000) < c.bad_per_10k {
                    self.bad(reason, &mut out);
                }
            }
        }
        self.planned += events;
        out
    }

    /// Plan the waiting scenario events whose time the clock has reached.
    fn release_waiting(&mut self, until: i64, out: &mut Vec<Planned>) {
        while self.waiting.peek().is_some_and(|w| w.0 .0 <= until) {
            let std::cmp::Reverse((_, _, w)) = self.waiting.pop().expect("peeked");
            self.plan(w.record.0, w.label, out);
        }
    }
}
