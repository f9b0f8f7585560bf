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
//! - `fence:{worker}`, a string per sink worker, written whenever its
//!   frontier is stored or fitted ([`Keys::fence`]).
//!
//! Each batch is applied in parts of a few hundred cards each (a fraction of
//! a millisecond of Redis's time, so that a reader never waits long behind a
//! catch-up), all but the last sent at once (pipelined), the last, which
//! stores the worker's frontier, once they all landed. A part is one
//! transaction: `WATCH` the worker's fence; a small script, the guard, that
//! lets it through only if its batch is beyond the worker's stored frontier
//! (touching the fence otherwise); then `MULTI`, the cards as one plain
//! `MSET` (and a `DEL`), the alerts and the frontier by script, and `EXEC`,
//! which does nothing if the fence was written since the `WATCH`: refused by
//! the guard, or a frontier stored meanwhile by another run. Redis refuses
//! the whole transaction when out of memory, and the scripts check every
//! key's type before their first write. A batch whose last part did not
//! land is sent again, whole, on retry or by the replay after a crash; every
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

/// A Lua function: the `n` fields and values (20 digits) in ARGV from `i` on
/// go into the hash `key`, each field keeping the greater; returns the
/// index past them. [`KEEP_GREATEST`] and the batch's [`GUARD`] use it.
macro_rules! lua_keep_greatest {
    () => {
        r#"
local function keep_greatest(key, i, n)
  for _ = 1, n do
    local was = redis.call('HGET', key, ARGV[i])
    if not was or ARGV[i + 1] > was then redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
    i = i + 2
  end
  return i
end
"#
    };
}

/// KEYS[1] a hash; ARGV: fields and values (20 digits): each field keeps the greater.
const KEEP_GREATEST: &str = concat!(lua_keep_greatest!(), "keep_greatest(KEYS[1], 1, #ARGV / 2)\n");

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
    let keys = Keys::new(job);
    let _: i64 = redis::Script::new(FIT)
        .key(keys.frontiers())
        .arg(workers)
        .arg(&keys.prefix)
        .invoke_async(&mut conn)
        .await?;
    Ok(())
}

/// KEYS[1] the frontiers hash; ARGV[1] the number of workers of the run about
/// to start, ARGV[2] the prefix. Every worker's fence, old and new, is
/// touched (see `Keys::fence`).
const FIT: &str = r#"
local n = tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local least, fits = nil, (#all / 2 == n)
for i = 1, #all, 2 do
  local w = tonumber(all[i])
  if w == nil or w >= n then fits = false end
  if least == nil or all[i + 1] < least then least = all[i + 1] end
end
if fits then return 0 end
least = least or '00000000000000000000'
for i = 1, #all, 2 do redis.call('SET', ARGV[2] .. 'fence:' .. all[i], least) end
redis.call('DEL', KEYS[1])
for w = 0, n - 1 do
  redis.call('HSET', KEYS[1], tostring(w), least)
  redis.call('SET', ARGV[2] .. 'fence:' .. w, least)
end
return 1
"#;

/// A Lua function every script below starts with: `nil` when `key` is absent
/// or of type `kind`, else the error that refuses the part.
macro_rules! lua_expect {
    () => {
        r#"#!lua
local function expect(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kind then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a ' .. kind .. ': batch not applied')
  end
end
"#
    };
}

/// The guard of one part of a batch, run after the part's `WATCH` of this
/// worker's fence and before its `MULTI`: it lets the part's writes (queued
/// in the `MULTI`, run by `EXEC`) land only if the batch is beyond the
/// stored frontier. Refusing, it touches the fence, which makes the part's
/// `EXEC` do nothing; so does any writer that stores this worker's frontier
/// between the guard and the `EXEC`. Any failure refuses (under `pcall`:
/// a guard that fails half way still touches the fence).
///
/// KEYS[1] frontiers hash, KEYS[2] this worker's fence, KEYS[3] the source's
/// floors, KEYS[4] its read positions (hashes of 20-digit values, each kept at
/// its greatest). ARGV: the batch's frontier (20 digits), this worker's
/// field, #floors, #positions, then floors and positions (field, value:
/// recorded whether or not the batch is covered, as the source took them
/// while reading; only the first part carries them). Returns 1 (go on), 0
/// (the stored frontier covers the batch) or an error.
const GUARD: &str = concat!(
    lua_expect!(),
    lua_keep_greatest!(),
    r#"
local function guard()
  local err = expect(KEYS[1], 'hash') or expect(KEYS[3], 'hash') or expect(KEYS[4], 'hash')
  if err then return err end
  keep_greatest(KEYS[4], keep_greatest(KEYS[3], 5, tonumber(ARGV[3])), tonumber(ARGV[4]))
  local current = redis.call('HGET', KEYS[1], ARGV[2])
  if current and ARGV[1] <= current then return 0 end
  return 1
end
local ok, r = pcall(guard)
if ok and r == 1 then return 1 end
redis.call('SET', KEYS[2], ARGV[1])
if not ok then return redis.error_reply(type(r) == 'table' and r.err or tostring(r)) end
return r
"#
);

/// A part's alerts and, in a batch's last part, its frontier: run inside the
/// part's `MULTI`, after its cards.
///
/// KEYS[1] frontiers hash, KEYS[2] alert stream, KEYS[3] alert markers (a
/// sorted set), KEYS[4] last alert order by card, KEYS[5] last alert by card,
/// KEYS[6] this worker's fence. ARGV: frontier (20 digits), prefix, last (1
/// on a batch's last part: it stores the frontier), stream max len, #alerts,
/// this worker's field; then the alerts (card, id, rule, time, event time,
/// details, order: event time and id, 20 digits each, the alert as JSON).
/// Every key it writes is checked for its type before its first write.
const SCRIPT: &str = concat!(
    lua_expect!(),
    r#"
local na = tonumber(ARGV[5])
local err = expect(KEYS[1], 'hash')
if not err and (na > 0 or ARGV[3] == '1') then err = expect(KEYS[3], 'zset') end
if not err and na > 0 then
  err = expect(KEYS[2], 'stream') or expect(KEYS[4], 'hash') or expect(KEYS[5], 'hash')
end
if err then return err end
local frontier = ARGV[1]
local current = redis.call('HGET', KEYS[1], ARGV[6])
-- The guard and the WATCH keep a covered batch's part from getting here;
-- checked again all the same, as cheap as it is.
if current and frontier <= current then return 0 end
local i = 7
for _ = 1, na do
  -- Each alert enters the stream once, whichever worker or run commits it:
  -- one below this worker's stored frontier is there already (a replay, or
  -- a run that read the frontier before a dead process's last batch landed);
  -- one at or above it is there if its marker is (after a rescale).
  local id = ARGV[i + 1]
  local fresh = not current or tonumber(ARGV[i + 3]) >= tonumber(current)
  if fresh and not redis.call('ZSCORE', KEYS[3], id) then
    redis.call('ZADD', KEYS[3], ARGV[i + 3], id)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'alert_id', id, 'card_id', ARGV[i],
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
redis.call('HSET', KEYS[1], ARGV[6], frontier)
redis.call('SET', KEYS[6], frontier)
-- (The channel is Keys::progress.)
redis.call('PUBLISH', ARGV[2] .. 'progress', ARGV[6] .. ' ' .. frontier)
-- Markers below every worker's frontier can never be needed again: no replay
-- recomputes an alert below the frontier it resumes from (event time, not a TTL).
local least = nil
for _, f in ipairs(redis.call('HVALS', KEYS[1])) do
  if least == nil or f < least then least = f end
end
if least then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. tonumber(least)) end
return 1
"#
);

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
    let store = Redis { config: config.clone(), worker };
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
    /// Worker `worker`'s fence, a string: written whenever the worker's
    /// frontier is stored or fitted, and whenever a part of one of its batches
    /// is refused. Each part watches it (`WATCH`) from before its guard to its
    /// writes (`EXEC`), which then land only if nothing wrote it meanwhile.
    pub fn fence(&self, worker: usize) -> String {
        format!("{}fence:{worker}", self.prefix)
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

/// How many cards one part of a batch writes: a fraction of a millisecond
/// of Redis's time, so that readers never wait long behind a commit (a
/// batch's parts go out pipelined, and Redis serves other clients between
/// them).
pub const PART_CARDS: usize = 250;

/// How many alerts one part of a batch carries (each is a few writes in a script).
pub const PART_ALERTS: usize = 60;

/// How many parts of a batch are sent ahead of the replies to earlier ones:
/// enough to keep Redis busy, few enough that formatting the rest of a large
/// batch overlaps Redis's work on the first.
const PARTS_IN_FLIGHT: usize = 64;

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
        // The cards to set, then those whose windows all emptied (to delete:
        // a `DEL` of a key Redis does not hold costs it next to nothing).
        let parts = Part::split(&b.upserts, &b.deletes, &b.alerts);
        let last = parts.len() - 1;
        // The source's decisions go with the first part (see `DecisionStore`).
        let decisions = match &self.config.decisions {
            Some(d) => d.take(DecisionStore::Redis),
            None => SourceDecisions::default(),
        };
        let (floors, positions) = decision_fields(&self.config.topic, &decisions);
        let writer = PartWriter {
            keys: Keys::new(&self.config.job),
            worker: self.worker,
            frontier: b.frontier,
            stream_max_len: self.config.stream_max_len,
        };
        let build = |n: usize, part: &Part<'_>| {
            let none = Fields::new();
            let decisions = if n == 0 { (&floors, &positions) } else { (&none, &none) };
            writer.pipeline(part, decisions, n == last)
        };
        let result = async {
            let (last_part, parts) = parts.split_last().expect("a batch has a last part");
            // Every part but the last pipelined on the one connection, up to
            // PARTS_IN_FLIGHT at a time, each built as an earlier one lands:
            // Redis starts on a large batch while the rest is still being
            // formatted, and serves readers between the parts. Each writes
            // only what the replay writes again (so a part that fails, after
            // some landed, leaves nothing the replay does not redo).
            let applied: Vec<bool> = stream::iter(parts.iter().enumerate())
                .map(|(n, part)| {
                    let pipeline = build(n, part);
                    let mut c = conn.clone();
                    async move { apply(pipeline?, &mut c).await }
                })
                .buffered(PARTS_IN_FLIGHT)
                .try_collect()
                .await?;
            // Covered by the stored frontier (then all of it is): nothing to store.
            if applied.contains(&false) {
                return Ok(());
            }
            // The frontier last, once every other part landed.
            apply(build(last, last_part)?, conn).await.map(drop)
        }
        .await;
        if let (Err(_), Some(d)) = (&result, &self.config.decisions) {
            d.put_back(DecisionStore::Redis, decisions);
        }
        result
    }
}

/// One part of a batch: some of its cards to set and to delete, and some of its alerts.
#[derive(Default)]
struct Part<'a> {
    sets: &'a [(u64, CardStats, Time)],
    deletes: &'a [(u64, Time)],
    alerts: &'a [(Alert, Time)],
}

impl<'a> Part<'a> {
    /// The batch's cards in parts of at most [`PART_CARDS`], its alerts in
    /// parts of at most [`PART_ALERTS`] (the last parts carry both); at
    /// least one part.
    fn split(
        sets: &'a [(u64, CardStats, Time)],
        deletes: &'a [(u64, Time)],
        alerts: &'a [(Alert, Time)],
    ) -> Vec<Part<'a>> {
        let mut parts: Vec<Part<'a>> =
            sets.chunks(PART_CARDS).map(|sets| Part { sets, ..Part::default() }).collect();
        parts.extend(deletes.chunks(PART_CARDS).map(|deletes| Part { deletes, ..Part::default() }));
        let chunks: Vec<_> = alerts.chunks(PART_ALERTS).collect();
        while parts.len() < chunks.len().max(1) {
            parts.push(Part::default());
        }
        let from = parts.len() - chunks.len();
        for (p, chunk) in parts[from..].iter_mut().zip(chunks) {
            p.alerts = chunk;
        }
        parts
    }
}

/// What every part of one batch of one worker shares.
struct PartWriter {
    keys: Keys,
    worker: usize,
    frontier: Time,
    stream_max_len: usize,
}

impl PartWriter {
    /// A part as one pipeline: `WATCH` this worker's fence, the guard (with
    /// the source's `decisions`, on the first part), then `MULTI`, the cards
    /// (`MSET`, `DEL`), the alerts and, on the `last` part, the frontier (a
    /// script), and `EXEC`: the writes land only if the guard let them and
    /// nothing stored this worker's frontier meanwhile. Plain `MSET`: the
    /// same cards through a script cost Redis a third more time (each
    /// argument copied into Lua and out again). (One way around the guard
    /// remains: Redis answering the `WATCH`, the guard and the `MULTI` with
    /// `BUSY`, while another client's script runs past
    /// `busy-reply-threshold`, and running the `MSET` once it ends. It would
    /// need that, a stale part, and the script ending within the part.)
    fn pipeline(
        &self,
        part: &Part<'_>,
        (floors, positions): (&Fields, &Fields),
        last: bool,
    ) -> Result<Prepared, String> {
        let (keys, fence) = (&self.keys, self.keys.fence(self.worker));
        let frontier = padded(self.frontier);
        let mut p = redis::pipe();
        p.cmd("WATCH").arg(&fence);
        let guard = p
            .cmd("EVAL")
            .arg(GUARD)
            .arg(4)
            .arg(keys.frontiers())
            .arg(&fence)
            .arg(keys.floors())
            .arg(keys.positions())
            .arg(&frontier)
            .arg(self.worker)
            .arg(floors.len())
            .arg(positions.len());
        for (field, value) in floors.iter().chain(positions) {
            guard.arg(field).arg(value);
        }
        p.cmd("MULTI");
        // One key and one value buffer for the part: `arg` copies them.
        let (mut key, mut value) = (Vec::new(), Vec::new());
        if !part.sets.is_empty() {
            let mset = p.cmd("MSET");
            for (id, stats, _) in part.sets {
                keys.write_card(*id, &mut key);
                write_card_value(stats, &mut value);
                mset.arg(&key[..]).arg(&value[..]);
            }
        }
        if !part.deletes.is_empty() {
            let del = p.cmd("DEL");
            for (id, _) in part.deletes {
                keys.write_card(*id, &mut key);
                del.arg(&key[..]);
            }
        }
        let scripted = last || !part.alerts.is_empty();
        if scripted {
            let script = p
                .cmd("EVAL")
                .arg(SCRIPT)
                .arg(6)
                .arg(keys.frontiers())
                .arg(keys.alerts())
                .arg(keys.alert_markers())
                .arg(keys.last_alert_order())
                .arg(keys.last_alerts())
                .arg(&fence)
                .arg(&frontier)
                .arg(&keys.prefix)
                .arg(u8::from(last))
                .arg(self.stream_max_len)
                .arg(part.alerts.len())
                .arg(self.worker);
            for (a, t) in part.alerts {
                let details = serde_json::to_string(&a.details).map_err(|e| e.to_string())?;
                script
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
        }
        p.cmd("EXEC");
        Ok(Prepared { pipeline: p, scripted })
    }
}

/// A part ready to send: its pipeline, and whether its transaction ends with the script.
struct Prepared {
    pipeline: redis::Pipeline,
    scripted: bool,
}

/// Send one part ([`PartWriter::pipeline`]); `true` if it landed, `false` if
/// the stored frontier covers its batch.
async fn apply(part: Prepared, conn: &mut MultiplexedConnection) -> Result<bool, String> {
    let p = &part.pipeline;
    let replies = conn.send_packed_commands(p, 0, p.len()).await.map_err(|e| e.to_string())?;
    let failed = |v: &redis::Value| match v {
        redis::Value::ServerError(e) => Some(e.to_string()),
        _ => None,
    };
    if let Some(e) = replies.iter().find_map(failed) {
        return Err(e);
    }
    let guard = replies.get(1);
    match replies.last() {
        // Refused by the guard: covered.
        Some(redis::Value::Nil) if guard == Some(&redis::Value::Int(0)) => Ok(false),
        // Let through, then watched out: this worker's frontier was stored
        // meanwhile (a rescale, or another run); the retry finds it.
        Some(redis::Value::Nil) => {
            Err("the worker's frontier changed under a part of its batch (another run?)".into())
        }
        Some(redis::Value::Array(results)) => {
            if let Some(e) = results.iter().find_map(failed) {
                return Err(e);
            }
            // The script's reply, when the part has one: 0 if covered.
            Ok(!(part.scripted && results.last() == Some(&redis::Value::Int(0))))
        }
        other => Err(format!("unexpected reply to a part's EXEC: {other:?}")),
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

    /// A part refused by its guard, or whose worker's frontier is stored or
    /// fitted between its guard and its writes (another run committing a
    /// newer batch, or starting with another worker count), writes no card;
    /// a part let through writes them all.
    /// Against the stack's Redis, each case under a job of its own.
    #[test]
    fn a_part_lands_only_while_its_batch_is_beyond_the_stored_frontier() {
        let url = crate::Endpoints::from_env().unwrap().redis_url();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stats = CardStats::new([(60_000, WindowStats { count: 1, ..WindowStats::default() })]);
        let cards: Vec<(u64, CardStats, Time)> = (0..10).map(|c| (c, stats, 5)).collect();
        let part = Part { sets: &cards, ..Part::default() };
        let none = Fields::new();
        // Each case: the cards written, and what `apply` said of the part.
        // `race`: after the guard, store a newer frontier (`Some(false)`) or
        // fit the frontiers to two workers (`Some(true)`).
        let case = |name: &str, stored: Option<Time>, race: Option<bool>| {
            rt.block_on(async {
                let job = format!(
                    "fence_{name}_{}_{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_nanos()
                );
                let client = redis::Client::open(url.as_str()).unwrap();
                let (mut a, mut b) = (
                    client.get_multiplexed_async_connection().await.unwrap(),
                    client.get_multiplexed_async_connection().await.unwrap(),
                );
                let at = |frontier| PartWriter {
                    keys: Keys::new(&job),
                    worker: 0,
                    frontier,
                    stream_max_len: 10,
                };
                if let Some(f) = stored {
                    apply(at(f).pipeline(&Part::default(), (&none, &none), true).unwrap(), &mut b)
                        .await
                        .unwrap();
                }
                let prepared = at(100).pipeline(&part, (&none, &none), false).unwrap();
                let outcome = if let Some(fit) = race {
                    // The guard (WATCH, EVAL), then another writer stores a
                    // newer frontier, then the writes (MULTI … EXEC).
                    let (mut guard, mut writes) = (redis::pipe(), redis::pipe());
                    for (n, cmd) in prepared.pipeline.cmd_iter().enumerate() {
                        if n < 2 { &mut guard } else { &mut writes }.add_command(cmd.clone());
                    }
                    let guarded = a.send_packed_commands(&guard, 0, guard.len()).await.unwrap();
                    assert_eq!(guarded[1], redis::Value::Int(1), "the guard let the part through");
                    if fit {
                        fit_frontiers(&url, &job, 2).await.unwrap();
                    } else {
                        let newer = at(200).pipeline(&Part::default(), (&none, &none), true);
                        apply(newer.unwrap(), &mut b).await.unwrap();
                    }
                    let written = a.send_packed_commands(&writes, 0, writes.len()).await.unwrap();
                    Ok(written.last() != Some(&redis::Value::Nil))
                } else {
                    apply(prepared, &mut a).await
                };
                let keys = Keys::new(&job);
                let mut present = 0;
                for (c, _, _) in &cards {
                    let held: Option<String> =
                        redis::cmd("GET").arg(keys.card(*c)).query_async(&mut a).await.unwrap();
                    present += usize::from(held == Some(card_value(&stats)));
                }
                let mut doomed: Vec<String> = cards.iter().map(|(c, _, _)| keys.card(*c)).collect();
                doomed.extend([
                    keys.frontiers(),
                    keys.fence(0),
                    keys.fence(1),
                    keys.alert_markers(),
                ]);
                let _: () = redis::cmd("DEL").arg(doomed).query_async(&mut a).await.unwrap();
                (present, outcome)
            })
        };
        assert_eq!(case("fresh", None, None), (10, Ok(true)), "a first batch lands");
        assert_eq!(case("behind", Some(50), None), (10, Ok(true)), "a batch beyond the frontier");
        assert_eq!(case("covered", Some(100), None), (0, Ok(false)), "a batch at the frontier");
        assert_eq!(case("ahead", Some(150), None), (0, Ok(false)), "a batch below it");
        assert_eq!(case("raced", Some(50), Some(false)), (0, Ok(false)), "stored meanwhile");
        assert_eq!(case("refitted", Some(50), Some(true)), (0, Ok(false)), "fitted meanwhile");
    }
}
