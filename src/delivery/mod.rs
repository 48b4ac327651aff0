//! Consumers: who has read and acked what, and what happens to deliveries
//! that fail. The state machine is in [`consumer`] (no I/O); [`Consumer`]
//! shares one between the subscriptions attached to it, carries out its
//! effects (dead letters to the DLQ, retries to the [`retry`] queue) and
//! wakes subscriptions when their window opens.

mod consumer;
pub mod retry;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

pub use consumer::{
    ConsumerMode, ConsumerState, DeadLetter, DeadReason, Effects, NotDelivered, Pick, Picked,
    Retry, RetryPolicy, SubscriptionId,
};
use retry::{RetryJob, RetryQueue};

use crate::broker::{Channel, now_ms};
use crate::metrics;
use crate::storage::{DeadLetterRecord, Store};

/// Retries due within one bucket share one job (a burst of expiries makes
/// a few jobs, not thousands).
const SLED_BUCKET_MS: u64 = 25;
/// apalis-redis schedules in whole seconds.
const REDIS_BUCKET_MS: u64 = 1000;

/// One consumer of one channel, shared by its live subscriptions.
pub struct Consumer {
    /// `g/<group>`, `c/<consumer>`, `u/<user>` or `a/<subscription>`.
    key: String,
    channel: Arc<Channel>,
    /// Saved to the store (durable channel, named consumer).
    persistent: bool,
    /// Its channel was deleted: never saved again.
    retired: std::sync::atomic::AtomicBool,
    state: Mutex<ConsumerState>,
    /// Woken on acks, nacks, fired retries and detaches.
    notify: Notify,
    store: Arc<Store>,
    retry: RetryQueue,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("key", &self.key)
            .field("channel", self.channel.name())
            .finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(
        key: String,
        channel: Arc<Channel>,
        persistent: bool,
        state: ConsumerState,
        store: Arc<Store>,
        retry: RetryQueue,
    ) -> Self {
        Self {
            key,
            channel,
            persistent,
            retired: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(state),
            notify: Notify::new(),
            store,
            retry,
        }
    }

    /// The consumer's registry key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The channel it reads.
    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// Whether its state is saved to the store.
    pub fn is_persistent(&self) -> bool {
        self.persistent && !self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Its channel was deleted: the state is never saved again, so a
    /// subscription still attached cannot bring the old position back.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The state machine, behind a short-held lock (never across an await).
    /// Use [`Consumer::update`] for operations that can fail deliveries.
    pub fn lock(&self) -> MutexGuard<'_, ConsumerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state and carries out its effects: dead letters are
    /// stored before the lock is released (so no saved state acks a seq
    /// whose dead letter is missing), then retries are scheduled.
    pub async fn update<T>(self: &Arc<Self>, f: impl FnOnce(&mut ConsumerState) -> T) -> T {
        let (result, retries) = {
            let mut state = self.lock();
            let result = f(&mut state);
            let effects = state.take_effects();
            if !effects.dead.is_empty() {
                self.store_dead_letters(&effects.dead);
            }
            (result, effects.retries)
        };
        if !retries.is_empty() {
            self.schedule(retries).await;
        }
        result
    }

    fn store_dead_letters(&self, dead: &[DeadLetter]) {
        let channel = &self.channel;
        let policy = channel.policy();
        for letter in dead {
            metrics::MESSAGES_DEAD_LETTERED
                .with_label_values(&[letter.reason.as_str()])
                .inc();
            if letter.reason == DeadReason::RetryQueueFull {
                tracing::warn!(channel = %channel.name(), consumer = %self.key, seq = letter.seq,
                    max_retries = policy.max_retries, "retry queue of the consumer is full: dead-lettered instead");
            } else {
                tracing::info!(channel = %channel.name(), consumer = %self.key, seq = letter.seq,
                    reason = letter.reason.as_str(), attempts = letter.attempts, "dead-lettered");
            }
            if !channel.is_durable() {
                continue;
            }
            let message = match self.store.read_one(channel.id(), letter.seq) {
                Ok(message) => message,
                Err(e) => {
                    tracing::error!(error = %e, "reading a dead letter's message failed");
                    None
                }
            };
            let record = DeadLetterRecord {
                seq: letter.seq,
                consumer: self.key.clone(),
                reason: letter.reason.as_str().to_owned(),
                detail: letter.detail.clone(),
                attempts: letter.attempts,
                dead_ms: now_ms(),
                message,
            };
            if channel.dead_letters().load(Ordering::Relaxed) >= policy.dlq_max {
                self.evict_oldest_dead_letter();
            }
            match self.store.dlq_put(channel.id(), &record) {
                Ok(()) => {
                    channel.dead_letters().fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(error = %e, seq = letter.seq, "storing a dead letter failed")
                }
            }
        }
    }

    fn evict_oldest_dead_letter(&self) {
        let channel = &self.channel;
        match self.store.dlq_first(channel.id()) {
            Ok(Some(oldest)) => {
                if matches!(
                    self.store
                        .dlq_remove(channel.id(), oldest.seq, &oldest.consumer),
                    Ok(true)
                ) {
                    decrement(channel.dead_letters());
                }
                metrics::DLQ_EVICTED.inc();
                tracing::warn!(channel = %channel.name(), seq = oldest.seq, consumer = %oldest.consumer,
                    dlq_max = channel.policy().dlq_max, "dead-letter queue full: dropped its oldest entry");
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "dead-letter queue eviction failed"),
        }
    }

    /// Schedules retries, one job per due-time bucket.
    async fn schedule(self: &Arc<Self>, retries: Vec<Retry>) {
        let bucket = match self.retry {
            RetryQueue::Sled(_) => SLED_BUCKET_MS,
            RetryQueue::Redis(_) => REDIS_BUCKET_MS,
        };
        let mut jobs: BTreeMap<u64, RetryJob> = BTreeMap::new();
        for retry in retries {
            let due = retry.due_ms.div_ceil(bucket).saturating_mul(bucket);
            let job = jobs.entry(due).or_insert_with(|| RetryJob {
                channel: self.channel.name().as_str().to_owned(),
                consumer: self.key.clone(),
                seqs: Vec::new(),
                attempt: retry.attempt,
                due_ms: due,
            });
            job.seqs.push(retry.seq);
            job.attempt = job.attempt.max(retry.attempt);
        }
        for job in jobs.into_values() {
            metrics::RETRIES_SCHEDULED.inc_by(u64::try_from(job.seqs.len()).unwrap_or(0));
            let due_ms = job.due_ms;
            if let Err(e) = self.retry.schedule(job).await {
                // The record still holds the schedule; without a job, an
                // in-process timer does the job's one task: wake at due.
                tracing::error!(error = %e, consumer = %self.key, "scheduling a retry failed; using an in-process timer");
                let consumer = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(
                        due_ms.saturating_sub(now_ms()),
                    ))
                    .await;
                    if let Some(consumer) = consumer.upgrade() {
                        consumer.fire_due();
                    }
                });
            }
        }
    }

    /// A retry job fired: move due seqs back to delivery and wake the subscriptions.
    pub fn fire_due(&self) {
        let fired = self.lock().fire(now_ms());
        if fired {
            self.wake();
        }
    }

    /// Wakes every subscription of this consumer to pick again.
    pub fn wake(&self) {
        self.notify.notify_waiters();
    }

    /// Resolves on the next [`Consumer::wake`].
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

fn decrement(counter: &AtomicU64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}
