//! The acknowledgement state of one consumer, free of I/O.
//!
//! A consumer is the server-side cursor of one reader of one channel. Its
//! durable part is the acked floor, the acked seqs above it, the delivery
//! count of each delivered, unacked seq, the seqs waiting for a retry (with
//! their due time) and seqs an operator requeued from the dead-letter queue.
//! Live subscriptions attach to it:
//!
//! - *fanout* (a named consumer or a user): every attached subscription reads
//!   every message with its own cursor (a user's two tabs both see a chat);
//!   an ack from any of them acks the seq for the consumer.
//! - *queue* (a group): attached subscriptions share one cursor, so each
//!   message goes to one of them.
//!
//! A delivery fails when its ack deadline passes, the client nacks it, or
//! the connection that held it goes away. A failed seq with attempts left
//! waits `backoff(attempt)` (or the nack's own delay) in `scheduled`, then
//! goes out again; one that used up `max_deliver`, or that the client
//! `term`ed, becomes a dead letter and counts as acked from then on.
//!
//! Invariants: a seq is in flight at most once per subscription; a
//! subscription never has more than its `max_in_flight` seqs in flight or
//! waiting for a retry (so a window of one is strict seq order); seqs
//! given back are delivered again, lowest first, before anything new; a
//! scheduled seq is not delivered before its due time; after all
//! subscriptions leave, the next one starts at `floor + 1` and gets every
//! unacked seq again. Time is wall-clock milliseconds passed in by the
//! caller, randomness (jitter) too.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::backoff::Backoff;
use crate::storage::ConsumerRecord;

/// Identifies one subscription (one connection's attachment to a consumer).
pub type SubscriptionId = u64;

/// How a consumer shares messages among its subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerMode {
    /// Every subscription gets every message.
    Fanout,
    /// Each message goes to one subscription.
    Queue,
}

/// The retry rules of a consumer (from its namespace).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub ack_wait_ms: u64,
    pub max_deliver: u32,
    pub backoff: Backoff,
    /// Seqs that may wait for a retry at once; past it a failure dead-letters.
    pub max_scheduled: usize,
}

/// One delivery chosen by [`ConsumerState::pick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub seq: u64,
    /// 1 on the first delivery to this consumer, 2 on the next, …
    pub attempt: u32,
}

/// What [`ConsumerState::pick`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Picked {
    /// Seqs `from..=to` the subscription will never see: retention dropped them.
    pub gap: Option<(u64, u64)>,
    pub deliveries: Vec<Pick>,
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// It failed `max_deliver` times.
    MaxDeliver,
    /// The client sent `term`.
    Term,
    /// The consumer had `max_scheduled` retries waiting already.
    RetryQueueFull,
}

impl DeadReason {
    /// The reason as the DLQ and the admin API show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxDeliver => "max_deliver",
            Self::Term => "term",
            Self::RetryQueueFull => "retry_queue_full",
        }
    }
}

/// A message this consumer gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: u64,
    pub attempts: u32,
    pub reason: DeadReason,
    /// The client's words for a `term`.
    pub detail: Option<String>,
}

/// A retry to schedule: deliver `seq` again at `due_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub seq: u64,
    pub due_ms: u64,
    /// The attempt that failed.
    pub attempt: u32,
}

/// What state changes require of the outside world.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub retries: Vec<Retry>,
    pub dead: Vec<DeadLetter>,
}

/// An ack (or nack, progress, term) that names a seq this subscription does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "seq {0} is not awaiting an ack from this consumer (never delivered, or delivered before a broker restart: then it is delivered again)"
)]
pub struct NotDelivered(pub u64);

#[derive(Debug)]
struct Window {
    max_in_flight: usize,
    /// Seq → ack deadline (ms).
    in_flight: BTreeMap<u64, u64>,
    /// Next seq never looked at (fanout mode only).
    cursor: u64,
}

/// The acknowledgement state machine of one consumer.
#[derive(Debug)]
pub struct ConsumerState {
    mode: ConsumerMode,
    policy: RetryPolicy,
    floor: u64,
    acked: BTreeSet<u64>,
    attempts: HashMap<u64, u32>,
    /// Failed seqs waiting for their retry: seq → due (ms).
    scheduled: BTreeMap<u64, u64>,
    /// Seqs an operator requeued from the DLQ (may be below the floor).
    requeued: BTreeSet<u64>,
    /// Seqs due for delivery again, lowest first.
    redeliver: BTreeSet<u64>,
    /// Next seq never looked at (queue mode).
    cursor: u64,
    windows: BTreeMap<SubscriptionId, Window>,
    /// Redeliveries so far, for operators.
    redelivered: u64,
    effects: Effects,
    /// Changed since the last [`ConsumerState::record`].
    dirty: bool,
}

impl ConsumerState {
    /// A consumer whose every seq ≤ `floor` counts as acked.
    pub fn new(mode: ConsumerMode, policy: RetryPolicy, floor: u64) -> Self {
        Self {
            mode,
            policy,
            floor,
            acked: BTreeSet::new(),
            attempts: HashMap::new(),
            scheduled: BTreeMap::new(),
            requeued: BTreeSet::new(),
            redeliver: BTreeSet::new(),
            cursor: floor + 1,
            windows: BTreeMap::new(),
            redelivered: 0,
            effects: Effects::default(),
            dirty: true,
        }
    }

    /// A consumer restored from its stored record.
    pub fn from_record(mode: ConsumerMode, policy: RetryPolicy, record: &ConsumerRecord) -> Self {
        let floor = record.floor;
        let mut state = Self::new(mode, policy, floor);
        state.acked = record
            .acked
            .iter()
            .copied()
            .filter(|s| *s > floor)
            .collect();
        state.attempts = record.attempts.iter().copied().collect();
        state.scheduled = record.scheduled.iter().copied().collect();
        state.requeued = record.requeued.iter().copied().collect();
        state.dirty = false;
        state
    }

    /// The durable part, and clears the dirty mark.
    pub fn record(&mut self) -> ConsumerRecord {
        self.dirty = false;
        ConsumerRecord {
            floor: self.floor,
            acked: self.acked.iter().copied().collect(),
            attempts: self.attempts.iter().map(|(s, a)| (*s, *a)).collect(),
            scheduled: self.scheduled.iter().map(|(s, d)| (*s, *d)).collect(),
            requeued: self.requeued.iter().copied().collect(),
        }
    }

    /// Whether anything changed since the last [`ConsumerState::record`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Every seq ≤ floor is acked.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The sharing mode.
    pub fn mode(&self) -> ConsumerMode {
        self.mode
    }

    /// The retry rules.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Subscriptions attached now.
    pub fn subscriptions(&self) -> usize {
        self.windows.len()
    }

    /// Delivered seqs not yet acked, across subscriptions.
    pub fn unacked(&self) -> usize {
        self.attempts.len()
    }

    /// Ms since each seq of subscription `id`'s window that `seqs` (or
    /// `upto`) names was delivered or last had its deadline restarted: the
    /// delivery-to-ack latency, when the ack goes through.
    pub fn ack_ages(
        &self,
        id: SubscriptionId,
        now: u64,
        seqs: &[u64],
        upto: Option<u64>,
    ) -> Vec<u64> {
        let Some(window) = self.windows.get(&id) else {
            return Vec::new();
        };
        let since =
            |deadline: u64| now.saturating_sub(deadline.saturating_sub(self.policy.ack_wait_ms));
        match upto {
            Some(upto) => window
                .in_flight
                .range(..=upto)
                .map(|(_, d)| since(*d))
                .collect(),
            None => seqs
                .iter()
                .filter_map(|s| window.in_flight.get(s).map(|d| since(*d)))
                .collect(),
        }
    }

    /// Delivered seqs awaiting an ack in some subscription's window.
    pub fn in_flight_total(&self) -> usize {
        self.windows.values().map(|w| w.in_flight.len()).sum()
    }

    /// The oldest seq not yet acked (up to `last_seq`), requeued dead
    /// letters included.
    pub fn oldest_unacked(&self, last_seq: u64) -> Option<u64> {
        let mut seq = self.floor + 1;
        while seq <= last_seq && self.acked.contains(&seq) {
            seq += 1;
        }
        let above = (seq <= last_seq).then_some(seq);
        match (self.requeued.first().copied(), above) {
            (Some(r), Some(a)) => Some(r.min(a)),
            (r, a) => r.or(a),
        }
    }

    /// Seqs waiting for a retry.
    pub fn scheduled(&self) -> usize {
        self.scheduled.len()
    }

    /// Redeliveries since the consumer was loaded.
    pub fn redelivered(&self) -> u64 {
        self.redelivered
    }

    /// Takes what the last operations require of the outside world.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// Forgets all progress: every seq ≤ `floor` counts as acked, nothing above.
    pub fn reset(&mut self, floor: u64) {
        self.floor = floor;
        self.acked.clear();
        self.attempts.clear();
        self.scheduled.clear();
        self.requeued.clear();
        self.redeliver.clear();
        self.cursor = floor + 1;
        for window in self.windows.values_mut() {
            window.in_flight.clear();
            window.cursor = floor + 1;
        }
        self.dirty = true;
    }

    /// Attaches a subscription with a delivery window of `max_in_flight`.
    pub fn attach(&mut self, id: SubscriptionId, max_in_flight: u32) {
        if self.windows.is_empty() {
            self.cursor = self.floor + 1;
            self.redeliver.extend(self.requeued.iter().copied());
        }
        let window = Window {
            max_in_flight: usize::try_from(max_in_flight.max(1)).unwrap_or(usize::MAX),
            in_flight: BTreeMap::new(),
            cursor: self.floor + 1,
        };
        self.windows.insert(id, window);
    }

    /// Detaches a subscription; what it had in flight is given back (the
    /// delivery counts as made: a client that dies on a message uses up its
    /// attempts).
    pub fn detach(&mut self, id: SubscriptionId) {
        if let Some(window) = self.windows.remove(&id) {
            self.redeliver.extend(window.in_flight.into_keys());
        }
        if self.windows.is_empty() {
            self.redeliver.clear();
            self.cursor = self.floor + 1;
        }
    }

    /// Chooses up to `limit` deliveries for subscription `id`, given the
    /// channel's stored range `first_seq..=head`, at time `now`.
    pub fn pick(
        &mut self,
        id: SubscriptionId,
        first_seq: u64,
        head: u64,
        limit: usize,
        now: u64,
    ) -> Picked {
        let mut picked = Picked::default();
        if first_seq > self.floor + 1 {
            let from = self.floor + 1;
            if self.skip_below(first_seq) {
                picked.gap = Some((from, first_seq - 1));
            }
        }
        self.fire(now);
        let mode = self.mode;
        let (ack_wait, max_deliver) = (self.policy.ack_wait_ms, self.policy.max_deliver);
        let Some(window) = self.windows.get_mut(&id) else {
            return picked;
        };
        let cursor = match mode {
            ConsumerMode::Queue => &mut self.cursor,
            ConsumerMode::Fanout => &mut window.cursor,
        };
        if *cursor < first_seq {
            *cursor = first_seq;
        }
        let mut exhausted = Vec::new();
        // Seqs waiting for a retry still count as unacked: with a window of
        // one, nothing overtakes a nacked message.
        while picked.deliveries.len() < limit
            && window.in_flight.len() + self.scheduled.len() < window.max_in_flight
        {
            let again = self
                .redeliver
                .iter()
                .copied()
                .find(|seq| !window.in_flight.contains_key(seq));
            let seq = match again {
                Some(seq) => {
                    self.redeliver.remove(&seq);
                    seq
                }
                None => {
                    if *cursor > head {
                        break;
                    }
                    let seq = *cursor;
                    *cursor += 1;
                    // Skip what is done, waiting for a retry, queued for
                    // redelivery (it goes out from there) or already in
                    // flight here (a retry delivered it before the cursor
                    // got this far).
                    if seq <= self.floor
                        || self.acked.contains(&seq)
                        || self.scheduled.contains_key(&seq)
                        || self.redeliver.contains(&seq)
                        || window.in_flight.contains_key(&seq)
                    {
                        continue;
                    }
                    seq
                }
            };
            let attempt = self.attempts.entry(seq).or_insert(0);
            if *attempt >= max_deliver {
                exhausted.push((seq, *attempt));
                continue;
            }
            *attempt = attempt.saturating_add(1);
            if *attempt > 1 {
                self.redelivered += 1;
            }
            window.in_flight.insert(seq, now.saturating_add(ack_wait));
            picked.deliveries.push(Pick {
                seq,
                attempt: *attempt,
            });
            self.dirty = true;
        }
        for (seq, attempts) in exhausted {
            self.dead_letter(seq, attempts, DeadReason::MaxDeliver, None);
        }
        picked
    }

    /// Moves scheduled seqs whose time has come to the redelivery set.
    /// Returns whether any did.
    pub fn fire(&mut self, now: u64) -> bool {
        let due: Vec<u64> = self
            .scheduled
            .iter()
            .filter(|(_, due)| **due <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &due {
            self.scheduled.remove(seq);
            self.redeliver.insert(*seq);
        }
        if !due.is_empty() {
            self.dirty = true;
        }
        !due.is_empty()
    }

    /// The earliest ack deadline on subscription `id`.
    pub fn next_deadline(&self, id: SubscriptionId) -> Option<u64> {
        self.windows
            .get(&id)
            .and_then(|w| w.in_flight.values().min().copied())
    }

    /// When the earliest waiting retry is due.
    pub fn next_retry_due(&self) -> Option<u64> {
        self.scheduled.values().min().copied()
    }

    /// Fails every delivery of subscription `id` whose ack deadline passed.
    /// `unit` supplies jitter in `[0, 1)`. Returns how many expired.
    pub fn expire(
        &mut self,
        id: SubscriptionId,
        now: u64,
        unit: &mut impl FnMut() -> f64,
    ) -> usize {
        let Some(window) = self.windows.get_mut(&id) else {
            return 0;
        };
        let expired: Vec<u64> = window
            .in_flight
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &expired {
            window.in_flight.remove(seq);
        }
        for seq in &expired {
            self.fail(*seq, now, None, unit());
        }
        expired.len()
    }

    /// `nack`: the delivery failed; retry after `delay_ms` or the backoff.
    pub fn nack(
        &mut self,
        id: SubscriptionId,
        seq: u64,
        delay_ms: Option<u64>,
        now: u64,
        unit: f64,
    ) -> Result<(), NotDelivered> {
        self.take_in_flight(id, seq)?;
        self.fail(seq, now, delay_ms, unit);
        Ok(())
    }

    /// `progress`: restarts the ack deadline of each seq. Refused whole when
    /// one of them is not in flight on this subscription.
    pub fn progress(
        &mut self,
        id: SubscriptionId,
        seqs: &[u64],
        now: u64,
    ) -> Result<(), NotDelivered> {
        let window = self
            .windows
            .get_mut(&id)
            .ok_or(NotDelivered(seqs.first().copied().unwrap_or(0)))?;
        if let Some(missing) = seqs.iter().find(|s| !window.in_flight.contains_key(s)) {
            return Err(NotDelivered(*missing));
        }
        for seq in seqs {
            window
                .in_flight
                .insert(*seq, now.saturating_add(self.policy.ack_wait_ms));
        }
        Ok(())
    }

    /// `term`: never deliver `seq` again; it becomes a dead letter.
    pub fn term(
        &mut self,
        id: SubscriptionId,
        seq: u64,
        reason: Option<String>,
    ) -> Result<(), NotDelivered> {
        self.take_in_flight(id, seq)?;
        let attempts = self.attempts.get(&seq).copied().unwrap_or(1);
        self.dead_letter(seq, attempts, DeadReason::Term, reason);
        Ok(())
    }

    /// Delivers `seq` again with a fresh attempt count (an operator's DLQ requeue).
    pub fn requeue(&mut self, seq: u64) {
        self.acked.remove(&seq);
        self.attempts.remove(&seq);
        self.scheduled.remove(&seq);
        if seq <= self.floor {
            self.requeued.insert(seq);
        }
        if !self.windows.is_empty() {
            self.redeliver.insert(seq);
        }
        self.dirty = true;
    }

    fn take_in_flight(&mut self, id: SubscriptionId, seq: u64) -> Result<(), NotDelivered> {
        let window = self.windows.get_mut(&id).ok_or(NotDelivered(seq))?;
        window
            .in_flight
            .remove(&seq)
            .map(|_| ())
            .ok_or(NotDelivered(seq))
    }

    /// A delivery of `seq` failed: schedule a retry or give up on it.
    fn fail(&mut self, seq: u64, now: u64, delay_ms: Option<u64>, unit: f64) {
        let attempt = self.attempts.get(&seq).copied().unwrap_or(1);
        if attempt >= self.policy.max_deliver {
            self.dead_letter(seq, attempt, DeadReason::MaxDeliver, None);
            return;
        }
        if self.scheduled.len() >= self.policy.max_scheduled {
            self.dead_letter(seq, attempt, DeadReason::RetryQueueFull, None);
            return;
        }
        let delay = delay_ms.unwrap_or_else(|| {
            u64::try_from(self.policy.backoff.delay(attempt, unit).as_millis()).unwrap_or(u64::MAX)
        });
        let due_ms = now.saturating_add(delay);
        tracing::debug!(seq, attempt, delay, due_ms, now, "retry scheduled");
        self.scheduled.insert(seq, due_ms);
        self.effects.retries.push(Retry {
            seq,
            due_ms,
            attempt,
        });
        self.dirty = true;
    }

    fn dead_letter(&mut self, seq: u64, attempts: u32, reason: DeadReason, detail: Option<String>) {
        self.effects.dead.push(DeadLetter {
            seq,
            attempts,
            reason,
            detail,
        });
        self.mark_acked(seq);
    }

    /// Seqs below `first_seq` are gone: count them as acked. True when any of
    /// them had not been acked (a real loss).
    fn skip_below(&mut self, first_seq: u64) -> bool {
        let below = first_seq - 1;
        let acked_below = u64::try_from(self.acked.range(..=below).count()).unwrap_or(0);
        let unacked = below - self.floor - acked_below;
        self.floor = below;
        self.acked = self.acked.split_off(&first_seq);
        self.attempts.retain(|seq, _| *seq >= first_seq);
        self.scheduled = self.scheduled.split_off(&first_seq);
        self.requeued = self.requeued.split_off(&first_seq);
        self.redeliver = self.redeliver.split_off(&first_seq);
        for window in self.windows.values_mut() {
            window.in_flight = window.in_flight.split_off(&first_seq);
        }
        self.dirty = true;
        unacked > 0
    }

    /// Acks `seqs` for subscription `id`. Seqs already acked are fine; a seq
    /// never delivered to this consumer is an error (and nothing is acked).
    pub fn ack(&mut self, id: SubscriptionId, seqs: &[u64]) -> Result<(), NotDelivered> {
        let window = self.windows.get(&id);
        for &seq in seqs {
            let done =
                (seq <= self.floor && !self.requeued.contains(&seq)) || self.acked.contains(&seq);
            let delivered = window.is_some_and(|w| w.in_flight.contains_key(&seq))
                || self.attempts.contains_key(&seq);
            if !done && !delivered {
                return Err(NotDelivered(seq));
            }
        }
        for &seq in seqs {
            self.mark_acked(seq);
        }
        Ok(())
    }

    /// Acks everything subscription `id` has in flight up to `upto`.
    /// Returns how many seqs it acked.
    pub fn ack_upto(&mut self, id: SubscriptionId, upto: u64) -> Result<usize, NotDelivered> {
        let Some(window) = self.windows.get(&id) else {
            return Err(NotDelivered(upto));
        };
        let seqs: Vec<u64> = window.in_flight.range(..=upto).map(|(s, _)| *s).collect();
        if seqs.is_empty() && upto > self.floor && !self.acked.contains(&upto) {
            return Err(NotDelivered(upto));
        }
        for &seq in &seqs {
            self.mark_acked(seq);
        }
        Ok(seqs.len())
    }

    /// Gives `seq` back for immediate redelivery.
    pub fn release(&mut self, id: SubscriptionId, seq: u64) -> Result<(), NotDelivered> {
        self.take_in_flight(id, seq)?;
        self.redeliver.insert(seq);
        Ok(())
    }

    /// Whether `seq` is in flight on subscription `id`.
    pub fn is_in_flight(&self, id: SubscriptionId, seq: u64) -> bool {
        self.windows
            .get(&id)
            .is_some_and(|w| w.in_flight.contains_key(&seq))
    }

    /// Whether some subscription's window is full (its pump waits for an
    /// ack before it can send more).
    pub fn any_window_full(&self) -> bool {
        self.windows
            .values()
            .any(|w| w.in_flight.len() + self.scheduled.len() >= w.max_in_flight)
    }

    /// Seqs in flight on subscription `id`.
    pub fn in_flight(&self, id: SubscriptionId) -> usize {
        self.windows.get(&id).map_or(0, |w| w.in_flight.len())
    }

    fn mark_acked(&mut self, seq: u64) {
        for window in self.windows.values_mut() {
            window.in_flight.remove(&seq);
        }
        self.redeliver.remove(&seq);
        self.attempts.remove(&seq);
        self.scheduled.remove(&seq);
        self.requeued.remove(&seq);
        self.dirty = true;
        if seq <= self.floor {
            return;
        }
        self.acked.insert(seq);
        while self.acked.first() == Some(&(self.floor + 1)) {
            self.acked.pop_first();
            self.floor += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T0: u64 = 1_000_000;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            ack_wait_ms: 1000,
            max_deliver: 3,
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_millis(1000),
                jitter: 0.0,
            },
            max_scheduled: 100,
        }
    }

    fn consumer(mode: ConsumerMode, floor: u64) -> ConsumerState {
        ConsumerState::new(mode, policy(), floor)
    }

    fn seqs(p: &Picked) -> Vec<u64> {
        p.deliveries.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn window_bounds_in_flight_and_acks_open_it() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 3);
        assert_eq!(seqs(&c.pick(1, 1, 10, 100, T0)), vec![1, 2, 3]);
        assert!(c.pick(1, 1, 10, 100, T0).deliveries.is_empty());
        c.ack(1, &[2]).unwrap();
        assert_eq!(seqs(&c.pick(1, 1, 10, 100, T0)), vec![4]);
        c.ack(1, &[1, 3, 4]).unwrap();
        assert_eq!(c.floor(), 4);
    }

    #[test]
    fn unacked_come_back_after_reattach_with_higher_attempt() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 100);
        c.pick(1, 1, 6, 100, T0);
        c.ack(1, &[1, 3, 5]).unwrap();
        c.detach(1);
        let record = c.record();
        let mut c = ConsumerState::from_record(ConsumerMode::Fanout, policy(), &record);
        c.attach(2, 100);
        let p = c.pick(2, 1, 6, 100, T0);
        assert_eq!(seqs(&p), vec![2, 4, 6]);
        assert!(p.deliveries.iter().all(|d| d.attempt == 2));
    }

    #[test]
    fn queue_mode_shares_the_cursor_and_releases_on_detach() {
        let mut c = consumer(ConsumerMode::Queue, 0);
        c.attach(1, 2);
        c.attach(2, 2);
        assert_eq!(seqs(&c.pick(1, 1, 10, 100, T0)), vec![1, 2]);
        assert_eq!(seqs(&c.pick(2, 1, 10, 100, T0)), vec![3, 4]);
        c.detach(1);
        c.ack(2, &[3, 4]).unwrap();
        assert_eq!(
            seqs(&c.pick(2, 1, 10, 100, T0)),
            vec![1, 2],
            "given back first"
        );
    }

    #[test]
    fn fanout_subscriptions_each_see_everything() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 10);
        c.attach(2, 10);
        assert_eq!(seqs(&c.pick(1, 1, 3, 100, T0)), vec![1, 2, 3]);
        assert_eq!(seqs(&c.pick(2, 1, 3, 100, T0)), vec![1, 2, 3]);
        c.ack(2, &[1, 2, 3]).unwrap();
        assert_eq!(c.in_flight(1), 0, "an ack from one tab acks for both");
    }

    #[test]
    fn acks_for_seqs_never_delivered_are_refused_whole() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 10);
        c.pick(1, 1, 2, 100, T0);
        assert_eq!(c.ack(1, &[1, 7]), Err(NotDelivered(7)));
        assert_eq!(c.floor(), 0, "nothing acked");
        assert_eq!(c.ack_upto(1, 9), Ok(2));
        assert_eq!(c.ack(1, &[1, 2]), Ok(()), "acking twice is fine");
        assert_eq!(c.ack_upto(1, 9), Err(NotDelivered(9)));
    }

    #[test]
    fn release_redelivers_before_new_messages() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 1);
        assert_eq!(seqs(&c.pick(1, 1, 5, 10, T0)), vec![1]);
        c.release(1, 1).unwrap();
        let p = c.pick(1, 1, 5, 10, T0);
        assert_eq!(p.deliveries, vec![Pick { seq: 1, attempt: 2 }]);
    }

    #[test]
    fn retention_loss_is_a_gap_and_acked_holes_are_not() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 10);
        let p = c.pick(1, 5, 8, 10, T0);
        assert_eq!(p.gap, Some((1, 4)));
        assert_eq!(seqs(&p), vec![5, 6, 7, 8]);
        c.ack(1, &[5, 6, 7, 8]).unwrap();
        assert_eq!(
            c.pick(1, 9, 8, 10, T0).gap,
            None,
            "everything below was acked"
        );
    }

    #[test]
    fn reset_moves_the_floor() {
        let mut c = consumer(ConsumerMode::Fanout, 10);
        c.attach(1, 10);
        c.reset(2);
        assert_eq!(seqs(&c.pick(1, 1, 4, 10, T0)), vec![3, 4]);
    }

    #[test]
    fn nacks_back_off_exponentially_then_dead_letter() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 1);
        let mut now = T0;
        let mut dues = Vec::new();
        for attempt in 1..=3 {
            let p = c.pick(1, 1, 1, 10, now);
            assert_eq!(p.deliveries, vec![Pick { seq: 1, attempt }]);
            c.nack(1, 1, None, now, 0.5).unwrap();
            let effects = c.take_effects();
            if attempt < 3 {
                let retry = effects.retries[0];
                dues.push(retry.due_ms - now);
                assert!(
                    c.pick(1, 1, 1, 10, retry.due_ms - 1).deliveries.is_empty(),
                    "not before due"
                );
                now = retry.due_ms;
            } else {
                assert!(effects.retries.is_empty());
                assert_eq!(
                    effects.dead,
                    vec![DeadLetter {
                        seq: 1,
                        attempts: 3,
                        reason: DeadReason::MaxDeliver,
                        detail: None
                    }]
                );
            }
        }
        assert_eq!(dues, vec![100, 200], "base, then twice base");
        assert_eq!(c.floor(), 1, "a dead letter counts as acked");
        assert!(
            c.pick(1, 1, 1, 10, now + 10_000).deliveries.is_empty(),
            "and never comes back"
        );
    }

    #[test]
    fn a_window_of_one_waits_for_the_retry_before_anything_newer() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 1);
        assert_eq!(seqs(&c.pick(1, 1, 3, 10, T0)), vec![1]);
        c.nack(1, 1, None, T0, 0.5).unwrap();
        assert!(
            c.pick(1, 1, 3, 10, T0 + 50).deliveries.is_empty(),
            "2 must not overtake 1"
        );
        assert_eq!(
            c.pick(1, 1, 3, 10, T0 + 100).deliveries,
            vec![Pick { seq: 1, attempt: 2 }]
        );
        c.ack(1, &[1]).unwrap();
        assert_eq!(seqs(&c.pick(1, 1, 3, 10, T0 + 100)), vec![2]);
    }

    #[test]
    fn a_retry_that_fires_before_the_cursor_arrives_is_delivered_once() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 10);
        c.pick(1, 1, 8, 100, T0);
        c.nack(1, 8, Some(10), T0, 0.5).unwrap();
        c.detach(1);
        let mut c = ConsumerState::from_record(ConsumerMode::Fanout, policy(), &c.record());
        c.attach(2, 10);
        // The retry fires first, then the resumed cursor walks up to 8.
        let p = c.pick(2, 1, 8, 100, T0 + 10);
        let eights: Vec<_> = p.deliveries.iter().filter(|d| d.seq == 8).collect();
        assert_eq!(eights.len(), 1, "{p:?}");
        assert_eq!(eights[0].attempt, 2);
    }

    #[test]
    fn a_closing_tab_does_not_double_deliver_to_the_one_behind() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 10);
        c.attach(2, 10);
        assert_eq!(seqs(&c.pick(1, 1, 4, 100, T0)), vec![1, 2, 3, 4]);
        assert_eq!(seqs(&c.pick(2, 1, 4, 2, T0)), vec![1, 2], "tab 2 is behind");
        c.detach(1);
        let rest = seqs(&c.pick(2, 1, 4, 100, T0));
        assert_eq!(rest, vec![3, 4], "each seq once on tab 2");
    }

    #[test]
    fn a_window_is_full_with_in_flight_and_waiting_retries() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 2);
        c.pick(1, 1, 5, 1, T0);
        assert!(!c.any_window_full());
        c.pick(1, 1, 5, 10, T0);
        assert!(c.any_window_full(), "two in flight of two");
        c.nack(1, 1, Some(1000), T0, 0.5).unwrap();
        assert!(
            c.any_window_full(),
            "one in flight, one waiting for its retry"
        );
        c.ack(1, &[2]).unwrap();
        assert!(!c.any_window_full());
    }

    #[test]
    fn a_nack_delay_overrides_the_backoff_once() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 5);
        c.pick(1, 1, 1, 10, T0);
        c.nack(1, 1, Some(5000), T0, 0.5).unwrap();
        assert_eq!(c.take_effects().retries[0].due_ms, T0 + 5000);
        assert!(c.pick(1, 1, 1, 10, T0 + 4999).deliveries.is_empty());
        let p = c.pick(1, 1, 1, 10, T0 + 5000);
        assert_eq!(p.deliveries, vec![Pick { seq: 1, attempt: 2 }]);
        c.nack(1, 1, None, T0 + 5000, 0.5).unwrap();
        assert_eq!(
            c.take_effects().retries[0].due_ms,
            T0 + 5000 + 200,
            "back to the backoff"
        );
    }

    #[test]
    fn deadlines_expire_like_nacks_and_progress_restarts_them() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 5);
        c.pick(1, 1, 2, 10, T0);
        assert_eq!(c.next_deadline(1), Some(T0 + 1000));
        c.progress(1, &[2], T0 + 900).unwrap();
        assert_eq!(
            c.expire(1, T0 + 1000, &mut || 0.5),
            1,
            "seq 1 expired, seq 2 was extended"
        );
        let retry = c.take_effects().retries[0];
        assert_eq!((retry.seq, retry.due_ms), (1, T0 + 1100));
        assert_eq!(
            c.progress(1, &[1], T0 + 1000),
            Err(NotDelivered(1)),
            "no longer in flight"
        );
        assert_eq!(c.expire(1, T0 + 1900, &mut || 0.5), 1);
    }

    #[test]
    fn term_dead_letters_at_once_with_the_reason() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 5);
        c.pick(1, 1, 2, 10, T0);
        c.term(1, 2, Some("bad input".into())).unwrap();
        let dead = c.take_effects().dead;
        assert_eq!(dead[0].reason, DeadReason::Term);
        assert_eq!(dead[0].detail.as_deref(), Some("bad input"));
        assert_eq!(c.term(1, 2, None), Err(NotDelivered(2)));
        c.detach(1);
        c.attach(2, 5);
        assert_eq!(
            seqs(&c.pick(2, 1, 2, 10, T0)),
            vec![1],
            "the termed seq is gone"
        );
    }

    #[test]
    fn a_client_that_keeps_dying_uses_up_its_attempts() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        for sub in 1..=3 {
            c.attach(sub, 5);
            assert_eq!(
                c.pick(sub, 1, 1, 10, T0).deliveries[0].attempt,
                u32::try_from(sub).unwrap()
            );
            c.detach(sub);
        }
        c.attach(4, 5);
        assert!(c.pick(4, 1, 1, 10, T0).deliveries.is_empty());
        assert_eq!(c.take_effects().dead[0].reason, DeadReason::MaxDeliver);
    }

    #[test]
    fn requeue_brings_a_dead_letter_back_with_attempt_one() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 5);
        c.pick(1, 1, 3, 10, T0);
        c.term(1, 1, None).unwrap();
        c.ack(1, &[2, 3]).unwrap();
        assert_eq!(c.floor(), 3);
        c.requeue(1);
        let p = c.pick(1, 1, 3, 10, T0);
        assert_eq!(p.deliveries, vec![Pick { seq: 1, attempt: 1 }]);
        let record = c.record();
        assert_eq!(record.requeued, vec![1], "survives a restart until acked");
        c.ack(1, &[1]).unwrap();
        assert!(c.record().requeued.is_empty());
    }

    #[test]
    fn scheduled_retries_survive_a_restart_and_fire_when_due() {
        let mut c = consumer(ConsumerMode::Fanout, 0);
        c.attach(1, 5);
        c.pick(1, 1, 2, 10, T0);
        c.nack(1, 1, Some(500), T0, 0.5).unwrap();
        let record = c.record();
        let mut c = ConsumerState::from_record(ConsumerMode::Fanout, policy(), &record);
        c.attach(2, 5);
        assert_eq!(
            seqs(&c.pick(2, 1, 2, 10, T0 + 10)),
            vec![2],
            "1 waits for its retry"
        );
        let p = c.pick(2, 1, 2, 10, T0 + 500);
        assert_eq!(p.deliveries, vec![Pick { seq: 1, attempt: 2 }]);
    }

    #[test]
    fn a_full_retry_queue_dead_letters_instead_of_dropping() {
        let mut c = ConsumerState::new(
            ConsumerMode::Fanout,
            RetryPolicy {
                max_scheduled: 1,
                ..policy()
            },
            0,
        );
        c.attach(1, 5);
        c.pick(1, 1, 2, 10, T0);
        c.nack(1, 1, None, T0, 0.5).unwrap();
        c.nack(1, 2, None, T0, 0.5).unwrap();
        let effects = c.take_effects();
        assert_eq!(effects.retries.len(), 1);
        assert_eq!(effects.dead[0].reason, DeadReason::RetryQueueFull);
    }
}
