//! Wire protocol v1: frames, the JSON and MessagePack codecs, error and close
//! codes, and the naming rules every peer checks.
//!
//! Pure: no sockets, no runtime, no storage. The exact spec is
//! `proto/PROTOCOL.md`; `proto/vectors/` holds test vectors both ways.

mod codec;
mod frames;
mod names;
mod payload;

pub use codec::{
    Codec, DecodeError, EncodeError, SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, decode_client,
    decode_server, encode_client, encode_server,
};
pub use frames::*;
pub use names::{ChannelName, NameError, namespace_of};
pub use payload::{B64Payload, Payload, data_field, is_json};

use serde::{Deserialize, Serialize};

/// Stable error codes of `error` frames and HTTP error bodies. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// WebSocket close codes the server uses.
pub mod close {
    /// Protocol error: the peer broke the protocol (repeated bad frames, no `connect`).
    pub const PROTOCOL_ERROR: u16 = 4000;
    /// Missing, invalid or expired credentials.
    pub const UNAUTHORIZED: u16 = 4001;
    /// Not allowed.
    pub const FORBIDDEN: u16 = 4003;
    /// Policy or rate limit.
    pub const POLICY: u16 = 4008;
    /// The client read nothing for too long.
    pub const SLOW_CONSUMER: u16 = 4009;
    /// The server is shutting down or restarting: reconnect.
    pub const RESTARTING: u16 = 4010;
    /// Standard WebSocket code: a frame was far larger than `max_frame`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Standard WebSocket code: the peer was silent for two heartbeats.
    pub const GOING_AWAY: u16 = 1001;
}
