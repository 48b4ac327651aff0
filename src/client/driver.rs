//! The driver: the one task that owns the socket, the pending requests, the
//! subscriptions and the reconnect state. Handles talk to it through a
//! bounded command channel; it never awaits anything but its own `select!`,
//! so a slow socket, a slow subscriber or a dead server cannot wedge it.
//!
//! Invariants:
//! - At most one of `conn`, `connecting`, `retry_at` is set; none of them
//!   only while the driver shuts down.
//! - `outbox` holds every publish not yet answered, in the order the
//!   application made them; its deadlines grow front to back (one timeout
//!   for all), so the front is always the next to expire. After a reconnect
//!   the whole outbox is sent again in that order, with the same `msg_id`s.
//! - A request id is used once per client (one counter), so a reply can
//!   never match a request it was not meant for.
//!
//! Commands are handled in `outgoing.rs`, server frames in `incoming.rs`,
//! connects, drops, deadlines and shutdown in `lifecycle.rs`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc::OwnedPermit;
use tokio::sync::mpsc::error::SendError;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::Event;
use super::command::{Attached, Command, Control, SubscribeSpec};
use super::connection::{Conn, Connecting, Options, Socket, encode};
use super::error::{ConnectError, PublishError, RequestError, SubscribeError};
use super::subscription::{RawDelivery, SubscriptionInfo};
use crate::protocol::{ClientFrame, Connected, Limits};

/// How long the driver sleeps when nothing is scheduled.
const IDLE_WAKE: Duration = Duration::from_secs(60);

/// How long a graceful close waits for the server's close reply.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Frames queued for the socket beyond which the driver stops taking
/// commands (backpressure onto the callers) until the socket drains.
const MAX_BACKLOG: usize = 4096;

/// Acks (and nacks, …) of named consumers kept while disconnected, sent
/// after the resubscribe. Beyond this they are dropped: the server
/// redelivers what was not acked, so at-least-once holds either way.
pub(super) const MAX_PARKED: usize = 10_000;

/// Most controls about earlier connections whose errors are kept quiet at
/// once; beyond it their errors are reported like any other.
pub(super) const MAX_QUIET: usize = 10_000;

/// A publish waiting for its `puback`.
pub(super) struct OutPublish {
    pub id: u64,
    /// The encoded frame, sent again as is after a reconnect.
    pub message: Message,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<u64, PublishError>>,
}

/// A request waiting for its reply, by request id.
pub(super) enum Request {
    /// A subscribe (first or after a reconnect) sent on the current connection.
    Subscribe { sub_id: u64, deadline: Instant },
    /// A subscribe whose caller is gone; its reply is ignored, and if it
    /// succeeds, the subscription is undone when `unsubscribe` is set.
    Discard {
        unsubscribe: bool,
        deadline: Instant,
    },
    Unsubscribe {
        reply: Option<oneshot::Sender<Result<(), RequestError>>>,
        deadline: Instant,
    },
    /// `sent_at` is `None` while it waits for a connection.
    Ping {
        reply: oneshot::Sender<Result<Duration, RequestError>>,
        deadline: Instant,
        sent_at: Option<Instant>,
    },
}

impl Request {
    pub fn deadline(&self) -> Instant {
        match self {
            Self::Subscribe { deadline, .. }
            | Self::Discard { deadline, .. }
            | Self::Unsubscribe { deadline, .. }
            | Self::Ping { deadline, .. } => *deadline,
        }
    }
}

/// The driver's side of one subscription.
pub(super) struct SubState {
    pub spec: SubscribeSpec,
    /// Where deliveries go; bounded by the subscription's window.
    pub tx: mpsc::Sender<RawDelivery>,
    /// Held until the first `subscribed`, then handed to the [`Subscription`](super::Subscription).
    pub rx: Option<mpsc::Receiver<RawDelivery>>,
    pub info: watch::Sender<SubscriptionInfo>,
    /// The first subscribe's caller and deadline, until it is answered.
    pub initial: Option<(oneshot::Sender<Result<Attached, SubscribeError>>, Instant)>,
    /// The epoch of the last `subscribed`: a change means the channel was reset.
    pub epoch: Option<String>,
    /// Highest seq handed to the application: where an anonymous
    /// subscription resumes (`since`) after a reconnect.
    pub position: Option<u64>,
    /// The connection generation the server-side subscription belongs to.
    pub generation: u64,
    /// Subscribed on the current connection.
    pub live: bool,
    /// The id of the subscribe in flight on the current connection.
    pub request: Option<u64>,
    /// Deliveries the bounded channel could not take yet; while any wait,
    /// the socket is not read (see `stalled`).
    pub overflow: VecDeque<RawDelivery>,
}

/// What woke the driver.
enum Wake {
    Command(Option<Command>),
    Socket(Option<Result<Message, WsError>>),
    Written(Result<(), WsError>),
    Connected(Box<Result<(Socket, Connected), ConnectError>>),
    Unstalled(Result<OwnedPermit<RawDelivery>, SendError<()>>),
    Timer,
}

/// The task state. Fields are documented where they are not obvious.
pub(super) struct Driver {
    pub options: Arc<Options>,
    pub commands: mpsc::Receiver<Command>,
    /// False once every handle is gone: the driver then closes itself.
    pub commands_open: bool,
    pub events: broadcast::Sender<Event>,
    pub conn: Option<Conn>,
    pub connecting: Option<Connecting>,
    /// When the next connection attempt starts.
    pub retry_at: Option<Instant>,
    /// Failed attempts since the last successful connection.
    pub attempt: u32,
    /// Successful connections so far; a delivery remembers its own.
    pub generation: u64,
    pub next_id: u64,
    /// Random per client: automatic `msg_id`s are `<prefix>-<counter>`.
    pub msg_id_prefix: u64,
    pub msg_counter: u64,
    pub outbox: VecDeque<OutPublish>,
    pub requests: HashMap<u64, Request>,
    /// By subscription id; ordered so resubscribes go out in subscribe order.
    pub subs: BTreeMap<u64, SubState>,
    /// Channel → subscription id (one subscription per channel per connection).
    pub channels: HashMap<String, u64>,
    pub next_sub_id: u64,
    /// Controls of named consumers waiting for their resubscribe.
    pub parked: VecDeque<(u64, Control)>,
    /// Ids of controls about deliveries of an earlier connection, with the
    /// time to forget them (in send order). A server that crashed may have
    /// forgotten those deliveries and refuse the ack; it redelivers them
    /// anyway, so such refusals are logged, not reported as events.
    pub quiet: VecDeque<(u64, Instant)>,
    pub quiet_ids: HashSet<u64>,
    /// The subscription whose overflow blocks reading the socket.
    pub stalled: Option<u64>,
    /// The limits of the last `connected`.
    pub limits: Limits,
    /// `Some` once `close` was asked for (the callers to tell when done).
    pub closing: Option<Vec<oneshot::Sender<()>>>,
    /// `max_reconnects` attempts failed: shut down.
    pub gave_up: bool,
}

impl Driver {
    /// A driver over a connection that just completed `connect`.
    pub fn new(
        options: Arc<Options>,
        commands: mpsc::Receiver<Command>,
        events: broadcast::Sender<Event>,
        socket: Socket,
        connected: Connected,
    ) -> Self {
        let limits = connected.limits.clone();
        Self {
            options,
            commands,
            commands_open: true,
            events,
            conn: Some(Conn::new(socket, connected)),
            connecting: None,
            retry_at: None,
            attempt: 0,
            generation: 1,
            next_id: 0,
            msg_id_prefix: rand::random(),
            msg_counter: 0,
            outbox: VecDeque::new(),
            requests: HashMap::new(),
            subs: BTreeMap::new(),
            channels: HashMap::new(),
            next_sub_id: 0,
            parked: VecDeque::new(),
            quiet: VecDeque::new(),
            quiet_ids: HashSet::new(),
            stalled: None,
            limits,
            closing: None,
            gave_up: false,
        }
    }

    /// Runs until closed (by [`Client::close`](super::Client::close), by
    /// every handle being dropped, or by `max_reconnects`).
    pub async fn run(mut self) {
        loop {
            if self.gave_up || (self.closing.is_some() && self.outbox.is_empty()) {
                break;
            }
            match self.wait().await {
                Wake::Command(Some(command)) => self.on_command(command),
                Wake::Command(None) => {
                    self.commands_open = false;
                    self.closing.get_or_insert_with(Vec::new);
                }
                Wake::Socket(Some(Ok(message))) => self.on_message(message),
                Wake::Socket(Some(Err(e))) => self.on_drop(Some(e.to_string())),
                Wake::Socket(None) => self.on_drop(None),
                Wake::Written(Ok(())) => {}
                Wake::Written(Err(e)) => self.on_drop(Some(e.to_string())),
                Wake::Connected(result) => {
                    self.connecting = None;
                    match *result {
                        Ok((socket, connected)) => self.on_connected(socket, connected),
                        Err(e) => self.on_connect_failed(e),
                    }
                }
                Wake::Unstalled(permit) => self.on_unstalled(permit),
                Wake::Timer => self.on_timer(Instant::now()),
            }
        }
        self.shutdown().await;
    }

    async fn wait(&mut self) -> Wake {
        let wake_at = self.next_wake();
        // While stalled, the application's acks are what frees the socket
        // (through the server), so they are taken whatever the backlog.
        let accept = self.commands_open
            && (self.stalled.is_some()
                || self
                    .conn
                    .as_ref()
                    .is_none_or(|conn| conn.backlog() < MAX_BACKLOG));
        let reading = self.stalled.is_none();
        let unstall = self
            .stalled
            .and_then(|id| self.subs.get(&id))
            .map(|sub| sub.tx.clone().reserve_owned());
        let (reader, writer) = match self.conn.as_mut() {
            Some(conn) => {
                let wants_write = conn.wants_write();
                let (reader, writer) = conn.halves();
                (Some(reader.next()), wants_write.then_some(writer))
            }
            None => (None, None),
        };
        let connecting = self.connecting.as_mut();
        let commands = &mut self.commands;
        tokio::select! {
            command = commands.recv(), if accept => Wake::Command(command),
            message = or_pending(reader), if reading => Wake::Socket(message),
            written = or_pending(writer) => Wake::Written(written),
            result = or_pending(connecting) => Wake::Connected(Box::new(result)),
            permit = or_pending(unstall) => Wake::Unstalled(permit),
            () = tokio::time::sleep_until(wake_at) => Wake::Timer,
        }
    }

    /// The earliest deadline, ping, liveness check or reconnect attempt.
    fn next_wake(&self) -> Instant {
        let mut at = Instant::now() + IDLE_WAKE;
        let mut consider = |t: Instant| at = at.min(t);
        if let Some(publish) = self.outbox.front() {
            consider(publish.deadline);
        }
        if let Some((_, forget_at)) = self.quiet.front() {
            consider(*forget_at);
        }
        self.requests.values().for_each(|r| consider(r.deadline()));
        for sub in self.subs.values() {
            if let Some((_, deadline)) = &sub.initial {
                consider(*deadline);
            }
        }
        if let Some(t) = self.retry_at {
            consider(t);
        }
        if let Some(conn) = &self.conn {
            if let Some(t) = conn.next_ping {
                consider(t);
            }
            if let (Some(heartbeat), None) = (conn.heartbeat(), self.stalled) {
                consider(conn.last_rx + heartbeat * 2);
            }
        }
        at
    }

    fn on_unstalled(&mut self, permit: Result<OwnedPermit<RawDelivery>, SendError<()>>) {
        let Some(sub_id) = self.stalled else {
            return;
        };
        let Ok(permit) = permit else {
            self.drop_subscription(sub_id);
            return;
        };
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            self.stalled = None;
            return;
        };
        if let Some(raw) = sub.overflow.pop_front() {
            permit.send(raw);
        }
        while let Some(raw) = sub.overflow.pop_front() {
            match sub.tx.try_send(raw) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(raw)) => {
                    sub.overflow.push_front(raw);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.drop_subscription(sub_id);
                    return;
                }
            }
        }
        if sub.overflow.is_empty() {
            self.stalled = None;
            // The socket was not read while stalled: its silence meant nothing.
            if let Some(conn) = &mut self.conn {
                conn.last_rx = Instant::now();
            }
        }
    }

    /// The application dropped a subscription's stream: unsubscribe.
    pub fn drop_subscription(&mut self, sub_id: u64) {
        self.unsubscribe(sub_id, None);
    }

    /// Removes `sub_id` and, if the server has it, sends `unsubscribe`.
    pub fn unsubscribe(
        &mut self,
        sub_id: u64,
        reply: Option<oneshot::Sender<Result<(), RequestError>>>,
    ) {
        let Some(sub) = self.remove_sub(sub_id) else {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return;
        };
        if self.conn.is_none() || !(sub.live || sub.request.is_some()) {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        let id = self.next_request_id();
        let deadline = Instant::now() + self.options.request_timeout;
        self.requests
            .insert(id, Request::Unsubscribe { reply, deadline });
        let frame = ClientFrame::Unsubscribe(crate::protocol::ChannelRequest {
            id,
            channel: sub.spec.channel,
        });
        self.queue_frame(&frame);
    }

    pub fn next_request_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn next_msg_id(&mut self) -> String {
        self.msg_counter += 1;
        format!("{:016x}-{}", self.msg_id_prefix, self.msg_counter)
    }

    pub fn next_sub_id(&mut self) -> u64 {
        self.next_sub_id += 1;
        self.next_sub_id
    }

    /// Encodes and queues a frame on the live connection (dropped if none).
    pub fn queue_frame(&mut self, frame: &ClientFrame) {
        let Some(conn) = &mut self.conn else {
            return;
        };
        match encode(self.options.codec, frame) {
            Ok(message) => conn.queue(message),
            Err(error) => tracing::warn!(%error, kind = frame.kind(), "cannot encode frame"),
        }
    }

    pub fn emit(&self, event: Event) {
        // No receiver is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }
}

/// Awaits `future`, or never when there is none.
async fn or_pending<F: Future>(future: Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}
