//! The broker core: the channel registry, publish (seq → persist → puback →
//! fan out), subscribe with resume, consumers and retention.
//!
//! Knows nothing of sockets or frame encodings: sessions call it with
//! validated names and bytes, and read deliveries from channels by cursor.

pub mod admin;
mod channel;
pub mod cluster;
pub(crate) mod presence;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use channel::{CacheLimits, ChannelState, Dedup};
pub use channel::{Channel, Message};
use writer::{AppendRequest, WriterRequest};

use crate::backoff::Backoff;
use crate::config::{Config, FsyncPolicy, NamespacePolicy, StorageBackend};
use crate::delivery::retry::{RetryError, RetryJob, RetryQueue};
use crate::delivery::{Consumer, ConsumerMode, ConsumerState, RetryPolicy, SubscriptionId};
use crate::protocol::{AckMode, ChannelName, ErrorCode, Headers, PresenceMember, StartFrom};
use crate::session::access::INBOX;
use crate::session::registry::{Connections, Control};
use crate::storage::{
    ChannelRecord, DeadLetterRecord, HeadRecord, LoadedChannel, Store, StoreError,
};

/// Why a broker operation failed, with the wire error code it maps to.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// Cluster mode: the consumer is served by another node (its id); the
    /// session subscribes through that node (see `session::relay`).
    #[error("the consumer is served by node {0}")]
    Elsewhere(String),
}

impl BrokerError {
    /// The `error` frame code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal(_) => ErrorCode::Internal,
            Self::Elsewhere(_) => ErrorCode::Unavailable,
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// The result of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    pub seq: u64,
    /// The `msg_id` was seen within the dedup window: nothing new was stored.
    pub duplicate: bool,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An operator's change to a consumer that another node serves: refused
/// with the node to ask (its state is that node's to change).
pub(crate) fn served_elsewhere(e: BrokerError) -> BrokerError {
    match e {
        BrokerError::Elsewhere(node) => BrokerError::Conflict(format!(
            "this consumer is served by cluster node {node} now; make the change through that node's admin API (GET /admin/info lists the nodes)"
        )),
        e => e,
    }
}

/// Runs blocking I/O from sync code that may be on the runtime: on a
/// multi-threaded runtime the worker hands its other tasks away first.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn new_epoch() -> String {
    random_hex::<8>()
}

/// `N` random bytes as lowercase hex: epochs, node ids, session ids, tokens.
pub fn random_hex<const N: usize>() -> String {
    let bytes: [u8; N] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a subscription asks for.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub channel: ChannelName,
    pub consumer: Option<String>,
    pub group: Option<String>,
    /// The authenticated user, which names the consumer when nothing else does.
    pub user: Option<String>,
    pub since: Option<u64>,
    pub from: Option<StartFrom>,
    pub max_in_flight: Option<u32>,
    pub ack: AckMode,
}

/// A live subscription: one connection attached to one consumer.
#[derive(Debug)]
pub struct Subscription {
    pub id: SubscriptionId,
    pub channel: Arc<Channel>,
    pub consumer: Arc<Consumer>,
    /// Auto for `ack: "auto"` and for every ephemeral channel.
    pub ack: AckMode,
    pub epoch: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub recovered: bool,
}

/// What [`Broker::dlq_take`] does with each dead letter before removing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DlqAction {
    /// Back to its consumer with a fresh attempt count.
    Requeue,
    /// Nothing: it is dropped.
    Purge,
}

/// The broker: channels, consumers, the writer, the store.
pub struct Broker {
    config: Arc<Config>,
    store: Arc<Store>,
    /// Every channel seen since start (durable ones are loaded at start-up).
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    /// Consumers with live subscriptions, or with state not yet saved.
    consumers: Mutex<HashMap<(String, String), Arc<Consumer>>>,
    /// Requests to the channel writer; bounded so publishers wait under load.
    writer: mpsc::Sender<WriterRequest>,
    /// The writer and flusher threads, joined at shutdown.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Where failed deliveries wait for their retry.
    retry: RetryQueue,
    next_channel_id: AtomicU64,
    next_id: AtomicU64,
    /// Every open connection (for the admin API and presence).
    connections: Arc<Connections>,
    /// When this broker started, ms since the Unix epoch.
    started_ms: u64,
    /// Token verification (disabled when `[auth]` has no key).
    auth: crate::auth::Auth,
    /// Rate and connection limits.
    limits: crate::limits::Limits,
    /// This node: its id in the cluster and the addresses it serves.
    node: cluster::Node,
    /// Subscriptions served by or for other nodes.
    relays: Arc<crate::session::relay::Relays>,
    /// This node's presence changes waiting to be written to the cluster.
    presence: presence::Changes,
    /// Cluster mode: this node hears the others' notifications now.
    following: std::sync::atomic::AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    /// Opens the store in the configured data dir and starts the writer.
    /// `retry` is the shared queue in cluster mode; `None` keeps retries in
    /// the embedded store. Blocking: call it off the runtime.
    pub fn open(config: Arc<Config>, retry: Option<RetryQueue>) -> Result<Arc<Self>, BrokerError> {
        let server = &config.server;
        // Keys and limits first: a bad one must not leave a run marked open.
        let auth = crate::auth::Auth::from_config(&config.auth)
            .map_err(|e| BrokerError::BadRequest(e.to_string()))?;
        let limits = crate::limits::Limits::new(&config.limits, server.max_frame)
            .map_err(BrokerError::BadRequest)?;
        let store = Arc::new(match config.storage.backend {
            StorageBackend::Sled => Store::open(&server.data_dir, server.store_cache)?,
            StorageBackend::Redis => Store::redis(
                config.storage.redis_url.as_deref().unwrap_or_default(),
                &config.storage.prefix,
            )?,
        });
        let retry = match retry {
            Some(retry) => retry,
            None => RetryQueue::sled(Arc::clone(&store))
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?,
        };
        let (writer_tx, writer_rx) = mpsc::channel(writer::QUEUE_CAPACITY);
        let threads = writer::start(
            Arc::clone(&store),
            server.fsync,
            server.fsync_interval,
            u64::try_from(server.dedup_window.as_millis()).unwrap_or(u64::MAX),
            writer_rx,
        )
        .map_err(|e| BrokerError::Internal(format!("cannot start the writer: {e}")))?;
        let node = cluster::Node::new();
        let broker = Self {
            next_channel_id: AtomicU64::new(store.max_channel_id()? + 1),
            config: Arc::clone(&config),
            store,
            channels: Mutex::new(HashMap::new()),
            consumers: Mutex::new(HashMap::new()),
            writer: writer_tx,
            threads: Mutex::new(threads),
            retry,
            next_id: AtomicU64::new(1),
            connections: Arc::new(Connections::default()),
            started_ms: now_ms(),
            auth,
            limits,
            relays: Arc::new(crate::session::relay::Relays::new(
                node.id(),
                &config.storage.prefix,
            )),
            node,
            presence: presence::Changes::default(),
            following: std::sync::atomic::AtomicBool::new(false),
        };
        let lossy_crash = broker
            .store
            .begin_run(config.server.fsync == FsyncPolicy::Interval)?;
        broker.load_channels(lossy_crash)?;
        if let Some(shared) = broker.store.shared() {
            // A member before its first subscribe: until then, another node
            // would take this node's consumer leases as a dead node's.
            let info = serde_json::to_string(&broker.node.info()).unwrap_or_default();
            let lease_ms = u64::try_from(cluster::NODE_LEASE.as_millis()).unwrap_or(u64::MAX);
            shared.node_heartbeat(broker.node.id(), &info, lease_ms)?;
        }
        Ok(Arc::new(broker))
    }

    /// Loads every stored channel. After an unclean stop of a run under
    /// `fsync = "interval"`, pubacked messages of the loss window may be gone
    /// and their seqs would be handed out again: each channel then gets a new
    /// epoch, so clients see a reset instead of reused seqs.
    fn load_channels(&self, reset_epochs: bool) -> Result<(), BrokerError> {
        if reset_epochs {
            tracing::warn!(
                "the last run (fsync = \"interval\") did not shut down cleanly: every channel gets a new epoch"
            );
        }
        let window_ms =
            u64::try_from(self.config.server.dedup_window.as_millis()).unwrap_or(u64::MAX);
        let since = now_ms().saturating_sub(window_ms);
        let mut channels = lock(&self.channels);
        for mut loaded in self.store.load_channels()? {
            let Ok(name) = ChannelName::new(&loaded.name) else {
                tracing::warn!(channel = %loaded.name, "skipping stored channel with an invalid name");
                continue;
            };
            let mut policy = self.config.policy(name.namespace()).clone();
            if !policy.durable {
                tracing::warn!(channel = %name, "namespace is ephemeral now, but the channel has stored messages; serving them as durable");
                policy.durable = true;
            }
            let mut dedup = Dedup::new(window_ms, self.config.server.dedup_max);
            let mut recent =
                self.store
                    .recent_msg_ids(loaded.record.id, since, self.config.server.dedup_max)?;
            recent.reverse();
            for (id, seq, ts) in recent {
                dedup.insert(id, seq, ts);
            }
            if reset_epochs {
                loaded.record.epoch = new_epoch();
                self.store.put_channel(&loaded.name, &loaded.record)?;
            }
            let channel = self.build_channel(name, policy, &loaded, dedup);
            channels.insert(loaded.name, Arc::new(channel));
        }
        Ok(())
    }

    /// A channel in memory at the position `loaded` reports.
    fn build_channel(
        &self,
        name: ChannelName,
        policy: NamespacePolicy,
        loaded: &LoadedChannel,
        dedup: Dedup,
    ) -> Channel {
        let state = ChannelState {
            epoch: loaded.record.epoch.clone(),
            assigned: loaded.last_seq,
            first_seq: loaded.first_seq,
            bytes: loaded.bytes,
            head_record: HeadRecord {
                last_seq: loaded.last_seq,
                appended_bytes: loaded.bytes,
            },
            cache: Default::default(),
            cache_bytes: 0,
            dedup,
            deleted: false,
        };
        let limits = self.cache_limits(&policy);
        let counters = self.namespace_counters(&name);
        Channel::new(
            name,
            loaded.record.id,
            policy,
            limits,
            state,
            loaded.dead_letters,
            counters,
        )
    }

    fn new_dedup(&self) -> Dedup {
        let window_ms =
            u64::try_from(self.config.server.dedup_window.as_millis()).unwrap_or(u64::MAX);
        Dedup::new(window_ms, self.config.server.dedup_max)
    }

    fn cache_limits(&self, policy: &crate::config::NamespacePolicy) -> CacheLimits {
        let server = &self.config.server;
        CacheLimits {
            msgs: server
                .cache_msgs
                .min(usize::try_from(policy.max_msgs).unwrap_or(usize::MAX))
                .max(1),
            bytes: usize::try_from(server.cache_bytes.min(policy.max_bytes)).unwrap_or(usize::MAX),
        }
    }

    /// The metric counters of `name`'s namespace: labelled with the
    /// namespace when the config names it, else `default`.
    fn namespace_counters(&self, name: &ChannelName) -> crate::metrics::NamespaceCounters {
        let namespace = name.namespace();
        let label = if self.config.namespaces.contains_key(namespace) {
            namespace
        } else {
            "default"
        };
        crate::metrics::NamespaceCounters::new(label)
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The store (for readers of the log).
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Token verification.
    pub fn auth(&self) -> &crate::auth::Auth {
        &self.auth
    }

    /// Rate and connection limits.
    pub fn limits(&self) -> &crate::limits::Limits {
        &self.limits
    }

    /// Every open connection.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// When this broker started, ms since the Unix epoch.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// A fresh id for a connection or subscription.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh connection id: `c<n>`, and in a cluster `c<n>-<node id>`, so
    /// that an id names one connection across the nodes and the node that
    /// holds it (see [`cluster::node_of_connection`]).
    pub fn next_connection_id(&self) -> String {
        let n = self.next_id();
        if self.clustered() {
            format!("c{n}-{}", self.node.id())
        } else {
            format!("c{n}")
        }
    }

    /// The channel named `name`, created on first use. In a cluster the
    /// first use on this node finds (or creates) it in the shared store.
    pub fn channel(&self, name: &ChannelName) -> Result<Arc<Channel>, BrokerError> {
        if let Some(channel) = lock(&self.channels).get(name.as_str()) {
            channel.touch(now_ms());
            return Ok(Arc::clone(channel));
        }
        let policy = self.config.policy(name.namespace()).clone();
        let shared = self.store.shared().filter(|_| policy.durable);
        let mut loaded = match shared {
            Some(shared) => {
                let found = blocking(|| {
                    shared.get_or_create_channel(name.as_str(), &new_epoch(), now_ms())?;
                    shared.load_channel(name.as_str())
                })?;
                found.ok_or_else(|| {
                    BrokerError::Unavailable(format!(
                        "channel {name} was deleted on another node meanwhile; try again"
                    ))
                })?
            }
            None => LoadedChannel {
                name: name.as_str().to_owned(),
                record: ChannelRecord {
                    id: 0,
                    epoch: new_epoch(),
                    created_ms: now_ms(),
                },
                first_seq: 1,
                last_seq: 0,
                bytes: 0,
                dead_letters: 0,
            },
        };
        let mut channels = lock(&self.channels);
        if let Some(channel) = channels.get(name.as_str()) {
            // Another request created it meanwhile.
            return Ok(Arc::clone(channel));
        }
        if shared.is_none() && policy.durable {
            loaded.record.id = self.next_channel_id.fetch_add(1, Ordering::Relaxed);
            // A small insert into sled's memory; it becomes durable with the
            // flush of the channel's first message.
            self.store.put_channel(name.as_str(), &loaded.record)?;
        }
        let channel = Arc::new(self.build_channel(name.clone(), policy, &loaded, self.new_dedup()));
        channels.insert(name.as_str().to_owned(), Arc::clone(&channel));
        Ok(channel)
    }

    /// Another node left the cluster (its lease ran out): what it held
    /// here is let go. (Presence and remote subscriptions hook in here.)
    pub(crate) async fn node_gone(&self, id: &str) {
        tracing::debug!(node = %id, "forgetting what a departed node held");
        presence::node_gone(self, id);
        self.relays.node_gone(self, id).await;
    }

    /// Subscriptions served by or for other nodes.
    pub(crate) fn relays(&self) -> &Arc<crate::session::relay::Relays> {
        &self.relays
    }

    /// The users subscribed to `channel`, with their connection counts, by
    /// user id: in a cluster, on every live node (connections summed per
    /// user); alone, or for a namespace without presence, on this node.
    pub async fn presence(
        &self,
        channel: &ChannelName,
    ) -> Result<Vec<PresenceMember>, BrokerError> {
        presence::members(self, channel).await
    }

    /// A connection of `user` subscribed to `channel` (of a presence
    /// namespace) or left it; `announce` is `Some(joined)` when the user's
    /// first connection joined or its last one left and the namespace has
    /// `join_leave`. In a cluster the node's presence of the channel is
    /// written to Redis shortly and the event reaches the other nodes (this
    /// node's connections are told by the caller); alone, nothing to do.
    pub fn presence_changed(&self, channel: &str, user: &str, announce: Option<bool>) {
        presence::changed(self, channel, user, announce);
    }

    /// This node of the cluster (a single node has an id too).
    pub fn node(&self) -> &cluster::Node {
        &self.node
    }

    /// Whether this node is one of a cluster (the store is Redis).
    pub fn clustered(&self) -> bool {
        self.store.shared().is_some()
    }

    /// Whether the broker can serve: in a cluster, whether Redis answers
    /// and this node hears the other nodes' notifications.
    pub async fn ready(&self) -> Result<(), BrokerError> {
        if self.store.shared().is_none() {
            return Ok(());
        }
        if !self.following.load(Ordering::Acquire) {
            return Err(BrokerError::Unavailable(
                "not subscribed to the cluster's notifications (yet)".into(),
            ));
        }
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.shared().map_or(Ok(()), |s| s.ping()))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??;
        Ok(())
    }

    /// The channel in memory with store id `id` (a durable channel).
    pub(crate) fn channel_by_id(&self, id: u64) -> Option<Arc<Channel>> {
        lock(&self.channels)
            .values()
            .find(|c| c.id() == id && id != 0)
            .cloned()
    }

    /// Every channel known to this broker, by name.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        let mut all: Vec<_> = lock(&self.channels).values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Hands a publish to the channel writer. Resolves (the returned
    /// receiver) once the message is durable under the fsync policy; waits
    /// here only while the writer's queue is full. Publishes from one caller
    /// are stored in the order this is called.
    pub async fn publish(
        &self,
        channel: Arc<Channel>,
        data: Bytes,
        headers: Option<Headers>,
        msg_id: Option<String>,
    ) -> Result<oneshot::Receiver<Result<PublishOutcome, BrokerError>>, BrokerError> {
        let (reply, rx) = oneshot::channel();
        let request = AppendRequest {
            channel,
            data,
            headers,
            msg_id,
            reply,
            received: Instant::now(),
        };
        if request.channel.is_durable() {
            self.writer
                .send(WriterRequest::Append(request))
                .await
                .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))?;
        } else {
            if self.store.shared().is_some() {
                // At most once, like the channel: the other nodes hear it
                // through pub/sub and deliver it to their own subscribers.
                self.relays.broadcast_ephemeral(
                    request.channel.name().as_str(),
                    &request.data,
                    request.headers.as_ref(),
                );
            }
            writer::publish_ephemeral(request);
        }
        Ok(rx)
    }

    /// Cluster mode: a message another node published to an ephemeral
    /// channel, delivered to this node's subscribers.
    pub(crate) fn publish_from_peer(&self, name: &str, data: Bytes, headers: Option<Headers>) {
        let Ok(name) = ChannelName::new(name) else {
            return;
        };
        // Only where someone listens: a node does not keep channels alive
        // for messages nobody here reads.
        let Some(channel) = lock(&self.channels).get(name.as_str()).cloned() else {
            return;
        };
        if channel.is_durable() || channel.subscribers() == 0 {
            return;
        }
        let (reply, _) = oneshot::channel();
        writer::publish_ephemeral(AppendRequest {
            channel,
            data,
            headers,
            msg_id: None,
            reply,
            received: Instant::now(),
        });
    }

    /// Attaches a new subscription to its consumer and positions it.
    pub async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, BrokerError> {
        let channel = self.channel(&request.channel)?;
        let id = self.next_id();
        let durable = channel.is_durable();
        let (key, mode, persistent) = consumer_key(&request, id, durable)?;
        let policy_window = channel.policy().max_in_flight;
        let max_in_flight = match request.max_in_flight {
            Some(0) => {
                return Err(BrokerError::BadRequest(
                    "max_in_flight must be at least 1".into(),
                ));
            }
            Some(n) => n.min(policy_window),
            None => policy_window,
        };
        if persistent {
            self.take_lease(&channel, &key).await?;
        }
        let (consumer, fresh) = self.consumer(&channel, &key, mode, persistent).await?;
        if consumer.lock().mode() != mode {
            return Err(BrokerError::Conflict(format!(
                "consumer {key:?} is in use in another mode"
            )));
        }
        let (epoch, first_seq, last_seq) = channel.position();
        let recovered = {
            let mut state = consumer.lock();
            let reposition = fresh || request.since.is_some() || request.from.is_some();
            let recovered = if reposition {
                let (floor, recovered) = match (request.since, request.from) {
                    (Some(since), _) if since > last_seq => (last_seq, false),
                    (Some(since), _) => (since, since + 1 >= first_seq),
                    (None, Some(StartFrom::First)) => (first_seq - 1, true),
                    // An inbox holds what was sent while its user was
                    // away, even before the user's first subscribe.
                    (None, None) if channel.name().namespace() == INBOX => (first_seq - 1, true),
                    (None, Some(StartFrom::New) | None) => (last_seq, true),
                };
                if state.subscriptions() == 0 || request.since.is_some() || request.from.is_some() {
                    state.reset(floor);
                }
                recovered
            } else if state.floor() > last_seq {
                state.reset(last_seq);
                false
            } else {
                state.floor() + 1 >= first_seq
            };
            state.attach(id, max_in_flight);
            recovered
        };
        let ack = if durable { request.ack } else { AckMode::Auto };
        channel.subscriber_added();
        Ok(Subscription {
            id,
            channel,
            consumer,
            ack,
            epoch,
            first_seq,
            last_seq,
            recovered,
        })
    }

    /// Cluster mode: makes sure this node serves consumer `key` (a durable
    /// consumer lives on one node at a time), taking its lease unless it is
    /// in memory here already. `Elsewhere` names the node that serves it.
    pub(crate) async fn take_lease(&self, channel: &Channel, key: &str) -> Result<(), BrokerError> {
        if self.store.shared().is_none()
            || lock(&self.consumers)
                .contains_key(&(channel.name().as_str().to_owned(), key.to_owned()))
        {
            return Ok(());
        }
        let (store, id, key, me) = (
            Arc::clone(&self.store),
            channel.id(),
            key.to_owned(),
            self.node.id().to_owned(),
        );
        let lease_ms = u64::try_from(cluster::NODE_LEASE.as_millis()).unwrap_or(u64::MAX);
        let holder = tokio::task::spawn_blocking(move || {
            store.shared().map_or(Ok(me.clone()), |s| {
                s.lease_consumer(id, &key, &me, lease_ms)
            })
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))??;
        if holder == self.node.id() {
            Ok(())
        } else {
            Err(BrokerError::Elsewhere(holder))
        }
    }

    /// Cluster mode: renews the leases of the durable consumers in memory;
    /// a consumer whose lease another node took meanwhile (this node was
    /// cut off for longer than a lease) is dropped here, and its
    /// subscriptions ended so their clients subscribe again.
    pub(crate) async fn renew_leases(&self) -> Result<(), BrokerError> {
        if self.store.shared().is_none() {
            return Ok(());
        }
        let held: Vec<Arc<Consumer>> = lock(&self.consumers)
            .values()
            .filter(|c| c.is_persistent())
            .cloned()
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let keys: Vec<(u64, String)> = held
            .iter()
            .map(|c| (c.channel().id(), c.key().to_owned()))
            .collect();
        let (store, me) = (Arc::clone(&self.store), self.node.id().to_owned());
        let lease_ms = u64::try_from(cluster::NODE_LEASE.as_millis()).unwrap_or(u64::MAX);
        let kept = tokio::task::spawn_blocking(move || {
            store
                .shared()
                .map_or(Ok(Vec::new()), |s| s.renew_leases(&keys, &me, lease_ms))
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))??;
        for (consumer, kept) in held.iter().zip(kept) {
            if kept {
                continue;
            }
            tracing::warn!(consumer = consumer.key(), channel = %consumer.channel().name(),
                "another node took over this consumer; its subscriptions here end");
            consumer.retire();
            lock(&self.consumers).retain(|_, c| !Arc::ptr_eq(c, consumer));
            for connection in self
                .connections
                .subscribed_to(consumer.channel().name().as_str())
            {
                connection.send(Control::EndSubscription {
                    channel: consumer.channel().name().as_str().to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Cluster mode: gives back the leases of consumers this node dropped.
    async fn release_leases(&self, released: Vec<(u64, String)>) {
        if released.is_empty() || self.store.shared().is_none() {
            return;
        }
        let (store, me) = (Arc::clone(&self.store), self.node.id().to_owned());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(shared) = store.shared() {
                for (channel, key) in released {
                    if let Err(e) = shared.release_consumer(channel, &key, &me) {
                        tracing::debug!(error = %e, "giving back a consumer lease failed (it runs out on its own)");
                    }
                }
            }
        })
        .await;
    }

    /// The consumer `key` of `channel`: from memory, else from the store,
    /// else new (then `fresh` is true).
    async fn consumer(
        &self,
        channel: &Arc<Channel>,
        key: &str,
        mode: ConsumerMode,
        persistent: bool,
    ) -> Result<(Arc<Consumer>, bool), BrokerError> {
        let registry_key = (channel.name().as_str().to_owned(), key.to_owned());
        if let Some(consumer) = lock(&self.consumers).get(&registry_key).cloned() {
            return Ok((consumer, false));
        }
        let stored = if persistent {
            let (store, channel_id, name) = (Arc::clone(&self.store), channel.id(), key.to_owned());
            tokio::task::spawn_blocking(move || store.load_consumer(channel_id, &name))
                .await
                .map_err(|e| BrokerError::Internal(e.to_string()))??
        } else {
            None
        };
        let policy = retry_policy(channel.policy());
        let fresh = stored.is_none();
        let state = match &stored {
            Some(record) => ConsumerState::from_record(mode, policy, record),
            None => ConsumerState::new(mode, policy, 0),
        };
        let candidate = Arc::new(Consumer::new(
            key.to_owned(),
            Arc::clone(channel),
            persistent,
            state,
            Arc::clone(&self.store),
            self.retry.clone(),
        ));
        let mut consumers = lock(&self.consumers);
        match consumers.get(&registry_key) {
            // Another subscribe loaded it meanwhile: use that one.
            Some(existing) => Ok((Arc::clone(existing), false)),
            None => {
                consumers.insert(registry_key, Arc::clone(&candidate));
                Ok((candidate, fresh))
            }
        }
    }

    /// A consumer that is in memory now.
    pub fn loaded_consumer(&self, channel: &str, key: &str) -> Option<Arc<Consumer>> {
        lock(&self.consumers)
            .get(&(channel.to_owned(), key.to_owned()))
            .cloned()
    }

    /// Starts the retry queue's worker, which runs until `cancel` fires: each job that
    /// fires wakes its consumer if it is in memory (otherwise the retry is
    /// delivered when the consumer is next subscribed).
    /// The worker thread is joined by [`Broker::shutdown`]; `cancel` must
    /// fire before that.
    pub fn start_retry_worker(
        self: &Arc<Self>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<(), RetryError> {
        let broker = Arc::downgrade(self);
        let handler: crate::delivery::retry::RetryHandler = Arc::new(move |job: RetryJob| {
            crate::metrics::RETRIES_FIRED.inc();
            let Some(broker) = broker.upgrade() else {
                return;
            };
            match broker.loaded_consumer(&job.channel, &job.consumer) {
                Some(consumer) => consumer.fire_due(),
                // In a cluster the consumer may be served by another node.
                None => cluster::announce_retry(&broker.store, &job.channel, &job.consumer),
            }
        });
        let poll = self.config.retry.poll_interval;
        let thread = self
            .retry
            .clone()
            .spawn_worker(handler, poll, cancel)
            .map_err(|e| RetryError::Worker(e.to_string()))?;
        lock(&self.threads).push(thread);
        Ok(())
    }

    /// Dead letters of `channel` in (seq, consumer) order after `after`,
    /// with seqs in `seqs`, at most `limit`.
    pub async fn dlq_list(
        &self,
        channel: &ChannelName,
        after: Option<(u64, String)>,
        seqs: std::ops::RangeInclusive<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, BrokerError> {
        let (channel, _) = self.channel_view(channel).await?;
        let store = Arc::clone(&self.store);
        let id = channel.id();
        tokio::task::spawn_blocking(move || {
            store.dlq_list(
                id,
                after.as_ref().map(|(s, c)| (*s, c.as_str())),
                seqs,
                limit,
            )
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
        .map_err(BrokerError::from)
    }

    /// One dead letter of `channel`: `seq` as dead-lettered by `consumer`.
    pub async fn dlq_peek(
        &self,
        channel: &ChannelName,
        seq: u64,
        consumer: &str,
    ) -> Result<Option<DeadLetterRecord>, BrokerError> {
        let entries = self.dlq_list(channel, None, seq..=seq, usize::MAX).await?;
        Ok(entries.into_iter().find(|e| e.consumer == consumer))
    }

    /// Sends dead letters back to their consumers with a fresh attempt count:
    /// those with seqs in `seqs` (and of `consumer`, when given). Safe to
    /// repeat: a requeued entry leaves the DLQ. Returns how many it requeued.
    pub async fn dlq_requeue(
        &self,
        channel: &ChannelName,
        seqs: std::ops::RangeInclusive<u64>,
        consumer: Option<&str>,
    ) -> Result<usize, BrokerError> {
        self.dlq_take(channel, seqs, consumer, DlqAction::Requeue)
            .await
    }

    /// Deletes dead letters with seqs in `seqs` (and of `consumer`, when
    /// given). Safe to repeat. Returns how many it deleted.
    pub async fn dlq_purge(
        &self,
        channel: &ChannelName,
        seqs: std::ops::RangeInclusive<u64>,
        consumer: Option<&str>,
    ) -> Result<usize, BrokerError> {
        self.dlq_take(channel, seqs, consumer, DlqAction::Purge)
            .await
    }

    /// Requeues (or only drops) the selected dead letters, then removes
    /// them from the DLQ. Returns how many it removed (a repeat finds none).
    async fn dlq_take(
        &self,
        channel: &ChannelName,
        seqs: std::ops::RangeInclusive<u64>,
        consumer: Option<&str>,
        action: DlqAction,
    ) -> Result<usize, BrokerError> {
        let entries = self.dlq_select(channel, seqs, consumer).await?;
        let channel = self.stored_channel(channel).await?;
        let mut removed = 0;
        for entry in entries {
            if action == DlqAction::Requeue {
                let mode = if entry.consumer.starts_with("g/") {
                    ConsumerMode::Queue
                } else {
                    ConsumerMode::Fanout
                };
                self.take_lease(&channel, &entry.consumer)
                    .await
                    .map_err(served_elsewhere)?;
                let (target, _) = self.consumer(&channel, &entry.consumer, mode, true).await?;
                target.update(|state| state.requeue(entry.seq)).await;
                target.wake();
            }
            if self
                .dlq_remove(&channel, entry.seq, &entry.consumer)
                .await?
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn dlq_select(
        &self,
        channel: &ChannelName,
        seqs: std::ops::RangeInclusive<u64>,
        consumer: Option<&str>,
    ) -> Result<Vec<DeadLetterRecord>, BrokerError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .dlq_list(channel, after.clone(), seqs.clone(), 1000)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some((last.seq, last.consumer.clone()));
            all.extend(
                page.into_iter()
                    .filter(|e| consumer.is_none_or(|c| c == e.consumer)),
            );
        }
        Ok(all)
    }

    async fn dlq_remove(
        &self,
        channel: &Arc<Channel>,
        seq: u64,
        consumer: &str,
    ) -> Result<bool, BrokerError> {
        let (store, id, consumer_key) =
            (Arc::clone(&self.store), channel.id(), consumer.to_owned());
        let removed = tokio::task::spawn_blocking(move || store.dlq_remove(id, seq, &consumer_key))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??;
        if removed {
            let _ =
                channel
                    .dead_letters()
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
        Ok(removed)
    }

    /// Has the writer remove a deleted channel's records, after the appends
    /// queued before; returns how many messages it removed.
    async fn delete_stored(&self, channel: &Channel) -> Result<u64, BrokerError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriterRequest::Delete {
                name: channel.name().as_str().to_owned(),
                id: channel.id(),
                reply,
            })
            .await
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))?;
        Ok(rx
            .await
            .map_err(|_| BrokerError::Unavailable("the writer has stopped".into()))??)
    }

    /// A channel that exists (never creates one).
    pub fn existing_channel(&self, name: &ChannelName) -> Result<Arc<Channel>, BrokerError> {
        lock(&self.channels)
            .get(name.as_str())
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("no channel {name}")))
    }

    /// Detaches a subscription; what it had in flight goes back to its consumer.
    pub async fn unsubscribe(&self, subscription: &Subscription) {
        let consumer = &subscription.consumer;
        subscription.channel.subscriber_removed();
        let (idle, record) = {
            let mut state = consumer.lock();
            state.detach(subscription.id);
            let idle = state.subscriptions() == 0;
            let record = (idle && consumer.is_persistent()).then(|| state.record());
            (idle, record)
        };
        consumer.wake();
        if !idle {
            return;
        }
        if let Some(record) = record {
            let (store, channel_id, name) = (
                Arc::clone(&self.store),
                subscription.channel.id(),
                consumer.key().to_owned(),
            );
            let saved = tokio::task::spawn_blocking(move || {
                store.save_consumer(channel_id, &name, &record)
            })
            .await;
            if !matches!(saved, Ok(Ok(()))) {
                tracing::error!(
                    consumer = consumer.key(),
                    "saving consumer state failed; it stays in memory"
                );
                return;
            }
            // Make the saved state durable soon even on an idle broker.
            let _ = self.writer.try_send(WriterRequest::Flush(None));
        }
        let registry_key = (
            subscription.channel.name().as_str().to_owned(),
            consumer.key().to_owned(),
        );
        let removed = {
            let mut consumers = lock(&self.consumers);
            let idle = consumers.get(&registry_key).is_some_and(|c| {
                Arc::ptr_eq(c, consumer) && c.lock().subscriptions() == 0 && !c.lock().is_dirty()
            });
            idle && consumers.remove(&registry_key).is_some()
        };
        if removed && consumer.is_persistent() {
            self.release_leases(vec![(subscription.channel.id(), consumer.key().to_owned())])
                .await;
        }
    }

    /// Saves every changed durable consumer, then asks the writer for a flush.
    /// Acks become durable this way within one persist period.
    pub async fn persist_consumers(&self) -> Result<(), BrokerError> {
        let consumers: Vec<Arc<Consumer>> = lock(&self.consumers).values().cloned().collect();
        let dirty: Vec<(u64, String, crate::storage::ConsumerRecord)> = consumers
            .iter()
            .filter(|c| c.is_persistent())
            .filter_map(|c| {
                let mut state = c.lock();
                state
                    .is_dirty()
                    .then(|| (c.channel().id(), c.key().to_owned(), state.record()))
            })
            .collect();
        if dirty.is_empty() {
            self.evict_idle_consumers().await;
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            for (channel, name, record) in &dirty {
                store.save_consumer(*channel, name, record)?;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))??;
        let _ = self.writer.send(WriterRequest::Flush(None)).await;
        self.evict_idle_consumers().await;
        Ok(())
    }

    /// Drops consumers with no subscription whose state is saved (in a
    /// cluster, giving their leases back).
    async fn evict_idle_consumers(&self) {
        let mut released = Vec::new();
        {
            lock(&self.consumers).retain(|_, c| {
                let state = c.lock();
                let keep = state.subscriptions() > 0 || (c.is_persistent() && state.is_dirty());
                if !keep && c.is_persistent() {
                    released.push((c.channel().id(), c.key().to_owned()));
                }
                keep
            });
        }
        self.release_leases(released).await;
    }

    /// Waits until everything written so far is durable.
    pub async fn flush(&self) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(WriterRequest::Flush(Some(tx)))
            .await
            .map_err(|_| BrokerError::Unavailable("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| BrokerError::Unavailable("the writer has stopped".into()))
    }

    /// Forgets channels that were never published to, have no subscriber,
    /// no consumer in memory and no dead letter, and that no request looked
    /// up for `idle`: what subscribes to names nobody publishes on leave
    /// behind (their stored consumers, all at seq 0, go with them).
    pub async fn evict_unused_channels(
        &self,
        idle: std::time::Duration,
    ) -> Result<usize, BrokerError> {
        let cutoff = now_ms().saturating_sub(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX));
        let candidates: Vec<Arc<Channel>> = {
            let channels = lock(&self.channels);
            let consumers = lock(&self.consumers);
            // Once, not per channel: channels × consumers would be quadratic.
            let consumed: std::collections::HashSet<&str> =
                consumers.keys().map(|(name, _)| name.as_str()).collect();
            channels
                .values()
                .filter(|c| {
                    c.head() == 0
                        && c.lock().assigned == 0
                        && c.subscribers() == 0
                        && c.idle_since() < cutoff
                        && c.dead_letters().load(Ordering::Relaxed) == 0
                        && !consumed.contains(c.name().as_str())
                })
                .cloned()
                .collect()
        };
        let mut evicted = 0;
        for channel in candidates {
            // Checked again under the registry lock: a request may have
            // come in since.
            let removed = {
                let mut channels = lock(&self.channels);
                let still_idle = channels.get(channel.name().as_str()).is_some_and(|c| {
                    Arc::ptr_eq(c, &channel) && c.idle_since() < cutoff && c.subscribers() == 0
                });
                if still_idle {
                    channels.remove(channel.name().as_str());
                    channel.mark_deleted();
                }
                still_idle
            };
            if !removed {
                continue;
            }
            evicted += 1;
            // In a cluster another node may use the channel: forget it here
            // only (its records in Redis are tiny: a name and an id).
            if channel.is_durable() && self.store.shared().is_none() {
                self.delete_stored(&channel).await?;
            }
        }
        if evicted > 0 {
            tracing::debug!(evicted, "forgot channels nobody published to");
        }
        Ok(evicted)
    }

    /// Removes what retention (`max_msgs`, `max_bytes`, `max_age`) no longer keeps.
    pub async fn enforce_retention(&self) -> Result<(), BrokerError> {
        let now = now_ms();
        for channel in self.channels().into_iter().filter(|c| c.is_durable()) {
            let policy = channel.policy().clone();
            let head = channel.head();
            let (first, bytes) = {
                let state = channel.lock();
                (state.first_seq, state.bytes)
            };
            if first > head {
                continue;
            }
            let max_age_ms = u64::try_from(policy.max_age.as_millis()).unwrap_or(u64::MAX);
            let cutoff = now.saturating_sub(max_age_ms);
            let mut count = head - first + 1;
            let mut size = bytes;
            let over = count > policy.max_msgs || size > policy.max_bytes;
            let oldest_expired = {
                let cached = channel.lock().cache.front().map(|m| (m.seq, m.ts));
                // When the oldest message is cached its age is known without I/O.
                !matches!(cached, Some((seq, ts)) if seq == first && ts >= cutoff)
            };
            if !over && !oldest_expired {
                continue;
            }
            let store = Arc::clone(&self.store);
            let id = channel.id();
            let (new_first, removed) = tokio::task::spawn_blocking(move || {
                store.trim(id, head, |_, record| {
                    let drop =
                        count > policy.max_msgs || size > policy.max_bytes || record.ts < cutoff;
                    if drop {
                        count -= 1;
                        size = size.saturating_sub(record.size());
                    }
                    drop
                })
            })
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??;
            if new_first > first {
                tracing::debug!(channel = %channel.name(), first = new_first, removed, "retention trimmed");
                channel.trimmed(new_first, removed);
            }
        }
        Ok(())
    }

    /// Saves consumers, stops the writer and flushes. Call once, after every
    /// session has ended.
    pub async fn shutdown(&self) -> Result<(), BrokerError> {
        let served = self.relays.stop_serving(self).await;
        let consumers: Vec<Arc<Consumer>> = lock(&self.consumers).values().cloned().collect();
        let saved = async {
            for consumer in consumers.iter().filter(|c| c.is_persistent()) {
                let record = consumer.lock().record();
                let (store, channel, name) = (
                    Arc::clone(&self.store),
                    consumer.channel().id(),
                    consumer.key().to_owned(),
                );
                tokio::task::spawn_blocking(move || store.save_consumer(channel, &name, &record))
                    .await
                    .map_err(|e| BrokerError::Internal(e.to_string()))??;
            }
            self.store.mark_clean()?;
            self.flush().await
        }
        .await;
        // In a cluster: give the consumers back, then tell the nodes whose
        // sessions read them here, which subscribe again and find them free.
        let held = consumers
            .iter()
            .filter(|c| c.is_persistent())
            .map(|c| (c.channel().id(), c.key().to_owned()))
            .collect();
        self.release_leases(held).await;
        self.relays.announce_gone(served);
        saved?;
        let _ = self.writer.send(WriterRequest::Stop).await;
        let threads = std::mem::take(&mut *lock(&self.threads));
        tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?;
        Ok(())
    }
}

/// The retry rules of a namespace, as consumers apply them.
pub fn retry_policy(policy: &NamespacePolicy) -> RetryPolicy {
    RetryPolicy {
        ack_wait_ms: u64::try_from(policy.ack_wait.as_millis()).unwrap_or(u64::MAX),
        max_deliver: policy.max_deliver,
        backoff: Backoff::new(policy.backoff_base, policy.backoff_max),
        max_scheduled: policy.max_retries,
    }
}

/// Names the consumer a subscription attaches to: group > consumer > user >
/// an anonymous one that lives as long as the subscription.
fn consumer_key(
    request: &SubscribeRequest,
    id: SubscriptionId,
    durable: bool,
) -> Result<(String, ConsumerMode, bool), BrokerError> {
    let check = |what: &str, name: &str| {
        ChannelName::new(name)
            .map(|_| ())
            .map_err(|e| BrokerError::BadRequest(format!("{what} name: {e}")))
    };
    if let Some(group) = &request.group {
        check("group", group)?;
        return Ok((format!("g/{group}"), ConsumerMode::Queue, durable));
    }
    if let Some(consumer) = &request.consumer {
        check("consumer", consumer)?;
        return Ok((format!("c/{consumer}"), ConsumerMode::Fanout, durable));
    }
    if let Some(user) = &request.user {
        return Ok((format!("u/{user}"), ConsumerMode::Fanout, durable));
    }
    Ok((format!("a/{id}"), ConsumerMode::Fanout, false))
}

/// How often consumer state is saved.
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
