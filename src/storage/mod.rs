//! Durable state on sled 0.34.7: channel logs, channel heads, consumers.
//!
//! Nothing outside this module touches sled. Layout (all integers big-endian):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `channels` | channel name | [`ChannelRecord`] |
//! | `log` | channel id ‖ seq | [`MessageRecord`] |
//! | `heads` | channel id ‖ 0 | [`HeadRecord`] (written by the channel writer) |
//! | `heads` | channel id ‖ 1 | [`TailRecord`] (written by the retention sweep) |
//! | `consumers` | channel id ‖ consumer key | [`ConsumerRecord`] |
//! | `dlq` | channel id ‖ seq ‖ consumer key | [`DeadLetterRecord`] |
//! | `retries` | due ms ‖ job id | a retry job (opaque bytes, see `delivery::retry`) |
//! | `meta` | `clean` | 1 after a graceful shutdown; while running 0, or 2 under `fsync = "interval"` |
//!
//! Invariants: seq 0 is never a message; a channel's log holds a contiguous
//! range `first_seq..=last_seq` (retention only removes a prefix); the head
//! record is written after the messages it counts, so after a crash the last
//! seq is `max(head.last_seq, last key in the log)`.
//!
//! Durability: sled 0.34's own `flush` syncs with `sync_file_range`, which
//! does not reach the disk's cache, so [`Store::flush_durable`] adds an
//! fdatasync of sled's data file. Only one thread may flush (concurrent
//! `flush_async` deadlocks in 0.34.7), which the channel writer guarantees.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::protocol::Headers;

pub mod redis;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record in {tree}: {message}")]
    Corrupt { tree: &'static str, message: String },
    /// Redis refused a command (a bug or a misconfigured server).
    #[error("redis: {0}")]
    Redis(String),
    /// Redis cannot be reached now; the caller may retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// A channel as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    pub id: u64,
    pub epoch: String,
    pub created_ms: u64,
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl MessageRecord {
    /// Bytes this message counts against `max_bytes`.
    pub fn size(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        u64::try_from(self.data.len() + headers).unwrap_or(u64::MAX)
    }
}

/// What the writer knows of a channel's head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadRecord {
    pub last_seq: u64,
    /// Bytes of every message ever appended.
    pub appended_bytes: u64,
}

/// What the retention sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailRecord {
    /// Bytes of every message removed by retention.
    pub trimmed_bytes: u64,
}

/// A durable consumer's acknowledgement state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerRecord {
    /// Every seq ≤ floor is acked.
    pub floor: u64,
    /// Acked seqs above the floor.
    pub acked: Vec<u64>,
    /// Delivery counts of delivered, unacked seqs.
    pub attempts: Vec<(u64, u32)>,
    /// Seqs waiting for a retry, with their due time (ms since the epoch).
    #[serde(default)]
    pub scheduled: Vec<(u64, u64)>,
    /// Seqs requeued from the dead-letter queue, delivered again until acked.
    #[serde(default)]
    pub requeued: Vec<u64>,
}

/// A message a consumer gave up on, with a copy of the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    pub seq: u64,
    /// The consumer's key (`c/…`, `g/…`, `u/…`).
    pub consumer: String,
    /// `max_deliver`, `term` or `retry_queue_full`.
    pub reason: String,
    /// The client's words for a `term`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub attempts: u32,
    /// When it was dead-lettered, ms since the epoch.
    pub dead_ms: u64,
    /// The message as published (`None` when retention had dropped it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<MessageRecord>,
}

/// A channel loaded at start-up.
#[derive(Debug, Clone)]
pub struct LoadedChannel {
    pub name: String,
    pub record: ChannelRecord,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    /// Dead letters stored.
    pub dead_letters: u64,
}

/// The sled database and its trees.
pub struct SledStore {
    db: sled::Db,
    channels: sled::Tree,
    log: sled::Tree,
    heads: sled::Tree,
    consumers: sled::Tree,
    dlq: sled::Tree,
    retries: sled::Tree,
    /// `clean`: whether the last run shut down gracefully.
    meta: sled::Tree,
    /// sled's data file, kept open to fdatasync it after each flush.
    data_file: File,
}

/// `meta/clean`: the last run stopped gracefully.
const CLEAN: u8 = 1;
/// `meta/clean`: a run is going (or crashed) and acked only after flushing.
const RUNNING: u8 = 0;
/// `meta/clean`: a run is going (or crashed) and acked before flushing.
const RUNNING_LOSSY: u8 = 2;

const HEAD: u64 = 0;
const TAIL: u64 = 1;

fn key(channel: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&channel.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    key.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

fn consumer_key(channel: u64, name: &str) -> Vec<u8> {
    let mut k = channel.to_be_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn dlq_key(channel: u64, seq: u64, consumer: &str) -> Vec<u8> {
    let mut k = key(channel, seq).to_vec();
    k.extend_from_slice(consumer.as_bytes());
    k
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our own records always serialize; a failure here is a bug, not input.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        message: e.to_string(),
    })
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()?;
        let data_file = File::open(dir.join("db"))?;
        Ok(Self {
            channels: db.open_tree("channels")?,
            log: db.open_tree("log")?,
            heads: db.open_tree("heads")?,
            consumers: db.open_tree("consumers")?,
            dlq: db.open_tree("dlq")?,
            retries: db.open_tree("retries")?,
            meta: db.open_tree("meta")?,
            db,
            data_file,
        })
    }

    /// Records that a run has begun (durably) and tells whether the previous
    /// run ended uncleanly while acknowledging before its flush
    /// (`fsync = "interval"`), i.e. whether pubacked messages may be lost.
    pub fn begin_run(&self, acks_before_flush: bool) -> Result<bool, StoreError> {
        let lossy_crash = self
            .meta
            .get(b"clean")?
            .is_some_and(|v| v.as_ref() == [RUNNING_LOSSY]);
        let marker = if acks_before_flush {
            RUNNING_LOSSY
        } else {
            RUNNING
        };
        self.meta.insert(b"clean", &[marker])?;
        self.flush_durable()?;
        Ok(lossy_crash)
    }

    /// Marks the run as ended gracefully (durable with the final flush).
    pub fn mark_clean(&self) -> Result<(), StoreError> {
        self.meta.insert(b"clean", &[CLEAN])?;
        Ok(())
    }

    /// Makes every write so far durable: sled flush, then fdatasync.
    pub fn flush_durable(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.data_file.sync_data()?;
        Ok(())
    }

    /// Every stored channel with its seq range and size.
    pub fn load_channels(&self) -> Result<Vec<LoadedChannel>, StoreError> {
        let mut out = Vec::new();
        for entry in self.channels.iter() {
            let (name, value) = entry?;
            let record: ChannelRecord = decode("channels", &value)?;
            let head: HeadRecord = match self.heads.get(key(record.id, HEAD))? {
                Some(v) => decode("heads", &v)?,
                None => HeadRecord::default(),
            };
            let tail: TailRecord = match self.heads.get(key(record.id, TAIL))? {
                Some(v) => decode("heads", &v)?,
                None => TailRecord::default(),
            };
            let range = self.log.range(key(record.id, 1)..=key(record.id, u64::MAX));
            let mut range = range;
            let first_key = range.next().transpose()?.and_then(|(k, _)| seq_of(&k));
            let last_key = range
                .next_back()
                .transpose()?
                .and_then(|(k, _)| seq_of(&k))
                .or(first_key);
            let last_seq = head.last_seq.max(last_key.unwrap_or(0));
            let dead_letters =
                u64::try_from(self.dlq.scan_prefix(record.id.to_be_bytes()).count()).unwrap_or(0);
            out.push(LoadedChannel {
                dead_letters,
                name: String::from_utf8_lossy(&name).into_owned(),
                first_seq: first_key.unwrap_or(last_seq + 1),
                last_seq,
                bytes: head.appended_bytes.saturating_sub(tail.trimmed_bytes),
                record,
            });
        }
        Ok(out)
    }

    /// The highest channel id in use.
    pub fn max_channel_id(&self) -> Result<u64, StoreError> {
        let mut max = 0;
        for entry in self.channels.iter() {
            let (_, value) = entry?;
            max = max.max(decode::<ChannelRecord>("channels", &value)?.id);
        }
        Ok(max)
    }

    /// Records a new channel (durable with the next flush).
    pub fn put_channel(&self, name: &str, record: &ChannelRecord) -> Result<(), StoreError> {
        self.channels.insert(name.as_bytes(), encode(record))?;
        Ok(())
    }

    /// Appends one message (durable with the next flush). The writer moves
    /// the head with [`Store::put_head`] once per batch, after its messages.
    pub fn append(&self, channel: u64, seq: u64, record: &MessageRecord) -> Result<(), StoreError> {
        self.log.insert(key(channel, seq), encode(record))?;
        Ok(())
    }

    /// Records a channel's head (written after the messages it counts).
    pub fn put_head(&self, channel: u64, head: &HeadRecord) -> Result<(), StoreError> {
        self.heads.insert(key(channel, HEAD), encode(head))?;
        Ok(())
    }

    /// Messages `from..=to` that are still stored, at most `limit`.
    pub fn read_range(
        &self,
        channel: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, MessageRecord)>, StoreError> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        for entry in self
            .log
            .range(key(channel, from)..=key(channel, to))
            .take(limit)
        {
            let (k, v) = entry?;
            if let Some(seq) = seq_of(&k) {
                out.push((seq, decode("log", &v)?));
            }
        }
        Ok(out)
    }

    /// The newest messages with a `msg_id`, published at or after `since_ms`
    /// (newest first), at most `limit`: the dedup table after a restart.
    pub fn recent_msg_ids(
        &self,
        channel: u64,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let mut out = Vec::new();
        for entry in self
            .log
            .range(key(channel, 1)..=key(channel, u64::MAX))
            .rev()
        {
            let (k, v) = entry?;
            let record: MessageRecord = decode("log", &v)?;
            if record.ts < since_ms || out.len() >= limit {
                break;
            }
            if let (Some(id), Some(seq)) = (record.msg_id, seq_of(&k)) {
                out.push((id, seq, record.ts));
            }
        }
        Ok(out)
    }

    /// Removes the oldest messages of a channel while `keep(seq, record)` says
    /// no, stopping at the first one to keep or at `last_seq`. Returns the new
    /// first seq and the bytes removed.
    pub fn trim(
        &self,
        channel: u64,
        last_seq: u64,
        mut drop: impl FnMut(u64, &MessageRecord) -> bool,
    ) -> Result<(u64, u64), StoreError> {
        let mut removed = 0u64;
        let mut first = None;
        for entry in self.log.range(key(channel, 1)..=key(channel, last_seq)) {
            let (k, v) = entry?;
            let Some(seq) = seq_of(&k) else { continue };
            let record: MessageRecord = decode("log", &v)?;
            if !drop(seq, &record) {
                first = Some(seq);
                break;
            }
            self.log.remove(k)?;
            removed += record.size();
        }
        if removed > 0 {
            let mut tail: TailRecord = match self.heads.get(key(channel, TAIL))? {
                Some(v) => decode("heads", &v)?,
                None => TailRecord::default(),
            };
            tail.trimmed_bytes += removed;
            self.heads.insert(key(channel, TAIL), encode(&tail))?;
        }
        Ok((first.unwrap_or(last_seq + 1), removed))
    }

    /// A durable consumer's state, if it exists.
    pub fn load_consumer(
        &self,
        channel: u64,
        name: &str,
    ) -> Result<Option<ConsumerRecord>, StoreError> {
        self.consumers
            .get(consumer_key(channel, name))?
            .map(|v| decode("consumers", &v))
            .transpose()
    }

    /// Saves a durable consumer's state (durable with the next flush).
    pub fn save_consumer(
        &self,
        channel: u64,
        name: &str,
        record: &ConsumerRecord,
    ) -> Result<(), StoreError> {
        self.consumers
            .insert(consumer_key(channel, name), encode(record))?;
        Ok(())
    }

    /// Every stored consumer of a channel, by name.
    pub fn list_consumers(
        &self,
        channel: u64,
    ) -> Result<Vec<(String, ConsumerRecord)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.consumers.scan_prefix(channel.to_be_bytes()) {
            let (k, v) = entry?;
            let name = String::from_utf8_lossy(&k[8..]).into_owned();
            out.push((name, decode("consumers", &v)?));
        }
        Ok(out)
    }

    /// Removes a channel with its log, head, consumers and dead letters
    /// (durable with the next flush). The record under `name` goes only if
    /// it is still this channel's (`id`). Returns how many messages it removed.
    pub fn delete_channel(&self, name: &str, id: u64) -> Result<u64, StoreError> {
        if let Some(v) = self.channels.get(name)? {
            let record: ChannelRecord = decode("channels", &v)?;
            if record.id == id {
                self.channels.remove(name)?;
            }
        }
        let prefix = id.to_be_bytes();
        let mut removed = 0;
        for tree in [&self.log, &self.heads, &self.consumers, &self.dlq] {
            // In batches: a long log must not build one huge batch in memory.
            loop {
                let mut batch = sled::Batch::default();
                let mut n = 0;
                for entry in tree.scan_prefix(prefix).keys().take(10_000) {
                    batch.remove(entry?);
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                tree.apply_batch(batch)?;
                if std::ptr::eq(tree, &self.log) {
                    removed += n;
                }
            }
        }
        Ok(removed)
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// One message, if it is still stored.
    pub fn read_one(&self, channel: u64, seq: u64) -> Result<Option<MessageRecord>, StoreError> {
        self.log
            .get(key(channel, seq))?
            .map(|v| decode("log", &v))
            .transpose()
    }

    /// Stores a dead letter (durable with the next flush).
    pub fn dlq_put(&self, channel: u64, record: &DeadLetterRecord) -> Result<(), StoreError> {
        self.dlq.insert(
            dlq_key(channel, record.seq, &record.consumer),
            encode(record),
        )?;
        Ok(())
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
        let start = match after {
            Some((seq, consumer)) => {
                let mut k = dlq_key(channel, seq, consumer);
                k.push(0);
                k
            }
            None => dlq_key(channel, *seqs.start(), ""),
        };
        let end = dlq_key(channel, seqs.end().saturating_add(1), "");
        let mut out = Vec::new();
        for entry in self.dlq.range(start..end).take(limit) {
            let (_, v) = entry?;
            out.push(decode("dlq", &v)?);
        }
        Ok(out)
    }

    /// Removes one dead letter; true when it was there.
    pub fn dlq_remove(&self, channel: u64, seq: u64, consumer: &str) -> Result<bool, StoreError> {
        Ok(self.dlq.remove(dlq_key(channel, seq, consumer))?.is_some())
    }

    /// The oldest dead letter of a channel (lowest seq).
    pub fn dlq_first(&self, channel: u64) -> Result<Option<DeadLetterRecord>, StoreError> {
        self.dlq
            .scan_prefix(channel.to_be_bytes())
            .next()
            .transpose()?
            .map(|(_, v)| decode("dlq", &v))
            .transpose()
    }

    /// Stores a retry job due at `due_ms` (durable with the next flush).
    pub fn retry_put(&self, due_ms: u64, id: u64, job: &[u8]) -> Result<(), StoreError> {
        self.retries.insert(key(due_ms, id), job)?;
        Ok(())
    }

    /// Removes and returns up to `limit` jobs due at or before `now_ms`.
    pub fn retry_take_due(&self, now_ms: u64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for entry in self
            .retries
            .range(..key(now_ms.saturating_add(1), 0))
            .take(limit)
        {
            let (k, v) = entry?;
            self.retries.remove(k)?;
            out.push(v.to_vec());
        }
        Ok(out)
    }

    /// When the next retry job is due, if any.
    pub fn retry_next_due(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.retries.first()?.and_then(|(k, _)| {
            k.get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
        }))
    }

    /// Jobs waiting, and the highest job id in use.
    pub fn retry_stats(&self) -> Result<(u64, u64), StoreError> {
        let mut count = 0u64;
        let mut max_id = 0u64;
        for entry in self.retries.iter() {
            let (k, _) = entry?;
            count += 1;
            max_id = max_id.max(seq_of(&k).unwrap_or(0));
        }
        Ok((count, max_id))
    }
}

/// The store the broker runs on: embedded sled, or Redis shared by a
/// cluster. Every method means the same on both (see each backend).
pub enum Store {
    Sled(SledStore),
    Redis(Box<redis::RedisStore>),
}

impl Store {
    /// Opens (or creates) the embedded sled store in `dir`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        SledStore::open(dir, cache_bytes).map(Self::Sled)
    }

    /// Connects to the shared store on Redis at `url`, keys under `prefix`.
    pub fn redis(url: &str, prefix: &str) -> Result<Self, StoreError> {
        redis::RedisStore::open(url, prefix).map(|store| Self::Redis(Box::new(store)))
    }

    /// The Redis store, when the broker runs as part of a cluster.
    pub fn shared(&self) -> Option<&redis::RedisStore> {
        match self {
            Self::Sled(_) => None,
            Self::Redis(store) => Some(store),
        }
    }

    /// Records that a run has begun (durably) and tells whether the previous
    /// run ended uncleanly while acknowledging before its flush
    /// (`fsync = "interval"`), i.e. whether pubacked messages may be lost.
    pub fn begin_run(&self, acks_before_flush: bool) -> Result<bool, StoreError> {
        match self {
            Self::Sled(store) => store.begin_run(acks_before_flush),
            Self::Redis(store) => store.begin_run(acks_before_flush),
        }
    }

    /// Marks the run as ended gracefully (durable with the final flush).
    pub fn mark_clean(&self) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.mark_clean(),
            Self::Redis(store) => store.mark_clean(),
        }
    }

    /// Makes every write so far durable: sled flush, then fdatasync.
    pub fn flush_durable(&self) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.flush_durable(),
            Self::Redis(store) => store.flush_durable(),
        }
    }

    /// Every stored channel with its seq range and size.
    pub fn load_channels(&self) -> Result<Vec<LoadedChannel>, StoreError> {
        match self {
            Self::Sled(store) => store.load_channels(),
            Self::Redis(store) => store.load_channels(),
        }
    }

    /// The highest channel id in use.
    pub fn max_channel_id(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sled(store) => store.max_channel_id(),
            Self::Redis(store) => store.max_channel_id(),
        }
    }

    /// Records a new channel (durable with the next flush).
    pub fn put_channel(&self, name: &str, record: &ChannelRecord) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.put_channel(name, record),
            Self::Redis(store) => store.put_channel(name, record),
        }
    }

    /// Appends one message (durable with the next flush). The writer moves
    /// the head with [`Store::put_head`] once per batch, after its messages.
    pub fn append(&self, channel: u64, seq: u64, record: &MessageRecord) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.append(channel, seq, record),
            Self::Redis(store) => store.append(channel, seq, record),
        }
    }

    /// Records a channel's head (written after the messages it counts).
    pub fn put_head(&self, channel: u64, head: &HeadRecord) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.put_head(channel, head),
            Self::Redis(store) => store.put_head(channel, head),
        }
    }

    /// Messages `from..=to` that are still stored, at most `limit`.
    pub fn read_range(
        &self,
        channel: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, MessageRecord)>, StoreError> {
        match self {
            Self::Sled(store) => store.read_range(channel, from, to, limit),
            Self::Redis(store) => store.read_range(channel, from, to, limit),
        }
    }

    /// The newest messages with a `msg_id`, published at or after `since_ms`
    /// (newest first), at most `limit`: the dedup table after a restart.
    pub fn recent_msg_ids(
        &self,
        channel: u64,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        match self {
            Self::Sled(store) => store.recent_msg_ids(channel, since_ms, limit),
            Self::Redis(store) => store.recent_msg_ids(channel, since_ms, limit),
        }
    }

    /// Removes the oldest messages of a channel while `keep(seq, record)` says
    /// no, stopping at the first one to keep or at `last_seq`. Returns the new
    /// first seq and the bytes removed.
    pub fn trim(
        &self,
        channel: u64,
        last_seq: u64,
        drop: impl FnMut(u64, &MessageRecord) -> bool,
    ) -> Result<(u64, u64), StoreError> {
        match self {
            Self::Sled(store) => store.trim(channel, last_seq, drop),
            Self::Redis(store) => store.trim(channel, last_seq, drop),
        }
    }

    /// A durable consumer's state, if it exists.
    pub fn load_consumer(
        &self,
        channel: u64,
        name: &str,
    ) -> Result<Option<ConsumerRecord>, StoreError> {
        match self {
            Self::Sled(store) => store.load_consumer(channel, name),
            Self::Redis(store) => store.load_consumer(channel, name),
        }
    }

    /// Saves a durable consumer's state (durable with the next flush).
    pub fn save_consumer(
        &self,
        channel: u64,
        name: &str,
        record: &ConsumerRecord,
    ) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.save_consumer(channel, name, record),
            Self::Redis(store) => store.save_consumer(channel, name, record),
        }
    }

    /// Every stored consumer of a channel, by name.
    pub fn list_consumers(
        &self,
        channel: u64,
    ) -> Result<Vec<(String, ConsumerRecord)>, StoreError> {
        match self {
            Self::Sled(store) => store.list_consumers(channel),
            Self::Redis(store) => store.list_consumers(channel),
        }
    }

    /// Removes a channel with its log, head, consumers and dead letters
    /// (durable with the next flush). The record under `name` goes only if
    /// it is still this channel's (`id`). Returns how many messages it removed.
    pub fn delete_channel(&self, name: &str, id: u64) -> Result<u64, StoreError> {
        match self {
            Self::Sled(store) => store.delete_channel(name, id),
            Self::Redis(store) => store.delete_channel(name, id),
        }
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        match self {
            Self::Sled(store) => store.size_on_disk(),
            Self::Redis(store) => store.size_on_disk(),
        }
    }

    /// One message, if it is still stored.
    pub fn read_one(&self, channel: u64, seq: u64) -> Result<Option<MessageRecord>, StoreError> {
        match self {
            Self::Sled(store) => store.read_one(channel, seq),
            Self::Redis(store) => store.read_one(channel, seq),
        }
    }

    /// Stores a dead letter (durable with the next flush).
    pub fn dlq_put(&self, channel: u64, record: &DeadLetterRecord) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.dlq_put(channel, record),
            Self::Redis(store) => store.dlq_put(channel, record),
        }
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
        match self {
            Self::Sled(store) => store.dlq_list(channel, after, seqs, limit),
            Self::Redis(store) => store.dlq_list(channel, after, seqs, limit),
        }
    }

    /// Removes one dead letter; true when it was there.
    pub fn dlq_remove(&self, channel: u64, seq: u64, consumer: &str) -> Result<bool, StoreError> {
        match self {
            Self::Sled(store) => store.dlq_remove(channel, seq, consumer),
            Self::Redis(store) => store.dlq_remove(channel, seq, consumer),
        }
    }

    /// The oldest dead letter of a channel (lowest seq).
    pub fn dlq_first(&self, channel: u64) -> Result<Option<DeadLetterRecord>, StoreError> {
        match self {
            Self::Sled(store) => store.dlq_first(channel),
            Self::Redis(store) => store.dlq_first(channel),
        }
    }

    /// Stores a retry job due at `due_ms` (durable with the next flush).
    pub fn retry_put(&self, due_ms: u64, id: u64, job: &[u8]) -> Result<(), StoreError> {
        match self {
            Self::Sled(store) => store.retry_put(due_ms, id, job),
            Self::Redis(store) => store.retry_put(due_ms, id, job),
        }
    }

    /// Removes and returns up to `limit` jobs due at or before `now_ms`.
    pub fn retry_take_due(&self, now_ms: u64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        match self {
            Self::Sled(store) => store.retry_take_due(now_ms, limit),
            Self::Redis(store) => store.retry_take_due(now_ms, limit),
        }
    }

    /// When the next retry job is due, if any.
    pub fn retry_next_due(&self) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Sled(store) => store.retry_next_due(),
            Self::Redis(store) => store.retry_next_due(),
        }
    }

    /// Jobs waiting, and the highest job id in use.
    pub fn retry_stats(&self) -> Result<(u64, u64), StoreError> {
        match self {
            Self::Sled(store) => store.retry_stats(),
            Self::Redis(store) => store.retry_stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store, waiting briefly when the last handle's background
    /// threads still hold sled's lock file (they let go a moment after the
    /// `Store` is dropped; under load that moment can be long).
    fn open(dir: &Path) -> Store {
        let mut tries = 0;
        loop {
            match Store::open(dir, 8 << 20) {
                Ok(store) => return store,
                Err(_) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("store does not open: {e}"),
            }
        }
    }

    fn record(ts: u64, msg_id: Option<&str>, data: &[u8]) -> MessageRecord {
        MessageRecord {
            ts,
            msg_id: msg_id.map(str::to_owned),
            headers: None,
            data: data.to_vec(),
        }
    }

    #[test]
    fn log_survives_reopen_with_head_and_range() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let ch = ChannelRecord {
                id: 7,
                epoch: "e1".into(),
                created_ms: 1,
            };
            store.put_channel("chat:a", &ch).unwrap();
            for seq in 1..=5u64 {
                let head = HeadRecord {
                    last_seq: seq,
                    appended_bytes: seq * 3,
                };
                store.append(7, seq, &record(seq, None, b"abc")).unwrap();
                store.put_head(7, &head).unwrap();
            }
            store.flush_durable().unwrap();
        }
        let store = open(dir.path());
        let channels = store.load_channels().unwrap();
        assert_eq!(channels.len(), 1);
        assert_eq!(
            (
                channels[0].first_seq,
                channels[0].last_seq,
                channels[0].bytes
            ),
            (1, 5, 15)
        );
        let range = store.read_range(7, 2, 4, 100).unwrap();
        assert_eq!(
            range.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(store.max_channel_id().unwrap(), 7);
    }

    #[test]
    fn trim_removes_a_prefix_and_counts_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .put_channel(
                "c",
                &ChannelRecord {
                    id: 1,
                    epoch: "e".into(),
                    created_ms: 0,
                },
            )
            .unwrap();
        for seq in 1..=10u64 {
            let head = HeadRecord {
                last_seq: seq,
                appended_bytes: seq * 2,
            };
            store.append(1, seq, &record(seq, None, b"xy")).unwrap();
            store.put_head(1, &head).unwrap();
        }
        let (first, removed) = store.trim(1, 10, |seq, _| seq <= 4).unwrap();
        assert_eq!((first, removed), (5, 8));
        let loaded = store.load_channels().unwrap();
        assert_eq!(
            (loaded[0].first_seq, loaded[0].last_seq, loaded[0].bytes),
            (5, 10, 12)
        );
        let (first, _) = store.trim(1, 10, |_, _| true).unwrap();
        assert_eq!(first, 11, "an empty log starts after the last seq");
    }

    #[test]
    fn recent_msg_ids_stop_at_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for seq in 1..=5u64 {
            let id = format!("m{seq}");
            let head = HeadRecord {
                last_seq: seq,
                appended_bytes: 0,
            };
            store
                .append(3, seq, &record(seq * 100, Some(&id), b""))
                .unwrap();
            store.put_head(3, &head).unwrap();
        }
        let ids = store.recent_msg_ids(3, 300, 100).unwrap();
        assert_eq!(
            ids.iter().map(|(_, s, _)| *s).collect::<Vec<_>>(),
            vec![5, 4, 3]
        );
    }

    #[test]
    fn dead_letters_list_in_pages_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for (seq, consumer) in [(3, "c/a"), (1, "c/b"), (1, "c/a"), (9, "c/a")] {
            let record = DeadLetterRecord {
                seq,
                consumer: consumer.into(),
                reason: "term".into(),
                detail: None,
                attempts: 1,
                dead_ms: 0,
                message: None,
            };
            store.dlq_put(5, &record).unwrap();
        }
        store
            .dlq_put(
                6,
                &DeadLetterRecord {
                    seq: 2,
                    consumer: "x".into(),
                    reason: "term".into(),
                    detail: None,
                    attempts: 1,
                    dead_ms: 0,
                    message: None,
                },
            )
            .unwrap();
        let page1 = store.dlq_list(5, None, 0..=u64::MAX, 2).unwrap();
        assert_eq!(
            page1
                .iter()
                .map(|r| (r.seq, r.consumer.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "c/a"), (1, "c/b")]
        );
        let page2 = store
            .dlq_list(5, Some((1, "c/b")), 0..=u64::MAX, 10)
            .unwrap();
        assert_eq!(page2.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 9]);
        assert_eq!(store.dlq_list(5, None, 2..=3, 10).unwrap().len(), 1);
        assert!(store.dlq_remove(5, 3, "c/a").unwrap());
        assert!(
            !store.dlq_remove(5, 3, "c/a").unwrap(),
            "removing twice is harmless"
        );
        assert_eq!(store.dlq_first(5).unwrap().unwrap().seq, 1);
    }

    #[test]
    fn retry_jobs_come_out_when_due_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.retry_put(200, 1, b"b").unwrap();
        store.retry_put(100, 2, b"a").unwrap();
        store.retry_put(300, 3, b"c").unwrap();
        assert_eq!(store.retry_next_due().unwrap(), Some(100));
        assert_eq!(
            store.retry_take_due(200, 10).unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(store.retry_stats().unwrap(), (1, 3));
        assert!(store.retry_take_due(299, 10).unwrap().is_empty());
    }

    #[test]
    fn consumers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let rec = ConsumerRecord {
            floor: 4,
            acked: vec![6, 9],
            attempts: vec![(5, 2)],
            scheduled: vec![(7, 1234)],
            requeued: vec![2],
        };
        store.save_consumer(1, "c/alice", &rec).unwrap();
        assert_eq!(store.load_consumer(1, "c/alice").unwrap(), Some(rec));
        assert_eq!(store.load_consumer(1, "c/bob").unwrap(), None);
    }
}
