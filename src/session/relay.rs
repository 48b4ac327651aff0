//! Subscriptions served by another node of a cluster.
//!
//! In a cluster a durable consumer lives on one node at a time: the node
//! that holds its lease (see [`Broker::subscribe`]) runs its state machine,
//! so windows, acks, retries and queue groups work exactly as on one node.
//! A client connected to another node still subscribes there: its node (the
//! *member*) opens a *link* to the owner over Redis pub/sub (each node
//! listens on its own channel, `{prefix}:node:{id}`), forwards the client's
//! `subscribe`, `ack`, `nack`, `progress` and `term` for that channel, and
//! hands the owner's `subscribed`, `msg`, `msgs`, `gap` and `error` frames
//! to the client. The owner runs an ordinary subscription pump for the link.
//!
//! Pub/sub can drop a message: a lost delivery or ack is redelivered after
//! `ack_wait` like any other; a lost `open` times out and the client gets
//! `unavailable`. When the owner leaves the cluster (its membership runs
//! out, or it stops), each member ends its links' subscriptions with
//! `unsubscribed {id: 0}`; the SDK subscribes again and the consumer moves
//! to a live node with the state the owner last saved (at-least-once). When
//! a member leaves, the owner detaches its links, which gives their
//! deliveries back to the consumer.
//!
//! Messages between nodes are MessagePack; frames inside them are encoded
//! with the MessagePack codec of the wire protocol.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::registry::{ConnectionHandle, Control};
use super::{Outgoing, acks, error, subscription};
use crate::broker::{Broker, BrokerError, SubscribeRequest, Subscription};
use crate::protocol::{
    AckMode, ClientFrame, Codec, ErrorCode, ServerFrame, Subscribe, Subscribed, Unsubscribed,
    decode_client, decode_server, encode_client, encode_server,
};

/// How long a member waits for the owner's answer to `open`.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// Frames an owner queues for one link before its pump waits.
const LINK_BUFFER: usize = 64;

/// Messages sent to another node and not yet handed to Redis; past this
/// a message is dropped (and counted as lost: acks time out, deliveries
/// are redelivered).
const SEND_BUFFER: usize = 65_536;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Relay {
    /// Member → owner: subscribe for a client of node `from`.
    Open {
        from: String,
        link: u64,
        user: Option<String>,
        batch: bool,
        #[serde(with = "serde_bytes")]
        subscribe: Vec<u8>,
    },
    /// Member → owner: a client frame for the link.
    Frame {
        from: String,
        link: u64,
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
    },
    /// Member → owner: the client unsubscribed or left.
    Close { from: String, link: u64 },
    /// Owner → member: a server frame for the link's client.
    Out {
        from: String,
        link: u64,
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
    },
    /// Owner → member: the owner no longer serves the link.
    Gone { link: u64 },
}

/// A message for another node: its pub/sub channel and the bytes.
type Outbound = (String, Vec<u8>);

/// A message published to an ephemeral channel on node `from`.
#[derive(Debug, Serialize, Deserialize)]
struct Ephemeral {
    from: String,
    channel: String,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    headers: Option<crate::protocol::Headers>,
}

/// A message on the ephemeral pub/sub channel: delivered to this node's
/// subscribers unless this node published it.
pub fn on_ephemeral(broker: &Broker, bytes: &[u8]) {
    let Ok(message) = rmp_serde::from_slice::<Ephemeral>(bytes) else {
        return;
    };
    if message.from == broker.relays().me {
        return;
    }
    broker.publish_from_peer(
        &message.channel,
        bytes::Bytes::from(message.data),
        message.headers,
    );
}

/// A link this node opened for one of its sessions.
struct Link {
    owner: String,
    channel: String,
    handle: Arc<ConnectionHandle>,
    /// Waits for the answer to `open` (`subscribed` or `error`).
    first: Option<oneshot::Sender<ServerFrame>>,
}

/// A link this node serves for a session on another node.
struct Served {
    subscription: Arc<Subscription>,
    cancel: CancellationToken,
    pump: JoinHandle<()>,
}

/// Both sides of every link of this node.
pub struct Relays {
    me: String,
    prefix: String,
    outbox: mpsc::Sender<Outbound>,
    inbox: Mutex<Option<mpsc::Receiver<Outbound>>>,
    links: Mutex<HashMap<u64, Link>>,
    served: Mutex<HashMap<(String, u64), Served>>,
    /// Stops the sender once the last messages (the shutdown's) are queued.
    stopped: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn frame_bytes(frame: &ServerFrame) -> Vec<u8> {
    encode_server(Codec::MsgPack, frame).unwrap_or_default()
}

impl Relays {
    /// The relays of node `me`, whose Redis keys start with `prefix`.
    pub fn new(me: &str, prefix: &str) -> Self {
        let (outbox, inbox) = mpsc::channel(SEND_BUFFER);
        Self {
            me: me.to_owned(),
            prefix: prefix.to_owned(),
            outbox,
            inbox: Mutex::new(Some(inbox)),
            links: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            stopped: CancellationToken::new(),
        }
    }

    /// The pub/sub channel of node `id`.
    pub fn channel_of(&self, id: &str) -> String {
        format!("{}:node:{id}", self.prefix)
    }

    fn send(&self, node: &str, message: &Relay) {
        let bytes = rmp_serde::to_vec_named(message).unwrap_or_default();
        if self
            .outbox
            .try_send((self.channel_of(node), bytes))
            .is_err()
        {
            tracing::warn!(
                node,
                "relay queue full: a message to another node was dropped"
            );
        }
    }

    /// The pub/sub channel of messages published to ephemeral channels.
    pub fn ephemeral_channel(&self) -> String {
        format!("{}:ephemeral", self.prefix)
    }

    /// Sends a message published here to an ephemeral channel to every
    /// other node (at most once: lost if pub/sub drops it).
    pub(crate) fn broadcast_ephemeral(
        &self,
        channel: &str,
        data: &bytes::Bytes,
        headers: Option<&crate::protocol::Headers>,
    ) {
        let message = Ephemeral {
            from: self.me.clone(),
            channel: channel.to_owned(),
            data: data.to_vec(),
            headers: headers.cloned(),
        };
        let bytes = rmp_serde::to_vec_named(&message).unwrap_or_default();
        if self
            .outbox
            .try_send((self.ephemeral_channel(), bytes))
            .is_err()
        {
            tracing::warn!(
                "relay queue full: an ephemeral message was not sent to the other nodes"
            );
        }
    }

    /// Member side: subscribes through the owner `owner` for the session
    /// with `handle`. Returns the link and the owner's `subscribed`, or the
    /// `error` frame to answer with.
    pub(crate) async fn open(
        &self,
        owner: &str,
        handle: Arc<ConnectionHandle>,
        user: Option<String>,
        batch: bool,
        subscribe: &Subscribe,
        link: u64,
    ) -> Result<Subscribed, ServerFrame> {
        let (tx, rx) = oneshot::channel();
        lock(&self.links).insert(
            link,
            Link {
                owner: owner.to_owned(),
                channel: subscribe.channel.clone(),
                handle,
                first: Some(tx),
            },
        );
        let frame = encode_client(Codec::MsgPack, &ClientFrame::Subscribe(subscribe.clone()))
            .unwrap_or_default();
        self.send(
            owner,
            &Relay::Open {
                from: self.me.clone(),
                link,
                user,
                batch,
                subscribe: frame,
            },
        );
        let answer = tokio::time::timeout(OPEN_TIMEOUT, rx).await;
        match answer {
            Ok(Ok(ServerFrame::Subscribed(subscribed))) => Ok(subscribed),
            Ok(Ok(refusal)) => {
                lock(&self.links).remove(&link);
                Err(refusal)
            }
            Ok(Err(_)) | Err(_) => {
                self.close(link);
                Err(error(
                    Some(subscribe.id),
                    ErrorCode::Unavailable,
                    format!(
                        "the node serving this consumer ({owner}) did not answer; subscribe again"
                    ),
                ))
            }
        }
    }

    /// Member side: hands a client frame (ack, nack, progress, term) to the
    /// link's owner.
    pub(crate) fn forward(&self, link: u64, frame: &ClientFrame) {
        let owner = match lock(&self.links).get(&link) {
            Some(l) => l.owner.clone(),
            None => return,
        };
        let frame = encode_client(Codec::MsgPack, frame).unwrap_or_default();
        self.send(
            &owner,
            &Relay::Frame {
                from: self.me.clone(),
                link,
                frame,
            },
        );
    }

    /// Member side: the client unsubscribed or left.
    pub(crate) fn close(&self, link: u64) {
        if let Some(l) = lock(&self.links).remove(&link) {
            self.send(
                &l.owner,
                &Relay::Close {
                    from: self.me.clone(),
                    link,
                },
            );
        }
    }

    /// Node `id` left the cluster: end the subscriptions it served for
    /// this node's sessions, and stop serving its links.
    pub(crate) async fn node_gone(&self, broker: &Broker, id: &str) {
        self.prune(broker, |node| node != id).await;
    }

    /// The nodes this node has links with (as member or as owner).
    pub(crate) fn peers(&self) -> std::collections::HashSet<String> {
        let mut peers: std::collections::HashSet<String> = lock(&self.links)
            .values()
            .map(|l| l.owner.clone())
            .collect();
        peers.extend(lock(&self.served).keys().map(|(node, _)| node.clone()));
        peers
    }

    /// Ends the links with every node for which `live` says no: the
    /// subscriptions they served for this node's sessions end, and this
    /// node stops serving theirs.
    pub(crate) async fn prune(&self, broker: &Broker, live: impl Fn(&str) -> bool) {
        let ended: Vec<Link> = {
            let mut links = lock(&self.links);
            let gone: Vec<u64> = links
                .iter()
                .filter(|(_, l)| !live(&l.owner))
                .map(|(k, _)| *k)
                .collect();
            gone.iter().filter_map(|k| links.remove(k)).collect()
        };
        for link in ended {
            link.handle.send(Control::EndSubscription {
                channel: link.channel,
            });
        }
        let served: Vec<Served> = {
            let mut served = lock(&self.served);
            let gone: Vec<(String, u64)> =
                served.keys().filter(|(n, _)| !live(n)).cloned().collect();
            gone.iter().filter_map(|k| served.remove(k)).collect()
        };
        for s in served {
            stop(broker, s).await;
        }
    }

    /// This node stops: the links it serves stop (their deliveries go back
    /// to their consumers). Returns them for [`Relays::announce_gone`],
    /// which the broker calls once it has saved the consumers and given
    /// their leases back, so that the members' next subscribe finds them
    /// free.
    pub(crate) async fn stop_serving(&self, broker: &Broker) -> Vec<(String, u64)> {
        let served: Vec<((String, u64), Served)> = lock(&self.served).drain().collect();
        let mut gone = Vec::with_capacity(served.len());
        for (key, s) in served {
            stop(broker, s).await;
            gone.push(key);
        }
        gone
    }

    /// Tells the members of `links` that they are gone; then the sender
    /// delivers what is queued and stops.
    pub(crate) fn announce_gone(&self, links: Vec<(String, u64)>) {
        for (node, link) in links {
            self.send(&node, &Relay::Gone { link });
        }
        self.stopped.cancel();
    }

    /// Channel `name` was deleted or purged: the links served for it end
    /// (their members answer their clients `unsubscribed {id: 0}`).
    pub(crate) fn end_channel(&self, name: &str) {
        let ended: Vec<((String, u64), Served)> = {
            let mut served = lock(&self.served);
            let keys: Vec<(String, u64)> = served
                .iter()
                .filter(|(_, s)| s.subscription.channel.name().as_str() == name)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| served.remove(&k).map(|s| (k, s)))
                .collect()
        };
        for ((node, link), s) in ended {
            s.cancel.cancel();
            self.send(&node, &Relay::Gone { link });
        }
    }

    /// Sends queued messages to Redis until the node shuts down (one
    /// connection, so each link's frames stay in order).
    pub async fn run_sender(self: Arc<Self>, url: String) {
        let Some(mut inbox) = lock(&self.inbox).take() else {
            return;
        };
        let mut connection = None;
        let mut batch = Vec::new();
        let mut stopping = false;
        loop {
            if stopping {
                // What the shutdown queued, then stop.
                while let Ok(message) = inbox.try_recv() {
                    batch.push(message);
                }
                if batch.is_empty() {
                    return;
                }
            } else {
                tokio::select! {
                    () = self.stopped.cancelled() => { stopping = true; continue; }
                    got = inbox.recv_many(&mut batch, 256) => if got == 0 { return },
                }
            }
            if connection.is_none() {
                connection = connect(&url).await;
            }
            let Some(con) = connection.as_mut() else {
                tracing::warn!(
                    lost = batch.len(),
                    "relay: Redis unreachable; messages to other nodes dropped"
                );
                batch.clear();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut pipe = redis::pipe();
            for (channel, bytes) in batch.drain(..) {
                pipe.cmd("PUBLISH").arg(channel).arg(bytes).ignore();
            }
            if let Err(e) = pipe.query_async::<()>(con).await {
                tracing::warn!(error = %e, "relay: publishing to other nodes failed");
                connection = None;
            }
        }
    }
}

async fn connect(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).ok()?;
    match tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(connection)) => Some(connection),
        _ => None,
    }
}

async fn stop(broker: &Broker, served: Served) {
    served.cancel.cancel();
    let _ = served.pump.await;
    broker.unsubscribe(&served.subscription).await;
}

/// A message from another node on this node's channel.
pub async fn on_message(broker: &Arc<Broker>, bytes: &[u8]) {
    let Ok(message) = rmp_serde::from_slice::<Relay>(bytes) else {
        tracing::debug!("relay: unreadable message");
        return;
    };
    let relays = broker.relays();
    match message {
        Relay::Open {
            from,
            link,
            user,
            batch,
            subscribe,
        } => {
            let Ok(ClientFrame::Subscribe(subscribe)) = decode_client(Codec::MsgPack, &subscribe)
            else {
                return;
            };
            serve(broker, from, link, user, batch, subscribe).await;
        }
        Relay::Frame { from, link, frame } => {
            let Ok(frame) = decode_client(Codec::MsgPack, &frame) else {
                return;
            };
            let subscription = lock(&relays.served)
                .get(&(from.clone(), link))
                .map(|s| Arc::clone(&s.subscription));
            let Some(sub) = subscription else {
                return;
            };
            let reply = match frame {
                ClientFrame::Ack(ack) => acks::ack(&sub, &ack),
                ClientFrame::Nack(nack) => acks::nack(&sub, &nack).await,
                ClientFrame::Progress(progress) => acks::progress(&sub, &progress),
                ClientFrame::Term(term) => acks::term(broker, &sub, term).await,
                _ => None,
            };
            if let Some(reply) = reply {
                relays.send(
                    &from,
                    &Relay::Out {
                        from: relays.me.clone(),
                        link,
                        frame: frame_bytes(&reply),
                    },
                );
            }
        }
        Relay::Close { from, link } => {
            let served = lock(&relays.served).remove(&(from, link));
            if let Some(served) = served {
                stop(broker, served).await;
            }
        }
        Relay::Out { from, link, frame } => {
            let Ok(frame) = decode_server(Codec::MsgPack, &frame) else {
                return;
            };
            let mut links = lock(&relays.links);
            let Some(l) = links.get_mut(&link) else {
                // A link this node closed (its `close` may have been lost):
                // tell the owner again, so it stops pumping into the void.
                drop(links);
                relays.send(
                    &from,
                    &Relay::Close {
                        from: relays.me.clone(),
                        link,
                    },
                );
                return;
            };
            if let Some(first) = l.first.take() {
                let _ = first.send(frame);
                return;
            }
            match frame {
                // The owner ended it (the channel was deleted or purged).
                ServerFrame::Unsubscribed(Unsubscribed { id: 0, .. }) => {
                    if let Some(l) = links.remove(&link) {
                        l.handle
                            .send(Control::EndSubscription { channel: l.channel });
                    }
                }
                frame => {
                    l.handle.send(Control::Send(Box::new(frame)));
                }
            }
        }
        Relay::Gone { link } => {
            if let Some(l) = lock(&relays.links).remove(&link) {
                l.handle
                    .send(Control::EndSubscription { channel: l.channel });
            }
        }
    }
}

/// Owner side: subscribes for a session of node `from` and pumps its
/// deliveries back.
async fn serve(
    broker: &Arc<Broker>,
    from: String,
    link: u64,
    user: Option<String>,
    batch: bool,
    subscribe: Subscribe,
) {
    let relays = broker.relays();
    let reply = |frame: &ServerFrame| {
        relays.send(
            &from,
            &Relay::Out {
                from: relays.me.clone(),
                link,
                frame: frame_bytes(frame),
            },
        );
    };
    let Ok(channel) = crate::protocol::ChannelName::new(&subscribe.channel) else {
        return;
    };
    let request = SubscribeRequest {
        channel,
        consumer: subscribe.consumer.clone(),
        group: subscribe.group.clone(),
        user,
        since: subscribe.since,
        from: subscribe.from,
        max_in_flight: subscribe.max_in_flight,
        ack: subscribe.ack.unwrap_or(AckMode::Manual),
    };
    let subscription = match broker.subscribe(request).await {
        Ok(subscription) => Arc::new(subscription),
        Err(BrokerError::Elsewhere(owner)) => {
            reply(&error(
                Some(subscribe.id),
                ErrorCode::Unavailable,
                format!("this consumer moved to node {owner} meanwhile; subscribe again"),
            ));
            return;
        }
        Err(e) => {
            reply(&super::broker_error(Some(subscribe.id), &e));
            return;
        }
    };
    reply(&ServerFrame::Subscribed(Subscribed {
        id: subscribe.id,
        channel: subscribe.channel.clone(),
        epoch: subscription.epoch.clone(),
        first_seq: subscription.first_seq,
        last_seq: subscription.last_seq,
        recovered: subscription.recovered,
    }));
    let (out, mut frames) = mpsc::channel::<Outgoing>(LINK_BUFFER);
    let cancel = CancellationToken::new();
    let pump = tokio::spawn(subscription::pump(
        Arc::clone(broker),
        Arc::clone(&subscription),
        out,
        None,
        batch,
        cancel.clone(),
    ));
    let forward = {
        let (broker, from) = (Arc::clone(broker), from.clone());
        tokio::spawn(async move {
            while let Some(outgoing) = frames.recv().await {
                let relays = broker.relays();
                match outgoing {
                    Outgoing::Frame(frame) => relays.send(
                        &from,
                        &Relay::Out {
                            from: relays.me.clone(),
                            link,
                            frame: frame_bytes(&frame),
                        },
                    ),
                    Outgoing::Close(_) => relays.send(&from, &Relay::Gone { link }),
                }
            }
        })
    };
    // The forwarder ends with the pump (its sender goes with it).
    drop(forward);
    lock(&relays.served).insert(
        (from, link),
        Served {
            subscription,
            cancel,
            pump,
        },
    );
}
