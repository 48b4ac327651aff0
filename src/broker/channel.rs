//! One channel in memory: its seq counter, visible head, recent-message cache
//! and `msg_id` dedup table.
//!
//! Only the channel writer (see `writer.rs`) assigns seqs and moves the head;
//! readers watch the head and read the cache, or the store when behind.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use crate::config::NamespacePolicy;
use crate::protocol::{ChannelName, Headers};
use crate::storage::{HeadRecord, MessageRecord, Store, StoreError};

/// A message as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub seq: u64,
    /// Publish time, ms since the Unix epoch.
    pub ts: u64,
    pub headers: Option<Headers>,
    pub data: Bytes,
}

impl Message {
    /// Bytes this message counts against size limits.
    pub fn size(&self) -> usize {
        self.data.len()
            + self
                .headers
                .iter()
                .flatten()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    pub(crate) fn from_record(seq: u64, record: MessageRecord) -> Self {
        Self {
            seq,
            ts: record.ts,
            headers: record.headers,
            data: Bytes::from(record.data),
        }
    }
}

/// `msg_id`s seen recently, oldest first, bounded by age and count.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    window_ms: u64,
    max: usize,
    seqs: HashMap<String, u64>,
    order: VecDeque<(u64, String)>,
    /// Entries forgotten early because the table was full.
    pub evicted: u64,
}

impl Dedup {
    pub(crate) fn new(window_ms: u64, max: usize) -> Self {
        Self {
            window_ms,
            max,
            ..Self::default()
        }
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((ts, _)) = self.order.front() {
            if ts.saturating_add(self.window_ms) >= now_ms {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.seqs.remove(&id);
            }
        }
    }

    /// The seq a `msg_id` was stored under, if it is still remembered.
    pub(crate) fn get(&mut self, id: &str, now_ms: u64) -> Option<u64> {
        self.expire(now_ms);
        self.seqs.get(id).copied()
    }

    pub(crate) fn insert(&mut self, id: String, seq: u64, ts: u64) {
        if self.max == 0 {
            return;
        }
        while self.seqs.len() >= self.max {
            match self.order.pop_front() {
                Some((_, old)) => {
                    self.seqs.remove(&old);
                    self.evicted += 1;
                }
                None => break,
            }
        }
        self.seqs.insert(id.clone(), seq);
        self.order.push_back((ts, id));
    }
}

/// The mutable part of a channel, behind one short-held lock.
#[derive(Debug)]
pub(crate) struct ChannelState {
    pub epoch: String,
    /// Last seq the writer handed out (may be ahead of the visible head while a flush runs).
    pub assigned: u64,
    /// Oldest stored seq; `head + 1` when nothing is stored.
    pub first_seq: u64,
    /// Bytes stored (approximate after a crash).
    pub bytes: u64,
    pub head_record: HeadRecord,
    /// Recent visible messages, contiguous, ending at the head.
    pub cache: VecDeque<Arc<Message>>,
    pub cache_bytes: usize,
    pub dedup: Dedup,
    /// Deleted or purged by an operator: no more appends.
    pub deleted: bool,
}

/// Cache bounds of a channel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheLimits {
    pub msgs: usize,
    pub bytes: usize,
}

/// A channel and its in-memory state.
#[derive(Debug)]
pub struct Channel {
    name: ChannelName,
    /// Store id; 0 for ephemeral channels, which are never stored.
    id: u64,
    policy: NamespacePolicy,
    cache_limits: CacheLimits,
    state: Mutex<ChannelState>,
    /// The last visible seq: durable under the fsync policy.
    head: watch::Sender<u64>,
    /// Dead letters stored for this channel (for the `dlq_max` cap).
    dead_letters: std::sync::atomic::AtomicU64,
    /// Live subscriptions on this node.
    subscribers: AtomicUsize,
    /// Publish rate, msgs/s (an `f64`'s bits), and the head it was last sampled at.
    rate: AtomicU64,
    rate_head: AtomicU64,
    /// Its namespace's message counters.
    counters: crate::metrics::NamespaceCounters,
    /// When a request last looked the channel up, ms since the Unix epoch.
    last_used_ms: AtomicU64,
}

impl Channel {
    pub(crate) fn new(
        name: ChannelName,
        id: u64,
        policy: NamespacePolicy,
        cache_limits: CacheLimits,
        state: ChannelState,
        dead_letters: u64,
        counters: crate::metrics::NamespaceCounters,
    ) -> Self {
        let (head, _) = watch::channel(state.assigned);
        let rate_head = AtomicU64::new(state.assigned);
        Self {
            name,
            id,
            policy,
            cache_limits,
            state: Mutex::new(state),
            head,
            dead_letters: std::sync::atomic::AtomicU64::new(dead_letters),
            subscribers: AtomicUsize::new(0),
            rate: AtomicU64::new(0),
            rate_head,
            counters,
            last_used_ms: AtomicU64::new(crate::broker::now_ms()),
        }
    }

    /// Records a lookup (see [`Channel::idle_since`]).
    pub(crate) fn touch(&self, now_ms: u64) {
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When a request last looked the channel up, ms since the Unix epoch.
    pub fn idle_since(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// Its namespace's message counters.
    pub fn counters(&self) -> &crate::metrics::NamespaceCounters {
        &self.counters
    }

    /// Live subscriptions on this node.
    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    pub(crate) fn subscriber_added(&self) {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn subscriber_removed(&self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }

    /// Messages per second, averaged over about the last ten seconds.
    pub fn publish_rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// Folds the publishes since the last sample, `elapsed` ago, into the
    /// rate: an exponentially weighted average with a ten-second horizon.
    pub(crate) fn sample_rate(&self, elapsed: std::time::Duration) {
        let head = self.head();
        let before = self.rate_head.swap(head, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        #[allow(clippy::cast_precision_loss)] // a rate, not an exact count
        let instant = head.saturating_sub(before) as f64 / secs;
        let weight = (-secs / 10.0).exp();
        let rate = self.publish_rate() * weight + instant * (1.0 - weight);
        self.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// `(messages, bytes)` held: stored for a durable channel, cached for an
    /// ephemeral one.
    pub fn stored(&self) -> (u64, u64) {
        let head = self.head();
        let state = self.lock();
        if self.is_durable() {
            (head + 1 - state.first_seq.min(head + 1), state.bytes)
        } else {
            (
                u64::try_from(state.cache.len()).unwrap_or(u64::MAX),
                u64::try_from(state.cache_bytes).unwrap_or(u64::MAX),
            )
        }
    }

    /// Marks the channel deleted: the writer refuses further appends.
    pub(crate) fn mark_deleted(&self) {
        self.lock().deleted = true;
    }

    /// Dead letters stored for this channel.
    pub fn dead_letters(&self) -> &std::sync::atomic::AtomicU64 {
        &self.dead_letters
    }

    /// The channel's name.
    pub fn name(&self) -> &ChannelName {
        &self.name
    }

    /// The store id (0 for ephemeral channels).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The namespace policy this channel runs under.
    pub fn policy(&self) -> &NamespacePolicy {
        &self.policy
    }

    /// Persisted and acked, or memory only.
    pub fn is_durable(&self) -> bool {
        self.policy.durable
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ChannelState> {
        // A panic while holding this lock leaves the state consistent enough
        // to keep serving (every update is a few field writes).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last visible seq (0 before the first publish).
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// A receiver that wakes when the head moves.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// `(epoch, first_seq, last_seq)` as a `subscribed` reply tells them.
    pub fn position(&self) -> (String, u64, u64) {
        let head = self.head();
        let state = self.lock();
        let first = if self.is_durable() {
            state.first_seq
        } else {
            state.cache.front().map_or(head + 1, |m| m.seq)
        };
        (state.epoch.clone(), first.min(head + 1), head)
    }

    /// Oldest seq still readable.
    pub fn first_seq(&self) -> u64 {
        self.position().1
    }

    /// Makes a message visible: it is durable (or, for ephemeral channels and
    /// `fsync = "interval"`, accepted). Called by the writer in seq order.
    pub(crate) fn commit(&self, message: Arc<Message>) {
        let mut state = self.lock();
        self.commit_locked(&mut state, message);
    }

    /// [`Channel::commit`] for a caller that already holds the state lock.
    /// A seq at or below the head is already visible and is skipped; a seq
    /// past `head + 1` (a cluster node catching up over a trimmed range)
    /// empties the cache first, which stays contiguous.
    pub(crate) fn commit_locked(&self, state: &mut ChannelState, message: Arc<Message>) {
        let seq = message.seq;
        if seq <= self.head() {
            return;
        }
        if state.cache.back().is_some_and(|last| last.seq + 1 != seq) {
            state.cache.clear();
            state.cache_bytes = 0;
        }
        {
            state.cache_bytes += message.size();
            state.cache.push_back(message);
            while state.cache.len() > self.cache_limits.msgs
                || (state.cache_bytes > self.cache_limits.bytes && state.cache.len() > 1)
            {
                if let Some(old) = state.cache.pop_front() {
                    state.cache_bytes -= old.size();
                }
            }
        }
        self.head.send_replace(seq);
    }

    /// The messages with these seqs that are still stored, in seq order:
    /// from the cache, else from the store.
    pub(crate) async fn fetch(
        self: &Arc<Self>,
        store: &Arc<Store>,
        seqs: &[u64],
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        let mut found: Vec<Arc<Message>> = Vec::with_capacity(seqs.len());
        let mut missing = Vec::new();
        {
            let state = self.lock();
            let cache_first = state.cache.front().map(|m| m.seq);
            for &seq in seqs {
                let cached = cache_first
                    .and_then(|first| seq.checked_sub(first))
                    .and_then(|offset| usize::try_from(offset).ok())
                    .and_then(|offset| state.cache.get(offset))
                    .filter(|m| m.seq == seq);
                match cached {
                    Some(m) => found.push(Arc::clone(m)),
                    None => missing.push(seq),
                }
            }
        }
        if !missing.is_empty() && self.is_durable() {
            let (from, to) = (missing[0], missing[missing.len() - 1]);
            let limit = usize::try_from(to - from + 1).unwrap_or(usize::MAX);
            let (store, id) = (Arc::clone(store), self.id);
            let records =
                tokio::task::spawn_blocking(move || store.read_range(id, from, to, limit))
                    .await
                    .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
            let wanted: std::collections::HashSet<u64> = missing.into_iter().collect();
            found.extend(
                records
                    .into_iter()
                    .filter(|(seq, _)| wanted.contains(seq))
                    .map(|(seq, record)| Arc::new(Message::from_record(seq, record))),
            );
            found.sort_by_key(|m| m.seq);
        }
        Ok(found)
    }

    /// Cluster mode: makes every seq up to `target` visible, in order.
    /// `known` (sorted by seq) are this node's own appends; the seqs other
    /// nodes appended in between are read from the store. Seqs the store no
    /// longer holds (trimmed meanwhile) are passed over. Blocking.
    pub(crate) fn catch_up(
        &self,
        store: &Store,
        target: u64,
        known: &[Arc<Message>],
    ) -> Result<(), StoreError> {
        const READ: u64 = 1024;
        loop {
            let from = self.head() + 1;
            if from > target {
                return Ok(());
            }
            let to = target.min(from + READ - 1);
            let mut batch: Vec<Arc<Message>> = known
                .iter()
                .filter(|m| (from..=to).contains(&m.seq))
                .cloned()
                .collect();
            if u64::try_from(batch.len()).unwrap_or(0) < to - from + 1 {
                let limit = usize::try_from(READ).unwrap_or(usize::MAX);
                for (seq, record) in store.read_range(self.id, from, to, limit)? {
                    if batch.binary_search_by_key(&seq, |m| m.seq).is_err() {
                        batch.push(Arc::new(Message::from_record(seq, record)));
                    }
                }
                batch.sort_by_key(|m| m.seq);
            }
            let mut state = self.lock();
            if state.deleted {
                return Ok(());
            }
            for message in batch {
                if message.seq > self.head() {
                    state.bytes += u64::try_from(message.size()).unwrap_or(0);
                    state.assigned = state.assigned.max(message.seq);
                }
                self.commit_locked(&mut state, message);
            }
            if self.head() < to {
                // Trimmed before this node read them: nothing to show.
                state.cache.clear();
                state.cache_bytes = 0;
                state.first_seq = state.first_seq.max(to + 1);
                state.assigned = state.assigned.max(to);
                self.head.send_replace(to);
            }
        }
    }

    /// Drops cached messages below `first_seq` after retention trimmed them.
    pub(crate) fn trimmed(&self, first_seq: u64, bytes_removed: u64) {
        let mut state = self.lock();
        state.first_seq = state.first_seq.max(first_seq);
        state.bytes = state.bytes.saturating_sub(bytes_removed);
        while state.cache.front().is_some_and(|m| m.seq < first_seq) {
            if let Some(old) = state.cache.pop_front() {
                state.cache_bytes -= old.size();
            }
        }
    }
}
