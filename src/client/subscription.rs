//! Subscriptions and deliveries: the [`SubscribeBuilder`], the
//! [`Subscription`] stream, and [`Delivery`] with its ack, nack, progress
//! and term.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch};

use super::command::{Command, Control, Start, SubscribeSpec};
use super::error::{RequestError, RequestErrorKind, SubscribeError, SubscribeErrorKind};
use crate::protocol::{AckMode, Headers};

/// Configures a subscription; `.await` it to subscribe.
///
/// Without `consumer` or `group` the subscription is *anonymous*: the
/// server keeps its position only while it is subscribed, and after a
/// reconnect the SDK resubscribes with `since` = the last seq it delivered
/// to the application, so nothing is missed. With a name, the position
/// lives on the server and survives reconnects, restarts and other processes.
#[must_use = "a SubscribeBuilder does nothing until it is awaited"]
pub struct SubscribeBuilder {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) spec: SubscribeSpec,
}

impl SubscribeBuilder {
    /// Reads through the durable fanout consumer `name`: every consumer
    /// sees every message; a consumer that comes back resumes where it was.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.spec.consumer = Some(name.into());
        self
    }

    /// Reads through the shared (queue) consumer `name`: each message goes
    /// to one of the subscriptions of the group. Takes precedence over
    /// [`consumer`](Self::consumer).
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.spec.group = Some(name.into());
        self
    }

    /// Starts after `seq` (delivers seq > `seq`); moves an existing consumer there.
    pub fn since(mut self, seq: u64) -> Self {
        self.spec.start = Start::Since(seq);
        self
    }

    /// Starts at the oldest stored message; moves an existing consumer there.
    pub fn from_first(mut self) -> Self {
        self.spec.start = Start::First;
        self
    }

    /// At most `n` deliveries unacked at once (the server clamps it to the
    /// namespace's limit; default: that limit).
    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.spec.max_in_flight = Some(n);
        self
    }

    /// Manual acks (default, at least once) or auto (at most once).
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.spec.ack = mode;
        self
    }

    async fn subscribe(self) -> Result<Subscription, SubscribeError> {
        let (reply, answer) = oneshot::channel();
        let channel = self.spec.channel.clone();
        let command = Command::Subscribe {
            spec: self.spec,
            reply,
        };
        if self.tx.send(command).await.is_err() {
            return Err(SubscribeErrorKind::Closed.into());
        }
        let attached = answer
            .await
            .map_err(|_| SubscribeError::from(SubscribeErrorKind::Closed))??;
        Ok(Subscription {
            channel,
            sub_id: attached.sub_id,
            deliveries: attached.deliveries,
            info: attached.info,
            tx: self.tx,
            unsubscribed: false,
        })
    }
}

impl IntoFuture for SubscribeBuilder {
    type Output = Result<Subscription, SubscribeError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.subscribe())
    }
}

/// The server's latest `subscribed` reply for a subscription (updated on
/// every resubscribe after a reconnect).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// The channel's epoch; a new one means the channel was reset.
    pub epoch: String,
    /// Oldest stored seq (`last_seq + 1` when nothing is stored).
    pub first_seq: u64,
    /// Newest assigned seq (0 before the first publish).
    pub last_seq: u64,
    /// False when retention dropped messages this consumer never saw.
    pub recovered: bool,
}

/// A delivery as the driver hands it over; the [`Subscription`] adds the
/// handle that acks it.
#[derive(Debug)]
pub(super) struct RawDelivery {
    pub seq: u64,
    pub data: Bytes,
    pub headers: Headers,
    pub ts: u64,
    pub attempt: u32,
    pub generation: u64,
}

/// A live subscription: a [`Stream`] of [`Delivery`].
///
/// Its buffer is bounded (`max_in_flight`, the server's default when not
/// set); when the application does not keep up, the SDK stops reading the
/// socket rather than drop anything. Dropping a `Subscription` unsubscribes.
/// The stream ends when the subscription ends: [`unsubscribe`](Self::unsubscribe),
/// [`Client::close`](super::Client::close), or a server that refuses to
/// resubscribe after a reconnect (reported as [`Event::ServerError`](super::Event::ServerError)).
#[derive(Debug)]
pub struct Subscription {
    channel: String,
    sub_id: u64,
    deliveries: mpsc::Receiver<RawDelivery>,
    info: watch::Receiver<SubscriptionInfo>,
    tx: mpsc::Sender<Command>,
    unsubscribed: bool,
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The latest `subscribed` reply.
    pub fn info(&self) -> SubscriptionInfo {
        self.info.borrow().clone()
    }

    /// The channel's epoch in the latest `subscribed` reply.
    pub fn epoch(&self) -> String {
        self.info.borrow().epoch.clone()
    }

    /// Oldest stored seq in the latest `subscribed` reply.
    pub fn first_seq(&self) -> u64 {
        self.info.borrow().first_seq
    }

    /// Newest seq in the latest `subscribed` reply.
    pub fn last_seq(&self) -> u64 {
        self.info.borrow().last_seq
    }

    /// Whether the latest (re)subscribe resumed completely.
    pub fn recovered(&self) -> bool {
        self.info.borrow().recovered
    }

    /// Acks every delivery up to `seq` that is in flight on this
    /// subscription's current connection. Errors only if the client is closed;
    /// a refusal by the server arrives as [`Event::ServerError`](super::Event::ServerError).
    pub async fn ack_upto(&self, seq: u64) -> Result<(), RequestError> {
        send_control(&self.tx, self.sub_id, None, Control::AckUpto(seq)).await
    }

    /// Unsubscribes and waits for the server's `unsubscribed`. Deliveries in
    /// flight and not acked go back to the consumer (redelivered later).
    pub async fn unsubscribe(mut self) -> Result<(), RequestError> {
        self.unsubscribed = true;
        let (reply, answer) = oneshot::channel();
        let command = Command::Unsubscribe {
            sub_id: self.sub_id,
            reply: Some(reply),
        };
        if self.tx.send(command).await.is_err() {
            return Err(RequestErrorKind::Closed.into());
        }
        answer
            .await
            .map_err(|_| RequestError::from(RequestErrorKind::Closed))?
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = &mut *self;
        this.deliveries.poll_recv(cx).map(|raw| {
            raw.map(|raw| Delivery {
                channel: this.channel.clone(),
                seq: raw.seq,
                data: raw.data,
                headers: raw.headers,
                ts: raw.ts,
                attempt: raw.attempt,
                handle: DeliveryHandle {
                    tx: this.tx.clone(),
                    sub_id: this.sub_id,
                    generation: raw.generation,
                },
            })
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.unsubscribed {
            // Best effort: if the driver's queue is full, it notices the
            // closed stream at the next delivery and unsubscribes then.
            let _ = self.tx.try_send(Command::Unsubscribe {
                sub_id: self.sub_id,
                reply: None,
            });
        }
    }
}

/// One message delivered to a [`Subscription`].
///
/// With manual acks (the default) call exactly one of [`ack`](Self::ack),
/// [`nack`](Self::nack) or [`term`](Self::term) when done; a delivery left
/// alone is redelivered after the namespace's `ack_wait`. These methods
/// send a frame and return: they fail only when the client is closed. A
/// server's refusal (e.g. acking after the deadline passed) is reported as
/// [`Event::ServerError`](super::Event::ServerError).
#[derive(Debug)]
pub struct Delivery {
    /// The channel.
    pub channel: String,
    /// The message's seq in the channel.
    pub seq: u64,
    /// The payload.
    pub data: Bytes,
    /// The publisher's headers (empty when it sent none).
    pub headers: Headers,
    /// Publish time, ms since the Unix epoch.
    pub ts: u64,
    /// 1 on the first delivery to this consumer, 2 on the first redelivery, …
    pub attempt: u32,
    handle: DeliveryHandle,
}

/// What a delivery needs to answer for itself.
#[derive(Debug)]
struct DeliveryHandle {
    tx: mpsc::Sender<Command>,
    sub_id: u64,
    generation: u64,
}

impl Delivery {
    /// Processed: never deliver it to this consumer again.
    pub async fn ack(&self) -> Result<(), RequestError> {
        self.control(Control::Ack(self.seq)).await
    }

    /// Failed: deliver it again after `delay`, or after the namespace's
    /// backoff when `None`.
    pub async fn nack(&self, delay: Option<Duration>) -> Result<(), RequestError> {
        self.control(Control::Nack(self.seq, delay)).await
    }

    /// Still working: restart the ack deadline.
    pub async fn progress(&self) -> Result<(), RequestError> {
        self.control(Control::Progress(self.seq)).await
    }

    /// Never deliver it again: dead-letter it now, with an optional reason.
    pub async fn term(&self, reason: Option<String>) -> Result<(), RequestError> {
        self.control(Control::Term(self.seq, reason)).await
    }

    async fn control(&self, control: Control) -> Result<(), RequestError> {
        let handle = &self.handle;
        send_control(&handle.tx, handle.sub_id, Some(handle.generation), control).await
    }
}

async fn send_control(
    tx: &mpsc::Sender<Command>,
    sub_id: u64,
    generation: Option<u64>,
    control: Control,
) -> Result<(), RequestError> {
    let command = Command::Control {
        sub_id,
        generation,
        control,
    };
    tx.send(command)
        .await
        .map_err(|_| RequestErrorKind::Closed.into())
}
