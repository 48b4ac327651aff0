//! What the handles ([`Client`](super::Client), [`Subscription`](super::Subscription),
//! [`Delivery`](super::Delivery)) ask the driver to do, over one bounded channel.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::error::{PublishError, RequestError, SubscribeError};
use super::subscription::{RawDelivery, SubscriptionInfo};
use crate::protocol::{AckMode, Headers};

/// Commands waiting for the driver; senders wait when it is full.
pub(super) const COMMAND_BUFFER: usize = 1024;

/// A request to the driver.
pub(super) enum Command {
    Publish {
        channel: String,
        data: Bytes,
        headers: Option<Headers>,
        msg_id: Option<String>,
        reply: oneshot::Sender<Result<u64, PublishError>>,
    },
    Subscribe {
        spec: SubscribeSpec,
        reply: oneshot::Sender<Result<Attached, SubscribeError>>,
    },
    Unsubscribe {
        sub_id: u64,
        /// `None` when a dropped [`Subscription`](super::Subscription) sent it.
        reply: Option<oneshot::Sender<Result<(), RequestError>>>,
    },
    Control {
        sub_id: u64,
        /// The connection generation the delivery came on; `None` for
        /// controls that are not about one delivery (`ack upto`).
        generation: Option<u64>,
        control: Control,
    },
    Ping {
        reply: oneshot::Sender<Result<Duration, RequestError>>,
    },
    /// A new token: used for every later connect, and sent now as
    /// `refresh` when connected (answered like a ping).
    Refresh {
        token: String,
        reply: oneshot::Sender<Result<Duration, RequestError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Fire-and-forget frames about deliveries.
#[derive(Debug, Clone)]
pub(super) enum Control {
    Ack(u64),
    AckUpto(u64),
    Nack(u64, Option<Duration>),
    Progress(u64),
    Term(u64, Option<String>),
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Start {
    /// The server's default: a new consumer starts at `"new"`, an existing
    /// one resumes.
    #[default]
    Default,
    /// After this seq.
    Since(u64),
    /// At the oldest stored message.
    First,
}

/// Everything a subscribe asked for; kept to subscribe again after a reconnect.
#[derive(Debug, Clone, Default)]
pub(super) struct SubscribeSpec {
    pub channel: String,
    pub consumer: Option<String>,
    pub group: Option<String>,
    pub start: Start,
    pub max_in_flight: Option<u32>,
    pub ack: AckMode,
}

impl SubscribeSpec {
    /// A named consumer or a group: its position lives on the server.
    pub fn is_named(&self) -> bool {
        self.consumer.is_some() || self.group.is_some()
    }
}

/// What the driver hands back for a successful subscribe.
pub(super) struct Attached {
    pub sub_id: u64,
    pub deliveries: mpsc::Receiver<RawDelivery>,
    pub info: watch::Receiver<SubscriptionInfo>,
}
