//! The Redis sink: the read model for an authorisation service.
//!
//! Layout, under a prefix per job (`tripwire:{job}:`):
//! - `card:{id}`, a string: the card's non-empty windows as JSON, by window
//!   length in ms, each `[count, sum, max, distinct merchants, distinct
//!   countries]` (see [`card_value`]): one `GET` reads all of a card's
//!   features, and a commit writes thousands of cards with one `MSET` (a
//!   hash per card, a field per window, cost Redis seven times the time per
//!   card: an `HSET`, an `HDEL` and a type check each, and every field an
//!   argument of its own). The key goes when the card's last window
//!   empties, in event time (no wall-clock TTL, so a backfill or a replay
//!   leaves what a live run leaves).
//! - `last_alert`, a hash: per card, its newest alert by event time (ties by
//!   alert id) as JSON; `last_alert_order` holds the order key. Apart from
//!   the card hashes, so that when a card's windows empty and fill again it
//!   is the same whatever the batching of commits (alerts are rare: one
//!   field per card that ever alerted).
//! - `alerts`, a stream of recent alerts, trimmed to about `stream_max_len`
//!   entries (`XADD MAXLEN ~`, default 100,000); PostgreSQL keeps them all.
//! - `alert_markers`, a sorted set of the alert ids in the stream by alert
//!   time, so that each enters once; pruned below every worker's frontier,
//!   below which no replay recomputes an alert.
//! - `floors` and `positions`, hashes: the source's decisions (a partition's
//!   floor from an offset on, how far it had been read), recorded with the
//!   commits whose results depend on them, as PostgreSQL records them (see
//!   `kafka_source::DecisionStore`).
//! - `frontiers`, a hash: per sink worker, its committed frontier (20 digits).
//!   It always holds one field per worker of the current run
//!   ([`fit_frontiers`]), so the least of them is what every key is complete up to.
//! - `progress`, a channel: each stored frontier is published there as
//!   `{worker} {frontier}` when it is stored, so that a reader can learn
//!   how fresh the read model is without polling.
//!
//! Each batch is applied by Lua scripts of a few hundred arguments each
//! (about a millisecond of Redis's time, so that a reader never waits long
//! behind a catch-up), all but the last sent at once (pipelined), the last,
//! which stores the worker's frontier, once they all landed. Each script is
//! all or nothing: Redis refuses it up front when out of memory, and it checks
//! every key's type before its first write. A batch whose last script did not
//! run is sent again, whole, on retry or by the replay after a crash; every
//! write is idempotent, so the batch lands once. A batch at or below the
//! stored frontier is skipped, and changes below the
//! frontier the job had committed when this run started are dropped (a replay
//! recomputes them from partial windows), so a replay after a crash or a
//! rescale neither loses nor doubles anything. Statistics are absolute values,
//! so rewriting one is harmless. Redis runs its own committer thread: when it
//! is down it falls behind alone, PostgreSQL keeps committing. On every
//! (re)connect the committer checks that Redis still holds the frontier it
//! acknowledged (see `commit::verify_store`).

use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use redis::aio::MultiplexedConnection;
use tripwire_dataflow::{Alert, CardStats, Time};

use crate::commit::{
    committer, frontier_sinks, Batch, CommitOptions, Committed, Committer, InputEnd, SinkInputs,
    Store,
};
use crate::kafka_source::{DecisionStore, Decisions, SourceDecisions};

/// Where and how the Redis sink writes.
#[derive(Clone, Debug)]
pub struct RedisSinkConfig {
    /// `redis://host:port/`.
    pub url: String,
    /// The job's name: the key prefix is `tripwire:{job}:`.
    pub job: String,
    /// Commit at most this often.
    pub commit_interval: Duration,
    /// Commit at most this often while catching up (see `CommitOptions`).
    pub catch_up_interval: Duration,
    /// The alert stream keeps about this many entries (Redis trims it
    /// approximately: `XADD MAXLEN ~`); PostgreSQL keeps every alert.
    pub stream_max_len: usize,
    /// The least stored worker frontier when this run started (0 for a first
    /// run); changes below it are dropped, as in the PostgreSQL sink. (A
    /// worker ahead of it writes again what it has; the script skips alerts
    /// below the worker's stored frontier, so none enters the stream twice.)
    pub resume_from: Time,
    /// A bounded run's end, from the source.
    pub end: Option<InputEnd>,
    /// The greatest frontier any worker had stored when this run started
    /// (before a rescale fitted them): until a batch starts there, fields this
    /// run did not write may be in Redis.
    pub high_water: Time,
    /// The source's decisions, recorded with the commits (see [`DecisionStore`]).
    pub decisions: Option<Decisions>,
    /// The topic the decisions are about.
    pub topic: String,
}

impl RedisSinkConfig {
    /// `job`'s read model at `url`, with the job's defaults: commits at most
    /// every 500 ms (5 s while catching up), an alert stream of about 100,000
    /// entries, a first run (nothing to resume, no high water), unbounded, and
    /// no source decisions to record.
    pub fn new(url: String, job: String) -> Self {
        RedisSinkConfig {
            url,
            job,
            commit_interval: Duration::from_millis(500),
            catch_up_interval: Duration::from_secs(5),
            stream_max_len: 100_000,
            resume_from: 0,
            end: None,
            high_water: 0,
            decisions: None,
            topic: String::new(),
        }
    }
}

/// The source decisions `job`'s Redis commits recorded about `topic`.
pub async fn recorded_decisions(
    url: &str,
    job: &str,
    topic: &str,
) -> Result<SourceDecisions, redis::RedisError> {
    let keys = Keys::new(job);
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let (floors, positions): (Fields, Fields) = redis::pipe()
        .cmd("HGETALL")
        .arg(keys.floors())
        .cmd("HGETALL")
        .arg(keys.positions())
        .query_async(&mut conn)
        .await?;
    let mut d = SourceDecisions::default();
    for (field, value) in floors {
        // `{topic}:{partition}:{offset}`; topic names cannot hold a colon.
        let mut f = field.rsplitn(3, ':');
        let (Some(o), Some(p), Some(t)) = (f.next(), f.next(), f.next()) else { continue };
        if let (true, Ok(p), Ok(o), Ok(v)) = (t == topic, p.parse(), o.parse(), value.parse()) {
            d.floors.insert((p, o), v);
        }
    }
    for (field, value) in positions {
        let Some((t, p)) = field.rsplit_once(':') else { continue };
        if let (true, Ok(p), Ok(v)) = (t == topic, p.parse(), value.parse()) {
            d.positions.insert(p, v);
        }
    }
    Ok(d)
}

/// Record `decisions` about `topic` for `job` (idempotent: the greater floor,
/// the further position), as the sink's script does.
pub async fn record_decisions(
    url: &str,
    job: &str,
    topic: &str,
    decisions: &SourceDecisions,
) -> Result<(), redis::RedisError> {
    if decisions.is_empty() {
        return Ok(());
    }
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let (floors, positions) = decision_fields(topic, decisions);
    let script = redis::Script::new(KEEP_GREATEST);
    let keys = Keys::new(job);
    for (key, fields) in [(keys.floors(), floors), (keys.positions(), positions)] {
        let mut invocation = script.key(key);
        for (field, value) in &fields {
            invocation.arg(field).arg(value);
        }
        invocation.invoke_async::<()>(&mut conn).await?;
    }
    Ok(())
}

/// Hash fields and their values.
type Fields = Vec<(String, String)>;

/// KEYS[1] a hash; ARGV: fields and values (20 digits): each field keeps the greater.
/// (The batch script does the same with the decisions it carries.)
const KEEP_GREATEST: &str = r#"
for i = 1, #ARGV, 2 do
  local was = redis.call('HGET', KEYS[1], ARGV[i])
  if not was or ARGV[i + 1] > was then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
"#;

/// The `floors` and `positions` fields and 20-digit values of `decisions` about `topic`.
fn decision_fields(topic: &str, d: &SourceDecisions) -> (Fields, Fields) {
    (
        d.floors.iter().map(|((p, o), f)| (format!("{topic}:{p}:{o}"), padded(*f))).collect(),
        d.positions
            .iter()
            .map(|(p, o)| (format!("{topic}:{p}"), padded((*o).max(0) as Time)))
            .collect(),
    )
}

/// The least frontier stored by `job`'s Redis sink workers, `None` if they never stored one.
pub async fn committed_frontier(url: &str, job: &str) -> Result<Option<Time>, redis::RedisError> {
    Ok(worker_frontiers(url, job).await?.values().copied().min())
}

/// The frontier each of `job`'s Redis sink workers stored, by worker index.
pub async fn worker_frontiers(
    url: &str,
    job: &str,
) -> Result<std::collections::BTreeMap<usize, Time>, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let all: Vec<(String, String)> =
        redis::cmd("HGETALL").arg(Keys::new(job).frontiers()).query_async(&mut conn).await?;
    Ok(all.iter().filter_map(|(w, v)| Some((w.parse().ok()?, v.parse::<Time>().ok()?))).collect())
}

/// The greatest frontier any of `job`'s Redis sink workers ever stored,
/// including before a rescale fitted them (0 if none did).
pub async fn high_water(url: &str, job: &str) -> Result<Time, redis::RedisError> {
    let keys = Keys::new(job);
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let (before, partial): (Option<String>, Vec<String>) = redis::pipe()
        .cmd("GET")
        .arg(keys.high_water())
        .cmd("HVALS")
        .arg(keys.partial())
        .query_async(&mut conn)
        .await?;
    let stored = worker_frontiers(url, job).await?.values().copied().max();
    Ok(before
        .into_iter()
        .chain(partial)
        .filter_map(|v| v.parse().ok())
        .chain(stored)
        .max()
        .unwrap_or(0))
}

/// Make `job`'s frontiers fit a run of `workers` sink workers, before it starts.
///
/// A worker's frontier speaks only for the keys that worker owned, and which
/// worker owns a key depends on how many there are. So a first run starts
/// every worker at 0 (a worker that never commits then holds the least
/// frontier at 0, as it should), and a run with another worker count starts
/// every worker at the least frontier of the last run, up to which all keys
/// are complete whoever owned them. Atomic, and harmless to repeat.
pub async fn fit_frontiers(url: &str, job: &str, workers: usize) -> Result<(), redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: i64 = redis::Script::new(FIT)
        .key(Keys::new(job).frontiers())
        .key(Keys::new(job).high_water())
        .key(Keys::new(job).partial())
        .arg(workers)
        .invoke_async(&mut conn)
        .await?;
    Ok(())
}

const FIT: &str = r#"
-- KEYS[1] the frontiers hash, KEYS[2] the high water, KEYS[3] the partial batches' hash;
-- ARGV[1] the number of workers of the run about to start.
local n = tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local least, greatest, fits = nil, nil, (#all / 2 == n)
for i = 1, #all, 2 do
  local w = tonumber(all[i])
  if w == nil or w >= n then fits = false end
  if least == nil or all[i + 1] < least then least = all[i + 1] end
  if greatest == nil or all[i + 1] > greatest then greatest = all[i + 1] end
end
if fits then return 0 end
for _, p in ipairs(redis.call('HVALS', KEYS[3])) do
  if greatest == nil or p > greatest then greatest = p end
end
-- Fields the earlier workers wrote may lie beyond the frontier every worker starts at.
local was = redis.call('GET', KEYS[2])
if greatest and (not was or greatest > was) then redis.call('SET', KEYS[2], greatest) end
redis.call('DEL', KEYS[1])
for w = 0, n - 1 do
  redis.call('HSET', KEYS[1], tostring(w), least or '00000000000000000000')
end
return 1
"#;

const SCRIPT: &str = r#"#!lua
-- KEYS[1] frontiers hash, KEYS[2] alert stream, KEYS[3] alert markers (a sorted set),
-- KEYS[4] last alert order by card, KEYS[5] last alert by card, KEYS[6] partial: per
-- worker, the greatest frontier of a batch some of whose parts landed (beyond it, Redis
-- may hold values that no stored frontier speaks for), KEYS[7] the source's floors,
-- KEYS[8] its read positions (both hashes of 20-digit values, each kept at its greatest).
-- ARGV: frontier (20-digit), prefix, last (1 on a batch's last part: it stores the
-- frontier), stream max len, #sets, #alerts, this worker's field, the batch's start
-- (20-digit), #floors, #positions, #deletes; then floors and positions (field, value:
-- recorded whether or not the batch is covered, as the source took them while reading);
-- then the cards to set (key, value: the card's record); then the cards whose windows
-- all emptied (key, passing: 1 when the card came and went within the batch, and is
-- deleted only when Redis may hold what this run did not write); then alerts (card, id,
-- rule, time, event time, details, order: event time and id, 20 digits each, the alert
-- as JSON).
-- Each part all or nothing: the shebang makes Redis refuse the whole script up front
-- when it is out of memory, and every key written but the cards' (plain strings, which
-- SET and DEL take whatever they held) is checked for its type before the first write.
-- A batch is several parts, so that no reader waits behind a long script; only the last
-- stores the frontier, and the parts before it are written again, whole, by the replay
-- if the batch does not land (every write is idempotent).
local function expect(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kind then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a ' .. kind .. ': batch not applied')
  end
end
local err = expect(KEYS[1], 'hash') or expect(KEYS[7], 'hash') or expect(KEYS[8], 'hash')
if err then return err end
-- The source's decisions the batch's results depend on (and perhaps a few newer ones):
-- valid whatever becomes of the batch, so written first.
local i = 12
local function keep_greatest(key, n)
  for _ = 1, n do
    local was = redis.call('HGET', key, ARGV[i])
    if not was or ARGV[i + 1] > was then redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
    i = i + 2
  end
end
keep_greatest(KEYS[7], tonumber(ARGV[9]))
keep_greatest(KEYS[8], tonumber(ARGV[10]))
local frontier = ARGV[1]
local current = redis.call('HGET', KEYS[1], ARGV[7])
if current and frontier <= current then return 0 end
local maxlen = ARGV[4]
local ns, na, nd = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[11])
err = expect(KEYS[6], 'hash')
if not err and (na > 0 or ARGV[3] == '1') then err = expect(KEYS[3], 'zset') end
if not err and na > 0 then
  err = expect(KEYS[2], 'stream') or expect(KEYS[4], 'hash') or expect(KEYS[5], 'hash')
end
if err then return err end
local partial = redis.call('HGET', KEYS[6], ARGV[7])
local exact = current == ARGV[8] and (not partial or partial <= ARGV[8])
if ARGV[3] ~= '1' and (not partial or partial < frontier) then
  redis.call('HSET', KEYS[6], ARGV[7], frontier)
end
if ns > 0 then
  redis.call('MSET', unpack(ARGV, i, i + 2 * ns - 1))
  i = i + 2 * ns
end
for _ = 1, nd do
  -- Redis may hold values this run did not write, unless it holds exactly the batch's start.
  if not (ARGV[i + 1] == '1' and exact) then redis.call('DEL', ARGV[i]) end
  i = i + 2
end
for _ = 1, na do
  -- Each alert enters the stream once, whichever worker or run commits it:
  -- one below this worker's stored frontier is there already (a replay, or
  -- a run that read the frontier before a dead process's last batch landed);
  -- one at or above it is there if its marker is (after a rescale).
  local id = ARGV[i + 1]
  local fresh = not current or tonumber(ARGV[i + 3]) >= tonumber(current)
  if fresh and not redis.call('ZSCORE', KEYS[3], id) then
    redis.call('ZADD', KEYS[3], ARGV[i + 3], id)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'alert_id', id, 'card_id', ARGV[i],
      'rule', ARGV[i + 2], 'event_time', ARGV[i + 4], 'details', ARGV[i + 5])
  end
  -- The card's newest alert by event time, ties by id: the same whatever the
  -- order or the batching of commits.
  local order = ARGV[i + 6]
  local was = redis.call('HGET', KEYS[4], ARGV[i])
  if fresh and (not was or order > was) then
    redis.call('HSET', KEYS[4], ARGV[i], order)
    redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 7])
  end
  i = i + 8
end
if ARGV[3] ~= '1' then return 1 end
redis.call('HSET', KEYS[1], ARGV[7], frontier)
-- (The channel is Keys::progress.)
redis.call('PUBLISH', ARGV[2] .. 'progress', ARGV[7] .. ' ' .. frontier)
-- Markers below every worker's frontier can never be needed again: no replay
-- recomputes an alert below the frontier it resumes from (event time, not a TTL).
local least = nil
for _, f in ipairs(redis.call('HVALS', KEYS[1])) do
  if least == nil or f < least then least = f end
end
if least then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. tonumber(least)) end
return 1
"#;

/// A frontier as 20 zero-padded digits, so that Lua compares them exactly, as strings.
fn padded(t: Time) -> String {
    format!("{t:020}")
}

/// Apply this worker's statistics and alerts to Redis, atomically with its frontier.
///
/// The read model keeps no archive: `inputs.archive` should be `None`.
pub fn redis_sink(inputs: SinkInputs<'_>, config: &RedisSinkConfig) -> Committed {
    let worker = inputs.stats.inner.scope().index();
    frontier_sinks(inputs, vec![redis_committer(worker, config)]).remove(0)
}

/// Worker `worker`'s Redis committer, for [`frontier_sinks`] (the read model
/// keeps no archive).
pub fn redis_committer(worker: usize, config: &RedisSinkConfig) -> Committer {
    let store = Redis { config: config.clone(), worker, script: redis::Script::new(SCRIPT) };
    let options = CommitOptions {
        interval: config.commit_interval,
        resume_from: config.resume_from,
        report_to: None,
        catch_up_interval: config.catch_up_interval,
        end: config.end.clone(),
    };
    committer("RedisSink", worker, store, options, false)
}

/// What a card's key holds after the job's prefix, before the card id.
const CARD: &str = "card:";

/// The keys of one job's read model.
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys of `job`.
    pub fn new(job: &str) -> Self {
        Keys { prefix: format!("tripwire:{job}:") }
    }
    /// A card's key.
    pub fn card(&self, card_id: u64) -> String {
        let mut key = Vec::with_capacity(self.prefix.len() + 25);
        self.write_card(card_id, &mut key);
        String::from_utf8(key).expect("a prefix and digits")
    }
    /// A card's key, written over `key`.
    fn write_card(&self, card_id: u64, key: &mut Vec<u8>) {
        key.clear();
        key.extend_from_slice(self.prefix.as_bytes());
        key.extend_from_slice(CARD.as_bytes());
        key.extend_from_slice(itoa::Buffer::new().format(card_id).as_bytes());
    }
    /// What every card hash's key starts with.
    pub fn card_prefix(&self) -> String {
        format!("{}{CARD}", self.prefix)
    }
    /// The alert stream.
    pub fn alerts(&self) -> String {
        format!("{}alerts", self.prefix)
    }
    /// Alerts already in the stream (a sorted set: id by alert time), pruned below every frontier.
    pub fn alert_markers(&self) -> String {
        format!("{}alert_markers", self.prefix)
    }
    /// Per card, the order key (event time, alert id) of its newest alert.
    pub fn last_alert_order(&self) -> String {
        format!("{}last_alert_order", self.prefix)
    }
    /// Per card, its newest alert as JSON (`alert_id`, `rule`, `event_time`, `details`).
    pub fn last_alerts(&self) -> String {
        format!("{}last_alert", self.prefix)
    }
    /// The channel on which each stored frontier is published: `{worker} {frontier, 20 digits}`.
    pub fn progress(&self) -> String {
        format!("{}progress", self.prefix)
    }
    /// Per worker, the greatest frontier of a batch some of whose scripts ran (20 digits).
    pub fn partial(&self) -> String {
        format!("{}partial", self.prefix)
    }

    /// The greatest worker frontier before the last rescale (a string of 20 digits).
    pub fn high_water(&self) -> String {
        format!("{}high_water", self.prefix)
    }

    /// The source's floors (field `{topic}:{partition}:{offset}`, the floor in 20 digits).
    pub fn floors(&self) -> String {
        format!("{}floors", self.prefix)
    }

    /// How far the source had read (field `{topic}:{partition}`, the offset in 20 digits).
    pub fn positions(&self) -> String {
        format!("{}positions", self.prefix)
    }

    /// The hash of sink workers' frontiers (field: the worker's index).
    pub fn frontiers(&self) -> String {
        format!("{}frontiers", self.prefix)
    }
}

/// About how many script arguments one part of a batch carries (two per
/// card): about a millisecond of Redis's time, so that readers never wait
/// long behind a commit (a batch's parts go out pipelined, and Redis serves
/// other clients between them).
pub const PART_ARGS: usize = 500;

/// How many parts of a batch are sent ahead of the replies to earlier ones:
/// enough to keep Redis busy, few enough that formatting the rest of a large
/// batch overlaps Redis's work on the first.
const PARTS_IN_FLIGHT: usize = 64;

/// What a batch does to one card's hash.
enum Card<'a> {
    /// Set its non-empty windows' fields, remove its empty ones'.
    Set(u64, &'a CardStats),
    /// Every window emptied: the hash goes. `true`: the card came and went within the batch.
    Delete(u64, bool),
}

/// A card's record as Redis holds it: its non-empty windows, by length in
/// ms, each `[count, sum, max, distinct merchants, distinct countries]`
/// (amounts in minor units), e.g. `{"60000":[2,1500,1000,2,1]}`.
pub fn card_value(stats: &CardStats) -> String {
    let mut v = Vec::new();
    write_card_value(stats, &mut v);
    String::from_utf8(v).expect("JSON of digits")
}

/// [`card_value`], written over `v`. Without `fmt`: a bulk load's last
/// commit formats about 865K of them, and `write!` spent a tenth of the
/// Redis committers' time in its machinery.
fn write_card_value(stats: &CardStats, v: &mut Vec<u8>) {
    let mut digits = itoa::Buffer::new();
    v.clear();
    v.push(b'{');
    for (n, (w, s)) in stats.non_empty().enumerate() {
        if n > 0 {
            v.push(b',');
        }
        v.push(b'"');
        v.extend_from_slice(digits.format(w).as_bytes());
        v.extend_from_slice(b"\":[");
        let numbers = [s.count, s.sum, s.max_amount, s.distinct_merchants, s.distinct_countries];
        for (k, x) in numbers.into_iter().enumerate() {
            if k > 0 {
                v.push(b',');
            }
            v.extend_from_slice(digits.format(x).as_bytes());
        }
        v.push(b']');
    }
    v.push(b'}');
}

struct Redis {
    config: RedisSinkConfig,
    worker: usize,
    script: redis::Script,
}

impl Store for Redis {
    type Conn = MultiplexedConnection;

    async fn connect(&mut self) -> Result<MultiplexedConnection, String> {
        let client = redis::Client::open(self.config.url.as_str()).map_err(|e| e.to_string())?;
        // A part's reply can wait behind the parts in flight of every
        // worker's batch (PARTS_IN_FLIGHT each, about a millisecond apiece,
        // longer on a busy machine), which can exceed the client's default
        // response timeout (0.5 s); a timed-out commit is retried, so the
        // wait is long on purpose.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        Ok(conn)
    }

    async fn stored_frontier(
        &mut self,
        conn: &mut MultiplexedConnection,
    ) -> Result<Option<Time>, String> {
        let held: Option<String> = redis::cmd("HGET")
            .arg(Keys::new(&self.config.job).frontiers())
            .arg(self.worker)
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(held.and_then(|h| h.parse().ok()))
    }

    async fn commit(&mut self, conn: &mut MultiplexedConnection, b: &Batch) -> Result<(), String> {
        let keys = Keys::new(&self.config.job);
        let (upserts, deletes, alerts) = (&b.upserts, &b.deletes, &b.alerts);
        // Per card (each is among the upserts or the deletes, not both): the
        // fields to set (its non-empty windows) and to remove (its empty
        // ones), or the hash to delete once all its windows emptied. A card
        // that came and went within the batch is deleted only when Redis may
        // hold fields this run did not write (the script knows).
        let may_pass = b.start >= self.config.high_water;
        let cards: Vec<Card<'_>> = upserts
            .iter()
            .map(|(card, stats, _)| Card::Set(*card, stats))
            .chain(deletes.iter().map(|(card, _)| Card::Delete(*card, may_pass && b.passing(card))))
            .collect();
        // Parts of about PART_ARGS arguments (two per card): about a millisecond each.
        type Part<'a, 'b> = (&'a [Card<'b>], &'a [(Alert, Time)]);
        let mut parts: Vec<Part<'_, '_>> =
            cards.chunks(PART_ARGS / 2).map(|c| (c, &[][..])).collect();
        if parts.is_empty() {
            parts.push((&[], &[]));
        }
        for chunk in alerts.chunks(PART_ARGS / 8) {
            parts.push((&[], chunk));
        }
        let last = parts.len() - 1;
        // The source's decisions go with the first part (see `DecisionStore`).
        let decisions = match &self.config.decisions {
            Some(d) => d.take(DecisionStore::Redis),
            None => SourceDecisions::default(),
        };
        let (floors, positions) = decision_fields(&self.config.topic, &decisions);
        // A part's script invocation, built when it is about to go out.
        let build = |n: usize, (cards, alerts): Part<'_, '_>| {
            let (floors, positions): (&[_], &[_]) =
                if n == 0 { (&floors, &positions) } else { (&[], &[]) };
            let sets = cards.iter().filter(|c| matches!(c, Card::Set(..))).count();
            let mut invocation = self.script.prepare_invoke();
            invocation
                .key(keys.frontiers())
                .key(keys.alerts())
                .key(keys.alert_markers())
                .key(keys.last_alert_order())
                .key(keys.last_alerts())
                .key(keys.partial())
                .key(keys.floors())
                .key(keys.positions())
                .arg(padded(b.frontier))
                .arg(&keys.prefix)
                .arg(u8::from(n == last))
                .arg(self.config.stream_max_len)
                .arg(sets)
                .arg(alerts.len())
                .arg(self.worker)
                .arg(padded(b.start))
                .arg(floors.len())
                .arg(positions.len())
                .arg(cards.len() - sets);
            for (field, value) in floors.iter().chain(positions) {
                invocation.arg(field).arg(value);
            }
            // One key and one value buffer for the part: `arg` copies them.
            let (mut key, mut value) = (Vec::new(), Vec::new());
            for card in cards {
                if let Card::Set(id, stats) = card {
                    keys.write_card(*id, &mut key);
                    write_card_value(stats, &mut value);
                    invocation.arg(&key[..]).arg(&value[..]);
                }
            }
            for card in cards {
                if let Card::Delete(id, passing) = card {
                    keys.write_card(*id, &mut key);
                    invocation.arg(&key[..]).arg(u8::from(*passing));
                }
            }
            for (a, t) in alerts {
                let details = serde_json::to_string(&a.details).map_err(|e| e.to_string())?;
                invocation
                    .arg(a.card_id)
                    .arg(a.id)
                    .arg(a.rule.name())
                    .arg(*t)
                    .arg(a.event_time_ms)
                    .arg(details)
                    .arg(format!("{}{}", padded(a.event_time_ms), padded(a.id)))
                    .arg(
                        serde_json::json!({
                            "alert_id": a.id.to_string(),
                            "rule": a.rule.name(),
                            "event_time": a.event_time_ms,
                            "details": &a.details,
                        })
                        .to_string(),
                    );
            }
            Ok::<_, String>(invocation)
        };
        let result = async {
            let last_part = parts.pop().expect("a batch has a last part");
            // Every part but the last pipelined on the one connection, up to
            // PARTS_IN_FLIGHT at a time, each built as an earlier one lands:
            // Redis starts on a large batch while the rest is still being
            // formatted, and each part is about a millisecond of its time,
            // so that readers get their turn between them. Each marks the
            // batch as partly landed before its writes, and writes only what
            // the replay writes again (so a part that fails to build, after
            // some went out, leaves nothing the replay does not redo).
            let applied: Vec<i64> = stream::iter(parts.into_iter().enumerate())
                .map(|(n, part)| {
                    let invocation = build(n, part);
                    let mut c = conn.clone();
                    async move {
                        invocation?.invoke_async::<i64>(&mut c).await.map_err(|e| e.to_string())
                    }
                })
                .buffered(PARTS_IN_FLIGHT)
                .try_collect()
                .await?;
            // Covered by the stored frontier (then all of it is): nothing to store.
            if applied.contains(&0) {
                return Ok(());
            }
            // The frontier last, once every other part landed.
            let _: i64 =
                build(last, last_part)?.invoke_async(conn).await.map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        }
        .await;
        if let (Err(_), Some(d)) = (&result, &self.config.decisions) {
            d.put_back(DecisionStore::Redis, decisions);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tripwire_dataflow::WindowStats;

    /// The card value is the JSON the readers parse: the document serde_json
    /// writes of the card's non-empty windows, for extreme and ordinary numbers.
    #[test]
    fn card_value_is_the_json_serde_writes() {
        let amounts = [0, 1, -1, 9, 10, 99_999, i64::MAX, i64::MIN, 1_234_567_890_123];
        let counts = [1, 2, 9, 10, 4_294_967_295];
        for (n, &a) in amounts.iter().enumerate() {
            let b = amounts[(n + 3) % amounts.len()];
            let stats = |count: i64| WindowStats {
                count,
                sum: a,
                max_amount: b,
                distinct_merchants: counts[n % counts.len()],
                distinct_countries: counts[(n + 1) % counts.len()],
            };
            let card = CardStats::new([
                (60_000, stats(counts[n % counts.len()])),
                (300_000, stats(0)),
                (4_294_967_295, stats(1)),
            ]);
            let mut expected = serde_json::Map::new();
            for (w, s) in card.non_empty() {
                let v = [s.count, s.sum, s.max_amount, s.distinct_merchants, s.distinct_countries];
                expected.insert(w.to_string(), serde_json::json!(v));
            }
            assert_eq!(expected.len(), 2, "two windows of three are non-empty");
            let written = card_value(&card);
            let parsed: serde_json::Value = serde_json::from_str(&written).expect(&written);
            assert_eq!(parsed, serde_json::Value::Object(expected), "{written}");
        }
        assert_eq!(card_value(&CardStats::new([(60_000, WindowStats::default())])), "{}");
    }

    #[test]
    fn a_card_key_is_the_prefix_and_the_id() {
        let keys = Keys::new("job-1");
        assert_eq!(keys.card(0), "tripwire:job-1:card:0");
        assert_eq!(keys.card(u64::MAX), "tripwire:job-1:card:18446744073709551615");
    }
}
