//! The transaction codec: Confluent wire format, writer schema by id, serde straight into the record,
//! then validation into the dataflow's [`Transaction`].
//!
//! Wire format: magic byte `0`, the writer schema's id as 4 big-endian bytes,
//! then the Avro binary datum. Decoding deserializes the datum with the writer
//! schema directly into [`AvroTransaction`] (no generic `Value` in between,
//! measured 2-3x faster); schema evolution is handled by serde defaults on the
//! struct (v1 data has no `device_id` and gets `None`), which is sound because
//! the registry's versions are checked compatible both ways.

use std::sync::Arc;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::{Deserialize, Serialize};
use tripwire_dataflow::fxhash::FxHashMap;
use tripwire_dataflow::{Channel, Transaction};

use crate::codes;
use crate::dead_letter::{DeadLetterReason as Reason, Rejected};
use crate::registry::SchemaRegistry;

/// The Confluent wire format's magic byte.
pub const MAGIC: u8 = 0;

/// The largest amount accepted, in minor units (10 billion in major units):
/// far above any card payment, and low enough that a window's sum of
/// millions of such amounts still fits in an `i64`.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// A transaction as the Avro schemas spell it (v2; v1 lacks `device_id`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
// The schema-aware deserializer matches the struct's name to the record's.
#[serde(rename = "Transaction")]
pub struct AvroTransaction {
    /// Unique id.
    pub event_id: i64,
    /// Card.
    pub card_id: i64,
    /// Account.
    pub account_id: i64,
    /// Merchant.
    pub merchant_id: i64,
    /// Merchant category code.
    pub mcc: i32,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// ISO 3166-1 alpha-2 code.
    pub country: String,
    /// Degrees.
    pub lat: f64,
    /// Degrees.
    pub lon: f64,
    /// Channel.
    pub channel: AvroChannel,
    /// Event time, ms since the epoch.
    pub event_time: i64,
    /// Device fingerprint (v2).
    #[serde(default)]
    pub device_id: Option<i64>,
}

/// The Avro enum `Channel`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
#[serde(rename = "Channel")]
pub enum AvroChannel {
    /// Point of sale.
    #[default]
    POS,
    /// Online.
    ECOM,
    /// Cash machine.
    ATM,
}

impl AvroChannel {
    /// Every channel.
    pub const ALL: [AvroChannel; 3] = [AvroChannel::POS, AvroChannel::ECOM, AvroChannel::ATM];

    /// Its symbol in the schema (as serde names it).
    fn symbol(self) -> &'static str {
        match self {
            AvroChannel::POS => "POS",
            AvroChannel::ECOM => "ECOM",
            AvroChannel::ATM => "ATM",
        }
    }
}

/// Limits the source applies to every record.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Larger messages are rejected as oversize before decoding.
    pub max_message_bytes: usize,
    /// Event times more than this far ahead of the record's Kafka timestamp are rejected.
    pub max_future_ms: i64,
    /// Event times more than this far behind the record's Kafka timestamp are
    /// rejected; `None` accepts history of any age (a backfill).
    pub max_age_ms: Option<i64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // A transaction is ~100 bytes; 64 KiB leaves room for evolution, not for abuse.
            max_message_bytes: 64 * 1024,
            // Clock skew between card networks and us is seconds, not minutes.
            max_future_ms: 5 * 60_000,
            // Beyond a week the 24 h windows cannot use the record, and Kafka
            // retention is the replay horizon anyway.
            max_age_ms: Some(7 * 24 * 3_600_000),
        }
    }
}

/// Decodes Confluent-framed Avro transactions; one per source worker.
pub struct TransactionCodec {
    registry: Arc<dyn SchemaRegistry>,
    /// Readers for the writer schemas seen so far (checked to be transaction
    /// schemas), built once: building one resolves the schema, which cost more
    /// than decoding a record.
    known: FxHashMap<u32, Result<Reader, Rejected>>,
    limits: Limits,
    /// The record the plan reads into, its strings' buffers kept from one
    /// record to the next (two allocations and two frees per record were a
    /// twentieth of the source's time).
    scratch: AvroTransaction,
}

/// How the records of one writer schema are read: by apache-avro's reader,
/// and, where the schema has only fields the codec knows, first by [`Plan`].
#[derive(Clone)]
struct Reader {
    generic: Arc<GenericDatumReader<'static>>,
    plan: Option<Arc<Plan>>,
}

impl TransactionCodec {
    /// A codec resolving writer schemas through `registry`.
    pub fn new(registry: Arc<dyn SchemaRegistry>, limits: Limits) -> Self {
        // A length prefix in a hostile record could ask apache-avro to allocate
        // hundreds of MiB; nothing in a message can be longer than the message.
        // (A process-wide setting: the first codec's limit holds.)
        apache_avro::util::max_allocation_bytes(limits.max_message_bytes);
        TransactionCodec {
            registry,
            known: FxHashMap::default(),
            limits,
            scratch: AvroTransaction::default(),
        }
    }

    /// Decode and validate one message; `log_time_ms` is the Kafka record's
    /// timestamp, which the future/past checks are judged against (a value in
    /// the log, so that a replay decides the same); `None` skips those checks.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        log_time_ms: Option<i64>,
    ) -> Result<Transaction, Rejected> {
        if bytes.len() > self.limits.max_message_bytes {
            return Err(Rejected::new(
                Reason::Oversize,
                format!("{} bytes, limit {}", bytes.len(), self.limits.max_message_bytes),
            ));
        }
        let Some((&magic, rest)) = bytes.split_first() else {
            return Err(Rejected::new(Reason::Truncated, "empty message"));
        };
        if magic != MAGIC {
            return Err(Rejected::new(
                Reason::WrongMagic,
                format!("first byte {magic:#04x}, expected 0x00"),
            ));
        }
        let Some((id, mut datum)) = rest.split_first_chunk::<4>() else {
            return Err(Rejected::new(
                Reason::Truncated,
                format!("{} bytes, no room for a schema id", bytes.len()),
            ));
        };
        let id = u32::from_be_bytes(*id);
        let reader = Self::reader(&mut self.known, &*self.registry, id)?;
        // The plan reads what it can read exactly as apache-avro would; on
        // anything else (a truncated or malformed record among them) apache-avro
        // reads it again and says what is wrong.
        let planned =
            reader.plan.as_ref().is_some_and(|p| p.read(datum, &mut self.scratch).is_some());
        let generic;
        let record = match planned {
            true => &self.scratch,
            false => {
                let total = datum.len();
                generic =
                    reader.generic.read_deser::<AvroTransaction>(&mut datum).map_err(classify)?;
                if !datum.is_empty() {
                    return Err(Rejected::new(
                        Reason::WrongSchema,
                        format!(
                            "{} of {total} bytes left after the record: not written with schema {id}",
                            datum.len()
                        ),
                    ));
                }
                &generic
            }
        };
        validate(record, &self.limits, log_time_ms).map_err(|r| r.of_event(record.event_id))
    }

    /// The reader of writer schema `id`, built and kept in `known` the
    /// first time (borrowed, not cloned: the clone's two reference counts
    /// were two atomic increments and decrements per record).
    fn reader<'a>(
        known: &'a mut FxHashMap<u32, Result<Reader, Rejected>>,
        registry: &dyn SchemaRegistry,
        id: u32,
    ) -> Result<&'a Reader, Rejected> {
        let kept = match known.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Self::build_reader(registry, id)?)
            }
        };
        match kept {
            Ok(reader) => Ok(reader),
            Err(e) => Err(e.clone()),
        }
    }

    /// What to keep for writer schema `id`: its reader, or why its records
    /// are not transactions. Not found is an error not kept: an id
    /// registered later (or a registry that was briefly unreachable) must
    /// read its records then. The registry client keeps its own short
    /// negative cache.
    fn build_reader(
        registry: &dyn SchemaRegistry,
        id: u32,
    ) -> Result<Result<Reader, Rejected>, Rejected> {
        let schema = registry.schema(id).ok_or_else(|| {
            Rejected::new(Reason::UnknownSchemaId, format!("schema id {id} is not registered"))
        })?;
        let reader = if !is_transaction(&schema) {
            Err(Rejected::new(
                Reason::WrongSchema,
                format!("schema id {id} is {}, not a transaction", schema_name(&schema)),
            ))
        } else {
            // The reader borrows its schema for as long as the codec lives;
            // registered schemas are few and never change, so each is kept
            // for the process's lifetime (once per codec and registered id).
            let schema: &'static Schema = Box::leak(Box::new((*schema).clone()));
            GenericDatumReader::builder(schema)
                .build()
                .map(|generic| Reader {
                    generic: Arc::new(generic),
                    plan: Plan::of(schema).map(Arc::new),
                })
                .map_err(|e| Rejected::new(Reason::WrongSchema, e.to_string()))
        };
        Ok(reader)
    }
}

/// One field of a writer schema the codec reads by hand.
#[derive(Clone, Copy, Debug)]
enum Step {
    EventId,
    CardId,
    AccountId,
    MerchantId,
    Mcc,
    AmountMinor,
    Currency,
    Country,
    Lat,
    Lon,
    /// The channel of each of the writer's symbols, by its index; `None`: a
    /// symbol this codec does not know.
    Channel([Option<AvroChannel>; 8], usize),
    EventTime,
    /// The device id's union: the branch index of `null` and of `long`.
    DeviceId(usize, usize),
}

/// A writer schema's fields in order, read straight into an
/// [`AvroTransaction`] without apache-avro's values and serde: decoding was
/// a tenth of the workers' time in a bulk load. Only for writer schemas with
/// no field the codec does not know (a fully planned read gives what
/// apache-avro's reader gives: see the tests); others are read by
/// apache-avro alone.
#[derive(Debug)]
struct Plan {
    steps: Vec<Step>,
}

impl Plan {
    /// The plan of `schema`, if every field is one the codec reads by hand
    /// and every field but the device id is there.
    fn of(schema: &Schema) -> Option<Plan> {
        let Schema::Record(rs) = schema else { return None };
        let mut steps = Vec::with_capacity(rs.fields.len());
        for field in &rs.fields {
            let step = match (field.name.as_str(), &field.schema) {
                ("event_id", Schema::Long) => Step::EventId,
                ("card_id", Schema::Long) => Step::CardId,
                ("account_id", Schema::Long) => Step::AccountId,
                ("merchant_id", Schema::Long) => Step::MerchantId,
                ("mcc", Schema::Int) => Step::Mcc,
                ("amount_minor", Schema::Long) => Step::AmountMinor,
                ("currency", Schema::String) => Step::Currency,
                ("country", Schema::String) => Step::Country,
                ("lat", Schema::Double) => Step::Lat,
                ("lon", Schema::Double) => Step::Lon,
                ("channel", Schema::Enum(e)) if e.symbols.len() <= 8 => {
                    let mut by_index = [None; 8];
                    for (i, symbol) in e.symbols.iter().enumerate() {
                        by_index[i] = AvroChannel::ALL.into_iter().find(|c| c.symbol() == symbol);
                    }
                    Step::Channel(by_index, e.symbols.len())
                }
                ("event_time", Schema::Long | Schema::TimestampMillis) => Step::EventTime,
                ("device_id", Schema::Union(u)) if u.variants().len() == 2 => {
                    let at = |kind: fn(&Schema) -> bool| u.variants().iter().position(kind);
                    Step::DeviceId(
                        at(|s| matches!(s, Schema::Null))?,
                        at(|s| matches!(s, Schema::Long))?,
                    )
                }
                _ => return None,
            };
            steps.push(step);
        }
        // Field names are distinct (the schema parser refuses duplicates), so
        // twelve steps besides the device id's are the twelve required fields.
        let required = steps.iter().filter(|s| !matches!(s, Step::DeviceId(..))).count();
        (required == 12).then_some(Plan { steps })
    }

    /// Read the record in `datum`, all of it, into `r`; `None` where the
    /// plan cannot tell (apache-avro then reads it and names what is wrong),
    /// and `r` is then left half-written.
    fn read(&self, datum: &[u8], r: &mut AvroTransaction) -> Option<()> {
        let mut b = datum;
        // Every field is set below (the plan has a step for each required
        // one) but the device id, which older writers lack.
        r.device_id = None;
        for step in &self.steps {
            match *step {
                Step::EventId => r.event_id = read_long(&mut b)?,
                Step::CardId => r.card_id = read_long(&mut b)?,
                Step::AccountId => r.account_id = read_long(&mut b)?,
                Step::MerchantId => r.merchant_id = read_long(&mut b)?,
                Step::Mcc => r.mcc = i32::try_from(read_long(&mut b)?).ok()?,
                Step::AmountMinor => r.amount_minor = read_long(&mut b)?,
                Step::Currency => read_string(&mut b, &mut r.currency)?,
                Step::Country => read_string(&mut b, &mut r.country)?,
                Step::Lat => r.lat = read_double(&mut b)?,
                Step::Lon => r.lon = read_double(&mut b)?,
                Step::Channel(by_index, n) => {
                    let i = usize::try_from(read_long(&mut b)?).ok().filter(|i| *i < n)?;
                    r.channel = by_index[i]?;
                }
                Step::EventTime => r.event_time = read_long(&mut b)?,
                Step::DeviceId(null, long) => {
                    let branch = usize::try_from(read_long(&mut b)?).ok()?;
                    r.device_id = if branch == null {
                        None
                    } else if branch == long {
                        Some(read_long(&mut b)?)
                    } else {
                        return None;
                    };
                }
            }
        }
        b.is_empty().then_some(())
    }
}

/// Avro's `long` (and `int`): a base-128 varint of at most ten bytes, then zigzag.
fn read_long(b: &mut &[u8]) -> Option<i64> {
    let mut z: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        // The tenth byte holds the top bit only.
        if i == 9 && byte > 1 {
            return None;
        }
        z |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *b = &b[i + 1..];
            return Some((z >> 1) as i64 ^ -((z & 1) as i64));
        }
    }
    None
}

/// Avro's `string`: its length as a `long`, then as many bytes of UTF-8,
/// into `into` (its buffer reused).
fn read_string(b: &mut &[u8], into: &mut String) -> Option<()> {
    let n = usize::try_from(read_long(b)?).ok().filter(|n| *n <= b.len())?;
    into.clear();
    into.push_str(std::str::from_utf8(&b[..n]).ok()?);
    *b = &b[n..];
    Some(())
}

/// Avro's `double`: eight bytes, little-endian.
fn read_double(b: &mut &[u8]) -> Option<f64> {
    let (bytes, rest) = b.split_first_chunk::<8>()?;
    *b = rest;
    Some(f64::from_le_bytes(*bytes))
}

fn schema_name(s: &Schema) -> String {
    match s {
        Schema::Record(r) => r.name.fullname(None),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)),
    }
}

fn is_transaction(s: &Schema) -> bool {
    schema_name(s) == "dev.tripwire.Transaction"
}

/// An Avro read error as a dead-letter reason: running out of bytes is truncation.
fn classify(e: apache_avro::Error) -> Rejected {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("eof")
        || lower.contains("fill whole buffer")
        || lower.contains("unexpected end")
    {
        Rejected::new(Reason::Truncated, text)
    } else if lower.contains("missing field") {
        Rejected::new(Reason::InvalidField, text)
    } else {
        Rejected::new(Reason::WrongSchema, text)
    }
}

/// Check every field's domain and build the dataflow's event.
pub fn validate(
    r: &AvroTransaction,
    limits: &Limits,
    log_time_ms: Option<i64>,
) -> Result<Transaction, Rejected> {
    let invalid = |what: String| Err(Rejected::new(Reason::InvalidField, what));
    if r.amount_minor <= 0 {
        return invalid(format!("amount_minor {} is not positive", r.amount_minor));
    }
    if r.amount_minor > MAX_AMOUNT_MINOR {
        return invalid(format!("amount_minor {} is above {MAX_AMOUNT_MINOR}", r.amount_minor));
    }
    if !(r.lat.is_finite() && (-90.0..=90.0).contains(&r.lat)) {
        return invalid(format!("lat {} is not within ±90", r.lat));
    }
    if !(r.lon.is_finite() && (-180.0..=180.0).contains(&r.lon)) {
        return invalid(format!("lon {} is not within ±180", r.lon));
    }
    let Some(currency) = codes::currency(&r.currency) else {
        return invalid(format!("currency {:?} is not an ISO 4217 code", r.currency));
    };
    let Some(country) = codes::country(&r.country) else {
        return invalid(format!("country {:?} is not an ISO 3166-1 alpha-2 code", r.country));
    };
    if !(0..=9999).contains(&r.mcc) {
        return invalid(format!("mcc {} is not a 4-digit code", r.mcc));
    }
    if r.event_time < 0 {
        return Err(Rejected::new(
            Reason::TooFarInPast,
            format!("event_time {} is before 1970", r.event_time),
        ));
    }
    if let Some(log) = log_time_ms.filter(|l| *l >= 0) {
        if r.event_time > log.saturating_add(limits.max_future_ms) {
            return Err(Rejected::new(
                Reason::TooFarInFuture,
                format!(
                    "event_time {} is {} ms ahead of its Kafka timestamp {log} (at most {} allowed)",
                    r.event_time,
                    r.event_time - log,
                    limits.max_future_ms
                ),
            ));
        }
        if let Some(age) = limits.max_age_ms {
            if r.event_time < log.saturating_sub(age) {
                return Err(Rejected::new(
                    Reason::TooFarInPast,
                    format!(
                        "event_time {} is {} ms behind its Kafka timestamp {log} (at most {age} allowed; a backfill accepts any age)",
                        r.event_time,
                        log - r.event_time
                    ),
                ));
            }
        }
    }
    Ok(Transaction {
        event_id: r.event_id as u64,
        card_id: r.card_id as u64,
        account_id: r.account_id as u64,
        merchant_id: r.merchant_id as u64,
        mcc: r.mcc as u16,
        amount_minor: r.amount_minor,
        currency,
        country,
        lat_e6: (r.lat * 1e6).round() as i32,
        lon_e6: (r.lon * 1e6).round() as i32,
        channel: match r.channel {
            AvroChannel::POS => Channel::Pos,
            AvroChannel::ECOM => Channel::Ecom,
            AvroChannel::ATM => Channel::Atm,
        },
        event_time_ms: r.event_time as u64,
        device_id: r.device_id.map(|d| d as u64),
    })
}

/// Encode `record` in the wire format with writer schema `id` (`schema`); fields the
/// schema lacks (v1 has no `device_id`) are left out.
///
/// Written field by field in the schema's order when every field is one this
/// record has, with the type it has (what Tripwire's own schemas hold): about
/// a twentieth of the time of going through apache-avro's `Value` tree,
/// which rebuilt a writer from the schema for every record and was most of
/// what the load generator spent per record. Any other schema goes that way.
pub fn encode(
    record: &AvroTransaction,
    id: u32,
    schema: &Schema,
) -> Result<Vec<u8>, apache_avro::Error> {
    let mut out = Vec::with_capacity(96);
    out.push(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    if direct(record, schema, &mut out) {
        return Ok(out);
    }
    out.truncate(5);
    out.extend_from_slice(&datum(record, schema)?);
    Ok(out)
}

/// Append `record`'s Avro datum under `schema` to `out`, field by field;
/// false (and `out` partly written) when the schema has a field this does
/// not write directly.
fn direct(r: &AvroTransaction, schema: &Schema, out: &mut Vec<u8>) -> bool {
    let Schema::Record(rs) = schema else { return false };
    for field in &rs.fields {
        match (field.name.as_str(), &field.schema) {
            ("event_id", Schema::Long) => long(out, r.event_id),
            ("card_id", Schema::Long) => long(out, r.card_id),
            ("account_id", Schema::Long) => long(out, r.account_id),
            ("merchant_id", Schema::Long) => long(out, r.merchant_id),
            ("mcc", Schema::Int) => long(out, i64::from(r.mcc)),
            ("amount_minor", Schema::Long) => long(out, r.amount_minor),
            ("currency", Schema::String) => string(out, &r.currency),
            ("country", Schema::String) => string(out, &r.country),
            ("lat", Schema::Double) => out.extend_from_slice(&r.lat.to_le_bytes()),
            ("lon", Schema::Double) => out.extend_from_slice(&r.lon.to_le_bytes()),
            ("channel", Schema::Enum(e)) => {
                let Some(i) = e.symbols.iter().position(|s| s == r.channel.symbol()) else {
                    return false;
                };
                long(out, i as i64);
            }
            ("event_time", Schema::Long | Schema::TimestampMillis) => long(out, r.event_time),
            ("device_id", Schema::Union(u)) => {
                let branch = |kind: fn(&Schema) -> bool| u.variants().iter().position(kind);
                let null = branch(|s| matches!(s, Schema::Null));
                match (r.device_id, null, branch(|s| matches!(s, Schema::Long))) {
                    (None, Some(null), _) => long(out, null as i64),
                    (Some(d), _, Some(l)) => {
                        long(out, l as i64);
                        long(out, d);
                    }
                    _ => return false,
                }
            }
            _ => return false,
        }
    }
    true
}

/// Avro's `int` and `long`: zigzag, then a base-128 varint.
fn long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Avro's `string`: its length in bytes as a `long`, then UTF-8.
fn string(out: &mut Vec<u8>, s: &str) {
    long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

/// `record`'s datum under `schema`, by apache-avro (any schema).
fn datum(record: &AvroTransaction, schema: &Schema) -> Result<Vec<u8>, apache_avro::Error> {
    use apache_avro::types::Value;
    let mut value = apache_avro::to_value(record)?;
    if let (Value::Record(fields), Schema::Record(rs)) = (&mut value, schema) {
        fields.retain(|(name, _)| rs.lookup.contains_key(name));
    }
    GenericDatumWriter::builder(schema).build()?.write_value_to_vec(value.resolve(schema)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::EmbeddedRegistry;

    const NOW: i64 = 1_700_000_000_000;

    fn record() -> AvroTransaction {
        AvroTransaction {
            event_id: 42,
            card_id: 7,
            account_id: 3,
            merchant_id: 11,
            mcc: 5411,
            amount_minor: 1_999,
            currency: "EUR".into(),
            country: "DE".into(),
            lat: 52.52,
            lon: 13.405,
            channel: AvroChannel::ECOM,
            event_time: NOW - 1_000,
            device_id: Some(99),
        }
    }

    fn codec() -> (TransactionCodec, Arc<EmbeddedRegistry>) {
        let registry = Arc::new(EmbeddedRegistry::new().unwrap());
        (TransactionCodec::new(registry.clone(), Limits::default()), registry)
    }

    fn bytes(r: &AvroTransaction, id: u32) -> Vec<u8> {
        let (_, registry) = codec();
        encode(r, id, &registry.schema(id).unwrap()).unwrap()
    }

    fn reason(bytes: &[u8]) -> Reason {
        codec().0.decode(bytes, Some(NOW)).unwrap_err().reason
    }

    /// Records with every field's extremes, both devices and every channel, seeded.
    fn varied(n: usize) -> Vec<AvroTransaction> {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        // splitmix64
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let edges = [0, 1, -1, 63, 64, -64, -65, 127, 128, i64::MAX, i64::MIN];
        let mut long = move || {
            let x = next();
            if x % 4 == 0 {
                (edges[(x >> 8) as usize % edges.len()], x)
            } else {
                ((x as i64) >> (x % 60), x)
            }
        };
        (0..n)
            .map(|i| AvroTransaction {
                event_id: long().0,
                card_id: long().0,
                account_id: long().0,
                merchant_id: long().0,
                mcc: long().0 as i32,
                amount_minor: long().0,
                currency: ["EUR", "", "USD", "ünï"][i % 4].into(),
                country: "x".repeat(i % 70),
                lat: f64::from_bits(long().1),
                lon: -0.0,
                channel: AvroChannel::ALL[i % 3],
                event_time: long().0,
                device_id: (i % 2 == 0).then(|| long().0),
            })
            .collect()
    }

    #[test]
    fn the_direct_encoding_is_what_apache_avro_writes() {
        let (_, registry) = codec();
        for id in [1, 2] {
            let schema = registry.schema(id).unwrap();
            for r in varied(5_000) {
                let mut direct_bytes = Vec::new();
                assert!(direct(&r, &schema, &mut direct_bytes), "schema {id} is written directly");
                assert_eq!(direct_bytes, datum(&r, &schema).unwrap(), "schema {id}, {r:?}");
            }
        }
    }

    #[test]
    fn a_schema_the_direct_encoding_does_not_know_goes_through_apache_avro() {
        // v2 with the fields in another order and `mcc` a long: the order is
        // followed directly; a field of another type is left to apache-avro.
        let reordered = Schema::parse_str(
            r#"{"type": "record", "name": "Transaction", "namespace": "dev.tripwire", "fields": [
                {"name": "device_id", "type": ["null", "long"], "default": null},
                {"name": "event_time", "type": "long"},
                {"name": "channel", "type": {"type": "enum", "name": "Channel", "symbols": ["ATM", "ECOM", "POS"]}},
                {"name": "lon", "type": "double"}, {"name": "lat", "type": "double"},
                {"name": "country", "type": "string"}, {"name": "currency", "type": "string"},
                {"name": "amount_minor", "type": "long"}, {"name": "mcc", "type": "int"},
                {"name": "merchant_id", "type": "long"}, {"name": "account_id", "type": "long"},
                {"name": "card_id", "type": "long"}, {"name": "event_id", "type": "long"}]}"#,
        )
        .unwrap();
        let widened = Schema::parse_str(
            &include_str!("../../schemas/transaction-v2.avsc")
                .replace(r#""name": "mcc", "type": "int""#, r#""name": "mcc", "type": "long""#),
        )
        .unwrap();
        for r in varied(500) {
            let mut out = Vec::new();
            assert!(direct(&r, &reordered, &mut out));
            assert_eq!(out, datum(&r, &reordered).unwrap());
            assert!(
                !direct(&r, &widened, &mut Vec::new()),
                "mcc as a long is not written directly"
            );
            let framed = encode(&r, 9, &widened).unwrap();
            assert_eq!(framed[5..], datum(&r, &widened).unwrap()[..]);
        }
    }

    #[test]
    fn v2_record_decodes_into_the_event_with_its_device() {
        let x = codec().0.decode(&bytes(&record(), 2), Some(NOW)).unwrap();
        assert_eq!(x.event_id, 42);
        assert_eq!(x.card_id, 7);
        assert_eq!(x.amount_minor, 1_999);
        assert_eq!(x.currency, *b"EUR");
        assert_eq!(x.country, *b"DE");
        assert_eq!((x.lat_e6, x.lon_e6), (52_520_000, 13_405_000));
        assert_eq!(x.channel, Channel::Ecom);
        assert_eq!(x.event_time_ms, (NOW - 1_000) as u64);
        assert_eq!(x.device_id, Some(99));
    }

    #[test]
    fn v1_record_decodes_with_no_device() {
        let framed = bytes(&record(), 1);
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 1], "magic byte and schema id 1");
        let x = codec().0.decode(&framed, Some(NOW)).unwrap();
        assert_eq!(x.device_id, None);
        assert_eq!(x.event_id, 42);
    }

    #[test]
    fn framing_errors_have_their_reasons() {
        let good = bytes(&record(), 2);
        assert_eq!(reason(&[]), Reason::Truncated);
        assert_eq!(reason(&good[..3]), Reason::Truncated);
        assert_eq!(reason(&good[..good.len() - 4]), Reason::Truncated);
        let mut magic = good.clone();
        magic[0] = 1;
        assert_eq!(reason(&magic), Reason::WrongMagic);
        let mut unknown = good.clone();
        unknown[4] = 77;
        assert_eq!(reason(&unknown), Reason::UnknownSchemaId);
        let mut alert = good.clone();
        alert[4] = 3; // the alert schema: registered, but not a transaction
        assert_eq!(reason(&alert), Reason::WrongSchema);
        let mut long = good.clone();
        long.extend_from_slice(&[1, 2, 3]);
        assert_eq!(reason(&long), Reason::WrongSchema, "trailing bytes");
        assert_eq!(reason(&vec![0u8; 70_000]), Reason::Oversize);
    }

    #[test]
    fn field_domains_are_checked() {
        let bad = |f: fn(&mut AvroTransaction)| {
            let mut r = record();
            f(&mut r);
            codec().0.decode(&bytes(&r, 2), Some(NOW)).unwrap_err()
        };
        for f in [
            (|r: &mut AvroTransaction| r.amount_minor = 0) as fn(&mut AvroTransaction),
            |r| r.amount_minor = -5,
            |r| r.amount_minor = i64::MAX,
            |r| r.lat = f64::NAN,
            |r| r.lat = 90.5,
            |r| r.lon = -180.1,
            |r| r.lon = f64::INFINITY,
            |r| r.currency = "XYZ".into(),
            |r| r.country = "ZZ".into(),
            |r| r.mcc = 10_000,
        ] {
            assert_eq!(bad(f).reason, Reason::InvalidField);
        }
        assert_eq!(bad(|r| r.event_time = NOW + 3_600_000).reason, Reason::TooFarInFuture);
        assert_eq!(bad(|r| r.event_time = NOW - 30 * 86_400_000).reason, Reason::TooFarInPast);
        assert!(
            bad(|r| r.currency = "XYZ".into()).detail.contains("XYZ"),
            "the error names the value"
        );
    }

    #[test]
    fn time_bounds_are_judged_against_the_log_time_and_a_backfill_accepts_any_age() {
        let month_old = |r: &mut AvroTransaction| r.event_time = NOW - 30 * 86_400_000;
        let mut r = record();
        month_old(&mut r);
        let framed = bytes(&r, 2);
        // The same record decides the same whenever it is read: only the log's time counts.
        let (mut c, _) = codec();
        assert_eq!(c.decode(&framed, Some(NOW)).unwrap_err().reason, Reason::TooFarInPast);
        let written_then = NOW - 29 * 86_400_000;
        assert!(c.decode(&framed, Some(written_then)).is_ok(), "a day old when written");
        let backfill = Limits { max_age_ms: None, ..Limits::default() };
        let mut c = TransactionCodec::new(Arc::new(EmbeddedRegistry::new().unwrap()), backfill);
        assert!(c.decode(&framed, Some(NOW)).is_ok(), "a backfill accepts any age");
        let mut ahead = record();
        ahead.event_time = NOW + 10 * 365 * 86_400_000;
        assert_eq!(
            c.decode(&bytes(&ahead, 2), Some(NOW)).unwrap_err().reason,
            Reason::TooFarInFuture,
            "ten years ahead is refused even in a backfill"
        );
    }

    #[test]
    fn random_bytes_never_panic_and_always_get_a_reason() {
        // Seeded garbage after a valid header, and fully random messages.
        let mut z: u64 = 0x1234_5678;
        let mut next = move || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^ (x >> 27)
        };
        let (mut c, _) = codec();
        let good = bytes(&record(), 2);
        let mut rejected = 0;
        for i in 0..20_000 {
            let mut msg: Vec<u8> = if i % 2 == 0 { good[..5].to_vec() } else { Vec::new() };
            let len = (next() % 120) as usize;
            msg.extend((0..len).map(|_| next() as u8));
            if c.decode(&msg, Some(NOW)).is_err() {
                rejected += 1;
            }
        }
        assert!(rejected > 19_000, "garbage is rejected: {rejected}");
    }

    /// Writer schemas a plan reads: the two shipped versions, and one that
    /// orders its fields, enum symbols and union branches otherwise (an
    /// unknown symbol among them).
    fn planned_schemas() -> Vec<Schema> {
        let registry = EmbeddedRegistry::new().unwrap();
        let other = r#"{"type": "record", "name": "Transaction", "namespace": "dev.tripwire",
          "fields": [
            {"name": "device_id", "type": ["long", "null"]},
            {"name": "channel", "type": {"type": "enum", "name": "Channel",
              "symbols": ["ATM", "KIOSK", "POS", "ECOM"]}},
            {"name": "event_time", "type": "long"},
            {"name": "country", "type": "string"},
            {"name": "currency", "type": "string"},
            {"name": "lon", "type": "double"},
            {"name": "lat", "type": "double"},
            {"name": "amount_minor", "type": "long"},
            {"name": "mcc", "type": "int"},
            {"name": "merchant_id", "type": "long"},
            {"name": "account_id", "type": "long"},
            {"name": "card_id", "type": "long"},
            {"name": "event_id", "type": "long"}]}"#;
        vec![
            (*registry.schema(1).unwrap()).clone(),
            (*registry.schema(2).unwrap()).clone(),
            Schema::parse_str(other).unwrap(),
        ]
    }

    /// What apache-avro's reader makes of `datum` under `schema`, if it reads all of it.
    fn generic(schema: &Schema, datum: &[u8]) -> Option<AvroTransaction> {
        let reader = GenericDatumReader::builder(schema).build().unwrap();
        let mut rest = datum;
        let r = reader.read_deser::<AvroTransaction>(&mut rest).ok()?;
        rest.is_empty().then_some(r)
    }

    /// A record with its doubles as bits, so that a NaN equals itself.
    fn exact(r: Option<AvroTransaction>) -> Option<(AvroTransaction, u64, u64)> {
        r.map(|r| {
            let bits = (r.lat.to_bits(), r.lon.to_bits());
            (AvroTransaction { lat: 0.0, lon: 0.0, ..r }, bits.0, bits.1)
        })
    }

    #[test]
    fn a_planned_read_gives_what_apache_avro_gives_and_nothing_it_refuses() {
        let state = std::cell::Cell::new(0x9E37_79B9_7F4A_7C15_u64);
        let next = || {
            let mut x = state.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            state.set(x);
            x
        };
        let extremes = [0, 1, -1, 63, 64, -64, -65, i64::MAX, i64::MIN, 1 << 35];
        let strings = ["", "USD", "DE", "Ωμ", "a\u{1F600}b"];
        let (mut planned, mut compared) = (0, 0);
        // One record read into throughout, across schemas with and without
        // the device id: nothing of a record may stay for the next.
        let mut scratch = AvroTransaction::default();
        let schemas = planned_schemas();
        // Each schema twice, in both orders: a record without the device id
        // comes right after ones with it.
        for schema in schemas.iter().chain(schemas.iter().rev()) {
            let plan = Plan::of(schema).expect("a plan for this schema");
            let v1 = !matches!(schema, Schema::Record(r) if r.lookup.contains_key("device_id"));
            for n in 0..3_000 {
                let pick = |k: usize| next() as usize % k;
                let long = |v: u64, k: usize| {
                    if k.is_multiple_of(3) {
                        extremes[k % extremes.len()]
                    } else {
                        v as i64
                    }
                };
                let r = AvroTransaction {
                    event_id: long(next(), pick(9)),
                    card_id: long(next() >> 20, pick(9)),
                    account_id: long(next(), pick(9)),
                    merchant_id: long(next() >> 40, pick(9)),
                    mcc: [0, 5411, -1, i32::MAX, i32::MIN][pick(5)],
                    amount_minor: long(next() >> 30, pick(9)),
                    currency: strings[pick(strings.len())].to_string(),
                    country: strings[pick(strings.len())].to_string(),
                    lat: [0.0, -90.0, 52.52, f64::MIN_POSITIVE, f64::INFINITY][pick(5)],
                    lon: Some(f64::from_bits(next())).filter(|v| v.is_finite()).unwrap_or(13.4),
                    channel: AvroChannel::ALL[pick(3)],
                    event_time: long(next() >> 23, pick(9)),
                    device_id: if v1 || pick(2) == 0 { None } else { Some(long(next(), pick(9))) },
                };
                let bytes = encode(&r, 9, schema).unwrap();
                let datum = &bytes[5..];
                // Whole records: the plan reads each, as apache-avro does,
                // into the record it read the one before into (as the codec does).
                let got = plan.read(datum, &mut scratch).map(|()| scratch.clone());
                assert_eq!(got.as_ref(), Some(&r), "record {n}");
                assert_eq!(generic(schema, datum), got, "record {n}");
                planned += 1;
                // Cut short, or a byte changed: whatever the plan reads,
                // apache-avro reads the same (the rest it refuses, or reads
                // without the plan).
                let mut bad = datum.to_vec();
                if n % 2 == 0 {
                    bad.truncate(pick(datum.len()));
                } else {
                    let at = pick(bad.len());
                    bad[at] = next() as u8;
                }
                if plan.read(&bad, &mut scratch).is_some() {
                    let read = exact(Some(scratch.clone()));
                    assert_eq!(exact(generic(schema, &bad)), read, "changed record {n}");
                    compared += 1;
                }
            }
        }
        assert_eq!(planned, 18_000);
        assert!(compared > 1_000, "changed records the plan read: {compared}");
    }

    #[test]
    fn a_schema_with_a_field_the_codec_does_not_know_or_without_a_required_one_gets_no_plan() {
        let extra = r#"{"type": "record", "name": "Transaction", "namespace": "dev.tripwire",
          "fields": [
            {"name": "event_id", "type": "long"}, {"name": "card_id", "type": "long"},
            {"name": "account_id", "type": "long"}, {"name": "merchant_id", "type": "long"},
            {"name": "mcc", "type": "int"}, {"name": "amount_minor", "type": "long"},
            {"name": "currency", "type": "string"}, {"name": "country", "type": "string"},
            {"name": "lat", "type": "double"}, {"name": "lon", "type": "double"},
            {"name": "channel", "type": {"type": "enum", "name": "Channel", "symbols": ["POS"]}},
            {"name": "event_time", "type": "long"}, {"name": "tip_minor", "type": "long"}]}"#;
        assert!(Plan::of(&Schema::parse_str(extra).unwrap()).is_none());
        let missing = extra.replace(r#"{"name": "card_id", "type": "long"},"#, "");
        assert!(Plan::of(&Schema::parse_str(&missing).unwrap()).is_none());
    }
}
