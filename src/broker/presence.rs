//! Presence across the nodes of a cluster.
//!
//! Alone (sled), presence is the registry of this node's connections and
//! nothing here runs. In a cluster (Redis):
//!
//! - **Each node publishes its own presence.** A connection of a user that
//!   subscribes to or leaves a channel of a presence namespace marks the
//!   channel changed ([`changed`]); the node's presence task ([`run`])
//!   gathers the changes of [`DEBOUNCE`] and writes each changed channel's
//!   members (from the registry) to the node's hash in Redis, or removes
//!   the channel's field when it has none. The hash lives [`PRESENCE_TTL`]
//!   and the task renews it every [`NODE_BEAT`]; when the task finds it gone
//!   (expired after a long pause, or removed by a node that thought this
//!   one dead) it writes every channel it holds again.
//! - **A presence query** ([`members`]) merges this node's registry with the
//!   hashes of the other *live* nodes (`live_nodes`: their membership lease
//!   has not run out), summing connections per user. A dead node's members
//!   therefore leave every query as soon as its lease ends.
//! - **Joins and leaves** travel as events `presence join|leave <node>
//!   <channel> <user>` on the store's events channel, published after the
//!   hash write they go with. A node announces its own events to its own
//!   connections at once (the session does) and ignores them when they come
//!   back; another node sends `join` / `leave` frames to its subscribers of
//!   the channel unless the user has a connection subscribed to it there.
//!   So the events describe a user's presence *per node*: a user connected
//!   through two nodes can be announced as joining once per node, and as
//!   leaving one node while it is still on another.
//! - **A dead node** ([`node_gone`], run by the one node whose heartbeat
//!   removed it from the membership): its hash outlives its lease
//!   ([`PRESENCE_TTL`] is twice [`NODE_LEASE`]), so that node reads it,
//!   publishes a leave (in the dead node's name) for each member that no
//!   live node has in that channel, and deletes the hash. Should two nodes
//!   do it (a node that was declared dead and came back, a retry after a
//!   failure), a leave can be announced twice; if the hash is already gone,
//!   nothing is announced (the members still leave every query).
//! - **A graceful stop** waits (a bounded time) for its connections to
//!   close, sends their leaves, then deletes its hash.
//!
//! Nothing here is kept per connection: the pending changes are per
//! channel, and the events queue is bounded ([`MAX_QUEUED_EVENTS`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cluster::{NODE_BEAT, NODE_LEASE};
use super::{Broker, BrokerError, lock};
use crate::protocol::{ChannelName, PresenceEvent, PresenceMember, ServerFrame};
use crate::session::registry::Control;
use crate::storage::StoreError;
use crate::storage::redis::RedisStore;

/// How long a node's presence hash lives without renewal: twice the
/// membership lease, so that the node that notices the death (one beat
/// after the lease ends, at worst) can still read it.
pub const PRESENCE_TTL: Duration = NODE_LEASE.saturating_mul(2);

/// How long the presence task gathers changes before it writes them: a
/// burst of subscribes makes one write per channel, not one per subscribe.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Join and leave events waiting for the presence task, at most; more are
/// dropped (with a warning): the hashes still converge, only the frames
/// are lost.
pub const MAX_QUEUED_EVENTS: usize = 10_000;

/// Departed nodes waiting to be cleared, at most.
const MAX_QUEUED_DEPARTED: usize = 64;

/// What changed on this node since the presence task last wrote to Redis.
/// One per broker; empty (and unused) on sled.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pending: Mutex<Pending>,
    /// Wakes the presence task when something is pending.
    wake: Notify,
}

#[derive(Debug, Default)]
struct Pending {
    /// Channels whose members on this node changed.
    channels: HashSet<String>,
    /// Events to publish, oldest first.
    events: Vec<String>,
    /// Events dropped because `events` was full.
    dropped: u64,
    /// Nodes whose presence is to be cleared.
    departed: Vec<String>,
}

/// A member as a node's hash stores it (the wire's `PresenceMember` is not
/// a storage record).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct MemberRecord {
    user: String,
    connections: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client: Option<String>,
}

fn encode(members: &[PresenceMember]) -> String {
    let records: Vec<MemberRecord> = members
        .iter()
        .map(|m| MemberRecord {
            user: m.user.clone(),
            connections: m.connections,
            client: m.client.clone(),
        })
        .collect();
    serde_json::to_string(&records).unwrap_or_else(|_| "[]".to_owned())
}

fn decode(json: &str) -> Vec<MemberRecord> {
    serde_json::from_str(json).unwrap_or_else(|e| {
        tracing::debug!(error = %e, "ignoring an unreadable presence record");
        Vec::new()
    })
}

/// The event payload, as published (`presence ` included).
fn event(joined: bool, node: &str, channel: &str, user: &str) -> String {
    let kind = if joined { "join" } else { "leave" };
    format!("presence {kind} {node} {channel} {user}")
}

/// `local` (this node's registry) with the other nodes' members added:
/// connections summed per user; the client is this node's when it has
/// one, else the first node's that has one. Ordered by user id.
fn merge(
    local: Vec<PresenceMember>,
    remote: impl IntoIterator<Item = Vec<MemberRecord>>,
) -> Vec<PresenceMember> {
    let mut members: BTreeMap<String, PresenceMember> =
        local.into_iter().map(|m| (m.user.clone(), m)).collect();
    for record in remote.into_iter().flatten() {
        let member = members
            .entry(record.user.clone())
            .or_insert_with(|| PresenceMember {
                user: record.user,
                connections: 0,
                client: None,
            });
        member.connections = member.connections.saturating_add(record.connections);
        if member.client.is_none() {
            member.client = record.client;
        }
    }
    members.into_values().collect()
}

fn announces(broker: &Broker, channel: &str) -> bool {
    ChannelName::new(channel).is_ok_and(|name| {
        let policy = broker.config().policy(name.namespace());
        policy.presence && policy.join_leave
    })
}

/// A connection of `user` subscribed to `channel` (a presence namespace)
/// or left it; `announce` is `Some(joined)` when that was the user's first
/// or last connection in it and the namespace has `join_leave`. Queues the
/// channel's write and the event for the presence task. Cheap, never
/// blocks; does nothing on sled.
pub(crate) fn changed(broker: &Broker, channel: &str, user: &str, announce: Option<bool>) {
    if broker.store.shared().is_none() {
        return;
    }
    let mut pending = lock(&broker.presence.pending);
    if !pending.channels.contains(channel) {
        pending.channels.insert(channel.to_owned());
    }
    if let Some(joined) = announce {
        if pending.events.len() < MAX_QUEUED_EVENTS {
            let event = event(joined, broker.node().id(), channel, user);
            pending.events.push(event);
        } else {
            pending.dropped += 1;
        }
    }
    drop(pending);
    broker.presence.wake.notify_one();
}

/// The members of `channel` on every live node (this one alone on sled, or
/// when the namespace has no presence: nothing else is published then).
pub(crate) async fn members(
    broker: &Broker,
    channel: &ChannelName,
) -> Result<Vec<PresenceMember>, BrokerError> {
    let local = broker.connections().presence(channel.as_str());
    if broker.store.shared().is_none() || !broker.config().policy(channel.namespace()).presence {
        return Ok(local);
    }
    let store = Arc::clone(&broker.store);
    let (node, name) = (broker.node().id().to_owned(), channel.as_str().to_owned());
    let remote = tokio::task::spawn_blocking(move || {
        let Some(shared) = store.shared() else {
            return Ok(Vec::new());
        };
        let others = live_others(shared, &node, &node)?;
        let found = shared.presence_of(&others, std::slice::from_ref(&name))?;
        Ok::<_, StoreError>(
            found
                .into_iter()
                .filter_map(|mut fields| fields.pop().flatten())
                .collect::<Vec<String>>(),
        )
    })
    .await
    .map_err(|e| BrokerError::Internal(e.to_string()))??;
    Ok(merge(local, remote.iter().map(|json| decode(json))))
}

/// The live nodes other than `a` and `b`. Blocking.
fn live_others(shared: &RedisStore, a: &str, b: &str) -> Result<Vec<String>, StoreError> {
    Ok(shared
        .live_nodes()?
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| id != a && id != b)
        .collect())
}

/// A presence event from a node (`payload` after `presence `): `join` or
/// `leave`, the node it is about, the channel, the user. This node's own
/// events were announced here already.
pub(crate) fn on_event(broker: &Broker, payload: &str) {
    let mut parts = payload.splitn(4, ' ');
    let (Some(kind), Some(node), Some(channel), Some(user)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        tracing::debug!(payload, "malformed presence event");
        return;
    };
    let joined = match kind {
        "join" => true,
        "leave" => false,
        _ => {
            tracing::debug!(payload, "unknown presence event");
            return;
        }
    };
    if node == broker.node().id() || !announces(broker, channel) {
        return;
    }
    let subscribers = broker.connections().subscribed_to(channel);
    // The user is here too: for these subscribers it neither came nor went.
    if subscribers
        .iter()
        .any(|c| c.user().as_deref() == Some(user))
    {
        return;
    }
    let event = PresenceEvent {
        channel: channel.to_owned(),
        user: user.to_owned(),
    };
    let frame = if joined {
        ServerFrame::Join(event)
    } else {
        ServerFrame::Leave(event)
    };
    for subscriber in subscribers {
        subscriber.send(Control::Send(Box::new(frame.clone())));
    }
}

/// Node `id` left the cluster (its lease ran out): the presence task reads
/// its hash, announces its members' leaves and deletes it.
pub(crate) fn node_gone(broker: &Broker, id: &str) {
    // A node that sees its own lease run out (it was paused) is not gone.
    if broker.store.shared().is_none() || id == broker.node().id() {
        return;
    }
    let mut pending = lock(&broker.presence.pending);
    if pending.departed.len() < MAX_QUEUED_DEPARTED && !pending.departed.iter().any(|d| d == id) {
        pending.departed.push(id.to_owned());
    }
    drop(pending);
    broker.presence.wake.notify_one();
}

/// Publishes the leaves of departed node `id`'s members that no live node
/// has in the same channel (in `id`'s name, so every node, this one
/// included, announces them to its subscribers), then deletes its hash.
/// Blocking.
fn clear_departed(broker: &Broker, shared: &RedisStore, id: &str) -> Result<(), StoreError> {
    let held = shared.presence_node(id)?;
    if held.is_empty() {
        return Ok(());
    }
    let others = live_others(shared, id, broker.node().id())?;
    let held: Vec<(String, String)> = held
        .into_iter()
        .filter(|(channel, _)| announces(broker, channel))
        .collect();
    let channels: Vec<String> = held.iter().map(|(channel, _)| channel.clone()).collect();
    let remote = shared.presence_of(&others, &channels)?;
    let mut events = Vec::new();
    for (i, (channel, json)) in held.iter().enumerate() {
        let mut present: HashSet<String> = broker
            .connections()
            .presence(channel)
            .into_iter()
            .map(|m| m.user)
            .collect();
        for fields in &remote {
            if let Some(Some(json)) = fields.get(i) {
                present.extend(decode(json).into_iter().map(|m| m.user));
            }
        }
        events.extend(
            decode(json)
                .into_iter()
                .filter(|m| !present.contains(&m.user))
                .map(|m| event(false, id, channel, &m.user)),
        );
    }
    tracing::info!(node = %id, leaves = events.len(), "clearing a departed node's presence");
    shared.presence_forget(id, &events)
}

/// The presence task of a cluster node: writes this node's presence
/// changes, renews its hash every [`NODE_BEAT`], clears departed nodes;
/// at `cancel`, waits for the connections to close, writes their leaves
/// and deletes the hash. Returns at once on sled.
pub async fn run(broker: Arc<Broker>, cancel: CancellationToken) {
    if broker.store.shared().is_none() {
        return;
    }
    // The channels this node has a field for in its hash.
    let mut written = HashSet::new();
    let mut beat = tokio::time::interval(NODE_BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = broker.presence.wake.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = beat.tick() => {}
        }
        flush(&broker, &mut written).await;
    }
    // The sessions are closing (the same token stops them); their leaves
    // arrive as they go. Nothing signals the last one, so look every
    // DEBOUNCE, for half the shutdown budget at most.
    let deadline = tokio::time::Instant::now() + broker.config().server.shutdown_timeout / 2;
    while !broker.connections().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(DEBOUNCE).await;
    }
    flush(&broker, &mut written).await;
    let b = Arc::clone(&broker);
    let forgotten = tokio::task::spawn_blocking(move || {
        b.store
            .shared()
            .map_or(Ok(()), |shared| shared.presence_forget(b.node().id(), &[]))
    })
    .await;
    if !matches!(forgotten, Ok(Ok(()))) {
        tracing::warn!("removing this node's presence from Redis failed; it expires on its own");
    }
}

/// Writes what is pending (see [`run`]); `written` follows the hash.
async fn flush(broker: &Arc<Broker>, written: &mut HashSet<String>) {
    let pending = std::mem::take(&mut *lock(&broker.presence.pending));
    if pending.dropped > 0 {
        tracing::warn!(
            dropped = pending.dropped,
            "presence events dropped: too many waiting for Redis"
        );
    }
    if pending.channels.is_empty()
        && pending.events.is_empty()
        && pending.departed.is_empty()
        && written.is_empty()
    {
        return;
    }
    let mut set = Vec::new();
    let mut remove = Vec::new();
    for channel in pending.channels {
        let members = broker.connections().presence(&channel);
        if members.is_empty() {
            remove.push(channel);
        } else {
            let json = encode(&members);
            set.push((channel, json));
        }
    }
    let set_names: Vec<String> = set.iter().map(|(channel, _)| channel.clone()).collect();
    let (events, departed) = (pending.events, pending.departed);
    let event_count = events.len();
    let ttl_ms = u64::try_from(PRESENCE_TTL.as_millis()).unwrap_or(u64::MAX);
    let b = Arc::clone(broker);
    let removing = remove.clone();
    let result = tokio::task::spawn_blocking(move || {
        let Some(shared) = b.store.shared() else {
            return (Ok(true), Vec::new());
        };
        let write = shared.presence_write(b.node().id(), &set, &removing, ttl_ms, &events);
        let mut failed = Vec::new();
        for id in departed {
            if let Err(e) = clear_departed(&b, shared, &id) {
                tracing::warn!(node = %id, error = %e, "clearing a departed node's presence failed; retrying");
                failed.push(id);
            }
        }
        (write, failed)
    })
    .await;
    let (write, failed) = match result {
        Ok((write, failed)) => (write.map_err(|e| e.to_string()), failed),
        Err(e) => (Err(e.to_string()), Vec::new()),
    };
    let retry = |channels: Vec<String>, departed: Vec<String>| {
        let mut pending = lock(&broker.presence.pending);
        pending.channels.extend(channels);
        for id in departed {
            if pending.departed.len() < MAX_QUEUED_DEPARTED && !pending.departed.contains(&id) {
                pending.departed.push(id);
            }
        }
    };
    match write {
        Ok(existed) => {
            let lost = !existed && !written.is_empty();
            written.extend(set_names);
            for channel in &remove {
                written.remove(channel);
            }
            if lost {
                tracing::warn!("this node's presence was gone from Redis; writing it again");
            }
            let again = if lost {
                written.iter().cloned().collect()
            } else {
                Vec::new()
            };
            // Read by the next beat (or the next change).
            retry(again, failed);
        }
        Err(e) => {
            tracing::warn!(error = %e, events = event_count, "writing presence to Redis failed; the events are lost, the members are written again");
            retry(set_names.into_iter().chain(remove).collect(), failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str, connections: u32, client: Option<&str>) -> PresenceMember {
        PresenceMember {
            user: user.into(),
            connections,
            client: client.map(str::to_owned),
        }
    }

    fn record(user: &str, connections: u32, client: Option<&str>) -> MemberRecord {
        MemberRecord {
            user: user.into(),
            connections,
            client: client.map(str::to_owned),
        }
    }

    #[test]
    fn merge_sums_connections_per_user_and_keeps_the_local_client() {
        let local = vec![member("bob", 1, Some("here")), member("carol", 2, None)];
        let remote = vec![
            vec![record("alice", 1, None), record("bob", 2, Some("there"))],
            vec![
                record("carol", 1, Some("third")),
                record("alice", 3, Some("a")),
            ],
        ];
        assert_eq!(
            merge(local, remote),
            vec![
                member("alice", 4, Some("a")),
                member("bob", 3, Some("here")),
                member("carol", 3, Some("third")),
            ]
        );
    }

    #[test]
    fn merge_of_nothing_is_empty_and_counts_saturate() {
        assert!(merge(Vec::new(), Vec::<Vec<MemberRecord>>::new()).is_empty());
        let merged = merge(
            vec![member("a", u32::MAX, None)],
            vec![vec![record("a", 5, None)]],
        );
        assert_eq!(merged, vec![member("a", u32::MAX, None)]);
    }

    #[test]
    fn records_round_trip_and_bad_ones_read_as_empty() {
        let members = vec![member("alice", 2, Some("sdk/1")), member("bob", 1, None)];
        let json = encode(&members);
        assert_eq!(
            json,
            r#"[{"user":"alice","connections":2,"client":"sdk/1"},{"user":"bob","connections":1}]"#
        );
        assert_eq!(
            decode(&json),
            vec![record("alice", 2, Some("sdk/1")), record("bob", 1, None)]
        );
        assert!(decode("not json").is_empty());
    }

    #[test]
    fn events_keep_users_with_spaces_whole() {
        let payload = event(false, "n1", "room:1", "ann marie");
        assert_eq!(payload, "presence leave n1 room:1 ann marie");
        let rest = payload.strip_prefix("presence ").unwrap();
        let parts: Vec<&str> = rest.splitn(4, ' ').collect();
        assert_eq!(parts, ["leave", "n1", "room:1", "ann marie"]);
    }
}
