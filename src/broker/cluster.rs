//! Cluster mode: what a node learns from the others through Redis.
//!
//! Every node appends to the shared store; the append pipeline publishes
//! `"<channel id> <seq>"` on the store's notify channel (one notice per
//! channel per batch). [`follow`] listens on one async pub/sub connection:
//!
//! - a notice for a channel this node has in memory makes the channel catch
//!   up to that seq (one read of the missing range; the node's subscribers
//!   then read from the channel's cache);
//! - pub/sub may drop notices (a reconnect, a slow subscriber), so every
//!   [`HEAD_POLL`] the node also compares the heads of the channels it has
//!   subscribers for with the store's, and catches up after every reconnect;
//! - events (`deleted <id> <name>`, `retry <channel> <consumer>`) carry what
//!   an operator or a retry job did on another node.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::protocol::ChannelName;
use crate::storage::Store;

/// How often a node renews its membership and its consumer leases.
pub const NODE_BEAT: Duration = Duration::from_secs(1);

/// How long a membership or a consumer lease lasts without renewal: a node
/// that dies is out of the cluster (its presence gone, its consumers free
/// for another node) within two beats of its last one, plus one.
pub const NODE_LEASE: Duration = Duration::from_secs(3);

/// This node: a random id, fixed for the run, and the addresses it serves
/// (known once the listeners are bound).
#[derive(Debug)]
pub struct Node {
    id: String,
    addresses: std::sync::OnceLock<NodeInfo>,
}

/// A node as the cluster's membership lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Its public listener (WebSocket, SSE, HTTP), as advertised.
    pub listen: String,
    /// Its admin listener, as advertised: where the other nodes call it.
    pub admin: String,
    /// When it started, ms since the Unix epoch.
    pub started_ms: u64,
}

impl Node {
    pub(crate) fn new() -> Self {
        Self {
            id: super::random_hex::<6>(),
            addresses: std::sync::OnceLock::new(),
        }
    }

    /// The node id: unique per run.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records where this node listens (once; later calls are ignored):
    /// the bound addresses, or their ports on `advertise_host`
    /// (`[server] advertise_host`), which is how other nodes reach it.
    pub fn set_addresses(
        &self,
        listen: std::net::SocketAddr,
        admin: std::net::SocketAddr,
        advertise_host: Option<&str>,
    ) {
        let advertised = |bound: std::net::SocketAddr| match advertise_host {
            None => bound.to_string(),
            Some(host) if host.parse::<std::net::Ipv6Addr>().is_ok() => {
                format!("[{host}]:{}", bound.port())
            }
            Some(host) => format!("{host}:{}", bound.port()),
        };
        let _ = self.addresses.set(NodeInfo {
            id: self.id.clone(),
            listen: advertised(listen),
            admin: advertised(admin),
            started_ms: super::now_ms(),
        });
    }

    /// This node as the membership lists it.
    pub fn info(&self) -> NodeInfo {
        self.addresses.get().cloned().unwrap_or_else(|| NodeInfo {
            id: self.id.clone(),
            listen: String::new(),
            admin: String::new(),
            started_ms: 0,
        })
    }
}

/// The node a connection id names: the `<node id>` of `c<n>-<node id>`
/// ([`Broker::next_connection_id`]); `None` for a single node's `c<n>`.
pub fn node_of_connection(id: &str) -> Option<&str> {
    let (_, node) = id.rsplit_once('-')?;
    (!node.is_empty() && node.bytes().all(|b| b.is_ascii_hexdigit())).then_some(node)
}

/// The live nodes of the cluster (just this one on sled). Blocking.
pub fn live_nodes(broker: &Broker) -> Result<Vec<NodeInfo>, crate::storage::StoreError> {
    let Some(shared) = broker.store.shared() else {
        return Ok(vec![broker.node.info()]);
    };
    Ok(shared
        .live_nodes()?
        .into_iter()
        .map(|(id, info)| {
            serde_json::from_str(&info).unwrap_or(NodeInfo {
                id,
                listen: String::new(),
                admin: String::new(),
                started_ms: 0,
            })
        })
        .collect())
}

/// Renews this node's membership every [`NODE_BEAT`] until `cancel` fires,
/// then leaves the cluster.
pub async fn heartbeat(broker: Arc<Broker>, cancel: CancellationToken) {
    if broker.store.shared().is_none() {
        return;
    }
    let mut tick = tokio::time::interval(NODE_BEAT);
    let lease_ms = u64::try_from(NODE_LEASE.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let b = Arc::clone(&broker);
        let beat = tokio::task::spawn_blocking(move || {
            let Some(shared) = b.store.shared() else {
                return Ok(Vec::new());
            };
            let info = serde_json::to_string(&b.node.info()).unwrap_or_default();
            shared.node_heartbeat(b.node.id(), &info, lease_ms)
        })
        .await;
        match beat {
            Ok(Ok(dead)) => {
                for id in dead {
                    tracing::warn!(node = %id, "a cluster node stopped renewing its membership");
                    broker.node_gone(&id).await;
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing cluster membership failed"),
            Err(e) => tracing::warn!(error = %e, "renewing cluster membership failed"),
        }
        // Every node checks its own links: the heartbeat that finds a
        // member dead tells only one node.
        let peers = broker.relays().peers();
        if !peers.is_empty() {
            let b = Arc::clone(&broker);
            let live = tokio::task::spawn_blocking(move || live_nodes(&b)).await;
            if let Ok(Ok(live)) = live {
                let live: std::collections::HashSet<String> =
                    live.into_iter().map(|n| n.id).collect();
                if peers.iter().any(|p| !live.contains(p)) {
                    broker
                        .relays()
                        .prune(&broker, |node| live.contains(node))
                        .await;
                }
            }
        }
        if let Err(e) = broker.renew_leases().await {
            tracing::warn!(error = %e, "renewing consumer leases failed");
        }
    }
    let b = Arc::clone(&broker);
    let _ = tokio::task::spawn_blocking(move || {
        b.store
            .shared()
            .map(|shared| shared.node_leave(b.node.id()))
    })
    .await;
}

/// How often a node compares its subscribed channels' heads with the store.
pub const HEAD_POLL: Duration = Duration::from_millis(500);

/// How long a node waits before it reconnects its pub/sub connection.
const RECONNECT: Duration = Duration::from_millis(500);

/// Tells the other nodes that channel `name` (store id `id`) was deleted.
pub(crate) async fn announce_deleted(store: &Arc<Store>, name: &str, id: u64) {
    let (store, event) = (Arc::clone(store), format!("deleted {id} {name}"));
    // A lost event costs at most stale memory on another node until it
    // restarts; log it.
    let result = tokio::task::spawn_blocking(move || announce(&store, &event)).await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "announcing a deleted channel failed");
    }
}

/// Tells the other nodes that a retry of `consumer` on `channel` is due
/// (the job fired on a node that does not serve that consumer). Blocking.
pub(crate) fn announce_retry(store: &Store, channel: &str, consumer: &str) {
    announce(store, &format!("retry {channel} {consumer}"));
}

fn announce(store: &Store, event: &str) {
    let Some(shared) = store.shared() else {
        return;
    };
    if let Err(e) = shared.publish_event(event) {
        tracing::warn!(error = %e, %event, "announcing to the cluster failed");
    }
}

/// Follows the other nodes until `cancel` fires.
pub async fn follow(broker: Arc<Broker>, cancel: CancellationToken) {
    let Some(shared) = broker.store.shared() else {
        return;
    };
    let (url, notify, events, inbox, ephemeral) = (
        shared.url().to_owned(),
        shared.notify_channel(),
        shared.events_channel(),
        shared.node_channel(broker.node.id()),
        broker.relays().ephemeral_channel(),
    );
    let notices = Arc::new(Notices::default());
    tokio::spawn(catch_up(
        Arc::clone(&broker),
        Arc::clone(&notices),
        cancel.clone(),
    ));
    let mut connected_before = false;
    while !cancel.is_cancelled() {
        let pubsub = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&notify).await?;
            pubsub.subscribe(&events).await?;
            pubsub.subscribe(&inbox).await?;
            pubsub.subscribe(&ephemeral).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            () = cancel.cancelled() => return,
            p = tokio::time::timeout(Duration::from_secs(5), pubsub) => p,
        };
        let mut messages = match pubsub {
            Ok(Ok(pubsub)) => pubsub.into_on_message(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster notifications: cannot subscribe; retrying");
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
            Err(_) => {
                tracing::warn!("cluster notifications: subscribing timed out; retrying");
                continue;
            }
        };
        if connected_before {
            tracing::info!("cluster notifications: subscribed again");
        }
        connected_before = true;
        broker
            .following
            .store(true, std::sync::atomic::Ordering::Release);
        // Whatever was published while this node was not listening.
        poll_heads(&broker).await;
        let mut tick = tokio::time::interval(HEAD_POLL);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => poll_heads(&broker).await,
                message = messages.next() => {
                    let Some(message) = message else {
                        tracing::warn!("cluster notifications: connection lost; reconnecting");
                        broker.following.store(false, std::sync::atomic::Ordering::Release);
                        break;
                    };
                    let from = message.get_channel_name();
                    if from == inbox {
                        crate::session::relay::on_message(&broker, message.get_payload_bytes()).await;
                        continue;
                    }
                    if from == ephemeral {
                        crate::session::relay::on_ephemeral(&broker, message.get_payload_bytes());
                        continue;
                    }
                    let Ok(payload) = message.get_payload::<String>() else { continue };
                    if from == notify {
                        notices.add(&payload);
                    } else {
                        on_event(&broker, &payload).await;
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Notices not yet acted on: the highest seq heard per channel id. Notices
/// that arrive while a catch-up runs fold into one read per channel.
#[derive(Default)]
struct Notices {
    heads: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    wake: tokio::sync::Notify,
}

impl Notices {
    /// `"<channel id> <seq>"`: another node appended up to `seq`.
    fn add(&self, payload: &str) {
        let mut parts = payload.split(' ');
        let (Some(Ok(id)), Some(Ok(seq))) = (
            parts.next().map(str::parse::<u64>),
            parts.next().map(str::parse::<u64>),
        ) else {
            return;
        };
        {
            let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            let head = heads.entry(id).or_insert(seq);
            *head = (*head).max(seq);
        }
        self.wake.notify_one();
    }

    fn take(&self) -> std::collections::HashMap<u64, u64> {
        std::mem::take(&mut *self.heads.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Brings the channels in memory up to the seqs other nodes announced.
async fn catch_up(broker: Arc<Broker>, notices: Arc<Notices>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = notices.wake.notified() => {}
        }
        let behind: Vec<(Arc<super::Channel>, u64)> = notices
            .take()
            .into_iter()
            .filter_map(|(id, seq)| broker.channel_by_id(id).map(|c| (c, seq)))
            .filter(|(channel, seq)| channel.head() < *seq)
            .collect();
        if behind.is_empty() {
            continue;
        }
        let store = Arc::clone(&broker.store);
        let result = tokio::task::spawn_blocking(move || {
            for (channel, seq) in behind {
                channel.catch_up(&store, seq, &[])?;
            }
            Ok::<_, crate::storage::StoreError>(())
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "catching up with another node's appends failed");
        }
    }
}

/// `deleted <id> <name>` or `retry <channel> <consumer>`.
async fn on_event(broker: &Arc<Broker>, payload: &str) {
    let mut parts = payload.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("deleted"), Some(id), Some(name)) => {
            let (Ok(id), Ok(name)) = (id.parse::<u64>(), ChannelName::new(name)) else {
                return;
            };
            if broker.forget_channel(&name, Some(id)).is_some() {
                tracing::info!(channel = %name, "channel deleted on another node");
            }
        }
        (Some("retry"), Some(channel), Some(consumer)) => {
            if let Some(consumer) = broker.loaded_consumer(channel, consumer) {
                consumer.fire_due();
            }
        }
        (Some("presence"), _, _) => {
            if let Some(rest) = payload.strip_prefix("presence ") {
                super::presence::on_event(broker, rest);
            }
        }
        _ => tracing::debug!(payload, "unknown cluster event"),
    }
}

/// Catches up every channel with subscribers on this node whose head in
/// the store is ahead.
async fn poll_heads(broker: &Arc<Broker>) {
    let channels: Vec<_> = broker
        .channels()
        .into_iter()
        .filter(|c| c.is_durable() && c.subscribers() > 0)
        .collect();
    if channels.is_empty() {
        return;
    }
    let store = Arc::clone(&broker.store);
    let result = tokio::task::spawn_blocking(move || {
        let Some(shared) = store.shared() else {
            return Ok(());
        };
        let ids: Vec<u64> = channels.iter().map(|c| c.id()).collect();
        let heads = shared.heads(&ids)?;
        for (channel, head) in channels.iter().zip(heads) {
            if head > channel.head() {
                channel.catch_up(&store, head, &[])?;
            }
        }
        Ok::<_, crate::storage::StoreError>(())
    })
    .await;
    if let Ok(Err(e)) = result {
        tracing::debug!(error = %e, "polling channel heads failed");
    }
}

#[cfg(test)]
mod tests {
    use super::node_of_connection;

    #[test]
    fn a_connection_id_names_its_node_in_a_cluster() {
        assert_eq!(node_of_connection("c42-0a1b2c3d4e5f"), Some("0a1b2c3d4e5f"));
        assert_eq!(node_of_connection("c42"), None);
        assert_eq!(node_of_connection("c42-"), None);
        assert_eq!(node_of_connection("c-fake"), None);
    }
}
