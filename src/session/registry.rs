//! Every open connection, whatever its transport: what the admin API lists
//! and kicks, and what presence reads.
//!
//! A session registers itself when it starts and is removed when it ends
//! (the [`Registration`] guard). Operators reach a session through its
//! control queue: a kick closes it with a code, and ending a subscription
//! (after its channel was purged or deleted) sends the client
//! `unsubscribed` with `id: 0`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use crate::metrics;

/// What an operator (or the broker) asks of a live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close the connection with this code and reason.
    Kick { code: u16, reason: String },
    /// End the subscription to this channel (it was purged or deleted).
    EndSubscription { channel: String },
}

/// One open connection as the registry shows it.
#[derive(Debug)]
pub struct ConnectionHandle {
    /// Registry order, the paging cursor of connection lists.
    pub order: u64,
    pub id: String,
    pub remote: Option<SocketAddr>,
    pub transport: &'static str,
    /// When it connected, ms since the Unix epoch.
    pub connected_ms: u64,
    /// Frames received from the client.
    pub msgs_in: AtomicU64,
    /// Messages delivered to the client.
    pub msgs_out: AtomicU64,
    user: Mutex<Option<String>>,
    /// Subscribed channels, with the time each subscription started.
    subscriptions: Mutex<BTreeMap<String, u64>>,
    control: mpsc::UnboundedSender<Control>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConnectionHandle {
    /// The authenticated user, if any.
    pub fn user(&self) -> Option<String> {
        lock(&self.user).clone()
    }

    pub(crate) fn set_user(&self, user: Option<String>) {
        *lock(&self.user) = user;
    }

    /// Subscribed channel names, sorted.
    pub fn subscriptions(&self) -> Vec<String> {
        lock(&self.subscriptions).keys().cloned().collect()
    }

    /// When the subscription to `channel` started, if there is one.
    pub fn subscribed_since(&self, channel: &str) -> Option<u64> {
        lock(&self.subscriptions).get(channel).copied()
    }

    pub(crate) fn subscribed(&self, channel: &str, since_ms: u64) {
        lock(&self.subscriptions).insert(channel.to_owned(), since_ms);
    }

    pub(crate) fn unsubscribed(&self, channel: &str) {
        lock(&self.subscriptions).remove(channel);
    }

    /// Asks the session to act; false when it has already ended.
    pub fn send(&self, control: Control) -> bool {
        self.control.send(control).is_ok()
    }

    pub(crate) fn delivered(&self, messages: usize) {
        self.msgs_out
            .fetch_add(u64::try_from(messages).unwrap_or(0), Ordering::Relaxed);
    }
}

/// The registry of open connections.
#[derive(Debug, Default)]
pub struct Connections {
    by_order: Mutex<BTreeMap<u64, Arc<ConnectionHandle>>>,
    next_order: AtomicU64,
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Connections>,
    handle: Arc<ConnectionHandle>,
}

impl Registration {
    pub fn handle(&self) -> &Arc<ConnectionHandle> {
        &self.handle
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry.by_order).remove(&self.handle.order);
        metrics::CONNECTIONS.dec();
    }
}

impl Connections {
    /// Adds a connection; it stays listed while the guard lives.
    pub fn register(
        self: &Arc<Self>,
        id: String,
        remote: Option<SocketAddr>,
        transport: &'static str,
        connected_ms: u64,
        control: mpsc::UnboundedSender<Control>,
    ) -> Registration {
        let order = self.next_order.fetch_add(1, Ordering::Relaxed) + 1;
        let handle = Arc::new(ConnectionHandle {
            order,
            id,
            remote,
            transport,
            connected_ms,
            msgs_in: AtomicU64::new(0),
            msgs_out: AtomicU64::new(0),
            user: Mutex::new(None),
            subscriptions: Mutex::new(BTreeMap::new()),
            control,
        });
        lock(&self.by_order).insert(order, Arc::clone(&handle));
        metrics::CONNECTIONS.inc();
        metrics::CONNECTIONS_OPENED.inc();
        Registration {
            registry: Arc::clone(self),
            handle,
        }
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        lock(&self.by_order).len()
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` connections registered after `after` (a previous
    /// page's last `order`), oldest first.
    pub fn page(&self, after: u64, limit: usize) -> Vec<Arc<ConnectionHandle>> {
        lock(&self.by_order)
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, h)| Arc::clone(h))
            .collect()
    }

    /// The connection with this id.
    pub fn get(&self, id: &str) -> Option<Arc<ConnectionHandle>> {
        lock(&self.by_order).values().find(|h| h.id == id).cloned()
    }

    /// Connections subscribed to `channel`, oldest first.
    pub fn subscribed_to(&self, channel: &str) -> Vec<Arc<ConnectionHandle>> {
        let all: Vec<_> = lock(&self.by_order).values().cloned().collect();
        all.into_iter()
            .filter(|h| h.subscribed_since(channel).is_some())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_lists_pages_and_removes_on_drop() {
        let registry = Arc::new(Connections::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let guards: Vec<_> = (0..5)
            .map(|i| registry.register(format!("c{i}"), None, "ws", 0, tx.clone()))
            .collect();
        assert_eq!(registry.len(), 5);
        let first = registry.page(0, 2);
        assert_eq!(
            first.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            ["c0", "c1"]
        );
        let rest = registry.page(first[1].order, 10);
        assert_eq!(rest.len(), 3);
        guards[1].handle().subscribed("chat:a", 7);
        assert_eq!(registry.subscribed_to("chat:a")[0].id, "c1");
        assert!(registry.get("c3").unwrap().send(Control::Kick {
            code: 4008,
            reason: "x".into()
        }));
        assert!(matches!(
            rx.try_recv(),
            Ok(Control::Kick { code: 4008, .. })
        ));
        drop(guards);
        assert!(registry.is_empty());
        assert!(registry.get("c3").is_none());
    }
}
