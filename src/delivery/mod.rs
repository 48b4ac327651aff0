//! Consumers: who has read and acked what. The state machine is in
//! [`consumer`] (no I/O); [`Consumer`] shares one between the subscriptions
//! attached to it and wakes them when its window opens.

mod consumer;

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

pub use consumer::{ConsumerMode, ConsumerState, NotDelivered, Pick, Picked, SubscriptionId};

use crate::broker::Channel;

/// One consumer of one channel, shared by its live subscriptions.
#[derive(Debug)]
pub struct Consumer {
    /// `g/<group>`, `c/<consumer>`, `u/<user>` or `a/<subscription>`.
    key: String,
    channel: Arc<Channel>,
    /// Saved to the store (durable channel, named consumer).
    persistent: bool,
    state: Mutex<ConsumerState>,
    /// Woken on acks, nacks and detaches: a window opened or seqs came back.
    notify: Notify,
}

impl Consumer {
    pub(crate) fn new(
        key: String,
        channel: Arc<Channel>,
        persistent: bool,
        state: ConsumerState,
    ) -> Self {
        Self {
            key,
            channel,
            persistent,
            state: Mutex::new(state),
            notify: Notify::new(),
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
        self.persistent
    }

    /// The state machine, behind a short-held lock (never across an await).
    pub fn lock(&self) -> MutexGuard<'_, ConsumerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
