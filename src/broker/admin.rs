//! What operators see and change: channel and consumer statistics, peeking
//! at the log, purging and deleting channels, moving consumers. The admin
//! API (`crate::admin`) serves these as JSON; the views serialize as the
//! API's schemas in `proto/admin.openapi.yaml`.
//!
//! In a cluster the shared store is the truth about durable channels: views
//! read a channel's numbers from it, whether this node has the channel in
//! memory or not, and operations on a channel this node never used load it
//! first (never creating one). What only memory knows (subscribers, publish
//! rate, live consumers) is this node's; the admin API asks the other nodes
//! for theirs.

use std::sync::Arc;

use base64::Engine;
use serde::Serialize;

use super::{Broker, BrokerError, lock, now_ms};
use crate::broker::Channel;
use crate::config::NamespacePolicy;
use crate::delivery::{Consumer, ConsumerMode, ConsumerState};
use crate::protocol::{ChannelName, Headers};
use crate::session::registry::Control;
use crate::storage::{ConsumerRecord, LoadedChannel, MessageRecord};

/// A channel in a list.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelSummary {
    pub name: String,
    pub namespace: String,
    pub durable: bool,
    pub epoch: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub messages: u64,
    pub bytes: u64,
    pub publish_rate: f64,
    pub subscribers: usize,
    pub dead_letters: u64,
}

/// A namespace policy, durations in ms.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyView {
    pub durable: bool,
    pub ack_wait_ms: u128,
    pub max_deliver: u32,
    pub backoff_base_ms: u128,
    pub backoff_max_ms: u128,
    pub max_in_flight: u32,
    pub max_msgs: u64,
    pub max_bytes: u64,
    pub max_age_ms: u128,
    pub max_retries: usize,
    pub dlq_max: u64,
}

impl From<&NamespacePolicy> for PolicyView {
    fn from(p: &NamespacePolicy) -> Self {
        Self {
            durable: p.durable,
            ack_wait_ms: p.ack_wait.as_millis(),
            max_deliver: p.max_deliver,
            backoff_base_ms: p.backoff_base.as_millis(),
            backoff_max_ms: p.backoff_max.as_millis(),
            max_in_flight: p.max_in_flight,
            max_msgs: p.max_msgs,
            max_bytes: p.max_bytes,
            max_age_ms: p.max_age.as_millis(),
            max_retries: p.max_retries,
            dlq_max: p.dlq_max,
        }
    }
}

/// One consumer of a channel.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub kind: &'static str,
    pub floor: u64,
    pub lag: u64,
    pub in_flight: usize,
    pub scheduled: usize,
    pub oldest_unacked_age_ms: Option<u64>,
    pub redeliveries: u64,
    pub connected: bool,
    pub subscriptions: usize,
    /// The nodes where it has live subscriptions.
    pub nodes: Vec<String>,
}

/// A channel with its policy and consumers.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelDetail {
    #[serde(flatten)]
    pub summary: ChannelSummary,
    pub policy: PolicyView,
    pub consumers: Vec<ConsumerInfo>,
}

/// A stored message as operators read it: text when it is UTF-8, else base64.
#[derive(Debug, Clone, Serialize)]
pub struct StoredMessage {
    pub seq: u64,
    pub ts: u64,
    pub msg_id: Option<String>,
    pub headers: Headers,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

impl StoredMessage {
    pub fn new(seq: u64, ts: u64, msg_id: Option<String>, headers: Headers, data: &[u8]) -> Self {
        let (data, data_b64) = match std::str::from_utf8(data) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(data)),
            ),
        };
        Self {
            seq,
            ts,
            msg_id,
            headers,
            data,
            data_b64,
        }
    }

    pub fn from_record(seq: u64, record: MessageRecord) -> Self {
        Self::new(
            seq,
            record.ts,
            record.msg_id,
            record.headers.unwrap_or_default(),
            &record.data,
        )
    }
}

fn mode_of(key: &str) -> ConsumerMode {
    if key.starts_with("g/") {
        ConsumerMode::Queue
    } else {
        ConsumerMode::Fanout
    }
}

fn kind(mode: ConsumerMode) -> &'static str {
    match mode {
        ConsumerMode::Queue => "queue",
        ConsumerMode::Fanout => "fanout",
    }
}

impl Broker {
    /// A channel's numbers.
    pub fn channel_summary(&self, channel: &Channel) -> ChannelSummary {
        let (epoch, first_seq, last_seq) = channel.position();
        let (messages, bytes) = channel.stored();
        ChannelSummary {
            name: channel.name().as_str().to_owned(),
            namespace: channel.name().namespace().to_owned(),
            durable: channel.is_durable(),
            epoch,
            first_seq,
            last_seq,
            messages,
            bytes,
            publish_rate: channel.publish_rate(),
            subscribers: channel.subscribers(),
            dead_letters: channel
                .dead_letters()
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// A stored channel's numbers, from its stored state; subscribers and
    /// publish rate are this node's (0 when it does not have it in memory).
    fn loaded_summary(&self, loaded: &LoadedChannel) -> ChannelSummary {
        let memory = lock(&self.channels).get(&loaded.name).cloned();
        ChannelSummary {
            name: loaded.name.clone(),
            namespace: ChannelName::new(&loaded.name)
                .map(|n| n.namespace().to_owned())
                .unwrap_or_default(),
            durable: true,
            epoch: loaded.record.epoch.clone(),
            first_seq: loaded.first_seq,
            last_seq: loaded.last_seq,
            messages: (loaded.last_seq + 1).saturating_sub(loaded.first_seq),
            bytes: loaded.bytes,
            publish_rate: memory.as_ref().map_or(0.0, |c| c.publish_rate()),
            subscribers: memory.as_ref().map_or(0, |c| c.subscribers()),
            dead_letters: loaded.dead_letters,
        }
    }

    /// Channels in memory whose names start with `prefix`, after `after`,
    /// by name (only the ephemeral ones with `ephemeral_only`).
    fn channel_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        ephemeral_only: bool,
    ) -> Vec<Arc<Channel>> {
        let channels = lock(&self.channels);
        let mut names: Vec<&String> = channels
            .iter()
            .filter(|(n, c)| {
                n.starts_with(prefix)
                    && after.is_none_or(|a| n.as_str() > a)
                    && !(ephemeral_only && c.is_durable())
            })
            .map(|(n, _)| n)
            .collect();
        names.sort();
        names
            .into_iter()
            .take(limit)
            .filter_map(|n| channels.get(n).cloned())
            .collect()
    }

    /// Up to `limit` channels whose names start with `prefix`, after
    /// `after`, by name. In a cluster: the durable channels of the shared
    /// store (whether this node has them in memory or not) and this node's
    /// ephemeral ones.
    pub async fn channel_list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ChannelSummary>, BrokerError> {
        let clustered = self.clustered();
        let memory = self.channel_page(prefix, after, limit, clustered);
        let mut page: std::collections::BTreeMap<String, ChannelSummary> = memory
            .iter()
            .map(|c| (c.name().as_str().to_owned(), self.channel_summary(c)))
            .collect();
        if clustered {
            let (store, prefix, after) = (
                Arc::clone(&self.store),
                prefix.to_owned(),
                after.map(str::to_owned),
            );
            let stored = tokio::task::spawn_blocking(move || {
                store.shared().map_or(Ok(Vec::new()), |shared| {
                    shared.channel_page(&prefix, after.as_deref(), limit)
                })
            })
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??;
            for loaded in &stored {
                page.insert(loaded.name.clone(), self.loaded_summary(loaded));
            }
        }
        Ok(page.into_values().take(limit).collect())
    }

    /// How many channels there are: in a cluster, the stored ones and this
    /// node's ephemeral ones.
    pub async fn channel_count(&self) -> Result<usize, BrokerError> {
        if !self.clustered() {
            return Ok(lock(&self.channels).len());
        }
        let ephemeral = lock(&self.channels)
            .values()
            .filter(|c| !c.is_durable())
            .count();
        let store = Arc::clone(&self.store);
        let stored = tokio::task::spawn_blocking(move || {
            store
                .shared()
                .map_or(Ok(0), |shared| shared.channel_count())
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))??;
        Ok(usize::try_from(stored)
            .unwrap_or(usize::MAX)
            .saturating_add(ephemeral))
    }

    /// The stored state of channel `name`, in a cluster (`None` on sled or
    /// when it is not stored).
    async fn load_stored(&self, name: &ChannelName) -> Result<Option<LoadedChannel>, BrokerError> {
        if !self.clustered() {
            return Ok(None);
        }
        let (store, name) = (Arc::clone(&self.store), name.as_str().to_owned());
        tokio::task::spawn_blocking(move || {
            store
                .shared()
                .map_or(Ok(None), |shared| shared.load_channel(&name))
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
        .map_err(BrokerError::from)
    }

    /// A stored channel as a [`Channel`], durable whatever its namespace
    /// says now (as at start-up); not registered.
    fn stored_as_channel(&self, name: &ChannelName, loaded: &LoadedChannel) -> Channel {
        let mut policy = self.config.policy(name.namespace()).clone();
        policy.durable = true;
        self.build_channel(name.clone(), policy, loaded, self.new_dedup())
    }

    /// A channel to read, with its numbers; never creates one. In a cluster
    /// a durable channel is read from the shared store (fresh numbers
    /// whether this node has it in memory or not, subscribers and rate
    /// from memory) as a channel this node does not register; otherwise it
    /// is the channel in memory.
    pub async fn channel_view(
        &self,
        name: &ChannelName,
    ) -> Result<(Arc<Channel>, ChannelSummary), BrokerError> {
        if let Some(loaded) = self.load_stored(name).await? {
            let summary = self.loaded_summary(&loaded);
            return Ok((Arc::new(self.stored_as_channel(name, &loaded)), summary));
        }
        let channel = self.existing_channel(name)?;
        if self.clustered() && channel.is_durable() {
            // Gone from the store: deleted on another node.
            return Err(BrokerError::NotFound(format!("no channel {name}")));
        }
        let summary = self.channel_summary(&channel);
        Ok((channel, summary))
    }

    /// A channel that exists, to change it: the one in memory, else (in a
    /// cluster) the stored one, loaded into memory as a client's first use
    /// on this node would. Never creates one.
    pub(crate) async fn stored_channel(
        &self,
        name: &ChannelName,
    ) -> Result<Arc<Channel>, BrokerError> {
        if let Ok(channel) = self.existing_channel(name) {
            return Ok(channel);
        }
        let loaded = self
            .load_stored(name)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no channel {name}")))?;
        let mut channels = lock(&self.channels);
        if let Some(channel) = channels.get(name.as_str()) {
            // A request loaded it meanwhile.
            return Ok(Arc::clone(channel));
        }
        let channel = Arc::new(self.stored_as_channel(name, &loaded));
        channels.insert(name.as_str().to_owned(), Arc::clone(&channel));
        Ok(channel)
    }

    /// A channel with its policy and every consumer: those in memory and
    /// those only stored. With `local`, only what this node has in memory:
    /// the channel (else `NotFound`), its numbers and the consumers loaded
    /// here (what the other nodes of a cluster ask for).
    pub async fn channel_detail(
        &self,
        name: &ChannelName,
        local: bool,
    ) -> Result<ChannelDetail, BrokerError> {
        let (channel, summary) = if local {
            let channel = self.existing_channel(name)?;
            let summary = self.channel_summary(&channel);
            (channel, summary)
        } else {
            self.channel_view(name).await?
        };
        let loaded: Vec<Arc<Consumer>> = lock(&self.consumers)
            .iter()
            .filter(|((c, _), _)| c == name.as_str())
            .map(|(_, consumer)| Arc::clone(consumer))
            .collect();
        let stored = if channel.is_durable() && !local {
            let (store, id) = (Arc::clone(&self.store), channel.id());
            tokio::task::spawn_blocking(move || store.list_consumers(id))
                .await
                .map_err(|e| BrokerError::Internal(e.to_string()))??
        } else {
            Vec::new()
        };
        let mut consumers = Vec::new();
        for consumer in &loaded {
            let state = consumer.lock();
            consumers.push((
                loaded_info(consumer.key(), &state, summary.last_seq, self.node.id()),
                state.oldest_unacked(summary.last_seq),
            ));
        }
        for (key, record) in stored {
            if loaded.iter().any(|c| c.key() == key) {
                continue;
            }
            let oldest = oldest_unacked_of(&record, summary.last_seq);
            consumers.push((stored_info(key, &record, summary.last_seq), oldest));
        }
        let now = now_ms();
        let mut out = Vec::with_capacity(consumers.len());
        for (mut info, oldest) in consumers {
            info.oldest_unacked_age_ms = match oldest {
                Some(seq) => self
                    .message_ts(&channel, seq.max(summary.first_seq))
                    .await
                    .map(|ts| now.saturating_sub(ts)),
                None => None,
            };
            out.push(info);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ChannelDetail {
            summary,
            policy: PolicyView::from(channel.policy()),
            consumers: out,
        })
    }

    /// The publish time of a message, from the cache or the store.
    async fn message_ts(&self, channel: &Arc<Channel>, seq: u64) -> Option<u64> {
        if seq > channel.head() {
            return None;
        }
        if let Some(ts) = channel
            .lock()
            .cache
            .iter()
            .find(|m| m.seq == seq)
            .map(|m| m.ts)
        {
            return Some(ts);
        }
        if !channel.is_durable() {
            return None;
        }
        let (store, id) = (Arc::clone(&self.store), channel.id());
        tokio::task::spawn_blocking(move || store.read_one(id, seq))
            .await
            .ok()?
            .ok()?
            .map(|record| record.ts)
    }

    /// Up to `limit` messages of `channel` (from [`Broker::channel_view`])
    /// with seqs in `from..=to`, oldest first.
    pub async fn peek(
        &self,
        channel: &Arc<Channel>,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, BrokerError> {
        let to = to.min(channel.head());
        if from > to {
            return Ok(Vec::new());
        }
        if !channel.is_durable() {
            let state = channel.lock();
            return Ok(state
                .cache
                .iter()
                .filter(|m| (from..=to).contains(&m.seq))
                .take(limit)
                .map(|m| {
                    StoredMessage::new(
                        m.seq,
                        m.ts,
                        None,
                        m.headers.clone().unwrap_or_default(),
                        &m.data,
                    )
                })
                .collect());
        }
        let (store, id) = (Arc::clone(&self.store), channel.id());
        let records = tokio::task::spawn_blocking(move || store.read_range(id, from, to, limit))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??;
        Ok(records
            .into_iter()
            .map(|(seq, record)| StoredMessage::from_record(seq, record))
            .collect())
    }

    /// Deletes a channel: its messages, consumers and dead letters. Live
    /// subscriptions are ended (`unsubscribed`, `id: 0`); the next use of
    /// the name creates the channel anew, with a new epoch. Returns the
    /// number of stored messages removed.
    pub async fn delete_channel(&self, name: &ChannelName) -> Result<u64, BrokerError> {
        let channel = match self.forget_channel(name, None) {
            Some(channel) => channel,
            // In a cluster: a stored channel this node never used.
            None => self.channel_view(name).await?.0,
        };
        if !channel.is_durable() {
            let (messages, _) = channel.stored();
            return Ok(messages);
        }
        let removed = self.delete_stored(&channel).await?;
        self.flush().await?;
        if self.store.shared().is_some() {
            super::cluster::announce_deleted(&self.store, name.as_str(), channel.id()).await;
        }
        tracing::info!(channel = %name, removed, "channel deleted by an operator");
        Ok(removed)
    }

    /// Drops a channel from memory (only if its store id is `id`, when
    /// given): no more appends, its consumers retired, its subscriptions
    /// ended (`unsubscribed`, `id: 0`). Returns it when it was there.
    pub(crate) fn forget_channel(
        &self,
        name: &ChannelName,
        id: Option<u64>,
    ) -> Option<Arc<Channel>> {
        let channel = {
            let mut channels = lock(&self.channels);
            if id.is_some_and(|id| channels.get(name.as_str()).is_none_or(|c| c.id() != id)) {
                return None;
            }
            channels.remove(name.as_str())?
        };
        channel.mark_deleted();
        let retired: Vec<Arc<Consumer>> = {
            let mut consumers = lock(&self.consumers);
            let keys: Vec<_> = consumers
                .keys()
                .filter(|(c, _)| c == name.as_str())
                .cloned()
                .collect();
            keys.iter().filter_map(|k| consumers.remove(k)).collect()
        };
        for consumer in &retired {
            consumer.retire();
        }
        for connection in self.connections.subscribed_to(name.as_str()) {
            connection.send(Control::EndSubscription {
                channel: name.as_str().to_owned(),
            });
        }
        self.relays().end_channel(name.as_str());
        Some(channel)
    }

    /// Drops every message of a channel and gives it a new epoch (seqs
    /// start again at 1). Consumers and dead letters go with the messages.
    pub async fn purge_channel(&self, name: &ChannelName) -> Result<ChannelSummary, BrokerError> {
        self.delete_channel(name).await?;
        let channel = self.channel(name)?;
        self.flush().await?;
        Ok(self.channel_summary(&channel))
    }

    /// Moves a consumer: every seq up to `seq` counts as acked, everything
    /// after it is delivered again.
    pub async fn reset_consumer(
        &self,
        name: &ChannelName,
        key: &str,
        seq: u64,
    ) -> Result<ConsumerInfo, BrokerError> {
        let channel = self.stored_channel(name).await?;
        let head = channel.head();
        if seq > head {
            return Err(BrokerError::BadRequest(format!(
                "seq {seq} is past the channel's last seq ({head})"
            )));
        }
        let known = self.loaded_consumer(name.as_str(), key).is_some() || {
            let (store, id, k) = (Arc::clone(&self.store), channel.id(), key.to_owned());
            channel.is_durable()
                && tokio::task::spawn_blocking(move || store.load_consumer(id, &k))
                    .await
                    .map_err(|e| BrokerError::Internal(e.to_string()))??
                    .is_some()
        };
        if !known {
            return Err(BrokerError::NotFound(format!(
                "channel {name} has no consumer {key:?}"
            )));
        }
        let persistent = channel.is_durable() && !key.starts_with("s/");
        if persistent {
            self.take_lease(&channel, key)
                .await
                .map_err(super::served_elsewhere)?;
        }
        let (consumer, _) = self
            .consumer(&channel, key, mode_of(key), persistent)
            .await?;
        consumer.update(|state| state.reset(seq)).await;
        consumer.wake();
        if consumer.is_persistent() {
            let record = consumer.lock().record();
            let (store, id, k) = (Arc::clone(&self.store), channel.id(), key.to_owned());
            tokio::task::spawn_blocking(move || store.save_consumer(id, &k, &record))
                .await
                .map_err(|e| BrokerError::Internal(e.to_string()))??;
            self.flush().await?;
        }
        tracing::info!(channel = %name, consumer = key, seq, "consumer reset by an operator");
        let state = consumer.lock();
        Ok(loaded_info(consumer.key(), &state, head, self.node.id()))
    }

    /// Samples every channel's publish rate; call about once a second.
    pub fn sample_rates(&self, elapsed: std::time::Duration) {
        let channels: Vec<Arc<Channel>> = lock(&self.channels).values().cloned().collect();
        for channel in channels {
            channel.sample_rate(elapsed);
        }
    }

    /// Seqs waiting for a retry, over the consumers in memory.
    pub fn retries_waiting(&self) -> usize {
        let consumers: Vec<Arc<Consumer>> = lock(&self.consumers).values().cloned().collect();
        consumers.iter().map(|c| c.lock().scheduled()).sum()
    }

    /// Bytes the store uses on disk.
    pub fn store_size(&self) -> u64 {
        self.store.size_on_disk()
    }
}

fn loaded_info(key: &str, state: &ConsumerState, last_seq: u64, node: &str) -> ConsumerInfo {
    let connected = state.subscriptions() > 0;
    ConsumerInfo {
        name: key.to_owned(),
        kind: kind(state.mode()),
        floor: state.floor(),
        lag: last_seq.saturating_sub(state.floor()),
        in_flight: state.in_flight_total(),
        scheduled: state.scheduled(),
        oldest_unacked_age_ms: None,
        redeliveries: state.redelivered(),
        connected,
        subscriptions: state.subscriptions(),
        nodes: if connected {
            vec![node.to_owned()]
        } else {
            Vec::new()
        },
    }
}

fn stored_info(key: String, record: &ConsumerRecord, last_seq: u64) -> ConsumerInfo {
    ConsumerInfo {
        kind: kind(mode_of(&key)),
        name: key,
        floor: record.floor,
        lag: last_seq.saturating_sub(record.floor),
        in_flight: 0,
        scheduled: record.scheduled.len(),
        oldest_unacked_age_ms: None,
        redeliveries: 0,
        connected: false,
        subscriptions: 0,
        nodes: Vec::new(),
    }
}

/// The lowest seq above the floor that is not acked, if any is waiting.
fn oldest_unacked_of(record: &ConsumerRecord, last_seq: u64) -> Option<u64> {
    let mut seq = record.floor + 1;
    while seq <= last_seq && record.acked.contains(&seq) {
        seq += 1;
    }
    (seq <= last_seq).then_some(seq)
}
