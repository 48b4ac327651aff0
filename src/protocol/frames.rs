//! The v1 frames, exactly as they travel (see `proto/PROTOCOL.md`).
//!
//! Every frame is a map with a `type` field. Frames that carry a payload hold
//! it as [`Payload`]; the codec decides whether it travels as MessagePack
//! `bin`, a JSON value (`data`) or base64 text (`data_b64`).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::payload::{B64Payload, Payload};

/// Optional string headers of a message.
pub type Headers = BTreeMap<String, String>;

/// How a subscription acknowledges what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// The client sends `ack` for what it processed (at least once).
    #[default]
    Manual,
    /// A message counts as acked once it is written to the socket (at most once).
    Auto,
}

/// Where a new (or reset) consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The oldest message still stored.
    First,
    /// Only messages published after the subscribe.
    New,
}

/// `connect`: the first frame of a connection.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Connect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Free-form client description (SDK name and version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Opt in to `msgs` batch frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<bool>,
}

/// `publish`: append a message to a channel.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Publish {
    pub id: u64,
    pub channel: String,
    #[serde(
        default,
        deserialize_with = "super::payload::data_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<B64Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
}

/// `subscribe`: attach this connection to a consumer of a channel.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Subscribe {
    pub id: u64,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<StartFrom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<AckMode>,
}

/// A request that names only a channel (`unsubscribe`, `presence`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChannelRequest {
    pub id: u64,
    pub channel: String,
}

/// `ack`: the client processed these deliveries.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Ack {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seqs: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upto: Option<u64>,
}

/// `nack`: redeliver this message later.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Nack {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

/// `progress`: still working on these; restart their ack deadline.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Progress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    pub seqs: Vec<u64>,
}

/// `term`: never redeliver this message; dead-letter it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Term {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `refresh`: a new token before the old one expires.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Refresh {
    pub id: u64,
    pub token: String,
}

/// A request that carries only its id (`ping`, `pong`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IdOnly {
    pub id: u64,
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Connect(Connect),
    Publish(Publish),
    Subscribe(Subscribe),
    Unsubscribe(ChannelRequest),
    Ack(Ack),
    Nack(Nack),
    Progress(Progress),
    Term(Term),
    Presence(ChannelRequest),
    Refresh(Refresh),
    Ping(IdOnly),
}

/// Limits the server announces in `connected`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame the server accepts, bytes.
    pub max_frame: u64,
    /// Largest `max_in_flight` a subscription may ask for.
    pub max_in_flight: u32,
    /// Publishes a connection may have waiting for their `puback`.
    pub max_pending_publishes: u32,
}

/// `connected`: the reply to `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Connected {
    pub conn_id: String,
    /// The authenticated user, or `null` for an anonymous connection.
    pub user: Option<String>,
    pub heartbeat_ms: u64,
    pub limits: Limits,
}

/// `puback`: the message is durable under the configured fsync policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PubAck {
    pub id: u64,
    pub channel: String,
    pub seq: u64,
}

/// `subscribed`: the reply to `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Subscribed {
    pub id: u64,
    pub channel: String,
    pub epoch: String,
    /// Oldest stored seq; `last_seq + 1` when nothing is stored.
    pub first_seq: u64,
    /// Newest assigned seq; 0 before the first publish.
    pub last_seq: u64,
    /// False when retention dropped messages this consumer never saw.
    pub recovered: bool,
}

/// `msg`: one delivery.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Msg {
    pub channel: String,
    pub seq: u64,
    #[serde(
        default,
        deserialize_with = "super::payload::data_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<B64Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    pub ts: u64,
    pub attempt: u32,
}

/// One delivery inside a `msgs` batch.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MsgItem {
    pub seq: u64,
    #[serde(
        default,
        deserialize_with = "super::payload::data_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<B64Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    pub ts: u64,
    pub attempt: u32,
}

/// `msgs`: several deliveries of one subscription (only with `batch: true`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Msgs {
    pub channel: String,
    pub items: Vec<MsgItem>,
}

/// One member in a `presence` reply.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PresenceMember {
    pub user: String,
    pub connections: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// `presence`: who is subscribed to a channel.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PresenceReply {
    pub id: u64,
    pub channel: String,
    pub members: Vec<PresenceMember>,
}

/// `join` / `leave`: presence events.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PresenceEvent {
    pub channel: String,
    pub user: String,
}

/// `unsubscribed`: the reply to `unsubscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Unsubscribed {
    pub id: u64,
    pub channel: String,
}

/// `gap`: messages `from..=to` were dropped before this subscription saw them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Gap {
    pub channel: String,
    pub from: u64,
    pub to: u64,
}

/// `error`: a request failed; the connection stays up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub code: super::ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Connected(Connected),
    Puback(PubAck),
    Subscribed(Subscribed),
    Unsubscribed(Unsubscribed),
    Msg(Msg),
    Msgs(Msgs),
    Presence(PresenceReply),
    Join(PresenceEvent),
    Leave(PresenceEvent),
    Gap(Gap),
    Pong(IdOnly),
    Error(ErrorFrame),
}

impl Publish {
    /// The payload, whichever field carried it. `None` when neither did.
    pub fn payload(&self) -> Option<Bytes> {
        match (&self.data, &self.data_b64) {
            (Some(data), _) => Some(data.0.clone()),
            (None, Some(b64)) => Some(b64.0.clone()),
            (None, None) => None,
        }
    }
}

impl Msg {
    /// The payload, whichever field carried it.
    pub fn payload(&self) -> Bytes {
        payload_of(&self.data, &self.data_b64)
    }
}

impl MsgItem {
    /// The same delivery as a `msg` frame of `channel`.
    pub fn into_msg(self, channel: String) -> Msg {
        Msg {
            channel,
            seq: self.seq,
            data: self.data,
            data_b64: self.data_b64,
            headers: self.headers,
            ts: self.ts,
            attempt: self.attempt,
        }
    }

    /// The payload, whichever field carried it.
    pub fn payload(&self) -> Bytes {
        payload_of(&self.data, &self.data_b64)
    }
}

fn payload_of(data: &Option<Payload>, data_b64: &Option<B64Payload>) -> Bytes {
    match (data, data_b64) {
        (Some(data), _) => data.0.clone(),
        (None, Some(b64)) => b64.0.clone(),
        (None, None) => Bytes::new(),
    }
}

impl ErrorFrame {
    /// An error reply, echoing `id` when the request had one.
    pub fn new(id: Option<u64>, code: super::ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

impl ClientFrame {
    /// The `type` name on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Publish(_) => "publish",
            Self::Subscribe(_) => "subscribe",
            Self::Unsubscribe(_) => "unsubscribe",
            Self::Ack(_) => "ack",
            Self::Nack(_) => "nack",
            Self::Progress(_) => "progress",
            Self::Term(_) => "term",
            Self::Presence(_) => "presence",
            Self::Refresh(_) => "refresh",
            Self::Ping(_) => "ping",
        }
    }
}

impl ServerFrame {
    /// The `type` name on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connected(_) => "connected",
            Self::Puback(_) => "puback",
            Self::Subscribed(_) => "subscribed",
            Self::Unsubscribed(_) => "unsubscribed",
            Self::Msg(_) => "msg",
            Self::Msgs(_) => "msgs",
            Self::Presence(_) => "presence",
            Self::Join(_) => "join",
            Self::Leave(_) => "leave",
            Self::Gap(_) => "gap",
            Self::Pong(_) => "pong",
            Self::Error(_) => "error",
        }
    }
}
