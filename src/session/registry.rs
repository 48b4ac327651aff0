//! Every open connection, whatever its transport: what the admin API lists
//! and kicks, and what presence reads.
//!
//! A session registers itself when it starts and is removed when it ends
//! (the [`Registration`] guard). Operators reach a session through its
//! control queue: a kick closes it with a code, and ending a subscription
//! (after its channel was purged or deleted) sends the client
//! `unsubscribed` with `id: 0`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::metrics;
use crate::protocol::{PresenceEvent, PresenceMember, ServerFrame};

/// What an operator (or the broker) asks of a live session.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Close the connection with this code and reason.
    Kick { code: u16, reason: String },
    /// End the subscription to this channel (it was purged or deleted).
    EndSubscription { channel: String },
    /// Send this frame (a presence event).
    Send(Box<ServerFrame>),
    /// The transport can deliver nothing more (it cut a slow consumer, or
    /// its socket failed): end the session.
    TransportGone,
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
    /// The parts that change, behind one lock.
    state: Mutex<HandleState>,
    /// Wakes the session when a request is queued in `state.control`.
    wake: tokio::sync::Notify,
    /// The session has ended: nothing reads `control` any more.
    ended: std::sync::atomic::AtomicBool,
}

/// What a connection's handle holds behind its lock.
#[derive(Debug, Default)]
struct HandleState {
    user: Option<String>,
    /// `connect.client`, for presence.
    client: Option<String>,
    /// Subscribed channels, with the time each subscription started.
    subscriptions: BTreeMap<String, u64>,
    /// Requests for the session. (A plain queue: a tokio channel would
    /// allocate a block of 32 slots up front for every idle connection.)
    control: std::collections::VecDeque<Control>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConnectionHandle {
    /// The authenticated user, if any.
    pub fn user(&self) -> Option<String> {
        lock(&self.state).user.clone()
    }

    pub(crate) fn set_user(&self, user: Option<String>, client: Option<String>) {
        let mut state = lock(&self.state);
        state.user = user;
        state.client = client;
    }

    /// Subscribed channel names, sorted.
    pub fn subscriptions(&self) -> Vec<String> {
        lock(&self.state).subscriptions.keys().cloned().collect()
    }

    /// When the subscription to `channel` started, if there is one.
    pub fn subscribed_since(&self, channel: &str) -> Option<u64> {
        lock(&self.state).subscriptions.get(channel).copied()
    }

    /// The session is closing (a kick): it takes no more requests, and the
    /// registry no longer finds it by id, though it is listed until gone.
    pub(crate) fn closing(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// Asks the session to act; false when it has already ended.
    pub fn send(&self, control: Control) -> bool {
        if self.ended.load(Ordering::Acquire) {
            return false;
        }
        lock(&self.state).control.push_back(control);
        self.wake.notify_one();
        true
    }

    /// The next request for the session; waits for one.
    pub(crate) async fn next_control(&self) -> Control {
        loop {
            let notified = self.wake.notified();
            if let Some(control) = lock(&self.state).control.pop_front() {
                return control;
            }
            notified.await;
        }
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
    /// Channel → the connections subscribed to it (by order).
    by_channel: Mutex<HashMap<String, BTreeSet<u64>>>,
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

    /// Records a subscription. True when its user (if any) was not
    /// subscribed to `channel` on another connection: the user joined.
    pub fn subscribed(&self, channel: &str, since_ms: u64) -> bool {
        lock(&self.handle.state)
            .subscriptions
            .insert(channel.to_owned(), since_ms);
        let mut by_channel = lock(&self.registry.by_channel);
        let members = by_channel.entry(channel.to_owned()).or_default();
        members.insert(self.handle.order);
        let members: Vec<u64> = members.iter().copied().collect();
        drop(by_channel);
        self.alone(&members)
    }

    /// Forgets a subscription. True when its user (if any) has no other
    /// connection subscribed to `channel`: the user left.
    pub fn unsubscribed(&self, channel: &str) -> bool {
        if lock(&self.handle.state)
            .subscriptions
            .remove(channel)
            .is_none()
        {
            return false;
        }
        let members: Vec<u64> = {
            let mut by_channel = lock(&self.registry.by_channel);
            let Some(members) = by_channel.get_mut(channel) else {
                return false;
            };
            members.remove(&self.handle.order);
            let left: Vec<u64> = members.iter().copied().collect();
            if left.is_empty() {
                by_channel.remove(channel);
            }
            left
        };
        self.alone(&members)
    }

    /// Whether no connection in `members` other than this one has this
    /// connection's user (false for anonymous connections).
    fn alone(&self, members: &[u64]) -> bool {
        let Some(user) = self.handle.user() else {
            return false;
        };
        let by_order = lock(&self.registry.by_order);
        !members
            .iter()
            .filter(|o| **o != self.handle.order)
            .filter_map(|o| by_order.get(o))
            .any(|h| h.user().as_deref() == Some(user.as_str()))
    }

    /// Sends `join` or `leave` of this connection's user to the other
    /// connections subscribed to `channel`.
    pub fn announce(&self, channel: &str, joined: bool) {
        let Some(user) = self.handle.user() else {
            return;
        };
        let event = PresenceEvent {
            channel: channel.to_owned(),
            user,
        };
        let frame = if joined {
            ServerFrame::Join(event)
        } else {
            ServerFrame::Leave(event)
        };
        for other in self.registry.subscribed_to(channel) {
            if other.order != self.handle.order {
                other.send(Control::Send(Box::new(frame.clone())));
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.handle.ended.store(true, Ordering::Release);
        let channels: Vec<String> = {
            let mut state = lock(&self.handle.state);
            state.control.clear();
            state.subscriptions.keys().cloned().collect()
        };
        {
            let mut by_channel = lock(&self.registry.by_channel);
            for channel in channels {
                if let Some(members) = by_channel.get_mut(&channel) {
                    members.remove(&self.handle.order);
                    if members.is_empty() {
                        by_channel.remove(&channel);
                    }
                }
            }
        }
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
            state: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            ended: std::sync::atomic::AtomicBool::new(false),
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

    /// The connection with this id, unless it is closing.
    pub fn get(&self, id: &str) -> Option<Arc<ConnectionHandle>> {
        lock(&self.by_order)
            .values()
            .find(|h| h.id == id && !h.ended.load(Ordering::Acquire))
            .cloned()
    }

    /// Connections subscribed to `channel`, oldest first.
    pub fn subscribed_to(&self, channel: &str) -> Vec<Arc<ConnectionHandle>> {
        let members: Vec<u64> = lock(&self.by_channel)
            .get(channel)
            .map(|m| m.iter().copied().collect())
            .unwrap_or_default();
        let by_order = lock(&self.by_order);
        members
            .iter()
            .filter_map(|o| by_order.get(o).cloned())
            .collect()
    }

    /// The users subscribed to `channel`, with how many of their
    /// connections are, by user id (anonymous connections are not members).
    pub fn presence(&self, channel: &str) -> Vec<PresenceMember> {
        let mut members: BTreeMap<String, PresenceMember> = BTreeMap::new();
        for handle in self.subscribed_to(channel) {
            let Some(user) = handle.user() else { continue };
            let member = members
                .entry(user.clone())
                .or_insert_with(|| PresenceMember {
                    user,
                    connections: 0,
                    client: None,
                });
            member.connections += 1;
            if member.client.is_none() {
                member.client = lock(&handle.state).client.clone();
            }
        }
        members.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_lists_pages_and_removes_on_drop() {
        let registry = Arc::new(Connections::default());
        let guards: Vec<_> = (0..5)
            .map(|i| registry.register(format!("c{i}"), None, "ws", 0))
            .collect();
        assert_eq!(registry.len(), 5);
        let first = registry.page(0, 2);
        assert_eq!(
            first.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            ["c0", "c1"]
        );
        let rest = registry.page(first[1].order, 10);
        assert_eq!(rest.len(), 3);
        guards[1].subscribed("chat:a", 7);
        assert_eq!(registry.subscribed_to("chat:a")[0].id, "c1");
        assert!(registry.get("c3").unwrap().send(Control::Kick {
            code: 4008,
            reason: "x".into()
        }));
        assert!(matches!(
            lock(&guards[3].handle().state).control.pop_front(),
            Some(Control::Kick { code: 4008, .. })
        ));
        let ended = Arc::clone(guards[3].handle());
        drop(guards);
        assert!(
            !ended.send(Control::Kick {
                code: 4008,
                reason: "x".into()
            }),
            "an ended session takes no more requests"
        );
        assert!(registry.is_empty());
        assert!(registry.get("c3").is_none());
    }
}
