//! A Kafka producer that sends each broker every partition's pending records
//! in one `ProduceRequest`, as the Java producer does: txgen's fixed-rate
//! mode writes with it.
//!
//! librdkafka (2.12) sends one `ProduceRequest` per partition (its issue
//! #1700). With a linger of 5 ms over 12 partitions that is up to 2,400
//! requests a second at any rate, and a broker's cost is mostly per request:
//! on this project's two-core machine, 10K records/s cost the broker about
//! four times the CPU over 12 partitions that they cost over one. The
//! payment systems Tripwire reads from mostly produce with the Java client,
//! whose sender drains all of a broker's partitions into one request per
//! linger; a load generator that costs the broker a dozen times more per
//! record than they do measures the load generator, not the job beside it.
//!
//! What it does:
//! - idempotent: a producer id from `InitProducerId`, a sequence per
//!   partition; a resent batch keeps its sequence, so the broker writes it
//!   once (a duplicate is acknowledged, not appended);
//! - `acks=all`, record batches of magic 2, uncompressed, each record's
//!   timestamp (CreateTime) the wall clock when [`WireProducer::send`] was
//!   called, as librdkafka stamps it;
//! - one request in flight per broker, so a partition's records land in the
//!   order they were sent; records sent while a request is out go in the
//!   next one;
//! - a request times out, a connection that fails is opened again, and a
//!   retriable error (timeout, too few replicas, storage) resends the same
//!   batches, for up to [`RETRY_FOR`]; any other error (a partition whose
//!   leader moved among them: this producer does not follow leaders) ends
//!   the producer, and the next `send` or [`WireProducer::flush`] returns it.
//!   Nothing is dropped quietly.
//!
//! Protocol versions: `InitProducerId` v1 and `Produce` v7 (the last ones
//! before flexible encoding; Kafka 4.x serves `Produce` 3-13).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// How long a request may fail retriably before the producer gives up.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
/// A partition's records in one request at most: the sender takes them once
/// they reach this, and `send` waits while they are at it (below the broker's
/// default `message.max.bytes`, 1 MB).
const BATCH_BYTES: usize = 512 * 1024;
const PRODUCE: i16 = 0;
const INIT_PRODUCER_ID: i16 = 22;
/// Errors worth the same batches again (Kafka's error codes).
const RETRIABLE: [i16; 4] = [
    7,  // REQUEST_TIMED_OUT
    19, // NOT_ENOUGH_REPLICAS
    20, // NOT_ENOUGH_REPLICAS_AFTER_APPEND
    56, // KAFKA_STORAGE_ERROR
];
/// The broker wrote this batch already (a resend of one that landed).
const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;

/// See the module documentation.
pub struct WireProducer {
    topic: String,
    /// Per partition, the index of its leader's lane.
    lane_of: Vec<usize>,
    lanes: Vec<Arc<Lane>>,
    senders: Vec<JoinHandle<()>>,
}

/// One broker's pending records and its sender thread's signals.
struct Lane {
    pending: Mutex<Pending>,
    /// The sender waits on it for records, a full batch or the end.
    work: Condvar,
    /// `send` waits on it while its partition's batch is full.
    room: Condvar,
}

#[derive(Default)]
struct Pending {
    batches: BTreeMap<i32, Records>,
    /// When the oldest pending record was sent (the linger runs from there).
    since: Option<Instant>,
    /// A partition reached [`BATCH_BYTES`]: send without waiting out the linger.
    full: bool,
    closing: bool,
    failed: Option<String>,
}

/// A partition's records not yet sent, encoded as a record batch's records.
#[derive(Default)]
struct Records {
    first_ts: i64,
    max_ts: i64,
    count: i32,
    body: Vec<u8>,
    /// One record while it is encoded (its length goes before it).
    scratch: Vec<u8>,
}

impl WireProducer {
    /// Connect to the leaders of `topic`'s partitions (found with librdkafka's
    /// metadata request through `bootstrap`) and get a producer id.
    pub fn new(bootstrap: &str, topic: &str, linger: Duration) -> Result<Self> {
        let client: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
        let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let t = metadata.topics().first().context("no metadata for the topic")?;
        if let Some(e) = t.error() {
            bail!("topic {topic}: {e:?}");
        }
        let address = |id: i32| {
            metadata
                .brokers()
                .iter()
                .find(|b| b.id() == id)
                .map(|b| format!("{}:{}", b.host(), b.port()))
                .with_context(|| format!("broker {id} is not in the metadata"))
        };
        if t.partitions().is_empty() {
            bail!("topic {topic} has no partitions in the metadata");
        }
        let mut leaders: Vec<i32> = Vec::new();
        let mut lane_of = vec![0; t.partitions().len()];
        for p in t.partitions() {
            if p.leader() < 0 {
                bail!("partition {} of {topic} has no leader", p.id());
            }
            let lane = match leaders.iter().position(|l| *l == p.leader()) {
                Some(i) => i,
                None => {
                    leaders.push(p.leader());
                    leaders.len() - 1
                }
            };
            let index = usize::try_from(p.id()).context("a negative partition id")?;
            if index >= lane_of.len() {
                bail!("partition ids of {topic} are not 0..{}", lane_of.len());
            }
            lane_of[index] = lane;
        }
        let addresses = leaders.iter().map(|id| address(*id)).collect::<Result<Vec<_>>>()?;
        let mut first = Connection::open(&addresses[0])?;
        let id = first.init_producer_id()?;
        let mut lanes = Vec::new();
        let mut senders = Vec::new();
        let mut first = Some(first);
        for (n, address) in addresses.into_iter().enumerate() {
            let lane = Arc::new(Lane {
                pending: Mutex::new(Pending::default()),
                work: Condvar::new(),
                room: Condvar::new(),
            });
            let conn = match first.take() {
                Some(c) => c,
                None => Connection::open(&address)?,
            };
            let sender = Sender {
                lane: lane.clone(),
                conn: Some(conn),
                address,
                topic: topic.to_owned(),
                id,
                sequences: BTreeMap::new(),
                linger,
            };
            senders.push(
                std::thread::Builder::new()
                    .name(format!("wire-producer-{n}"))
                    .spawn(move || sender.run())?,
            );
            lanes.push(lane);
        }
        Ok(Self { topic: topic.to_owned(), lane_of, lanes, senders })
    }

    /// The topic's partitions.
    pub fn partitions(&self) -> usize {
        self.lane_of.len()
    }

    /// Queue one record for `partition`; its timestamp is now. Waits while
    /// the partition's pending records are a full batch; fails once the
    /// producer has failed.
    pub fn send(&self, partition: i32, key: &[u8], value: &[u8]) -> Result<()> {
        let lane = usize::try_from(partition)
            .ok()
            .and_then(|p| self.lane_of.get(p))
            .with_context(|| format!("{} has no partition {partition}", self.topic))?;
        let lane = &self.lanes[*lane];
        let mut pending = lane.pending.lock().map_err(|_| anyhow!("a sender panicked"))?;
        loop {
            if let Some(e) = &pending.failed {
                bail!("producing to {}: {e}", self.topic);
            }
            if pending.batches.get(&partition).is_none_or(|r| r.body.len() < BATCH_BYTES) {
                break;
            }
            pending = lane.room.wait(pending).map_err(|_| anyhow!("a sender panicked"))?;
        }
        let records = pending.batches.entry(partition).or_default();
        records.push(now_ms(), key, value);
        let full = records.body.len() >= BATCH_BYTES;
        let first = pending.since.is_none();
        if first {
            pending.since = Some(Instant::now());
        }
        if full {
            pending.full = true;
        }
        drop(pending);
        if first || full {
            lane.work.notify_one();
        }
        Ok(())
    }

    /// Send what is pending and wait until the brokers have acknowledged all
    /// of it; the first error any sender met, if one did.
    pub fn flush(mut self) -> Result<()> {
        for lane in &self.lanes {
            lane.pending.lock().map_err(|_| anyhow!("a sender panicked"))?.closing = true;
            lane.work.notify_one();
        }
        for sender in self.senders.drain(..) {
            sender.join().map_err(|_| anyhow!("a sender panicked"))?;
        }
        for lane in &self.lanes {
            let pending = lane.pending.lock().map_err(|_| anyhow!("a sender panicked"))?;
            if let Some(e) = &pending.failed {
                bail!("producing to {}: {e}", self.topic);
            }
        }
        Ok(())
    }
}

impl Records {
    /// Append one record (key and value, no headers).
    fn push(&mut self, ts: i64, key: &[u8], value: &[u8]) {
        if self.count == 0 {
            self.first_ts = ts;
            self.max_ts = ts;
        }
        self.max_ts = self.max_ts.max(ts);
        let record = &mut self.scratch;
        record.clear();
        record.push(0); // attributes
        put_varlong(record, ts - self.first_ts);
        put_varlong(record, i64::from(self.count)); // offset delta
        put_varlong(record, key.len() as i64);
        record.extend_from_slice(key);
        put_varlong(record, value.len() as i64);
        record.extend_from_slice(value);
        put_varlong(record, 0); // headers
        put_varlong(&mut self.body, record.len() as i64);
        self.body.extend_from_slice(record);
        self.count += 1;
    }

    /// The record batch (magic 2) of these records from `id` at `sequence`.
    fn batch(&self, id: ProducerId, sequence: i32) -> Vec<u8> {
        let mut b = Vec::with_capacity(61 + self.body.len());
        b.extend_from_slice(&0i64.to_be_bytes()); // base offset
        b.extend_from_slice(&(49 + self.body.len() as i32).to_be_bytes()); // batch length
        b.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
        b.push(2); // magic
        b.extend_from_slice(&[0; 4]); // CRC, below
        b.extend_from_slice(&0i16.to_be_bytes()); // attributes: uncompressed, CreateTime
        b.extend_from_slice(&(self.count - 1).to_be_bytes()); // last offset delta
        b.extend_from_slice(&self.first_ts.to_be_bytes());
        b.extend_from_slice(&self.max_ts.to_be_bytes());
        b.extend_from_slice(&id.id.to_be_bytes());
        b.extend_from_slice(&id.epoch.to_be_bytes());
        b.extend_from_slice(&sequence.to_be_bytes());
        b.extend_from_slice(&self.count.to_be_bytes());
        b.extend_from_slice(&self.body);
        let crc = crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }
}

#[derive(Clone, Copy, Debug)]
struct ProducerId {
    id: i64,
    epoch: i16,
}

/// A lane's thread: takes the pending records once the linger is out (or a
/// batch is full, or the producer closes) and sends them in one request.
struct Sender {
    lane: Arc<Lane>,
    conn: Option<Connection>,
    address: String,
    topic: String,
    id: ProducerId,
    /// Per partition of this broker, the next record's sequence (0 until its first batch).
    sequences: BTreeMap<i32, i32>,
    linger: Duration,
}

impl Sender {
    fn run(mut self) {
        while let Some(batches) = self.take() {
            let mut out = Vec::with_capacity(batches.len());
            for (partition, records) in &batches {
                let next = self.sequences.entry(*partition).or_insert(0);
                out.push((*partition, records.batch(self.id, *next)));
                *next = next_sequence(*next, records.count);
            }
            if let Err(e) = self.produce(out) {
                let mut pending = self.lane.pending.lock().unwrap_or_else(|p| p.into_inner());
                pending.failed = Some(format!("{e:#}"));
                self.lane.room.notify_all();
                return;
            }
        }
    }

    /// The next records to send, or `None` once closing with nothing left
    /// (or failed).
    fn take(&self) -> Option<BTreeMap<i32, Records>> {
        let mut pending = self.lane.pending.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if pending.failed.is_some() {
                return None;
            }
            match pending.since {
                None if pending.closing => return None,
                None => {
                    pending = self.lane.work.wait(pending).unwrap_or_else(|p| p.into_inner());
                }
                Some(since) => {
                    let left = self.linger.saturating_sub(since.elapsed());
                    if left.is_zero() || pending.full || pending.closing {
                        break;
                    }
                    pending = self
                        .lane
                        .work
                        .wait_timeout(pending, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        pending.since = None;
        pending.full = false;
        let batches = std::mem::take(&mut pending.batches);
        drop(pending);
        self.lane.room.notify_all();
        Some(batches)
    }

    /// Send `batches` until each is acknowledged, resending the ones that
    /// failed retriably (and all of them over a new connection when the
    /// connection failed) for up to [`RETRY_FOR`].
    fn produce(&mut self, mut batches: Vec<(i32, Vec<u8>)>) -> Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        while !batches.is_empty() {
            if started.elapsed() > RETRY_FOR {
                bail!("gave up after {RETRY_FOR:?}: {last}");
            }
            if !last.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let conn = match self.conn.as_mut() {
                Some(c) => c,
                None => match Connection::open(&self.address) {
                    Ok(c) => self.conn.insert(c),
                    Err(e) => {
                        last = format!("{e:#}");
                        continue;
                    }
                },
            };
            let errors = match conn.produce(&self.topic, &batches) {
                Ok(errors) => errors,
                Err(e) => {
                    last = format!("{e:#}");
                    self.conn = None;
                    continue;
                }
            };
            let mut again = Vec::new();
            for (partition, error) in errors {
                match error {
                    0 | DUPLICATE_SEQUENCE_NUMBER => {}
                    e if RETRIABLE.contains(&e) => {
                        last = format!("partition {partition}: Kafka error {e}");
                        again.push(partition);
                    }
                    6 => bail!(
                        "partition {partition}: its leader moved (NOT_LEADER_OR_FOLLOWER); \
                         this producer does not follow leaders (txgen --producer librdkafka does)"
                    ),
                    e => bail!("partition {partition}: Kafka error {e}"),
                }
            }
            batches.retain(|(p, _)| again.contains(p));
        }
        Ok(())
    }
}

/// One connection to a broker, request by request.
struct Connection {
    stream: TcpStream,
    correlation: i32,
}

impl Connection {
    fn open(address: &str) -> Result<Self> {
        let stream =
            TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(40)))?;
        stream.set_write_timeout(Some(Duration::from_secs(40)))?;
        Ok(Self { stream, correlation: 0 })
    }

    /// One request (header v1, client id `txgen`) and its response's body.
    fn call(&mut self, api: i16, version: i16, body: &[u8]) -> io::Result<Vec<u8>> {
        self.correlation = self.correlation.wrapping_add(1);
        let client = b"txgen";
        let mut head = Vec::with_capacity(18);
        let size = 2 + 2 + 4 + 2 + client.len() + body.len();
        head.extend_from_slice(&(size as i32).to_be_bytes());
        head.extend_from_slice(&api.to_be_bytes());
        head.extend_from_slice(&version.to_be_bytes());
        head.extend_from_slice(&self.correlation.to_be_bytes());
        head.extend_from_slice(&(client.len() as i16).to_be_bytes());
        head.extend_from_slice(client);
        self.stream.write_all(&head)?;
        self.stream.write_all(body)?;
        let mut size = [0; 4];
        self.stream.read_exact(&mut size)?;
        let size = usize::try_from(i32::from_be_bytes(size))
            .map_err(|_| io::Error::other("a negative response size"))?;
        let mut response = vec![0; size];
        self.stream.read_exact(&mut response)?;
        let mut r = Reader(&response);
        if r.i32()? != self.correlation {
            return Err(io::Error::other("a response to another request"));
        }
        Ok(response[4..].to_vec())
    }

    /// A producer id for an idempotent producer (no transactional id).
    fn init_producer_id(&mut self) -> Result<ProducerId> {
        let started = Instant::now();
        loop {
            let mut body = Vec::new();
            body.extend_from_slice(&(-1i16).to_be_bytes()); // transactional id: null
            body.extend_from_slice(&60_000i32.to_be_bytes()); // transaction timeout
            let response = self.call(INIT_PRODUCER_ID, 1, &body)?;
            let mut r = Reader(&response);
            let _throttle = r.i32()?;
            let error = r.i16()?;
            let id = ProducerId { id: r.i64()?, epoch: r.i16()? };
            match error {
                0 => return Ok(id),
                // COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE,
                // NOT_COORDINATOR: a broker just started.
                14..=16 if started.elapsed() < RETRY_FOR => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                e => bail!("InitProducerId: Kafka error {e}"),
            }
        }
    }

    /// One `Produce` v7 request with `batches` for `topic` (`acks=all`); the
    /// error code of each partition.
    fn produce(&mut self, topic: &str, batches: &[(i32, Vec<u8>)]) -> Result<Vec<(i32, i16)>> {
        let size: usize = batches.iter().map(|(_, b)| 8 + b.len()).sum();
        let mut body = Vec::with_capacity(20 + topic.len() + size);
        body.extend_from_slice(&(-1i16).to_be_bytes()); // transactional id: null
        body.extend_from_slice(&(-1i16).to_be_bytes()); // acks: all
        body.extend_from_slice(&30_000i32.to_be_bytes()); // timeout ms
        body.extend_from_slice(&1i32.to_be_bytes()); // one topic
        body.extend_from_slice(&(topic.len() as i16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&(batches.len() as i32).to_be_bytes());
        for (partition, batch) in batches {
            body.extend_from_slice(&partition.to_be_bytes());
            body.extend_from_slice(&(batch.len() as i32).to_be_bytes());
            body.extend_from_slice(batch);
        }
        let response = self.call(PRODUCE, 7, &body)?;
        let mut r = Reader(&response);
        let mut errors = Vec::with_capacity(batches.len());
        for _ in 0..r.i32()? {
            let name_len = r.i16()?;
            r.skip(usize::try_from(name_len).unwrap_or(0))?;
            for _ in 0..r.i32()? {
                let partition = r.i32()?;
                let error = r.i16()?;
                r.skip(8 + 8 + 8)?; // base offset, log append time, log start offset
                errors.push((partition, error));
            }
        }
        for (p, _) in batches {
            if !errors.iter().any(|(q, _)| q == p) {
                bail!("the broker did not answer for partition {p}");
            }
        }
        Ok(errors)
    }
}

/// Big-endian reads off a response.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| io::Error::other("a response shorter than its fields"))?;
        self.0 = rest;
        Ok(*head)
    }
    fn skip(&mut self, n: usize) -> io::Result<()> {
        self.0 = self
            .0
            .get(n..)
            .ok_or_else(|| io::Error::other("a response shorter than its fields"))?;
        Ok(())
    }
    fn i16(&mut self) -> io::Result<i16> {
        self.take().map(i16::from_be_bytes)
    }
    fn i32(&mut self) -> io::Result<i32> {
        self.take().map(i32::from_be_bytes)
    }
    fn i64(&mut self) -> io::Result<i64> {
        self.take().map(i64::from_be_bytes)
    }
}

/// The sequence after `count` records from `sequence` (Kafka's wraps to 0
/// past `i32::MAX`).
fn next_sequence(sequence: i32, count: i32) -> i32 {
    if sequence > i32::MAX - count {
        count - (i32::MAX - sequence) - 1
    } else {
        sequence + count
    }
}

/// Kafka's variable-length signed integer (zig-zag, then 7 bits a byte).
fn put_varlong(out: &mut Vec<u8>, v: i64) {
    let mut u = ((v << 1) ^ (v >> 63)) as u64;
    while u >= 0x80 {
        out.push((u as u8 & 0x7f) | 0x80);
        u >>= 7;
    }
    out.push(u as u8);
}

/// CRC-32C (Castagnoli), as record batches carry it.
fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, b| TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    use tripwire_connectors::kafka_admin::ensure_topic;
    use tripwire_connectors::Endpoints;

    /// A record read back: key, value, timestamp.
    type Read = (Vec<u8>, Vec<u8>, i64);

    /// A fresh topic of `partitions` on the stack's broker.
    fn topic(name: &str, partitions: i32) -> (String, String) {
        let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
        let topic = format!("wire_{name}_{}_{}", std::process::id(), now_ms());
        ensure_topic(&bootstrap, &topic, partitions).expect("a topic; is the stack up?");
        (bootstrap, topic)
    }

    /// Every record of `topic` by partition: (key, value, timestamp), in
    /// offset order, reading until `expected` records came (or 60 s passed).
    fn read_back(bootstrap: &str, topic: &str, partitions: i32, expected: usize) -> Vec<Vec<Read>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "wire-producer-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut out = vec![Vec::new(); partitions as usize];
        let deadline = Instant::now() + Duration::from_secs(60);
        while out.iter().map(Vec::len).sum::<usize>() < expected && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                let ts = m.timestamp().to_millis().unwrap();
                out[m.partition() as usize].push((
                    m.key().unwrap().to_vec(),
                    m.payload().unwrap().to_vec(),
                    ts,
                ));
            }
        }
        // Nothing beyond what was expected arrives either.
        while let Some(m) = consumer.poll(Duration::from_millis(500)) {
            let m = m.unwrap();
            out[m.partition() as usize].push((m.key().unwrap().to_vec(), Vec::new(), 0));
        }
        out
    }

    #[test]
    fn records_land_once_each_in_their_partitions_in_the_order_sent() {
        let (bootstrap, topic) = topic("order", 4);
        let before = now_ms();
        let producer = WireProducer::new(&bootstrap, &topic, Duration::from_millis(5)).unwrap();
        assert_eq!(producer.partitions(), 4);
        let mut sent = vec![Vec::new(); 4];
        for i in 0..20_000u32 {
            // Uneven partitions and sizes, with pauses so that several
            // requests carry them.
            let partition = (i * 7 % 13 % 4) as i32;
            let (key, value) =
                (format!("card-{i}").into_bytes(), vec![(i % 251) as u8; (i % 300) as usize]);
            producer.send(partition, &key, &value).unwrap();
            sent[partition as usize].push((key, value));
            if i % 2_000 == 0 {
                std::thread::sleep(Duration::from_millis(7));
            }
        }
        producer.flush().unwrap();
        let after = now_ms();
        let read = read_back(&bootstrap, &topic, 4, 20_000);
        for (p, (sent, read)) in sent.iter().zip(&read).enumerate() {
            let records: Vec<(Vec<u8>, Vec<u8>)> =
                read.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect();
            assert_eq!(records.len(), sent.len(), "partition {p}: as many records as sent");
            assert!(records == *sent, "partition {p}: the records sent, in order");
            assert!(
                read.iter().all(|(_, _, ts)| (before..=after).contains(ts)),
                "partition {p}: timestamps are when they were sent"
            );
        }
    }

    #[test]
    fn a_batch_sent_again_is_written_once() {
        let (bootstrap, topic) = topic("again", 1);
        let client: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
        let metadata = client.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
        let b = &metadata.brokers()[0];
        let mut conn = Connection::open(&format!("{}:{}", b.host(), b.port())).unwrap();
        let id = conn.init_producer_id().unwrap();
        let mut first = Records::default();
        for i in 0..3 {
            first.push(now_ms(), format!("k{i}").as_bytes(), b"first");
        }
        let batch = first.batch(id, 0);
        // A resend, as after a connection lost before its answer.
        for _ in 0..2 {
            let errors = conn.produce(&topic, &[(0, batch.clone())]).unwrap();
            assert!(matches!(errors[..], [(0, 0 | DUPLICATE_SEQUENCE_NUMBER)]), "{errors:?}");
        }
        let mut second = Records::default();
        second.push(now_ms(), b"k3", b"second");
        let errors = conn.produce(&topic, &[(0, second.batch(id, next_sequence(0, 3)))]).unwrap();
        assert_eq!(errors, [(0, 0)]);
        let read = read_back(&bootstrap, &topic, 1, 4);
        let keys: Vec<&[u8]> = read[0].iter().map(|(k, _, _)| &k[..]).collect();
        assert_eq!(keys, [&b"k0"[..], b"k1", b"k2", b"k3"], "the resent batch once, then the next");
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC catalogue's check value of CRC-32/ISCSI (Castagnoli).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_are_zig_zag_then_seven_bits_a_byte() {
        // From the Kafka protocol guide's and protobuf's examples.
        for (v, bytes) in [
            (0i64, &[0x00u8][..]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (150, &[0xac, 0x02]),
            (i64::MIN, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ] {
            let mut out = Vec::new();
            put_varlong(&mut out, v);
            assert_eq!(out, bytes, "{v}");
        }
    }

    #[test]
    fn sequences_wrap_past_the_largest_int_to_zero() {
        assert_eq!(next_sequence(0, 5), 5);
        assert_eq!(next_sequence(i32::MAX - 5, 5), i32::MAX);
        assert_eq!(next_sequence(i32::MAX - 4, 5), 0);
        assert_eq!(next_sequence(i32::MAX, 1), 0);
        assert_eq!(next_sequence(i32::MAX - 1, 3), 1);
    }
}
