//! The cluster store on Redis: the same records and methods as the sled
//! [`Store`](super::Store), shared by every broker node of a cluster.
//!
//! All keys start with the store's prefix `{p}` (`courier` in production).
//! Layout:
//!
//! | key | type | content |
//! |---|---|---|
//! | `{p}:channels` | hash | channel name → [`ChannelRecord`] |
//! | `{p}:channel_ids` | string | the last channel id handed out (`INCR`) |
//! | `{p}:log:{id}` | stream | entry id `<seq>-0`, field `m` → [`MessageRecord`] |
//! | `{p}:head:{id}` | hash | `last_seq`, `appended_bytes`, `trimmed_bytes`, `notified_seq` |
//! | `{p}:dedup:{id}:{msg_id}` | string, `PX` = dedup window | seq of the first message with that `msg_id` |
//! | `{p}:consumers:{id}` | hash | consumer key → [`ConsumerRecord`] |
//! | `{p}:dlq:{id}` | sorted set, all scores 0 | `be_u64(seq) ‖ consumer key`, in lexicographic = (seq, consumer) order |
//! | `{p}:dlq_records:{id}` | hash | `be_u64(seq) ‖ consumer key` → [`DeadLetterRecord`] |
//! | `{p}:notify` | pub/sub | `"<channel id> <seq>"`: the channel's log reaches at least `seq` |
//! | `{p}:events` | pub/sub | free-form notices ([`RedisStore::publish_event`]) |
//!
//! Records are MessagePack like the sled store's. Invariants: seq 0 is never
//! a message; a channel's stream holds a contiguous range
//! `first_seq..=last_seq` (retention only removes a prefix, with an exact
//! `XTRIM MINID`); `head.last_seq` is never below the stream's last entry,
//! because [`RedisStore::append_batch`] moves both in one Lua script.
//! `{p}:head:{id}` carries one field the sled head has not: `notified_seq`,
//! the highest seq announced on `{p}:notify`, so a batch of duplicates does
//! not announce anything.
//!
//! Requirements: Redis ≥ 6.2 (`XTRIM MINID`), one primary (the scripts touch
//! keys of several hash slots, so no Redis Cluster). Seqs, ids, byte counts
//! and timestamps pass through Lua numbers (doubles), exact below 2⁵³.
//!
//! Durability is Redis' own (AOF / RDB as configured): every method returns
//! after Redis acknowledged its writes, nothing is buffered here.
//!
//! Connections: a few blocking connections (one per concurrent caller, at
//! most three), made lazily with a 2 s connect timeout and 5 s
//! read/write timeouts. An I/O failure drops the connection and returns
//! [`StoreError::Unavailable`]; the next call reconnects. Every method blocks:
//! call them from blocking threads, never from async code.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use redis::{
    Connection, ConnectionLike, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind, Value,
};

use super::{
    ChannelRecord, ConsumerRecord, DeadLetterRecord, HeadRecord, LoadedChannel, MessageRecord,
    StoreError, decode, encode,
};

/// How long connecting to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may wait for Redis before the connection counts as dead.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections kept open: callers run concurrently up to this many.
const POOL_SIZE: usize = 3;
/// Log entries read per round trip by [`RedisStore::trim`].
const TRIM_CHUNK: usize = 256;
/// Channels whose state is fetched per round trip by [`RedisStore::load_channels`].
const LOAD_CHUNK: usize = 512;
/// The stream field holding a message.
const FIELD: &str = "m";
const NO_RETRY_JOBS: &str = "the redis store keeps no retry jobs; use [retry] backend = \"redis\"";

/// Appends one message unless its `msg_id` was seen within the dedup window.
/// XADD goes first so that a failing XADD leaves the head untouched.
const APPEND_LUA: &str = r"
-- One channel's messages, in order. KEYS: head, log, then the dedup key of
-- each message that has one. ARGV: four per message: record, size,
-- 1 when the next dedup key is its own (else 0), dedup window ms.
-- Returns two per message: 1 and its new seq, or 0 and the seq its msg_id
-- was first stored under.
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
local bytes = 0
local stored = false
local replies = {}
local next_key = 3
for i = 1, #ARGV, 4 do
  local key = nil
  if ARGV[i + 2] == '1' then
    key = KEYS[next_key]
    next_key = next_key + 1
  end
  local seen = key and redis.call('GET', key)
  if seen then
    replies[#replies + 1] = 0
    replies[#replies + 1] = seen
  else
    last = last + 1
    local seq = string.format('%d', last)
    redis.call('XADD', KEYS[2], seq .. '-0', 'm', ARGV[i])
    bytes = bytes + tonumber(ARGV[i + 1])
    stored = true
    if key then redis.call('SET', key, seq, 'PX', ARGV[i + 3]) end
    replies[#replies + 1] = 1
    replies[#replies + 1] = seq
  end
end
if stored then
  redis.call('HSET', KEYS[1], 'last_seq', string.format('%d', last))
  redis.call('HINCRBY', KEYS[1], 'appended_bytes', bytes)
end
return replies
";

/// Announces a channel's head unless that seq (or a later one) was announced.
const NOTIFY_LUA: &str = r"
-- KEYS: head; ARGV: pub/sub channel, channel id
local last = redis.call('HGET', KEYS[1], 'last_seq')
if not last then return 0 end
local notified = redis.call('HGET', KEYS[1], 'notified_seq')
if notified and tonumber(notified) >= tonumber(last) then return 0 end
redis.call('HSET', KEYS[1], 'notified_seq', last)
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' ' .. last)
return 1
";

/// Writes a head unless it would lower `last_seq` (a stale head is ignored whole).
const PUT_HEAD_LUA: &str = r"
-- KEYS: head; ARGV: last_seq, appended_bytes
local current = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
if tonumber(ARGV[1]) < current then return 0 end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[1], 'appended_bytes', ARGV[2])
return 1
";

/// Stores a channel record and keeps the id counter at or above its id.
const PUT_CHANNEL_LUA: &str = r"
-- KEYS: channels, id counter; ARGV: name, record, id
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[3])
end
return 1
";

/// The channel's record, or a new one with a fresh id (cmsgpack writes the
/// same MessagePack map `rmp_serde::to_vec_named` reads).
const GET_OR_CREATE_LUA: &str = r"
-- KEYS: channels, id counter; ARGV: name, epoch, created_ms
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return {0, existing} end
local id = redis.call('INCR', KEYS[2])
local record = cmsgpack.pack({id = id, epoch = ARGV[2], created_ms = tonumber(ARGV[3])})
redis.call('HSET', KEYS[1], ARGV[1], record)
return {1, record}
";

/// Removes a channel's keys, and its name only while it still names this id.
const DELETE_CHANNEL_LUA: &str = r"
-- KEYS: channels, log, the channel's other keys...; ARGV: name, id
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
  local record = cmsgpack.unpack(stored)
  if type(record) == 'table' and record.id == tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end
local removed = redis.call('XLEN', KEYS[2])
redis.call('UNLINK', unpack(KEYS, 2))
return removed
";

/// Trims the log below a seq and counts the bytes of what was really removed:
/// the entries read form a prefix, so if a concurrent trim removed some of
/// them first, the ones removed here are the last `deleted` of that prefix.
const TRIM_LUA: &str = r"
-- KEYS: log, head; ARGV: first seq kept, then the sizes of the entries below it, oldest first
local deleted = redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
local bytes = 0
for i = math.max(2, #ARGV - deleted + 1), #ARGV do bytes = bytes + tonumber(ARGV[i]) end
if bytes > 0 then
  redis.call('HINCRBY', KEYS[2], 'trimmed_bytes', string.format('%d', bytes))
end
return bytes
";

/// What `load_channels` reports of one channel, without moving message bodies.
const CHANNEL_STATE_LUA: &str = r"
-- KEYS: log, head, dlq index
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local head = redis.call('HMGET', KEYS[2], 'last_seq', 'appended_bytes', 'trimmed_bytes')
return {
  first[1] and first[1][1] or '', last[1] and last[1][1] or '',
  head[1] or '', head[2] or '', head[3] or '',
  redis.call('ZCARD', KEYS[3])
}
";

/// Dead letters in index order within a lexicographic range.
const DLQ_RANGE_LUA: &str = r"
-- KEYS: dlq index, dlq records; ARGV: min, max, count
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, ARGV[3])
local out = {}
for _, member in ipairs(members) do
  local record = redis.call('HGET', KEYS[2], member)
  if record then out[#out + 1] = record end
end
return out
";

/// One message for [`RedisStore::append_batch`].
#[derive(Debug, Clone, Copy)]
pub struct AppendItem<'a> {
    /// The channel's id (the caller checked that the channel exists).
    pub channel: u64,
    /// The message.
    pub record: &'a MessageRecord,
    /// How long its `msg_id` deduplicates later messages; 0 disables dedup.
    pub dedup_window_ms: u64,
}

/// What [`RedisStore::append_batch`] did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this seq.
    New {
        /// The seq the message got.
        seq: u64,
    },
    /// Not stored: its `msg_id` was seen within the window, first under `seq`.
    Duplicate {
        /// The seq of the first message with this `msg_id`.
        seq: u64,
    },
}

/// The Lua scripts, loaded on every new connection.
struct Scripts {
    append: Script,
    notify: Script,
    put_head: Script,
    put_channel: Script,
    get_or_create: Script,
    delete_channel: Script,
    trim: Script,
    channel_state: Script,
    dlq_range: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            append: Script::new(APPEND_LUA),
            notify: Script::new(NOTIFY_LUA),
            put_head: Script::new(PUT_HEAD_LUA),
            put_channel: Script::new(PUT_CHANNEL_LUA),
            get_or_create: Script::new(GET_OR_CREATE_LUA),
            delete_channel: Script::new(DELETE_CHANNEL_LUA),
            trim: Script::new(TRIM_LUA),
            channel_state: Script::new(CHANNEL_STATE_LUA),
            dlq_range: Script::new(DLQ_RANGE_LUA),
        }
    }

    /// `SCRIPT LOAD`s every script in one round trip, so that pipelined
    /// `EVALSHA`s (which cannot fall back to `EVAL`) normally find them.
    fn load(&self, connection: &mut Connection) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        for script in [
            &self.append,
            &self.notify,
            &self.put_head,
            &self.put_channel,
            &self.get_or_create,
            &self.delete_channel,
            &self.trim,
            &self.channel_state,
            &self.dlq_range,
        ] {
            pipe.load_script(script).ignore();
        }
        pipe.exec(connection)
    }
}

/// A pooled connection and the pool generation it was made in.
struct Pooled {
    generation: u64,
    connection: Connection,
}

/// The Redis store: a client, a few connections and the key prefix.
pub struct RedisStore {
    /// Where Redis is; the broker opens its own pub/sub connection with it.
    url: String,
    /// Every key starts with `{prefix}:`, so stores can share one Redis.
    prefix: String,
    client: redis::Client,
    /// Connections, each used by one caller at a time; `None` until needed
    /// or after a failure.
    slots: Vec<Mutex<Option<Pooled>>>,
    /// Picks the slot to wait for when every slot is busy.
    next_slot: AtomicUsize,
    /// Bumped when Redis was unreachable: older connections are likely dead
    /// too (Redis restarted), so they are replaced instead of tried.
    generation: AtomicU64,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Maps a client error: `(error, drop the connection, Redis is unreachable)`.
fn classify(error: &RedisError) -> (StoreError, bool, bool) {
    let unreachable = error.is_io_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        );
    if unreachable {
        (StoreError::Unavailable(error.to_string()), true, true)
    } else {
        // A parse error or a failed handshake leaves the connection unusable.
        let broken = error.is_unrecoverable_error();
        (StoreError::Redis(error.to_string()), broken, false)
    }
}

/// The seq of a stream entry id `<seq>-<n>`.
fn seq_of_id(id: &str) -> Option<u64> {
    id.split('-').next().and_then(|seq| seq.parse().ok())
}

/// A decimal field that may be missing (empty).
fn number(text: &str) -> Result<u64, StoreError> {
    if text.is_empty() {
        return Ok(0);
    }
    text.parse().map_err(|_| StoreError::Corrupt {
        tree: "heads",
        message: format!("not a number: {text:?}"),
    })
}

/// A Redis `COUNT`/`LIMIT` argument (Redis counts are signed 64-bit).
fn count(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The dead-letter index member: `be_u64(seq) ‖ consumer`.
fn dlq_member(seq: u64, consumer: &str) -> Vec<u8> {
    let mut member = seq.to_be_bytes().to_vec();
    member.extend_from_slice(consumer.as_bytes());
    member
}

/// A lexicographic range bound: `[` inclusive or `(` exclusive.
fn lex_bound(inclusive: bool, member: Vec<u8>) -> Vec<u8> {
    let mut bound = vec![if inclusive { b'[' } else { b'(' }];
    bound.extend(member);
    bound
}

/// A stream entry as `XRANGE` returns it: id and flat field/value list.
type StreamEntry = (String, Vec<Vec<u8>>);

fn decode_entries(entries: Vec<StreamEntry>) -> Result<Vec<(u64, MessageRecord)>, StoreError> {
    entries
        .into_iter()
        .map(|(id, fields)| {
            let corrupt = |message: String| StoreError::Corrupt {
                tree: "log",
                message,
            };
            let seq = seq_of_id(&id).ok_or_else(|| corrupt(format!("entry id {id:?}")))?;
            let value = fields
                .chunks(2)
                .find(|pair| pair.first().is_some_and(|name| name == FIELD.as_bytes()))
                .and_then(|pair| pair.get(1))
                .ok_or_else(|| corrupt(format!("entry {id} has no field {FIELD}")))?;
            Ok((seq, decode("log", value)?))
        })
        .collect()
}

/// Whether a pipelined reply is a NOSCRIPT error.
fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
}

impl RedisStore {
    /// Connects to Redis at `url` (2 s timeout) to check it is there and
    /// loads the scripts. Every key starts with `{prefix}:`.
    pub fn open(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Redis(format!("invalid redis URL: {e}")))?;
        let store = Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            client,
            slots: (0..POOL_SIZE).map(|_| Mutex::new(None)).collect(),
            next_slot: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            scripts: Scripts::new(),
        };
        store.ping()?;
        Ok(store)
    }

    /// The URL this store connects to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key prefix (without the `:`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pub/sub channel where [`RedisStore::append_batch`] announces
    /// `"<channel id> <seq>"`.
    pub fn notify_channel(&self) -> String {
        format!("{}:notify", self.prefix)
    }

    /// The pub/sub channel of [`RedisStore::publish_event`].
    pub fn events_channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Checks that Redis answers (readiness).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.run(|con| redis::cmd("PING").exec(con))
    }

    /// The `last_seq` of each channel id, in order (0 for an unknown id):
    /// one round trip, for a node comparing its heads with the cluster's.
    pub fn heads(&self, ids: &[u64]) -> Result<Vec<u64>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key("head", *id)).collect();
        let heads: Vec<Option<u64>> = self.run(|con| {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("HGET").arg(key).arg("last_seq");
            }
            pipe.query(con)
        })?;
        Ok(heads.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Publishes `payload` on [`RedisStore::events_channel`] to every node.
    pub fn publish_event(&self, payload: &str) -> Result<(), StoreError> {
        let channel = self.events_channel();
        self.run(|con| redis::cmd("PUBLISH").arg(&channel).arg(payload).exec(con))
    }

    fn channels_key(&self) -> String {
        format!("{}:channels", self.prefix)
    }

    fn ids_key(&self) -> String {
        format!("{}:channel_ids", self.prefix)
    }

    /// A per-channel key: `{prefix}:{kind}:{id}`.
    fn key(&self, kind: &str, channel: u64) -> String {
        format!("{}:{kind}:{channel}", self.prefix)
    }

    fn dedup_key(&self, channel: u64, msg_id: &str) -> String {
        format!("{}:dedup:{channel}:{msg_id}", self.prefix)
    }

    /// A free connection slot, or the next one in turn when all are busy.
    fn slot(&self) -> MutexGuard<'_, Option<Pooled>> {
        for slot in &self.slots {
            match slot.try_lock() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(poisoned)) => return Self::recover(slot, poisoned),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        slot.lock()
            .unwrap_or_else(|poisoned| Self::recover(slot, poisoned))
    }

    /// A caller panicked mid-command: its connection may be mid-reply.
    fn recover<'a>(
        slot: &Mutex<Option<Pooled>>,
        poisoned: PoisonError<MutexGuard<'a, Option<Pooled>>>,
    ) -> MutexGuard<'a, Option<Pooled>> {
        let mut guard = poisoned.into_inner();
        *guard = None;
        slot.clear_poison();
        guard
    }

    fn connect(&self) -> RedisResult<Connection> {
        let mut connection = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        connection.set_read_timeout(Some(IO_TIMEOUT))?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        self.scripts.load(&mut connection)?;
        Ok(connection)
    }

    /// Runs `op` on a pooled connection (connecting first when needed) and
    /// maps its errors; a connection that failed is dropped.
    fn run<T>(&self, op: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Result<T, StoreError> {
        let mut slot = self.slot();
        let generation = self.generation.load(Ordering::Acquire);
        let result = match slot.take() {
            Some(pooled) if pooled.generation == generation && pooled.connection.is_open() => {
                Ok(slot.insert(pooled))
            }
            _ => self.connect().map(|connection| {
                slot.insert(Pooled {
                    generation,
                    connection,
                })
            }),
        }
        .and_then(|pooled| op(&mut pooled.connection));
        result.map_err(|error| {
            let (error, broken, unreachable) = classify(&error);
            if broken {
                *slot = None;
            }
            if unreachable {
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
            error
        })
    }

    /// Runs script invocations in one pipeline and returns their replies.
    /// Replies that are NOSCRIPT errors (the script cache was flushed, or a
    /// failover reached a server without them) did not run: they run again
    /// once, after loading the scripts, together with every invocation from
    /// index `always_again` on (the notifications must follow the appends).
    fn run_scripts(
        &self,
        con: &mut Connection,
        invocations: &[redis::ScriptInvocation<'_>],
        always_again: usize,
    ) -> RedisResult<Vec<Value>> {
        let mut replies = vec![Value::Nil; invocations.len()];
        let mut todo: Vec<usize> = (0..invocations.len()).collect();
        for attempt in 0..2 {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &index in &todo {
                pipe.invoke_script(&invocations[index]);
            }
            let got: Vec<Value> = pipe.query(con)?;
            if got.len() != todo.len() {
                return Err(RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "pipeline reply count",
                )));
            }
            let missing: Vec<usize> = todo
                .iter()
                .zip(&got)
                .filter(|(_, reply)| is_noscript(reply))
                .map(|(&index, _)| index)
                .collect();
            for (&index, reply) in todo.iter().zip(got) {
                replies[index] = reply;
            }
            if missing.is_empty() || attempt == 1 {
                break;
            }
            self.scripts.load(con)?;
            todo = missing;
            todo.extend(always_again..invocations.len());
            todo.sort_unstable();
            todo.dedup();
        }
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::ServerError(error) => Err(error.into()),
                reply => Ok(reply),
            })
            .collect()
    }

    /// Records that a run has begun. Always `false`: Redis' own persistence
    /// applies, there is no lossy-ack mode to detect.
    pub fn begin_run(&self, acks_before_flush: bool) -> Result<bool, StoreError> {
        let _ = acks_before_flush;
        Ok(false)
    }

    /// Marks the run as ended gracefully: nothing to record in Redis.
    pub fn mark_clean(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Nothing to do: every write was acknowledged by Redis before its
    /// method returned, and nothing is buffered here.
    pub fn flush_durable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Every stored channel with its seq range and size, by name.
    pub fn load_channels(&self) -> Result<Vec<LoadedChannel>, StoreError> {
        let key = self.channels_key();
        let entries: BTreeMap<Vec<u8>, Vec<u8>> =
            self.run(|con| redis::cmd("HGETALL").arg(&key).query(con))?;
        let mut channels = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            let record: ChannelRecord = decode("channels", &value)?;
            channels.push((String::from_utf8_lossy(&name).into_owned(), record));
        }
        let mut out = Vec::with_capacity(channels.len());
        for chunk in channels.chunks(LOAD_CHUNK) {
            out.extend(self.load_states(chunk)?);
        }
        Ok(out)
    }

    /// One channel as [`RedisStore::load_channels`] reports it.
    pub fn load_channel(&self, name: &str) -> Result<Option<LoadedChannel>, StoreError> {
        let key = self.channels_key();
        let value: Option<Vec<u8>> =
            self.run(|con| redis::cmd("HGET").arg(&key).arg(name).query(con))?;
        let Some(value) = value else { return Ok(None) };
        let record: ChannelRecord = decode("channels", &value)?;
        Ok(self
            .load_states(&[(name.to_owned(), record)])?
            .into_iter()
            .next())
    }

    /// Seq range, size and dead-letter count of channels, in one round trip.
    fn load_states(
        &self,
        channels: &[(String, ChannelRecord)],
    ) -> Result<Vec<LoadedChannel>, StoreError> {
        let keys: Vec<[String; 3]> = channels
            .iter()
            .map(|(_, record)| {
                let id = record.id;
                [
                    self.key("log", id),
                    self.key("head", id),
                    self.key("dlq", id),
                ]
            })
            .collect();
        let invocations: Vec<_> = keys
            .iter()
            .map(|keys| {
                let mut invocation = self.scripts.channel_state.prepare_invoke();
                invocation.key(keys);
                invocation
            })
            .collect();
        type State = (String, String, String, String, String, u64);
        let states: Vec<State> = self.run(|con| {
            self.run_scripts(con, &invocations, invocations.len())?
                .into_iter()
                .map(|reply| Ok(redis::from_redis_value(reply)?))
                .collect()
        })?;
        channels
            .iter()
            .zip(states)
            .map(
                |((name, record), (first, last, head_seq, appended, trimmed, dead))| {
                    let first_key = seq_of_id(&first);
                    let last_key = seq_of_id(&last).or(first_key);
                    let last_seq = number(&head_seq)?.max(last_key.unwrap_or(0));
                    Ok(LoadedChannel {
                        name: name.clone(),
                        record: record.clone(),
                        first_seq: first_key.unwrap_or(last_seq.saturating_add(1)),
                        last_seq,
                        bytes: number(&appended)?.saturating_sub(number(&trimmed)?),
                        dead_letters: dead,
                    })
                },
            )
            .collect()
    }

    /// The highest channel id handed out: the id counter, or a stored record
    /// above it. Unlike sled, ids of deleted channels count, so an id is
    /// never used twice.
    pub fn max_channel_id(&self) -> Result<u64, StoreError> {
        let (ids, records): (Option<u64>, Vec<Vec<u8>>) = self.run(|con| {
            redis::pipe()
                .cmd("GET")
                .arg(self.ids_key())
                .cmd("HVALS")
                .arg(self.channels_key())
                .query(con)
        })?;
        let mut max = ids.unwrap_or(0);
        for value in records {
            max = max.max(decode::<ChannelRecord>("channels", &value)?.id);
        }
        Ok(max)
    }

    /// Records a channel (under an id chosen by the caller; the id counter
    /// is raised to it so [`RedisStore::get_or_create_channel`] never reuses it).
    pub fn put_channel(&self, name: &str, record: &ChannelRecord) -> Result<(), StoreError> {
        let mut invocation = self.scripts.put_channel.prepare_invoke();
        invocation
            .key(self.channels_key())
            .key(self.ids_key())
            .arg(name)
            .arg(encode(record))
            .arg(record.id);
        self.run(|con| invocation.invoke::<()>(con))
    }

    /// The channel named `name`, created with a fresh id, `epoch` and
    /// `created_ms` if it does not exist (atomically: concurrent callers on
    /// any node get the same record). True when it was created.
    pub fn get_or_create_channel(
        &self,
        name: &str,
        epoch: &str,
        created_ms: u64,
    ) -> Result<(ChannelRecord, bool), StoreError> {
        let mut invocation = self.scripts.get_or_create.prepare_invoke();
        invocation
            .key(self.channels_key())
            .key(self.ids_key())
            .arg(name)
            .arg(epoch)
            .arg(created_ms);
        let (created, value): (u8, Vec<u8>) = self.run(|con| invocation.invoke(con))?;
        Ok((decode("channels", &value)?, created == 1))
    }

    /// Appends one message under a seq chosen by the caller, for single-writer
    /// setups (the writer moves the head with [`RedisStore::put_head`]). Redis
    /// refuses a seq at or below the stream's last entry.
    pub fn append(&self, channel: u64, seq: u64, record: &MessageRecord) -> Result<(), StoreError> {
        let key = self.key("log", channel);
        self.run(|con| {
            redis::cmd("XADD")
                .arg(&key)
                .arg(format!("{seq}-0"))
                .arg(FIELD)
                .arg(encode(record))
                .exec(con)
        })
    }

    /// Records a channel's head, unless it is older than the stored one
    /// (`last_seq` never goes down; a stale head is ignored whole).
    pub fn put_head(&self, channel: u64, head: &HeadRecord) -> Result<(), StoreError> {
        let mut invocation = self.scripts.put_head.prepare_invoke();
        invocation
            .key(self.key("head", channel))
            .arg(head.last_seq)
            .arg(head.appended_bytes);
        self.run(|con| invocation.invoke::<()>(con))
    }

    /// Appends messages, each under the next seq of its channel (gapless
    /// even with several nodes appending), in one round trip: one script
    /// call per channel, which stores that channel's messages in the order
    /// given and writes its head once. A message
    /// whose `msg_id` is still within its dedup window is not stored and
    /// reports the first seq. Then announces, once per channel, the
    /// channel's head on [`RedisStore::notify_channel`] (skipped when an
    /// equal or later seq was already announced, e.g. all duplicates).
    ///
    /// The caller checks that the channels exist: appending to a deleted
    /// channel's id leaves orphan keys. On `Unavailable` some messages may
    /// have been stored; a client retry with the same `msg_id` is safe. A
    /// Redis error on one message (foreign data under our keys) fails the
    /// call, though other messages of the batch may be stored.
    pub fn append_batch(&self, items: &[AppendItem<'_>]) -> Result<Vec<Appended>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // One script call per channel, its messages in the order given.
        let mut channels: Vec<(u64, Vec<usize>)> = Vec::new();
        for (index, item) in items.iter().enumerate() {
            match channels.iter_mut().find(|(id, _)| *id == item.channel) {
                Some((_, indexes)) => indexes.push(index),
                None => channels.push((item.channel, vec![index])),
            }
        }
        channels.sort_unstable_by_key(|(id, _)| *id);
        let notify = self.notify_channel();
        let mut invocations = Vec::with_capacity(2 * channels.len());
        for (channel, indexes) in &channels {
            let mut invocation = self.scripts.append.prepare_invoke();
            invocation
                .key(self.key("head", *channel))
                .key(self.key("log", *channel));
            for &index in indexes {
                let item = &items[index];
                let dedup = item
                    .record
                    .msg_id
                    .as_ref()
                    .filter(|_| item.dedup_window_ms > 0);
                if let Some(msg_id) = dedup {
                    invocation.key(self.dedup_key(*channel, msg_id));
                }
                invocation
                    .arg(encode(item.record))
                    .arg(item.record.size())
                    .arg(u8::from(dedup.is_some()))
                    .arg(item.dedup_window_ms);
            }
            invocations.push(invocation);
        }
        for &(channel, _) in &channels {
            let mut invocation = self.scripts.notify.prepare_invoke();
            invocation
                .key(self.key("head", channel))
                .arg(&notify)
                .arg(channel);
            invocations.push(invocation);
        }
        self.run(|con| {
            let replies = self.run_scripts(con, &invocations, channels.len())?;
            let mut appended = vec![Appended::Duplicate { seq: 0 }; items.len()];
            for ((_, indexes), reply) in channels.iter().zip(replies) {
                let pairs: Vec<(u8, u64)> = redis::from_redis_value(reply)?;
                if pairs.len() != indexes.len() {
                    return Err(RedisError::from((
                        ErrorKind::UnexpectedReturnType,
                        "append script reply count",
                    )));
                }
                for (&index, (new, seq)) in indexes.iter().zip(pairs) {
                    appended[index] = if new == 1 {
                        Appended::New { seq }
                    } else {
                        Appended::Duplicate { seq }
                    };
                }
            }
            Ok(appended)
        })
    }

    /// Messages `from..=to` that are still stored, at most `limit`.
    pub fn read_range(
        &self,
        channel: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, MessageRecord)>, StoreError> {
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.key("log", channel);
        let entries: Vec<StreamEntry> = self.run(|con| {
            redis::cmd("XRANGE")
                .arg(&key)
                .arg(from)
                .arg(to)
                .arg("COUNT")
                .arg(count(limit))
                .query(con)
        })?;
        decode_entries(entries)
    }

    /// One message, if it is still stored.
    pub fn read_one(&self, channel: u64, seq: u64) -> Result<Option<MessageRecord>, StoreError> {
        Ok(self
            .read_range(channel, seq, seq, 1)?
            .into_iter()
            .next()
            .map(|(_, record)| record))
    }

    /// Always empty: in Redis mode the dedup table lives in Redis (the
    /// `{p}:dedup:…` keys that [`RedisStore::append_batch`] checks), so there
    /// is nothing to rebuild after a restart.
    pub fn recent_msg_ids(
        &self,
        channel: u64,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let _ = (channel, since_ms, limit);
        Ok(Vec::new())
    }

    /// Removes the oldest messages of a channel while `drop(seq, record)`
    /// says so, stopping at the first one to keep or at `last_seq`. Returns
    /// the new first seq and the bytes removed (by this call: bytes a
    /// concurrent trim removed first are counted there, not here).
    pub fn trim(
        &self,
        channel: u64,
        last_seq: u64,
        mut drop: impl FnMut(u64, &MessageRecord) -> bool,
    ) -> Result<(u64, u64), StoreError> {
        let after_last = last_seq.saturating_add(1);
        let mut removed = 0u64;
        let mut from = 1u64;
        while from <= last_seq {
            let chunk = self.read_range(channel, from, last_seq, TRIM_CHUNK)?;
            let mut sizes = Vec::new();
            let mut kept = None;
            for (seq, record) in &chunk {
                if !drop(*seq, record) {
                    kept = Some(*seq);
                    break;
                }
                sizes.push(record.size());
                from = seq.saturating_add(1);
            }
            if !sizes.is_empty() {
                let mut invocation = self.scripts.trim.prepare_invoke();
                invocation
                    .key(self.key("log", channel))
                    .key(self.key("head", channel))
                    .arg(from)
                    .arg(&sizes);
                removed += self.run(|con| invocation.invoke::<u64>(con))?;
            }
            if let Some(seq) = kept {
                return Ok((seq, removed));
            }
            if chunk.len() < TRIM_CHUNK {
                break;
            }
        }
        Ok((after_last, removed))
    }

    /// A durable consumer's state, if it exists.
    pub fn load_consumer(
        &self,
        channel: u64,
        name: &str,
    ) -> Result<Option<ConsumerRecord>, StoreError> {
        let key = self.key("consumers", channel);
        let value: Option<Vec<u8>> =
            self.run(|con| redis::cmd("HGET").arg(&key).arg(name).query(con))?;
        value.map(|v| decode("consumers", &v)).transpose()
    }

    /// Saves a durable consumer's state.
    pub fn save_consumer(
        &self,
        channel: u64,
        name: &str,
        record: &ConsumerRecord,
    ) -> Result<(), StoreError> {
        let key = self.key("consumers", channel);
        self.run(|con| {
            redis::cmd("HSET")
                .arg(&key)
                .arg(name)
                .arg(encode(record))
                .exec(con)
        })
    }

    /// Every stored consumer of a channel, by name.
    pub fn list_consumers(
        &self,
        channel: u64,
    ) -> Result<Vec<(String, ConsumerRecord)>, StoreError> {
        let key = self.key("consumers", channel);
        let entries: BTreeMap<Vec<u8>, Vec<u8>> =
            self.run(|con| redis::cmd("HGETALL").arg(&key).query(con))?;
        entries
            .into_iter()
            .map(|(name, value)| {
                Ok((
                    String::from_utf8_lossy(&name).into_owned(),
                    decode("consumers", &value)?,
                ))
            })
            .collect()
    }

    /// Removes a channel with its log, head, consumers and dead letters, in
    /// one script. The record under `name` goes only if it is still this
    /// channel's (`id`). Returns how many messages it removed. Dedup keys
    /// are left to expire: ids are never reused, so nothing reads them.
    pub fn delete_channel(&self, name: &str, id: u64) -> Result<u64, StoreError> {
        let mut invocation = self.scripts.delete_channel.prepare_invoke();
        invocation.key(self.channels_key());
        for kind in ["log", "head", "consumers", "dlq", "dlq_records"] {
            invocation.key(self.key(kind, id));
        }
        invocation.arg(name).arg(id);
        self.run(|con| invocation.invoke(con))
    }

    /// Memory Redis uses (`used_memory` of `INFO memory`), 0 when unknown.
    pub fn size_on_disk(&self) -> u64 {
        let info: Result<String, _> = self.run(|con| redis::cmd("INFO").arg("memory").query(con));
        info.ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("used_memory:"))
                    .and_then(|value| value.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Stores a dead letter.
    pub fn dlq_put(&self, channel: u64, record: &DeadLetterRecord) -> Result<(), StoreError> {
        let member = dlq_member(record.seq, &record.consumer);
        self.run(|con| {
            redis::pipe()
                .atomic()
                .cmd("ZADD")
                .arg(self.key("dlq", channel))
                .arg(0)
                .arg(&member)
                .ignore()
                .cmd("HSET")
                .arg(self.key("dlq_records", channel))
                .arg(&member)
                .arg(encode(record))
                .ignore()
                .exec(con)
        })
    }

    /// Dead letters of a channel in (seq, consumer) order, after the given
    /// position, at most `limit`; `seqs` bounds the seqs listed.
    pub fn dlq_list(
        &self,
        channel: u64,
        after: Option<(u64, &str)>,
        seqs: std::ops::RangeInclusive<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let min = match after {
            Some((seq, consumer)) => lex_bound(false, dlq_member(seq, consumer)),
            None => lex_bound(true, dlq_member(*seqs.start(), "")),
        };
        let max = lex_bound(false, dlq_member(seqs.end().saturating_add(1), ""));
        self.dlq_range(channel, min, max, limit)
    }

    fn dlq_range(
        &self,
        channel: u64,
        min: Vec<u8>,
        max: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let mut invocation = self.scripts.dlq_range.prepare_invoke();
        invocation
            .key(self.key("dlq", channel))
            .key(self.key("dlq_records", channel))
            .arg(min)
            .arg(max)
            .arg(count(limit));
        let values: Vec<Vec<u8>> = self.run(|con| invocation.invoke(con))?;
        values.iter().map(|v| decode("dlq", v)).collect()
    }

    /// Removes one dead letter; true when it was there.
    pub fn dlq_remove(&self, channel: u64, seq: u64, consumer: &str) -> Result<bool, StoreError> {
        let member = dlq_member(seq, consumer);
        let (removed, _): (u64, u64) = self.run(|con| {
            redis::pipe()
                .atomic()
                .cmd("ZREM")
                .arg(self.key("dlq", channel))
                .arg(&member)
                .cmd("HDEL")
                .arg(self.key("dlq_records", channel))
                .arg(&member)
                .query(con)
        })?;
        Ok(removed > 0)
    }

    /// The oldest dead letter of a channel (lowest seq).
    pub fn dlq_first(&self, channel: u64) -> Result<Option<DeadLetterRecord>, StoreError> {
        Ok(self
            .dlq_range(channel, b"-".to_vec(), b"+".to_vec(), 1)?
            .into_iter()
            .next())
    }

    /// Refused: in Redis mode retry jobs live in apalis-redis, not here.
    pub fn retry_put(&self, due_ms: u64, id: u64, job: &[u8]) -> Result<(), StoreError> {
        let _ = (due_ms, id, job);
        Err(StoreError::Redis(NO_RETRY_JOBS.into()))
    }

    /// Always empty (see [`RedisStore::retry_put`]).
    pub fn retry_take_due(&self, now_ms: u64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let _ = (now_ms, limit);
        Ok(Vec::new())
    }

    /// Always `None` (see [`RedisStore::retry_put`]).
    pub fn retry_next_due(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// Always `(0, 0)` (see [`RedisStore::retry_put`]).
    pub fn retry_stats(&self) -> Result<(u64, u64), StoreError> {
        Ok((0, 0))
    }
}

/// Renews a node's membership and drops members whose lease ran out, by
/// Redis' own clock (nodes' clocks may differ).
const NODE_BEAT_LUA: &str = r"
-- KEYS: nodes (zset id -> expiry ms), info (hash id -> json); ARGV: id, info, lease ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do
  if id ~= ARGV[1] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return dead
";

/// The live members: ids whose lease has not run out, with their info.
const NODES_LUA: &str = r"
-- KEYS: nodes, info
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local out = {}
for _, id in ipairs(ids) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id) or '')
end
return out
";

/// Takes (or keeps) a lease: `ARGV[1]` gets it when it is free, already
/// its own, or held by a node that is no longer a member. Returns the holder.
const LEASE_LUA: &str = r"
-- KEYS: lease, nodes (zset id -> expiry ms); ARGV: holder, lease ms
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local expiry = redis.call('ZSCORE', KEYS[2], holder)
  if expiry and tonumber(expiry) > now then
    return holder
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
";

/// Gives a lease back if `ARGV[1]` holds it.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Cluster membership and consumer ownership.
impl RedisStore {
    fn nodes_keys(&self) -> (String, String) {
        (
            format!("{}:nodes", self.prefix),
            format!("{}:node_info", self.prefix),
        )
    }

    /// The pub/sub channel on which node `id` receives messages from the
    /// other nodes.
    pub fn node_channel(&self, id: &str) -> String {
        format!("{}:node:{id}", self.prefix)
    }

    /// Renews node `id`'s membership for `lease_ms` with its `info`, and
    /// returns the ids of members whose lease ran out (now removed).
    pub fn node_heartbeat(
        &self,
        id: &str,
        info: &str,
        lease_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let (nodes, infos) = self.nodes_keys();
        let script = Script::new(NODE_BEAT_LUA);
        self.run(|con| {
            script
                .key(&nodes)
                .key(&infos)
                .arg(id)
                .arg(info)
                .arg(lease_ms)
                .invoke(con)
        })
    }

    /// The live members, `(id, info)`.
    pub fn live_nodes(&self) -> Result<Vec<(String, String)>, StoreError> {
        let (nodes, infos) = self.nodes_keys();
        let script = Script::new(NODES_LUA);
        let flat: Vec<String> = self.run(|con| script.key(&nodes).key(&infos).invoke(con))?;
        Ok(flat
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect())
    }

    /// Node `id` leaves the cluster (a graceful stop).
    pub fn node_leave(&self, id: &str) -> Result<(), StoreError> {
        let (nodes, infos) = self.nodes_keys();
        self.run(|con| {
            redis::pipe()
                .cmd("ZREM")
                .arg(&nodes)
                .arg(id)
                .cmd("HDEL")
                .arg(&infos)
                .arg(id)
                .exec(con)
        })
    }

    fn lease_key(&self, channel: u64, consumer: &str) -> String {
        format!("{}:owner:{channel}:{consumer}", self.prefix)
    }

    /// Takes or renews the lease on consumer `consumer` of channel
    /// `channel` for node `node`; returns the node that holds it.
    pub fn lease_consumer(
        &self,
        channel: u64,
        consumer: &str,
        node: &str,
        lease_ms: u64,
    ) -> Result<String, StoreError> {
        let key = self.lease_key(channel, consumer);
        let (nodes, _) = self.nodes_keys();
        let script = Script::new(LEASE_LUA);
        self.run(|con| {
            script
                .key(&key)
                .key(&nodes)
                .arg(node)
                .arg(lease_ms)
                .invoke(con)
        })
    }

    /// Renews node `node`'s leases on `consumers` `(channel, key)`; returns
    /// for each whether `node` still holds it.
    pub fn renew_leases(
        &self,
        consumers: &[(u64, String)],
        node: &str,
        lease_ms: u64,
    ) -> Result<Vec<bool>, StoreError> {
        if consumers.is_empty() {
            return Ok(Vec::new());
        }
        let script = Script::new(LEASE_LUA);
        let (nodes, _) = self.nodes_keys();
        let keys: Vec<String> = consumers
            .iter()
            .map(|(channel, key)| self.lease_key(*channel, key))
            .collect();
        let holders: Vec<String> = self.run(|con| {
            let mut pipe = redis::pipe();
            // Pipelined scripts run as EVALSHA only: load it first.
            pipe.cmd("SCRIPT").arg("LOAD").arg(LEASE_LUA).ignore();
            for key in &keys {
                pipe.invoke_script(script.key(key).key(&nodes).arg(node).arg(lease_ms));
            }
            pipe.query(con)
        })?;
        Ok(holders.iter().map(|h| h == node).collect())
    }

    /// Gives back node `node`'s lease on a consumer (when it holds it).
    pub fn release_consumer(
        &self,
        channel: u64,
        consumer: &str,
        node: &str,
    ) -> Result<(), StoreError> {
        let key = self.lease_key(channel, consumer);
        let script = Script::new(RELEASE_LUA);
        self.run(|con| script.key(&key).arg(node).invoke::<()>(con))
    }
}

/// Cluster presence. Each node keeps the members of its own connections in
/// a hash `{p}:presence:{node}`: field = channel name, value = the JSON list
/// of that node's members of the channel (`[{"user", "connections",
/// "client"?}]`, never empty: an empty channel's field is removed). The hash
/// expires unless its node renews it, so a dead node's hash outlives its
/// membership lease for a while (long enough for another node to read it and
/// announce the leaves) and then disappears on its own.
impl RedisStore {
    fn presence_key(&self, node: &str) -> String {
        format!("{}:presence:{node}", self.prefix)
    }

    /// Applies node `node`'s presence changes in one round trip: sets the
    /// `set` fields `(channel, members JSON)`, removes the `remove` fields,
    /// renews the hash's TTL to `ttl_ms`, then publishes `events` on
    /// [`RedisStore::events_channel`] (after the writes, so a node that
    /// hears an event reads the presence that goes with it). Returns
    /// whether the hash existed before these writes: `false` means it
    /// expired or was removed (or was empty), and the node must write every
    /// channel it holds again.
    pub fn presence_write(
        &self,
        node: &str,
        set: &[(String, String)],
        remove: &[String],
        ttl_ms: u64,
        events: &[String],
    ) -> Result<bool, StoreError> {
        let key = self.presence_key(node);
        let channel = self.events_channel();
        let existed: (bool,) = self.run(|con| {
            let mut pipe = redis::pipe();
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms);
            if !set.is_empty() {
                pipe.cmd("HSET").arg(&key).arg(set).ignore();
            }
            if !remove.is_empty() {
                pipe.cmd("HDEL").arg(&key).arg(remove).ignore();
            }
            // HSET on a missing key makes one without a TTL.
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
            for event in events {
                pipe.cmd("PUBLISH").arg(&channel).arg(event).ignore();
            }
            pipe.query(con)
        })?;
        Ok(existed.0)
    }

    /// The members JSON of each of `channels` in each node's hash:
    /// `result[n][c]` for `nodes[n]` and `channels[c]`, `None` where that
    /// node has no member of that channel. One round trip.
    pub fn presence_of(
        &self,
        nodes: &[String],
        channels: &[String],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError> {
        if nodes.is_empty() || channels.is_empty() {
            return Ok(vec![Vec::new(); nodes.len()]);
        }
        let keys: Vec<String> = nodes.iter().map(|n| self.presence_key(n)).collect();
        self.run(|con| {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("HMGET").arg(key).arg(channels);
            }
            pipe.query(con)
        })
    }

    /// Every `(channel, members JSON)` in node `node`'s hash.
    pub fn presence_node(&self, node: &str) -> Result<Vec<(String, String)>, StoreError> {
        let key = self.presence_key(node);
        let all: BTreeMap<String, String> =
            self.run(|con| redis::cmd("HGETALL").arg(&key).query(con))?;
        Ok(all.into_iter().collect())
    }

    /// Publishes `events` (as [`RedisStore::presence_write`] does), then
    /// removes node `node`'s hash.
    pub fn presence_forget(&self, node: &str, events: &[String]) -> Result<(), StoreError> {
        let key = self.presence_key(node);
        let channel = self.events_channel();
        self.run(|con| {
            let mut pipe = redis::pipe();
            for event in events {
                pipe.cmd("PUBLISH").arg(&channel).arg(event).ignore();
            }
            pipe.cmd("DEL").arg(&key).ignore();
            pipe.exec(con)
        })
    }
}

/// Channels scanned per `HSCAN` round trip by [`RedisStore::channel_page`].
const SCAN_CHUNK: usize = 1000;

/// A `MATCH` pattern for names starting with `prefix` (glob characters escaped).
fn prefix_pattern(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// What the admin API reads of the shared channel list.
impl RedisStore {
    /// Up to `limit` stored channels whose names start with `prefix` and
    /// come after `after`, by name, with their state. Walks the channel hash
    /// with `HSCAN` (so Redis never blocks on a long reply) and keeps only
    /// the `limit` first names in memory; the state of those is fetched as
    /// [`RedisStore::load_channels`] does.
    pub fn channel_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LoadedChannel>, StoreError> {
        let key = self.channels_key();
        let pattern = prefix_pattern(prefix);
        let mut page: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut cursor = String::from("0");
        loop {
            let (next, flat): (String, Vec<Vec<u8>>) = self.run(|con| {
                redis::cmd("HSCAN")
                    .arg(&key)
                    .arg(&cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_CHUNK)
                    .query(con)
            })?;
            for pair in flat.chunks_exact(2) {
                let name = String::from_utf8_lossy(&pair[0]).into_owned();
                let wanted = name.starts_with(prefix)
                    && after.is_none_or(|a| name.as_str() > a)
                    && (page.len() < limit
                        || page.last_key_value().is_some_and(|(l, _)| &name < l));
                if wanted {
                    page.insert(name, pair[1].clone());
                    if page.len() > limit {
                        page.pop_last();
                    }
                }
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        let mut channels = Vec::with_capacity(page.len());
        for (name, value) in page {
            channels.push((name, decode::<ChannelRecord>("channels", &value)?));
        }
        let mut out = Vec::with_capacity(channels.len());
        for chunk in channels.chunks(LOAD_CHUNK) {
            out.extend(self.load_states(chunk)?);
        }
        Ok(out)
    }

    /// How many channels are stored.
    pub fn channel_count(&self) -> Result<u64, StoreError> {
        let key = self.channels_key();
        self.run(|con| redis::cmd("HLEN").arg(&key).query(con))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;

    use super::super::Store;
    use super::*;

    /// A `redis-server` child on a loopback port, killed on drop.
    struct RedisServer {
        child: Option<Child>,
        port: u16,
    }

    impl RedisServer {
        fn start() -> Self {
            for _ in 0..5 {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|listener| listener.local_addr())
                    .map(|addr| addr.port())
                    .unwrap();
                // Another process may take the port between drop and bind.
                if let Some(server) = Self::try_start(port) {
                    return server;
                }
            }
            panic!("redis-server does not start");
        }

        fn start_on(port: u16) -> Self {
            Self::try_start(port).expect("redis-server starts again on its port")
        }

        /// Starts the server and waits for its "ready" log line (it exits,
        /// closing stdout, when it cannot listen).
        fn try_start(port: u16) -> Option<Self> {
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let mut lines = BufReader::new(child.stdout.take().expect("piped stdout"));
            let mut line = String::new();
            let ready = loop {
                line.clear();
                match lines.read_line(&mut line) {
                    Ok(0) | Err(_) => break false,
                    Ok(_) if line.contains("Ready to accept connections") => break true,
                    Ok(_) => {}
                }
            };
            if !ready {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            // Drain the log so the server never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
            Some(Self {
                child: Some(child),
                port,
            })
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        fn connection(&self) -> Connection {
            redis::Client::open(self.url())
                .unwrap()
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .unwrap()
        }

        fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn message(ts: u64, msg_id: Option<&str>, data: &[u8]) -> MessageRecord {
        MessageRecord {
            ts,
            msg_id: msg_id.map(str::to_owned),
            headers: None,
            data: data.to_vec(),
        }
    }

    fn channel(id: u64) -> ChannelRecord {
        ChannelRecord {
            id,
            epoch: "e".into(),
            created_ms: 5,
        }
    }

    fn dead(seq: u64, consumer: &str) -> DeadLetterRecord {
        DeadLetterRecord {
            seq,
            consumer: consumer.into(),
            reason: "term".into(),
            detail: Some("bad".into()),
            attempts: 2,
            dead_ms: 9,
            message: Some(message(seq, None, b"m")),
        }
    }

    fn item(channel: u64, record: &MessageRecord) -> AppendItem<'_> {
        AppendItem {
            channel,
            record,
            dedup_window_ms: 60_000,
        }
    }

    fn new_seqs(appended: &[Appended]) -> Vec<u64> {
        appended
            .iter()
            .filter_map(|a| match a {
                Appended::New { seq } => Some(*seq),
                Appended::Duplicate { .. } => None,
            })
            .collect()
    }

    type Summary = (String, ChannelRecord, u64, u64, u64, u64);

    fn summary(loaded: Vec<LoadedChannel>) -> Vec<Summary> {
        loaded
            .into_iter()
            .map(|c| {
                let range = (c.first_seq, c.last_seq, c.bytes, c.dead_letters);
                (c.name, c.record, range.0, range.1, range.2, range.3)
            })
            .collect()
    }

    /// What one scenario observed, to compare the two stores.
    #[derive(Debug, Default, PartialEq)]
    struct Observed {
        loaded: Vec<Vec<Summary>>,
        ranges: Vec<Vec<(u64, MessageRecord)>>,
        ones: Vec<Option<MessageRecord>>,
        trims: Vec<(u64, u64)>,
        consumers: Vec<(String, ConsumerRecord)>,
        missing_consumer: Option<ConsumerRecord>,
        dlq_pages: Vec<Vec<DeadLetterRecord>>,
        dlq_removed: Vec<bool>,
        dlq_first: Option<DeadLetterRecord>,
        max_id: u64,
    }

    /// The same calls against the sled `Store` or a `RedisStore` (the two
    /// have the same methods but no common trait yet).
    macro_rules! scenario {
        ($store:expr) => {{
            let store = $store;
            let mut seen = Observed::default();
            store.put_channel("c", &channel(3)).unwrap();
            store.put_channel("d", &channel(4)).unwrap();
            let mut total = 0;
            for seq in 1..=10u64 {
                let mut record = message(seq, None, &vec![b'x'; usize::try_from(seq).unwrap()]);
                if seq == 2 {
                    record.headers = Some([("k".to_owned(), "vv".to_owned())].into());
                }
                total += record.size();
                store.append(3, seq, &record).unwrap();
                let head = HeadRecord {
                    last_seq: seq,
                    appended_bytes: total,
                };
                store.put_head(3, &head).unwrap();
            }
            seen.loaded.push(summary(store.load_channels().unwrap()));
            for (channel, from, to, limit) in [
                (3, 2, 4, 100),
                (3, 1, u64::MAX, 3),
                (3, 5, 4, 10),
                (3, 8, 20, 100),
                (3, 1, 10, 0),
                (4, 1, 10, 10),
            ] {
                seen.ranges
                    .push(store.read_range(channel, from, to, limit).unwrap());
            }
            for (channel, seq) in [(3, 3), (3, 11), (4, 1)] {
                seen.ones.push(store.read_one(channel, seq).unwrap());
            }
            seen.trims
                .push(store.trim(3, 10, |seq, _| seq <= 4).unwrap());
            seen.trims
                .push(store.trim(3, 10, |_, r| r.data.len() < 7).unwrap());
            seen.loaded.push(summary(store.load_channels().unwrap()));
            seen.trims.push(store.trim(3, 8, |_, _| true).unwrap());
            seen.loaded.push(summary(store.load_channels().unwrap()));
            seen.ranges.push(store.read_range(3, 1, 10, 100).unwrap());
            seen.trims.push(store.trim(3, 10, |_, _| true).unwrap());
            seen.trims.push(store.trim(3, 10, |_, _| true).unwrap());
            seen.trims.push(store.trim(4, 0, |_, _| true).unwrap());
            let alice = ConsumerRecord {
                floor: 4,
                acked: vec![6, 9],
                attempts: vec![(5, 2)],
                scheduled: vec![(7, 1234)],
                requeued: vec![2],
            };
            store
                .save_consumer(3, "c/bob", &ConsumerRecord::default())
                .unwrap();
            store
                .save_consumer(3, "c/alice", &ConsumerRecord::default())
                .unwrap();
            store.save_consumer(3, "c/alice", &alice).unwrap();
            store.save_consumer(4, "c/carol", &alice).unwrap();
            seen.consumers = store.list_consumers(3).unwrap();
            seen.missing_consumer = store.load_consumer(3, "c/dave").unwrap();
            for (seq, consumer) in [(3, "c/a"), (1, "c/b"), (1, "c/a"), (9, "c/a"), (256, "c/a")] {
                store.dlq_put(5, &dead(seq, consumer)).unwrap();
            }
            store.dlq_put(3, &dead(2, "x")).unwrap();
            let all = 0..=u64::MAX;
            for (after, seqs, limit) in [
                (None, all.clone(), 2),
                (Some((1, "c/b")), all.clone(), 10),
                (Some((1, "c/a")), 0..=1, 10),
                (None, 2..=3, 10),
                (None, 9..=9, 10),
                (None, std::ops::RangeInclusive::new(4, 2), 10),
                (None, all.clone(), usize::MAX),
                (None, all.clone(), 0),
            ] {
                seen.dlq_pages
                    .push(store.dlq_list(5, after, seqs, limit).unwrap());
            }
            seen.dlq_removed
                .push(store.dlq_remove(5, 3, "c/a").unwrap());
            seen.dlq_removed
                .push(store.dlq_remove(5, 3, "c/a").unwrap());
            seen.dlq_removed
                .push(store.dlq_remove(5, 1, "c/a").unwrap());
            seen.dlq_first = store.dlq_first(5).unwrap();
            seen.dlq_pages
                .push(store.dlq_list(5, None, all, 10).unwrap());
            seen.loaded.push(summary(store.load_channels().unwrap()));
            seen.max_id = store.max_channel_id().unwrap();
            seen
        }};
    }

    #[test]
    fn log_consumers_and_dead_letters_behave_like_sled() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Store::open(dir.path(), 8 << 20).unwrap();
        let expected = scenario!(&sled);
        let server = RedisServer::start();
        let redis = RedisStore::open(&server.url(), "t-sled").unwrap();
        let got = scenario!(&redis);
        assert_eq!(got, expected);
        // Spot checks that the comparison compared something.
        assert_eq!(expected.trims[0], (5, 1 + (2 + 3) + 3 + 4), "headers count");
        assert_eq!(expected.trims[1], (7, 5 + 6));
        assert_eq!(expected.trims[3].0, 11);
        assert_eq!(expected.dlq_pages[0].len(), 2);
        assert_eq!(expected.dlq_first.as_ref().map(|d| d.seq), Some(1));
    }

    #[test]
    fn the_store_is_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<RedisStore>();
    }

    #[test]
    fn put_head_never_lowers_the_last_seq() {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), "t-head").unwrap();
        store.put_channel("c", &channel(1)).unwrap();
        let head = |last_seq, appended_bytes| HeadRecord {
            last_seq,
            appended_bytes,
        };
        store.put_head(1, &head(7, 70)).unwrap();
        store.put_head(1, &head(5, 50)).unwrap();
        let loaded = store.load_channel("c").unwrap().unwrap();
        assert_eq!(
            (loaded.first_seq, loaded.last_seq, loaded.bytes),
            (8, 7, 70)
        );
        store.put_head(1, &head(9, 90)).unwrap();
        let loaded = store.load_channel("c").unwrap().unwrap();
        assert_eq!((loaded.last_seq, loaded.bytes), (9, 90));
        assert!(store.load_channel("nope").unwrap().is_none());
    }

    #[test]
    fn get_or_create_is_idempotent_and_ids_are_distinct() {
        let server = RedisServer::start();
        let url = server.url();
        let store = Arc::new(RedisStore::open(&url, "t-create").unwrap());
        let (a, created) = store.get_or_create_channel("a", "e1", 11).unwrap();
        assert!(created);
        assert_eq!(
            a,
            ChannelRecord {
                id: 1,
                epoch: "e1".into(),
                created_ms: 11
            }
        );
        let (again, created) = store.get_or_create_channel("a", "e2", 12).unwrap();
        assert!(!created);
        assert_eq!(again, a, "the existing record, not the new epoch");
        // Racing creators on two connections agree on one record.
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let other = RedisStore::open(&url, "t-create").unwrap();
                std::thread::spawn(move || other.get_or_create_channel("b", "eb", 13).unwrap())
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
        assert!(results.iter().all(|(record, _)| record == &results[0].0));
        let b = results[0].0.clone();
        assert_ne!(b.id, a.id);
        // Ids chosen by a single writer move the counter past them.
        store.put_channel("c", &channel(10)).unwrap();
        let (d, _) = store.get_or_create_channel("d", "ed", 14).unwrap();
        assert_eq!(d.id, 11);
        assert_eq!(store.max_channel_id().unwrap(), 11);
        let loaded = store.load_channel("a").unwrap().unwrap();
        assert_eq!(loaded.record, a);
        assert_eq!((loaded.first_seq, loaded.last_seq, loaded.bytes), (1, 0, 0));
        let names: Vec<_> = store
            .load_channels()
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        // A prefix is a namespace.
        let other = RedisStore::open(&url, "t-create-2").unwrap();
        assert!(other.load_channels().unwrap().is_empty());
        assert_eq!(other.get_or_create_channel("a", "x", 0).unwrap().0.id, 1);
    }

    #[test]
    fn append_batch_is_gapless_across_nodes() {
        const BATCHES: u64 = 40;
        const PER_BATCH: u64 = 6;
        let server = RedisServer::start();
        let url = server.url();
        let first = RedisStore::open(&url, "t-gapless").unwrap();
        let (shared, _) = first.get_or_create_channel("shared", "e", 0).unwrap();
        let (other, _) = first.get_or_create_channel("other", "e", 0).unwrap();
        let nodes: Vec<_> = [first, RedisStore::open(&url, "t-gapless").unwrap()]
            .into_iter()
            .enumerate()
            .map(|(node, store)| {
                std::thread::spawn(move || {
                    let mut seqs = Vec::new();
                    for batch in 0..BATCHES {
                        let records: Vec<_> = (0..PER_BATCH)
                            .map(|i| message(0, None, format!("{node}/{batch}/{i}").as_bytes()))
                            .collect();
                        let mut items: Vec<_> =
                            records.iter().map(|r| item(shared.id, r)).collect();
                        items.insert(1, item(other.id, &records[0]));
                        let appended = store.append_batch(&items).unwrap();
                        assert_eq!(appended.len(), items.len());
                        seqs.extend(
                            new_seqs(&appended)
                                .into_iter()
                                .enumerate()
                                .filter(|(i, _)| *i != 1)
                                .map(|(_, seq)| seq),
                        );
                    }
                    (store, seqs)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut stores = Vec::new();
        for node in nodes {
            let (store, seqs) = node.join().unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "a node's seqs rise");
            all.extend(seqs);
            stores.push(store);
        }
        let total = 2 * BATCHES * PER_BATCH;
        all.sort_unstable();
        assert_eq!(all, (1..=total).collect::<Vec<_>>(), "no repeats, no holes");
        let log = stores[0]
            .read_range(shared.id, 1, u64::MAX, usize::MAX)
            .unwrap();
        assert_eq!(log.len(), usize::try_from(total).unwrap());
        let mut bodies: Vec<_> = log.iter().map(|(_, r)| r.data.clone()).collect();
        bodies.sort();
        bodies.dedup();
        assert_eq!(bodies.len(), log.len(), "every message stored once");
        let bytes: u64 = log.iter().map(|(_, r)| r.size()).sum();
        let loaded = stores[1].load_channel("shared").unwrap().unwrap();
        assert_eq!(
            (loaded.first_seq, loaded.last_seq, loaded.bytes),
            (1, total, bytes)
        );
        let loaded = stores[1].load_channel("other").unwrap().unwrap();
        assert_eq!(loaded.last_seq, 2 * BATCHES);
    }

    #[test]
    fn dedup_returns_the_first_seq() {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), "t-dedup").unwrap();
        let (ch, _) = store.get_or_create_channel("c", "e", 0).unwrap();
        let (a, b, plain) = (
            message(1, Some("a"), b"1"),
            message(2, Some("b"), b"2"),
            message(3, None, b"3"),
        );
        let got = store
            .append_batch(&[item(ch.id, &a), item(ch.id, &plain), item(ch.id, &a)])
            .unwrap();
        assert_eq!(
            got,
            [
                Appended::New { seq: 1 },
                Appended::New { seq: 2 },
                Appended::Duplicate { seq: 1 }
            ]
        );
        let got = store
            .append_batch(&[item(ch.id, &b), item(ch.id, &a), item(ch.id, &plain)])
            .unwrap();
        assert_eq!(
            got,
            [
                Appended::New { seq: 3 },
                Appended::Duplicate { seq: 1 },
                Appended::New { seq: 4 }
            ]
        );
        // A zero window does not deduplicate.
        let no_window = AppendItem {
            dedup_window_ms: 0,
            ..item(ch.id, &a)
        };
        assert_eq!(
            store.append_batch(&[no_window]).unwrap(),
            [Appended::New { seq: 5 }]
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg("t-dedup:dedup:1:a")
            .query(&mut server.connection())
            .unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "the dedup key expires: {ttl}");
        let log = store.read_range(ch.id, 1, 10, 10).unwrap();
        assert_eq!(
            log.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(log[0].1, a);
        assert!(store.recent_msg_ids(ch.id, 0, 10).unwrap().is_empty());
    }

    #[test]
    fn delete_channel_removes_everything_and_counts_messages() {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), "t-delete").unwrap();
        let (ch, _) = store.get_or_create_channel("c", "e", 0).unwrap();
        let (keep, _) = store.get_or_create_channel("keep", "e", 0).unwrap();
        let records: Vec<_> = (0..5)
            .map(|i| message(i, Some(&i.to_string()), b"d"))
            .collect();
        let items: Vec<_> = records.iter().map(|r| item(ch.id, r)).collect();
        store.append_batch(&items).unwrap();
        store.append_batch(&[item(keep.id, &records[0])]).unwrap();
        store.trim(ch.id, 1, |_, _| true).unwrap();
        store
            .save_consumer(ch.id, "c/a", &ConsumerRecord::default())
            .unwrap();
        store.dlq_put(ch.id, &dead(2, "c/a")).unwrap();
        assert_eq!(store.delete_channel("keep", ch.id).unwrap(), 4);
        assert!(
            store.load_channel("keep").unwrap().is_some(),
            "another id's name stays"
        );
        assert_eq!(store.delete_channel("c", ch.id).unwrap(), 0, "already gone");
        assert!(store.load_channel("c").unwrap().is_none());
        assert!(store.read_range(ch.id, 1, 10, 10).unwrap().is_empty());
        assert!(store.list_consumers(ch.id).unwrap().is_empty());
        assert!(store.dlq_first(ch.id).unwrap().is_none());
        let mut con = server.connection();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("t-delete:*:{}*", ch.id))
            .query(&mut con)
            .unwrap();
        // Dedup keys are left to expire (ids are never reused).
        let left: Vec<_> = keys
            .iter()
            .filter(|k| !k.starts_with("t-delete:dedup:"))
            .collect();
        assert!(left.is_empty(), "left: {left:?}");
        assert_eq!(keys.len(), 5, "the dedup keys: {keys:?}");
        let (again, created) = store.get_or_create_channel("c", "e2", 0).unwrap();
        assert!(created);
        assert_ne!(again.id, ch.id, "ids are not reused");
        assert_eq!(store.load_channel("keep").unwrap().unwrap().last_seq, 1);
    }

    #[test]
    fn notifications_and_events_arrive() {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), "t-notify").unwrap();
        let (x, _) = store.get_or_create_channel("x", "e", 0).unwrap();
        let (y, _) = store.get_or_create_channel("y", "e", 0).unwrap();
        let mut con = server.connection();
        let mut pubsub = con.as_pubsub();
        pubsub.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        pubsub.subscribe(store.notify_channel()).unwrap();
        pubsub.subscribe(store.events_channel()).unwrap();
        let mut next = || {
            let msg = pubsub.get_message().unwrap();
            (
                msg.get_channel_name().to_owned(),
                msg.get_payload::<String>().unwrap(),
            )
        };
        let records: Vec<_> = (0..4)
            .map(|i| message(i, Some(&i.to_string()), b"n"))
            .collect();
        let got = store
            .append_batch(&[
                item(y.id, &records[0]),
                item(x.id, &records[1]),
                item(y.id, &records[2]),
                item(x.id, &records[3]),
                item(y.id, &records[3]),
            ])
            .unwrap();
        // Interleaved channels: each answer in its message's place, each
        // channel's seqs in the order its messages came.
        let seqs: Vec<_> = got
            .iter()
            .map(|a| match a {
                Appended::New { seq } => *seq,
                Appended::Duplicate { .. } => 0,
            })
            .collect();
        assert_eq!(seqs, [1, 1, 2, 2, 3]);
        let notify = store.notify_channel();
        assert_eq!(next(), (notify.clone(), format!("{} 2", x.id)));
        assert_eq!(next(), (notify.clone(), format!("{} 3", y.id)));
        // Only duplicates: no notice; the next one is for the next append.
        store.append_batch(&[item(x.id, &records[1])]).unwrap();
        store.publish_event("deleted y").unwrap();
        assert_eq!(next(), (store.events_channel(), "deleted y".to_owned()));
        let fresh = message(9, None, b"f");
        store.append_batch(&[item(x.id, &fresh)]).unwrap();
        assert_eq!(next(), (notify, format!("{} 3", x.id)));
    }

    #[test]
    fn unavailable_while_redis_is_down_then_reconnects() {
        let mut server = RedisServer::start();
        let port = server.port;
        let store = RedisStore::open(&server.url(), "t-down").unwrap();
        let (ch, _) = store.get_or_create_channel("c", "e", 0).unwrap();
        let record = message(1, None, b"x");
        store.append_batch(&[item(ch.id, &record)]).unwrap();
        server.stop();
        assert!(matches!(store.ping(), Err(StoreError::Unavailable(_))));
        assert!(matches!(
            store.append_batch(&[item(ch.id, &record)]),
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.read_range(ch.id, 1, 10, 10),
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(store.size_on_disk(), 0);
        // Without persistence the new server is empty, and has no scripts.
        let _server = RedisServer::start_on(port);
        store.ping().unwrap();
        let (ch, created) = store.get_or_create_channel("c", "e", 0).unwrap();
        assert!(created);
        assert_eq!(
            store.append_batch(&[item(ch.id, &record)]).unwrap(),
            [Appended::New { seq: 1 }]
        );
        assert!(store.size_on_disk() > 0);
    }

    #[test]
    fn scripts_come_back_after_a_script_flush() {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), "t-noscript").unwrap();
        let (ch, _) = store.get_or_create_channel("c", "e", 0).unwrap();
        let mut con = server.connection();
        redis::cmd("SCRIPT").arg("FLUSH").exec(&mut con).unwrap();
        let record = message(1, Some("m"), b"x");
        assert_eq!(
            store
                .append_batch(&[item(ch.id, &record), item(ch.id, &record)])
                .unwrap(),
            [Appended::New { seq: 1 }, Appended::Duplicate { seq: 1 }]
        );
        let loaded: Vec<u8> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(Script::new(APPEND_LUA).get_hash())
            .query(&mut con)
            .unwrap();
        assert_eq!(loaded, [1], "the pipeline loaded its scripts again");
        redis::cmd("SCRIPT").arg("FLUSH").exec(&mut con).unwrap();
        assert_eq!(store.load_channel("c").unwrap().unwrap().last_seq, 1);
        redis::cmd("SCRIPT").arg("FLUSH").exec(&mut con).unwrap();
        store
            .put_head(
                ch.id,
                &HeadRecord {
                    last_seq: 4,
                    appended_bytes: 1,
                },
            )
            .unwrap();
        assert_eq!(store.load_channels().unwrap()[0].last_seq, 4);
    }

    #[test]
    fn redis_errors_are_not_unavailable_and_retry_jobs_are_refused() {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), "t-errors").unwrap();
        let mut con = server.connection();
        redis::cmd("SET")
            .arg("t-errors:log:7")
            .arg("not a stream")
            .exec(&mut con)
            .unwrap();
        assert!(matches!(
            store.read_range(7, 1, 2, 10),
            Err(StoreError::Redis(_))
        ));
        store.ping().unwrap();
        assert!(matches!(
            store.retry_put(1, 1, b"job"),
            Err(StoreError::Redis(_))
        ));
        assert!(store.retry_take_due(u64::MAX, 10).unwrap().is_empty());
        assert_eq!(store.retry_next_due().unwrap(), None);
        assert_eq!(store.retry_stats().unwrap(), (0, 0));
        assert!(!store.begin_run(true).unwrap());
        store.mark_clean().unwrap();
        store.flush_durable().unwrap();
        assert!(matches!(
            RedisStore::open("not a url", "x"),
            Err(StoreError::Redis(_))
        ));
    }
}
