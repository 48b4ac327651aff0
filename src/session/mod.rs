//! One connection's protocol state machine: frames in, frames out.
//!
//! Transport-neutral: a transport hands the session a stream of [`Inbound`]
//! events and drains its [`Outgoing`] queue; nothing here knows about
//! sockets or encodings. Request errors get an `error` frame and the session
//! goes on; a broken protocol (no `connect`, too many bad frames, a silent
//! peer) ends it with a close code.
//!
//! Publishes are pipelined: each goes to the broker at once and its `puback`
//! is sent when it is durable, in the order the publishes arrived; at most
//! `max_pending_publishes` wait at a time, after which the session stops
//! reading (backpressure reaches the client through TCP).

pub mod access;
mod acks;
pub mod registry;
pub mod relay;
mod subscription;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{FuturesOrdered, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::{Broker, BrokerError, PublishOutcome, SubscribeRequest, Subscription, now_ms};
use crate::metrics;
use crate::protocol::{
    Ack, AckMode, ChannelName, ChannelRequest, ClientFrame, Connected, DecodeError, ErrorCode,
    ErrorFrame, IdOnly, Limits, Nack, Progress, PubAck, Publish, ServerFrame, Subscribe,
    Subscribed, Term, Unsubscribed, close,
};
use access::{Access, Action};
use registry::{Control, Registration};

/// What a session asks its transport to send.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Boxed: the queue's slots stay small, and tokio allocates a block of
    /// them per connection up front.
    Frame(Box<ServerFrame>),
    /// Send a close with this code and reason, then stop.
    Close(Box<(u16, String)>),
}

/// What a transport hands to the session.
#[derive(Debug)]
pub enum Inbound {
    /// A decoded frame, or why it could not be decoded.
    Frame(Result<ClientFrame, DecodeError>),
    /// A frame larger than `max_frame` (but small enough to read); bytes.
    TooLarge(usize),
    /// A frame of the wrong kind for the negotiated codec.
    WrongKind(&'static str),
    /// The transport cannot go on: close with this code and reason.
    Fatal { code: u16, reason: String },
}

/// Facts about the connection that the transport knows.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub conn_id: String,
    pub remote: Option<SocketAddr>,
    pub transport: &'static str,
    /// A token the transport received outside the `connect` frame
    /// (`Authorization: Bearer`, `?token=`); `connect.token` beats it.
    pub credentials: Option<String>,
}

/// Consecutive bad frames before the connection is closed with 4000.
pub const MAX_BAD_FRAMES: u32 = 10;
/// Longest `msg_id`, bytes.
pub const MAX_MSG_ID_LEN: usize = 256;
/// Longest `term` reason, bytes.
pub const MAX_TERM_REASON: usize = 1024;
/// Most headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Longest header name or value, bytes.
pub const MAX_HEADER_LEN: usize = 4096;

type PendingPublish = Pin<Box<dyn Future<Output = ServerFrame> + Send + Sync>>;

/// A subscription of this session.
enum Active {
    /// Its consumer is served here: a pump delivers from it.
    Local {
        subscription: Arc<Subscription>,
        cancel: CancellationToken,
        pump: JoinHandle<()>,
    },
    /// Cluster mode: another node serves its consumer, through this link
    /// (see [`relay`]).
    Remote { link: u64 },
}

/// The protocol state of one connection.
pub struct Session {
    broker: Arc<Broker>,
    /// The transport's token (`Authorization`, `?token=`), until the handshake.
    credentials: Option<String>,
    out: mpsc::Sender<Outgoing>,
    /// This connection in the broker's registry (removed when dropped).
    registration: Registration,
    /// Who the connection is and what it may do (boxed: every idle
    /// connection carries the session).
    access: Box<Access>,
    /// Its place under the per-user and per-IP connection caps.
    admission: Option<crate::limits::Admission>,
    /// Its rate limits, made at the first publish or subscribe (an idle
    /// connection does not carry them: they are ~0.5 KiB).
    rates: Option<Box<crate::limits::ConnectionLimits>>,
    /// When to act on the token's expiry: warn (`false`) or close (`true`).
    auth_deadline: Option<(tokio::time::Instant, bool)>,
    /// A refusal made the limiter call the connection abusive.
    abusive: bool,
    /// The client opted in to `msgs` batches.
    batch: bool,
    subscriptions: HashMap<String, Active>,
    pending: FuturesOrdered<PendingPublish>,
    bad_in_a_row: u32,
}

/// The session cannot go on (the transport's queue is gone).
struct Closed;

fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Error(ErrorFrame::new(id, code, message))
}

fn broker_error(id: Option<u64>, e: &BrokerError) -> ServerFrame {
    error(id, e.code(), e.to_string())
}

impl Session {
    /// A session that sends through `out`.
    pub fn new(broker: Arc<Broker>, info: ConnectionInfo, out: mpsc::Sender<Outgoing>) -> Self {
        let registration = broker.connections().register(
            info.conn_id.clone(),
            info.remote,
            info.transport,
            now_ms(),
        );
        Self {
            broker,
            credentials: info.credentials,
            out,
            registration,
            access: Box::default(),
            admission: None,
            rates: None,
            auth_deadline: None,
            abusive: false,
            batch: false,
            subscriptions: HashMap::new(),
            pending: FuturesOrdered::new(),
            bad_in_a_row: 0,
        }
    }

    /// This connection in the registry (transports signal it through
    /// [`ConnectionHandle::send`](registry::ConnectionHandle::send)).
    pub fn connection(&self) -> &Arc<registry::ConnectionHandle> {
        self.registration.handle()
    }

    async fn send(&self, frame: ServerFrame) -> Result<(), Closed> {
        metrics::FRAMES_OUT.with_label_values(&[frame.kind()]).inc();
        self.out
            .send(Outgoing::Frame(Box::new(frame)))
            .await
            .map_err(|_| Closed)
    }

    async fn close(&self, code: u16, reason: &str) {
        metrics::CONNECTIONS_CLOSED
            .with_label_values(&[&code.to_string()])
            .inc();
        // A close frame's reason has room for 123 bytes.
        let mut end = reason.len().min(120);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let _ = self
            .out
            .send(Outgoing::Close(Box::new((code, reason[..end].to_owned()))))
            .await;
    }

    /// Runs the session until the client leaves, the protocol breaks, or
    /// `shutdown` fires (then clients are told 4010: reconnect).
    /// `incoming` is borrowed so the transport can finish the closing
    /// handshake after the session ends.
    pub async fn run<S>(mut self, incoming: &mut S, shutdown: CancellationToken)
    where
        S: Stream<Item = Inbound> + Unpin,
    {
        // A debug span: an info-level span costs ~4 KiB per connection in
        // the tracing registry (measured with 10,000 idle connections).
        // Events at info and above name the connection themselves.
        let span = tracing::debug_span!(
            "connection",
            conn_id = %self.registration.handle().id,
            transport = self.registration.handle().transport,
            user = tracing::field::Empty
        );
        async move {
            // Rare, heavy steps are boxed: an idle connection's future stays
            // small (its size is the largest step's).
            if Box::pin(self.handshake(incoming, &shutdown)).await.is_ok() {
                let _ = Box::pin(self.serve(incoming, &shutdown)).await;
            }
            Box::pin(self.teardown()).await;
        }
        .instrument(span)
        .await
    }

    async fn handshake<S>(
        &mut self,
        incoming: &mut S,
        shutdown: &CancellationToken,
    ) -> Result<(), Closed>
    where
        S: Stream<Item = Inbound> + Unpin,
    {
        let timeout = self.broker.config().server.connect_timeout;
        let first = tokio::select! {
            _ = shutdown.cancelled() => {
                self.close(close::RESTARTING, "server restarting").await;
                return Err(Closed);
            }
            first = tokio::time::timeout(timeout, incoming.next()) => first,
        };
        let connect = match first {
            Err(_) => {
                self.close(close::PROTOCOL_ERROR, "no connect frame in time")
                    .await;
                return Err(Closed);
            }
            Ok(None) => return Err(Closed),
            Ok(Some(Inbound::Frame(Ok(ClientFrame::Connect(connect))))) => connect,
            Ok(Some(Inbound::Fatal { code, reason })) => {
                self.close(code, &reason).await;
                return Err(Closed);
            }
            Ok(Some(other)) => {
                let id = match &other {
                    Inbound::Frame(Ok(frame)) => request_id(frame),
                    Inbound::Frame(Err(e)) => e.id,
                    _ => None,
                };
                let _ = self
                    .send(error(
                        id,
                        ErrorCode::BadRequest,
                        "the first frame must be `connect`",
                    ))
                    .await;
                self.close(close::PROTOCOL_ERROR, "first frame must be connect")
                    .await;
                return Err(Closed);
            }
        };
        metrics::FRAMES_IN.with_label_values(&["connect"]).inc();
        self.registration
            .handle()
            .msgs_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err((code, reason)) = self.authenticate(connect.token.clone()) {
            tracing::debug!(code, reason, "connection refused");
            self.close(code, &reason).await;
            return Err(Closed);
        }
        let handle = self.registration.handle();
        handle.set_user(self.access.user.clone(), connect.client.clone());
        if let Some(user) = &self.access.user {
            tracing::Span::current().record("user", user.as_str());
        }
        self.batch = connect.batch.unwrap_or(false);
        let server = &self.broker.config().server;
        let connected = Connected {
            conn_id: self.registration.handle().id.clone(),
            user: self.access.user.clone(),
            heartbeat_ms: u64::try_from(server.heartbeat.as_millis()).unwrap_or(u64::MAX),
            limits: Limits {
                max_frame: server.max_frame,
                max_in_flight: self.broker.config().default_namespace.max_in_flight,
                max_pending_publishes: server.max_pending_publishes,
            },
        };
        tracing::debug!(
            client = connect.client.as_deref().unwrap_or(""),
            "connected"
        );
        self.send(ServerFrame::Connected(connected)).await
    }

    /// Checks the credentials and the connection caps; sets the identity,
    /// the rate limits and the expiry timer. The error is the close code
    /// and reason.
    fn authenticate(&mut self, token: Option<String>) -> Result<(), (u16, String)> {
        let auth = self.broker.auth();
        let token = token.or_else(|| self.credentials.take());
        *self.access = if auth.enabled() {
            match token {
                Some(token) => match auth.verify(&token) {
                    Ok(identity) => Access::authenticated(identity),
                    Err(e) => return Err((close::UNAUTHORIZED, e.to_string())),
                },
                None if access::anonymous_allowed(self.broker.config(), true) => {
                    Access::anonymous(true)
                }
                None => {
                    return Err((
                        close::UNAUTHORIZED,
                        "a token is required (connect.token, Authorization: Bearer, or ?token=)"
                            .to_owned(),
                    ));
                }
            }
        } else {
            Access::anonymous(false)
        };
        let limits = self.broker.limits();
        let ip = self.registration.handle().remote.map(|a| a.ip());
        self.admission = Some(
            limits
                .admit(self.access.user.as_deref(), ip)
                .map_err(|refused| (close::POLICY, refused.to_string()))?,
        );
        self.schedule_expiry();
        Ok(())
    }

    /// The connection's rate limits, made on first use.
    fn rates(&mut self) -> &mut crate::limits::ConnectionLimits {
        let (broker, user) = (&self.broker, self.access.user.as_deref());
        self.rates
            .get_or_insert_with(|| Box::new(broker.limits().connection(user)))
    }

    /// Arms the timer of the token's expiry: first a warning
    /// `refresh_window` before it, then the close.
    fn schedule_expiry(&mut self) {
        let window =
            u64::try_from(self.broker.config().auth.refresh_window.as_millis()).unwrap_or(u64::MAX);
        self.auth_deadline = self.access.expires_ms.map(|expires| {
            let now = now_ms();
            // Warned `refresh_window` before `exp` (at once when less is
            // left); closed at `exp` plus the verification leeway.
            let warn_at = expires.saturating_sub(window).max(now);
            let in_ms = |at: u64| {
                tokio::time::Instant::now()
                    + std::time::Duration::from_millis(at.saturating_sub(now))
            };
            (in_ms(warn_at), false)
        });
    }

    /// The token is about to expire (tell the client to refresh) or has
    /// expired (close with 4001).
    async fn on_auth_deadline(&mut self, last: bool) -> Result<(), Closed> {
        if last {
            self.drain_pending().await?;
            self.close(close::UNAUTHORIZED, "the token has expired")
                .await;
            return Err(Closed);
        }
        let expires = self
            .access
            .expires_ms
            .unwrap_or_else(now_ms)
            .saturating_add(crate::auth::LEEWAY_SECS * 1000);
        let left = expires.saturating_sub(now_ms());
        self.auth_deadline = Some((
            tokio::time::Instant::now() + std::time::Duration::from_millis(left),
            true,
        ));
        let left = left / 1000;
        self.send(error(
            None,
            ErrorCode::Unauthorized,
            format!("the token expires in {left} s: send `refresh` with a new token"),
        ))
        .await
    }

    fn on_refresh(&mut self, refresh: &crate::protocol::Refresh) -> ServerFrame {
        let auth = self.broker.auth();
        if !auth.enabled() {
            return error(
                Some(refresh.id),
                ErrorCode::BadRequest,
                "this server has no authentication configured; there is nothing to refresh",
            );
        }
        match auth.verify(&refresh.token) {
            Err(e) => error(Some(refresh.id), ErrorCode::Unauthorized, e.to_string()),
            Ok(identity) if self.access.user.as_deref() != Some(identity.user.as_str()) => error(
                Some(refresh.id),
                ErrorCode::Forbidden,
                "a refresh must carry a token of the connection's own user (sub)",
            ),
            Ok(identity) => {
                *self.access = Access::authenticated(identity);
                self.schedule_expiry();
                ServerFrame::Pong(IdOnly { id: refresh.id })
            }
        }
    }

    /// Whether `action` on `channel` is allowed; the `forbidden` reply if not.
    fn permit(
        &self,
        id: Option<u64>,
        action: Action,
        channel: &ChannelName,
    ) -> Option<ServerFrame> {
        self.access
            .check(self.broker.config(), action, channel)
            .err()
            .map(|message| error(id, ErrorCode::Forbidden, message))
    }

    async fn on_presence(&self, request: &ChannelRequest) -> ServerFrame {
        let id = Some(request.id);
        let name = match ChannelName::new(&request.channel) {
            Ok(name) => name,
            Err(e) => return error(id, ErrorCode::BadRequest, e.to_string()),
        };
        if !self.broker.config().policy(name.namespace()).presence {
            return error(
                id,
                ErrorCode::NotFound,
                format!(
                    "presence is not enabled for namespace {:?}",
                    name.namespace()
                ),
            );
        }
        if let Some(denied) = self.permit(id, Action::Presence, &name) {
            return denied;
        }
        match self.broker.presence(&name).await {
            Ok(members) => ServerFrame::Presence(crate::protocol::PresenceReply {
                id: request.id,
                channel: request.channel.clone(),
                members,
            }),
            Err(e) => broker_error(id, &e),
        }
    }

    /// Records a subscription in the registry and, where the namespace
    /// wants it, tells the channel's other subscribers that the user joined
    /// (or, with `joined = false`, left); in a cluster, the broker tells
    /// the other nodes.
    fn presence_changed(&self, channel: &str, joined: bool) {
        let changed = if joined {
            self.registration.subscribed(channel, now_ms())
        } else {
            self.registration.unsubscribed(channel)
        };
        let Ok(name) = ChannelName::new(channel) else {
            return;
        };
        let policy = self.broker.config().policy(name.namespace());
        if !policy.presence {
            return;
        }
        let announce = changed && policy.join_leave;
        if announce {
            self.registration.announce(channel, joined);
        }
        if let Some(user) = self.registration.handle().user() {
            self.broker
                .presence_changed(channel, &user, announce.then_some(joined));
        }
    }

    async fn serve<S>(
        &mut self,
        incoming: &mut S,
        shutdown: &CancellationToken,
    ) -> Result<(), Closed>
    where
        S: Stream<Item = Inbound> + Unpin,
    {
        let max_pending = usize::try_from(self.broker.config().server.max_pending_publishes)
            .unwrap_or(usize::MAX);
        // Held once for the loop: the control branch borrows it while the
        // handlers borrow the session mutably.
        let handle = Arc::clone(self.registration.handle());
        loop {
            let deadline = self.auth_deadline;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.drain_pending().await?;
                    self.close(close::RESTARTING, "server restarting").await;
                    return Err(Closed);
                }
                Some(reply) = self.pending.next(), if !self.pending.is_empty() => {
                    self.send(reply).await?;
                }
                control = handle.next_control() => {
                    Box::pin(self.on_control(control)).await?;
                }
                last = until(deadline) => {
                    Box::pin(self.on_auth_deadline(last)).await?;
                }
                event = incoming.next(), if self.pending.len() < max_pending => {
                    let Some(event) = event else {
                        return Ok(());
                    };
                    Box::pin(self.on_inbound(event)).await?;
                }
            }
        }
    }

    /// A kick closes the connection (after the pubacks it owes); an ended
    /// subscription is stopped and the client told with `unsubscribed`,
    /// `id: 0`.
    async fn on_control(&mut self, control: Control) -> Result<(), Closed> {
        match control {
            Control::Kick { code, reason } => {
                // A second kick finds it gone, even before the socket closes.
                self.registration.handle().closing();
                tracing::info!(conn_id = %self.registration.handle().id, code, "kicked by an operator");
                self.drain_pending().await?;
                self.close(code, &reason).await;
                Err(Closed)
            }
            Control::Send(frame) => self.send(*frame).await,
            Control::TransportGone => Err(Closed),
            Control::EndSubscription { channel } => {
                let Some(active) = self.subscriptions.remove(&channel) else {
                    return Ok(());
                };
                self.presence_changed(&channel, false);
                stop(active, &self.broker).await;
                self.send(ServerFrame::Unsubscribed(Unsubscribed { id: 0, channel }))
                    .await
            }
        }
    }

    /// Sends the pubacks of publishes already handed to the broker.
    async fn drain_pending(&mut self) -> Result<(), Closed> {
        while let Some(reply) = self.pending.next().await {
            self.send(reply).await?;
        }
        Ok(())
    }

    async fn on_inbound(&mut self, event: Inbound) -> Result<(), Closed> {
        let failure = match event {
            Inbound::Frame(Ok(frame)) => {
                self.bad_in_a_row = 0;
                self.registration
                    .handle()
                    .msgs_in
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::FRAMES_IN.with_label_values(&[frame.kind()]).inc();
                return self.on_frame(frame).await;
            }
            Inbound::Frame(Err(e)) => error(e.id, ErrorCode::BadRequest, e.message),
            Inbound::TooLarge(size) => error(
                None,
                ErrorCode::TooLarge,
                format!(
                    "frame of {size} bytes exceeds max_frame ({} bytes)",
                    self.broker.config().server.max_frame
                ),
            ),
            Inbound::WrongKind(message) => error(None, ErrorCode::BadRequest, message),
            Inbound::Fatal { code, reason } => {
                self.close(code, &reason).await;
                return Err(Closed);
            }
        };
        metrics::FRAMES_IN.with_label_values(&["invalid"]).inc();
        self.send(failure).await?;
        self.bad_in_a_row += 1;
        if self.bad_in_a_row >= MAX_BAD_FRAMES {
            self.close(close::PROTOCOL_ERROR, "too many bad frames")
                .await;
            return Err(Closed);
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: ClientFrame) -> Result<(), Closed> {
        if let Some(link) = self.remote_link(&frame) {
            self.broker.relays().forward(link, &frame);
            return Ok(());
        }
        let reply = match frame {
            ClientFrame::Connect(_) => {
                Some(error(None, ErrorCode::BadRequest, "already connected"))
            }
            ClientFrame::Publish(publish) => self.on_publish(publish).await,
            ClientFrame::Subscribe(subscribe) => Box::pin(self.on_subscribe(subscribe)).await?,
            ClientFrame::Unsubscribe(request) => Some(Box::pin(self.on_unsubscribe(request)).await),
            ClientFrame::Ack(ack) => self.on_ack(&ack),
            ClientFrame::Nack(nack) => self.on_nack(&nack).await,
            ClientFrame::Progress(progress) => self.on_progress(progress).await,
            ClientFrame::Term(term) => Box::pin(self.on_term(term)).await,
            ClientFrame::Presence(request) => Some(Box::pin(self.on_presence(&request)).await),
            ClientFrame::Refresh(refresh) => Some(self.on_refresh(&refresh)),
            ClientFrame::Ping(IdOnly { id }) => Some(ServerFrame::Pong(IdOnly { id })),
        };
        if let Some(frame) = reply {
            self.send(frame).await?;
        }
        if self.abusive {
            self.drain_pending().await?;
            self.close(close::POLICY, "rate limits exceeded again and again")
                .await;
            return Err(Closed);
        }
        Ok(())
    }

    async fn on_publish(&mut self, publish: Publish) -> Option<ServerFrame> {
        let id = publish.id;
        let (name, data) = match check_publish(&publish) {
            Ok(checked) => checked,
            Err((code, message)) => return Some(error(Some(id), code, message)),
        };
        if let Some(denied) = self.permit(Some(id), Action::Publish, &name) {
            return Some(denied);
        }
        if let Err(limited) = self.rates().check_publish(data.len()) {
            self.abusive = self.rates().abusive();
            return Some(ServerFrame::Error(limited.error_frame(Some(id))));
        }
        let channel = match self.broker.channel(&name) {
            Ok(channel) => channel,
            Err(e) => return Some(broker_error(Some(id), &e)),
        };
        let channel_name = publish.channel;
        match self
            .broker
            .publish(channel, data, publish.headers, publish.msg_id)
            .await
        {
            Ok(receiver) => {
                self.pending.push_back(Box::pin(async move {
                    match receiver.await {
                        Ok(Ok(PublishOutcome { seq, duplicate: _ })) => {
                            ServerFrame::Puback(PubAck {
                                id,
                                channel: channel_name,
                                seq,
                            })
                        }
                        Ok(Err(e)) => broker_error(Some(id), &e),
                        Err(_) => error(
                            Some(id),
                            ErrorCode::Unavailable,
                            "the broker is shutting down",
                        ),
                    }
                }));
                None
            }
            Err(e) => Some(broker_error(Some(id), &e)),
        }
    }

    /// Sends `subscribed` itself (before the pump starts); returns an error reply, if any.
    async fn on_subscribe(&mut self, subscribe: Subscribe) -> Result<Option<ServerFrame>, Closed> {
        let id = subscribe.id;
        let name = match ChannelName::new(&subscribe.channel) {
            Ok(name) => name,
            Err(e) => return Ok(Some(error(Some(id), ErrorCode::BadRequest, e.to_string()))),
        };
        if self.subscriptions.contains_key(name.as_str()) {
            return Ok(Some(error(
                Some(id),
                ErrorCode::Conflict,
                format!("already subscribed to {name}"),
            )));
        }
        if subscribe.since.is_some() && subscribe.from.is_some() {
            return Ok(Some(error(
                Some(id),
                ErrorCode::BadRequest,
                "give `since` or `from`, not both",
            )));
        }
        if let Some(denied) = self.permit(Some(id), Action::Subscribe, &name) {
            return Ok(Some(denied));
        }
        let subscriptions = self.subscriptions.len();
        if let Err(denied) = self.rates().check_subscribe(subscriptions) {
            self.abusive = self.rates().abusive();
            return Ok(Some(ServerFrame::Error(denied.error_frame(Some(id)))));
        }
        let request = SubscribeRequest {
            channel: name.clone(),
            consumer: subscribe.consumer.clone(),
            group: subscribe.group.clone(),
            user: self.access.user.clone(),
            since: subscribe.since,
            from: subscribe.from,
            max_in_flight: subscribe.max_in_flight,
            ack: subscribe.ack.unwrap_or(AckMode::Manual),
        };
        let subscription = match self.broker.subscribe(request).await {
            Ok(subscription) => Arc::new(subscription),
            Err(BrokerError::Elsewhere(owner)) => {
                return self.subscribe_remote(&owner, &subscribe).await;
            }
            Err(e) => return Ok(Some(broker_error(Some(id), &e))),
        };
        // `subscribed` goes out before the pump can send any `msg`.
        self.send(ServerFrame::Subscribed(Subscribed {
            id,
            channel: name.as_str().to_owned(),
            epoch: subscription.epoch.clone(),
            first_seq: subscription.first_seq,
            last_seq: subscription.last_seq,
            recovered: subscription.recovered,
        }))
        .await?;
        let cancel = CancellationToken::new();
        let pump = tokio::spawn(subscription::pump(
            Arc::clone(&self.broker),
            Arc::clone(&subscription),
            self.out.clone(),
            Some(Arc::clone(self.registration.handle())),
            self.batch,
            cancel.clone(),
        ));
        self.presence_changed(name.as_str(), true);
        self.subscriptions.insert(
            name.as_str().to_owned(),
            Active::Local {
                subscription,
                cancel,
                pump,
            },
        );
        Ok(None)
    }

    /// Subscribes through the node that serves the consumer.
    async fn subscribe_remote(
        &mut self,
        owner: &str,
        subscribe: &Subscribe,
    ) -> Result<Option<ServerFrame>, Closed> {
        let link = self.broker.next_id();
        let opened = self
            .broker
            .relays()
            .open(
                owner,
                Arc::clone(self.registration.handle()),
                self.access.user.clone(),
                self.batch,
                subscribe,
                link,
            )
            .await;
        match opened {
            Ok(subscribed) => {
                self.send(ServerFrame::Subscribed(subscribed)).await?;
                self.presence_changed(&subscribe.channel, true);
                self.subscriptions
                    .insert(subscribe.channel.clone(), Active::Remote { link });
                Ok(None)
            }
            Err(refusal) => Ok(Some(refusal)),
        }
    }

    /// The link of a frame that another node must handle (an ack, nack,
    /// progress or term of a subscription served there).
    fn remote_link(&self, frame: &ClientFrame) -> Option<u64> {
        let channel = match frame {
            ClientFrame::Ack(f) => &f.channel,
            ClientFrame::Nack(f) => &f.channel,
            ClientFrame::Progress(f) => &f.channel,
            ClientFrame::Term(f) => &f.channel,
            _ => return None,
        };
        match self.subscriptions.get(channel) {
            Some(Active::Remote { link }) => Some(*link),
            _ => None,
        }
    }

    async fn on_unsubscribe(&mut self, request: ChannelRequest) -> ServerFrame {
        let Some(active) = self.subscriptions.remove(&request.channel) else {
            return error(
                Some(request.id),
                ErrorCode::NotFound,
                format!("not subscribed to {:?}", request.channel),
            );
        };
        self.presence_changed(&request.channel, false);
        stop(active, &self.broker).await;
        ServerFrame::Unsubscribed(Unsubscribed {
            id: request.id,
            channel: request.channel,
        })
    }

    fn on_ack(&self, ack: &Ack) -> Option<ServerFrame> {
        match self.subscription(ack.id, &ack.channel) {
            Ok(sub) => acks::ack(&sub, ack),
            Err(reply) => Some(*reply),
        }
    }

    /// The subscription to `channel`, or the `not_found` reply.
    fn subscription(
        &self,
        id: Option<u64>,
        channel: &str,
    ) -> Result<Arc<Subscription>, Box<ServerFrame>> {
        self.subscriptions
            .get(channel)
            .and_then(|active| match active {
                Active::Local { subscription, .. } => Some(Arc::clone(subscription)),
                Active::Remote { .. } => None,
            })
            .ok_or_else(|| {
                Box::new(error(
                    id,
                    ErrorCode::NotFound,
                    format!("not subscribed to {channel:?}"),
                ))
            })
    }

    async fn on_nack(&self, nack: &Nack) -> Option<ServerFrame> {
        match self.subscription(nack.id, &nack.channel) {
            Ok(sub) => acks::nack(&sub, nack).await,
            Err(reply) => Some(*reply),
        }
    }

    async fn on_progress(&self, progress: Progress) -> Option<ServerFrame> {
        match self.subscription(progress.id, &progress.channel) {
            Ok(sub) => acks::progress(&sub, &progress),
            Err(reply) => Some(*reply),
        }
    }

    async fn on_term(&self, term: Term) -> Option<ServerFrame> {
        match self.subscription(term.id, &term.channel) {
            Ok(sub) => acks::term(&self.broker, &sub, term).await,
            Err(reply) => Some(*reply),
        }
    }

    async fn teardown(mut self) {
        for (channel, active) in std::mem::take(&mut self.subscriptions) {
            self.presence_changed(&channel, false);
            stop(active, &self.broker).await;
        }
    }
}

/// Stops a subscription's pump, then detaches it from its consumer.
async fn stop(active: Active, broker: &Broker) {
    match active {
        Active::Local {
            subscription,
            cancel,
            pump,
        } => {
            cancel.cancel();
            let _ = pump.await;
            broker.unsubscribe(&subscription).await;
        }
        Active::Remote { link } => broker.relays().close(link),
    }
}

/// The limits every publish must meet, whatever carries it (a `publish`
/// frame, `POST /api/publish`): a valid channel name, a `msg_id` of
/// 1..=256 bytes, at most 64 headers of at most 4096 bytes each, a payload.
/// Returns the channel name and the payload, or the error to answer with.
pub fn check_publish(
    publish: &Publish,
) -> Result<(ChannelName, bytes::Bytes), (ErrorCode, String)> {
    let name =
        ChannelName::new(&publish.channel).map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
    if let Some(msg_id) = &publish.msg_id
        && (msg_id.is_empty() || msg_id.len() > MAX_MSG_ID_LEN)
    {
        return Err((
            ErrorCode::BadRequest,
            format!("msg_id must be 1..={MAX_MSG_ID_LEN} bytes"),
        ));
    }
    if let Some(headers) = &publish.headers {
        if headers.len() > MAX_HEADERS {
            return Err((
                ErrorCode::TooLarge,
                format!("at most {MAX_HEADERS} headers"),
            ));
        }
        if headers
            .iter()
            .any(|(k, v)| k.len() > MAX_HEADER_LEN || v.len() > MAX_HEADER_LEN)
        {
            return Err((
                ErrorCode::TooLarge,
                format!("header names and values are at most {MAX_HEADER_LEN} bytes"),
            ));
        }
    }
    let data = publish
        .payload()
        .ok_or((ErrorCode::BadRequest, "publish needs `data`".to_owned()))?;
    Ok((name, data))
}

/// Resolves at `deadline` with its flag; never without one. The timer is
/// boxed: most connections have no deadline, and this future is part of
/// every idle connection's state.
async fn until(deadline: Option<(tokio::time::Instant, bool)>) -> bool {
    match deadline {
        Some((at, last)) => {
            Box::pin(tokio::time::sleep_until(at)).await;
            last
        }
        None => std::future::pending().await,
    }
}

fn request_id(frame: &ClientFrame) -> Option<u64> {
    match frame {
        ClientFrame::Connect(_) => None,
        ClientFrame::Publish(p) => Some(p.id),
        ClientFrame::Subscribe(s) => Some(s.id),
        ClientFrame::Unsubscribe(r) | ClientFrame::Presence(r) => Some(r.id),
        ClientFrame::Ack(a) => a.id,
        ClientFrame::Nack(n) => n.id,
        ClientFrame::Progress(p) => p.id,
        ClientFrame::Term(t) => t.id,
        ClientFrame::Refresh(r) => Some(r.id),
        ClientFrame::Ping(p) => Some(p.id),
    }
}
