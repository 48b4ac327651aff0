//! The Rust client SDK: publish, subscribe and ack over one WebSocket that
//! reconnects by itself.
//!
//! The shape is async-nats's: a [`Client`] is a cheap [`Clone`] holding a
//! bounded command sender; one task (the *driver*) owns the socket, the
//! requests waiting for replies, the subscriptions and the reconnect state.
//!
//! What the SDK guarantees on top of the protocol:
//!
//! - [`Client::publish`] resolves on the server's `puback`: the message is
//!   durable. Every publish carries a `msg_id` (its own, or one the SDK makes
//!   unique per client and publish), so a publish sent again after a
//!   reconnect is stored once. Publishes not yet pubacked when the connection
//!   drops are sent again, in their original order, after reconnecting. At
//!   most `publish_buffer` publishes wait at once; one more fails with
//!   [`PublishErrorKind::BufferFull`]; nothing is dropped silently.
//! - Any drop (error, close, 4010 restarting, a server silent for two
//!   heartbeats) is followed by reconnect attempts with exponential backoff;
//!   after 4001 (unauthorized) or 4003 (forbidden) the SDK waits the
//!   backoff's maximum between attempts. After reconnecting it resubscribes
//!   every live subscription: a named consumer or group resumes from the
//!   server's state, an anonymous subscription after the last seq it
//!   delivered. Each resubscribe emits [`Event::Resumed`] with `recovered`
//!   and whether the channel's epoch changed.
//! - Every request (publish, subscribe, unsubscribe, ping) is answered
//!   within the request timeout, connected or not.
//!
//! # Example
//!
//! ```no_run
//! use courier::client::Client;
//! use futures_util::StreamExt;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::builder("ws://127.0.0.1:7070/ws")
//!     .name("billing/1.0")
//!     .connect()
//!     .await?;
//! let mut orders = client.subscribe("orders:eu").consumer("billing").await?;
//! let seq = client.publish("orders:eu", "order 17").await?;
//! while let Some(delivery) = orders.next().await {
//!     println!("{} -> {:?}", delivery.seq, delivery.data);
//!     delivery.ack().await?;
//!     if delivery.seq == seq {
//!         break;
//!     }
//! }
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! `wss://` URLs need a TLS feature of tokio-tungstenite, which this crate
//! does not enable; connecting to one fails with [`ConnectErrorKind::Io`].
#![warn(missing_docs)]

mod command;
mod connection;
mod driver;
mod error;
mod incoming;
mod lifecycle;
mod outgoing;
mod subscription;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};

pub use self::error::{
    ConnectError, ConnectErrorKind, PublishError, PublishErrorKind, RequestError, RequestErrorKind,
    SubscribeError, SubscribeErrorKind,
};
pub use self::subscription::{Delivery, SubscribeBuilder, Subscription, SubscriptionInfo};
pub use crate::backoff::Backoff;
pub use crate::protocol::{AckMode, Codec, ErrorCode, Headers};

use self::command::{Command, SubscribeSpec};
use self::connection::{Options, establish};
use self::driver::Driver;

/// Default `publish_buffer`: publishes waiting for their `puback`.
pub const DEFAULT_PUBLISH_BUFFER: usize = 1024;

/// Default request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Lifecycle events kept for receivers that lag behind; older ones are
/// dropped for them (tokio's broadcast `Lagged`).
pub const EVENT_BUFFER: usize = 1024;

/// The default reconnect backoff: 100 ms doubling up to 5 s, ±20 % jitter.
pub fn default_reconnect() -> Backoff {
    Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_secs(5),
        jitter: 0.2,
    }
}

/// What happened to the connection, for the application to log or act on.
/// Receive them with [`Client::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A reconnect completed `connect` → `connected`. (The first
    /// connection is the `Ok` of [`ClientBuilder::connect`].)
    Connected {
        /// The server's id for this connection (for its logs and admin API).
        conn_id: String,
    },
    /// The connection ended, or a reconnect attempt was closed by the server
    /// (e.g. 4001 unauthorized: then the SDK retries only every
    /// `backoff.max`).
    Disconnected {
        /// The WebSocket close code, when the server sent one.
        code: Option<u16>,
        /// The close reason, or what failed.
        reason: String,
    },
    /// The next connection attempt starts after `delay`.
    Reconnecting {
        /// 1 for the first attempt after a drop.
        attempt: u32,
        /// The wait before it.
        delay: Duration,
    },
    /// A subscription was subscribed again after a reconnect.
    Resumed {
        /// The channel.
        channel: String,
        /// False when retention dropped messages this consumer never saw
        /// (a [`Event::Gap`] follows).
        recovered: bool,
        /// The channel's epoch differs from the previous `subscribed`: it was
        /// reset, and seqs before and after are unrelated. Resync.
        epoch_changed: bool,
    },
    /// Messages `from..=to` of `channel` were dropped by retention before
    /// this subscription's consumer saw them.
    Gap {
        /// The channel.
        channel: String,
        /// First dropped seq.
        from: u64,
        /// Last dropped seq.
        to: u64,
    },
    /// An `error` frame that answers no pending request: a refused ack,
    /// nack, progress or term, a refused resubscribe (its stream ends), or a
    /// refused reconnect.
    ServerError {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation; not stable, do not parse.
        message: String,
    },
    /// The client stopped: [`Client::close`], every handle dropped, or
    /// `max_reconnects` failed attempts.
    Closed,
}

/// Optional parts of a publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Headers delivered with the message.
    pub headers: Option<Headers>,
    /// The idempotency key. `None`: the SDK makes one, unique per client
    /// and publish. Give your own to make retries across processes (or
    /// after a [`PublishErrorKind::TimedOut`]) store the message once.
    pub msg_id: Option<String>,
}

/// Options of a [`Client`]; [`connect`](Self::connect) makes one.
#[derive(Debug, Clone)]
#[must_use = "a ClientBuilder does nothing until `connect` is awaited"]
pub struct ClientBuilder {
    options: Options,
}

impl ClientBuilder {
    /// Credentials, sent as `connect.token`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.options.token = Some(token.into());
        self
    }

    /// A description of this client (e.g. app name and version), sent as
    /// `connect.client`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.options.name = Some(name.into());
        self
    }

    /// The wire encoding. Default: [`Codec::MsgPack`].
    pub fn codec(mut self, codec: Codec) -> Self {
        self.options.codec = codec;
        self
    }

    /// How many publishes may wait for their `puback` (sent or waiting for a
    /// connection) at once; one more fails with
    /// [`PublishErrorKind::BufferFull`]. Default [`DEFAULT_PUBLISH_BUFFER`].
    pub fn publish_buffer(mut self, publishes: usize) -> Self {
        self.options.publish_buffer = publishes;
        self
    }

    /// How long any request (publish → `puback`, subscribe → `subscribed`,
    /// unsubscribe, ping, and the connect handshake) may take, counting the
    /// time spent waiting for a connection. Default [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.options.request_timeout = timeout;
        self
    }

    /// The reconnect schedule. Default [`default_reconnect`].
    pub fn reconnect(mut self, backoff: Backoff) -> Self {
        self.options.reconnect = backoff;
        self
    }

    /// Another server of the same cluster. Reconnects go round the URL and
    /// its fallbacks in turn, so a client whose server died resumes on
    /// another one; so does [`connect`](Self::connect) when the first
    /// cannot be reached. Call once per server.
    pub fn fallback(mut self, url: impl Into<String>) -> Self {
        self.options.fallbacks.push(url.into());
        self
    }

    /// Failed reconnect attempts in a row after which the client closes
    /// itself. Default `None`: unlimited.
    pub fn max_reconnects(mut self, max: Option<u32>) -> Self {
        self.options.max_reconnects = max;
        self
    }

    /// Connects. The first connection must succeed (within the request
    /// timeout; with fallbacks, to one of the servers, tried in order);
    /// later drops are reconnected in the background.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        let options = Arc::new(self.options);
        let mut attempt = 0;
        let (socket, connected) = loop {
            match establish(Arc::clone(&options), attempt).await {
                Ok(connection) => break connection,
                // A refusal by a server is not fixed by asking another.
                Err(e)
                    if matches!(e.kind, ConnectErrorKind::Io | ConnectErrorKind::TimedOut)
                        && usize::try_from(attempt).unwrap_or(usize::MAX)
                            < options.fallbacks.len() =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let (tx, commands) = mpsc::channel(command::COMMAND_BUFFER);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        tracing::info!(conn_id = %connected.conn_id, url = %options.url, "courier client connected");
        let driver = Driver::new(options, commands, events.clone(), socket, connected);
        tokio::spawn(driver.run());
        Ok(Client { tx, events })
    }
}

/// A connection to a Courier server. Cheap to clone; every clone talks to
/// the same connection. The connection closes when [`close`](Self::close)
/// is called or when every clone and every [`Subscription`] is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
}

impl Client {
    /// Options for a client of the server at `url` (`ws://host:port/ws`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            options: Options {
                url: url.into(),
                fallbacks: Vec::new(),
                token: None,
                name: None,
                codec: Codec::MsgPack,
                publish_buffer: DEFAULT_PUBLISH_BUFFER,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                reconnect: default_reconnect(),
                max_reconnects: None,
            },
        }
    }

    /// Connects with the default options.
    pub async fn connect(url: impl Into<String>) -> Result<Client, ConnectError> {
        Self::builder(url).connect().await
    }

    /// Publishes `data` to `channel`; resolves with its seq once the server
    /// stored it (`puback`).
    ///
    /// Dropping the returned future does not take the publish back: once
    /// handed to the driver it is sent (and re-sent after reconnects) until
    /// it is pubacked or times out.
    pub async fn publish(
        &self,
        channel: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Result<u64, PublishError> {
        self.publish_with(channel, data, PublishOptions::default())
            .await
    }

    /// [`publish`](Self::publish) with headers and/or an explicit `msg_id`.
    pub async fn publish_with(
        &self,
        channel: impl Into<String>,
        data: impl Into<Bytes>,
        options: PublishOptions,
    ) -> Result<u64, PublishError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Publish {
            channel: channel.into(),
            data: data.into(),
            headers: options.headers,
            msg_id: options.msg_id,
            reply,
        };
        if self.tx.send(command).await.is_err() {
            return Err(PublishErrorKind::Closed.into());
        }
        answer
            .await
            .map_err(|_| PublishError::from(PublishErrorKind::Closed))?
    }

    /// Starts a subscription to `channel`; configure it, then `.await` it.
    /// One client has at most one subscription per channel.
    pub fn subscribe(&self, channel: impl Into<String>) -> SubscribeBuilder {
        SubscribeBuilder {
            tx: self.tx.clone(),
            spec: SubscribeSpec {
                channel: channel.into(),
                ..SubscribeSpec::default()
            },
        }
    }

    /// An application-level `ping`; resolves with the round-trip time.
    pub async fn ping(&self) -> Result<Duration, RequestError> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Ping { reply }).await.is_err() {
            return Err(RequestErrorKind::Closed.into());
        }
        answer
            .await
            .map_err(|_| RequestError::from(RequestErrorKind::Closed))?
    }

    /// Replaces the token before the current one expires: sends `refresh`
    /// on the live connection (resolving when the server accepts it) and
    /// uses the new token for every later reconnect. A token the server
    /// refuses is an error with kind `Rejected` (`unauthorized`, or
    /// `forbidden` for another user's token); the connection keeps its
    /// old token until that one expires.
    pub async fn refresh(&self, token: impl Into<String>) -> Result<(), RequestError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Refresh {
            token: token.into(),
            reply,
        };
        if self.tx.send(command).await.is_err() {
            return Err(RequestErrorKind::Closed.into());
        }
        answer
            .await
            .map_err(|_| RequestError::from(RequestErrorKind::Closed))?
            .map(|_| ())
    }

    /// Lifecycle events from now on. Each receiver keeps up to
    /// [`EVENT_BUFFER`] events it has not read yet.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Closes gracefully: new requests fail with `Closed`, publishes already
    /// made get their `puback` (or time out), then the socket is closed and
    /// every subscription's stream ends. Returns when that is done.
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Close { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }

    /// True once the client has closed (or closed itself).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}
