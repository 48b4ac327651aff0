//! The acknowledgement state of one consumer, free of I/O.
//!
//! A consumer is the server-side cursor of one reader of one channel. Its
//! durable part is the acked floor, the acked seqs above it and the delivery
//! count of each delivered, unacked seq. Live subscriptions attach to it:
//!
//! - *fanout* (a named consumer or a user): every attached subscription reads
//!   every message with its own cursor (a user's two tabs both see a chat);
//!   an ack from any of them acks the seq for the consumer.
//! - *queue* (a group): attached subscriptions share one cursor, so each
//!   message goes to one of them.
//!
//! Invariants: a seq is delivered at most once at a time per subscription; a
//! subscription never has more than its `max_in_flight` seqs unacked; seqs a
//! subscription gave back (it left, or nacked) are delivered again, lowest
//! first, before anything new; after all subscriptions leave, the next one
//! starts at `floor + 1` and gets every unacked seq again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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

/// An ack that names a seq this subscription was never given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seq {0} was not delivered on this subscription")]
pub struct NotDelivered(pub u64);

#[derive(Debug)]
struct Window {
    max_in_flight: usize,
    in_flight: BTreeSet<u64>,
    /// Next seq never looked at (fanout mode only).
    cursor: u64,
}

/// The acknowledgement state machine of one consumer.
#[derive(Debug)]
pub struct ConsumerState {
    mode: ConsumerMode,
    floor: u64,
    acked: BTreeSet<u64>,
    attempts: HashMap<u64, u32>,
    /// Delivered seqs given back, waiting to go out again.
    redeliver: BTreeSet<u64>,
    /// Next seq never looked at (queue mode).
    cursor: u64,
    windows: BTreeMap<SubscriptionId, Window>,
    /// Changed since the last [`ConsumerState::record`].
    dirty: bool,
}

impl ConsumerState {
    /// A consumer whose every seq ≤ `floor` counts as acked.
    pub fn new(mode: ConsumerMode, floor: u64) -> Self {
        Self {
            mode,
            floor,
            acked: BTreeSet::new(),
            attempts: HashMap::new(),
            redeliver: BTreeSet::new(),
            cursor: floor + 1,
            windows: BTreeMap::new(),
            dirty: true,
        }
    }

    /// A consumer restored from its stored record.
    pub fn from_record(mode: ConsumerMode, record: &ConsumerRecord) -> Self {
        let mut state = Self::new(mode, record.floor);
        state.acked = record
            .acked
            .iter()
            .copied()
            .filter(|s| *s > record.floor)
            .collect();
        state.attempts = record
            .attempts
            .iter()
            .copied()
            .filter(|(s, _)| *s > record.floor)
            .collect();
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

    /// Subscriptions attached now.
    pub fn subscriptions(&self) -> usize {
        self.windows.len()
    }

    /// Delivered seqs not yet acked, across subscriptions.
    pub fn unacked(&self) -> usize {
        self.attempts.len()
    }

    /// Forgets all progress: every seq ≤ `floor` counts as acked, nothing above.
    pub fn reset(&mut self, floor: u64) {
        self.floor = floor;
        self.acked.clear();
        self.attempts.clear();
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
        }
        let window = Window {
            max_in_flight: usize::try_from(max_in_flight.max(1)).unwrap_or(usize::MAX),
            in_flight: BTreeSet::new(),
            cursor: self.floor + 1,
        };
        self.windows.insert(id, window);
    }

    /// Detaches a subscription; what it had in flight is given back.
    pub fn detach(&mut self, id: SubscriptionId) {
        if let Some(window) = self.windows.remove(&id) {
            self.redeliver.extend(window.in_flight);
        }
        if self.windows.is_empty() {
            self.redeliver.clear();
            self.cursor = self.floor + 1;
        }
    }

    /// Chooses up to `limit` deliveries for subscription `id`, given the
    /// channel's stored range `first_seq..=head`.
    pub fn pick(&mut self, id: SubscriptionId, first_seq: u64, head: u64, limit: usize) -> Picked {
        let mut picked = Picked::default();
        if first_seq > self.floor + 1 {
            let from = self.floor + 1;
            let lost = self.skip_below(first_seq);
            if lost {
                picked.gap = Some((from, first_seq - 1));
            }
        }
        let mode = self.mode;
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
        while picked.deliveries.len() < limit && window.in_flight.len() < window.max_in_flight {
            let again = self
                .redeliver
                .iter()
                .copied()
                .find(|seq| !window.in_flight.contains(seq));
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
                    if seq <= self.floor || self.acked.contains(&seq) {
                        continue;
                    }
                    seq
                }
            };
            let attempt = self.attempts.entry(seq).or_insert(0);
            *attempt = attempt.saturating_add(1);
            window.in_flight.insert(seq);
            picked.deliveries.push(Pick {
                seq,
                attempt: *attempt,
            });
            self.dirty = true;
        }
        picked
    }

    /// Seqs below `first_seq` are gone: count them as acked. True when any of
    /// them had not been acked (a real loss).
    fn skip_below(&mut self, first_seq: u64) -> bool {
        let below = first_seq - 1;
        let unacked =
            below - self.floor - u64::try_from(self.acked.range(..=below).count()).unwrap_or(0);
        self.floor = below;
        self.acked = self.acked.split_off(&first_seq);
        self.attempts.retain(|seq, _| *seq >= first_seq);
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
            let done = seq <= self.floor || self.acked.contains(&seq);
            let delivered = window.is_some_and(|w| w.in_flight.contains(&seq))
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
        let seqs: Vec<u64> = window.in_flight.range(..=upto).copied().collect();
        if seqs.is_empty() && upto > self.floor && !self.acked.contains(&upto) {
            return Err(NotDelivered(upto));
        }
        for &seq in &seqs {
            self.mark_acked(seq);
        }
        Ok(seqs.len())
    }

    /// Gives `seq` back for redelivery (a `nack`).
    pub fn release(&mut self, id: SubscriptionId, seq: u64) -> Result<(), NotDelivered> {
        let window = self.windows.get_mut(&id).ok_or(NotDelivered(seq))?;
        if !window.in_flight.remove(&seq) {
            return Err(NotDelivered(seq));
        }
        self.redeliver.insert(seq);
        Ok(())
    }

    /// Whether `seq` is in flight on subscription `id`.
    pub fn is_in_flight(&self, id: SubscriptionId, seq: u64) -> bool {
        self.windows
            .get(&id)
            .is_some_and(|w| w.in_flight.contains(&seq))
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
        if seq <= self.floor {
            return;
        }
        self.acked.insert(seq);
        while self.acked.first() == Some(&(self.floor + 1)) {
            self.acked.pop_first();
            self.floor += 1;
        }
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(p: &Picked) -> Vec<u64> {
        p.deliveries.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn window_bounds_in_flight_and_acks_open_it() {
        let mut c = ConsumerState::new(ConsumerMode::Fanout, 0);
        c.attach(1, 3);
        assert_eq!(seqs(&c.pick(1, 1, 10, 100)), vec![1, 2, 3]);
        assert!(c.pick(1, 1, 10, 100).deliveries.is_empty());
        c.ack(1, &[2]).unwrap();
        assert_eq!(seqs(&c.pick(1, 1, 10, 100)), vec![4]);
        c.ack(1, &[1, 3, 4]).unwrap();
        assert_eq!(c.floor(), 4);
    }

    #[test]
    fn unacked_come_back_after_reattach_with_higher_attempt() {
        let mut c = ConsumerState::new(ConsumerMode::Fanout, 0);
        c.attach(1, 100);
        c.pick(1, 1, 6, 100);
        c.ack(1, &[1, 3, 5]).unwrap();
        c.detach(1);
        let record = c.record();
        let mut c = ConsumerState::from_record(ConsumerMode::Fanout, &record);
        c.attach(2, 100);
        let p = c.pick(2, 1, 6, 100);
        assert_eq!(seqs(&p), vec![2, 4, 6]);
        assert!(p.deliveries.iter().all(|d| d.attempt == 2));
    }

    #[test]
    fn queue_mode_shares_the_cursor_and_releases_on_detach() {
        let mut c = ConsumerState::new(ConsumerMode::Queue, 0);
        c.attach(1, 2);
        c.attach(2, 2);
        assert_eq!(seqs(&c.pick(1, 1, 10, 100)), vec![1, 2]);
        assert_eq!(seqs(&c.pick(2, 1, 10, 100)), vec![3, 4]);
        c.detach(1);
        c.ack(2, &[3, 4]).unwrap();
        assert_eq!(seqs(&c.pick(2, 1, 10, 100)), vec![1, 2], "given back first");
    }

    #[test]
    fn fanout_subscriptions_each_see_everything() {
        let mut c = ConsumerState::new(ConsumerMode::Fanout, 0);
        c.attach(1, 10);
        c.attach(2, 10);
        assert_eq!(seqs(&c.pick(1, 1, 3, 100)), vec![1, 2, 3]);
        assert_eq!(seqs(&c.pick(2, 1, 3, 100)), vec![1, 2, 3]);
        c.ack(2, &[1, 2, 3]).unwrap();
        assert_eq!(c.in_flight(1), 0, "an ack from one tab acks for both");
    }

    #[test]
    fn acks_for_seqs_never_delivered_are_refused_whole() {
        let mut c = ConsumerState::new(ConsumerMode::Fanout, 0);
        c.attach(1, 10);
        c.pick(1, 1, 2, 100);
        assert_eq!(c.ack(1, &[1, 7]), Err(NotDelivered(7)));
        assert_eq!(c.floor(), 0, "nothing acked");
        assert_eq!(c.ack_upto(1, 9), Ok(2));
        assert_eq!(c.ack(1, &[1, 2]), Ok(()), "acking twice is fine");
        assert_eq!(c.ack_upto(1, 9), Err(NotDelivered(9)));
    }

    #[test]
    fn release_redelivers_before_new_messages() {
        let mut c = ConsumerState::new(ConsumerMode::Fanout, 0);
        c.attach(1, 1);
        assert_eq!(seqs(&c.pick(1, 1, 5, 10)), vec![1]);
        c.release(1, 1).unwrap();
        let p = c.pick(1, 1, 5, 10);
        assert_eq!(p.deliveries, vec![Pick { seq: 1, attempt: 2 }]);
    }

    #[test]
    fn retention_loss_is_a_gap_and_acked_holes_are_not() {
        let mut c = ConsumerState::new(ConsumerMode::Fanout, 0);
        c.attach(1, 10);
        let p = c.pick(1, 5, 8, 10);
        assert_eq!(p.gap, Some((1, 4)));
        assert_eq!(seqs(&p), vec![5, 6, 7, 8]);
        c.ack(1, &[5, 6, 7, 8]).unwrap();
        let p = c.pick(1, 9, 8, 10);
        assert_eq!(p.gap, None, "everything below was acked");
    }

    #[test]
    fn reset_moves_the_floor() {
        let mut c = ConsumerState::new(ConsumerMode::Fanout, 10);
        c.attach(1, 10);
        c.reset(2);
        assert_eq!(seqs(&c.pick(1, 1, 4, 10)), vec![3, 4]);
    }
}
