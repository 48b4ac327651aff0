//! The SDK's errors: one error type per operation, each carrying a `kind`
//! the application can match on (the async-nats shape).
//!
//! A kind says what went wrong and, by that, what the caller may do next:
//! `TimedOut` means the outcome is unknown (retry with the same `msg_id`),
//! `Rejected` means the server (or the SDK's own check of the same rule)
//! refused the request, `Closed` means the client is gone for good.

use crate::protocol::ErrorCode;

/// The first connection could not be made ([`ClientBuilder::connect`](super::ClientBuilder::connect)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot connect: {kind}: {message}")]
pub struct ConnectError {
    /// What went wrong.
    pub kind: ConnectErrorKind,
    /// Details, for logs.
    pub message: String,
}

/// What made a connection attempt fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectErrorKind {
    /// The URL is not a valid `ws://` URL (or names a scheme this build cannot speak).
    #[error("invalid URL")]
    InvalidUrl,
    /// TCP, or the WebSocket handshake, failed (refused, reset, HTTP error).
    #[error("transport error")]
    Io,
    /// No `connected` reply within the request timeout.
    #[error("timed out")]
    TimedOut,
    /// The server closed the connection before `connected`, e.g. with 4001
    /// (unauthorized) or 4003 (forbidden).
    #[error("closed by the server with code {code:?}")]
    Closed {
        /// The WebSocket close code, when the server sent one.
        code: Option<u16>,
    },
    /// The server answered `connect` with an `error` frame.
    #[error("rejected by the server: {}", .code.as_str())]
    Rejected {
        /// The error code of the `error` frame.
        code: ErrorCode,
    },
    /// The server sent something other than `connected` first.
    #[error("protocol violation")]
    Protocol,
}

/// A publish did not get its `puback`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("publish failed: {kind}")]
pub struct PublishError {
    /// What went wrong.
    pub kind: PublishErrorKind,
}

/// Why a publish failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// `publish_buffer` publishes already wait for their `puback`; nothing
    /// was queued. Retry later or raise `publish_buffer`.
    #[error("the publish buffer is full")]
    BufferFull,
    /// No `puback` within the request timeout. The message may or may not be
    /// stored: publish again with the same `msg_id` to be sure it is stored once.
    #[error("no puback within the request timeout")]
    TimedOut,
    /// The server refused the message (or the SDK did, by the same rule:
    /// a bad channel name is `bad_request`, a frame over `max_frame` is `too_large`).
    #[error("rejected: {} ({message})", .code.as_str())]
    Rejected {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation; not stable, do not parse.
        message: String,
    },
    /// The client is closed (or gave up reconnecting).
    #[error("the client is closed")]
    Closed,
}

/// A subscribe did not get its `subscribed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subscribe failed: {kind}")]
pub struct SubscribeError {
    /// What went wrong.
    pub kind: SubscribeErrorKind,
}

/// Why a subscribe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeErrorKind {
    /// No `subscribed` within the request timeout.
    #[error("no reply within the request timeout")]
    TimedOut,
    /// The server refused (or the SDK did, by the same rule: a bad name is
    /// `bad_request`, a second subscription to one channel on one client is
    /// `conflict`).
    #[error("rejected: {} ({message})", .code.as_str())]
    Rejected {
        /// The error code.
        code: ErrorCode,
        /// The explanation; not stable, do not parse.
        message: String,
    },
    /// The client is closed (or gave up reconnecting).
    #[error("the client is closed")]
    Closed,
}

/// Another request (`unsubscribe`, `ping`, an ack) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request failed: {kind}")]
pub struct RequestError {
    /// What went wrong.
    pub kind: RequestErrorKind,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestErrorKind {
    /// No reply within the request timeout.
    #[error("no reply within the request timeout")]
    TimedOut,
    /// The server answered with an `error` frame.
    #[error("rejected: {} ({message})", .code.as_str())]
    Rejected {
        /// The error code.
        code: ErrorCode,
        /// The explanation; not stable, do not parse.
        message: String,
    },
    /// The client is closed (or gave up reconnecting).
    #[error("the client is closed")]
    Closed,
}

impl From<PublishErrorKind> for PublishError {
    fn from(kind: PublishErrorKind) -> Self {
        Self { kind }
    }
}

impl From<SubscribeErrorKind> for SubscribeError {
    fn from(kind: SubscribeErrorKind) -> Self {
        Self { kind }
    }
}

impl From<RequestErrorKind> for RequestError {
    fn from(kind: RequestErrorKind) -> Self {
        Self { kind }
    }
}

impl ConnectError {
    pub(super) fn new(kind: ConnectErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}
