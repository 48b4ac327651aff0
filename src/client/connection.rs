//! One WebSocket connection: opening it (handshake, `connect` → `connected`),
//! and writing frames without ever blocking the driver.
//!
//! The driver never awaits a socket write: frames wait in [`Conn::out`] and
//! [`Conn::poll_write`] moves them into the socket as it accepts them, so a
//! server that stops reading (backpressure, §16.4) cannot stall reads,
//! timers or commands.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::error::{ConnectError, ConnectErrorKind};
use crate::backoff::Backoff;
use crate::protocol::{
    ClientFrame, Codec, Connect, Connected, ServerFrame, decode_server, encode_client,
};

/// The socket type of a client connection.
pub(super) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connection attempt in progress, polled by the driver.
pub(super) type Connecting =
    Pin<Box<dyn Future<Output = Result<(Socket, Connected), ConnectError>> + Send>>;

/// Largest message the SDK reads. The server's frames are bounded by its
/// `max_frame` (a `msgs` batch by about half of it), 1 MiB by default; this
/// leaves room for servers configured larger without tungstenite's 64 MiB.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Bytes tungstenite gathers before it writes to the socket.
const WRITE_BUFFER: usize = 64 * 1024;

/// What the builder configured, shared by the handles and the driver.
#[derive(Clone)]
pub(super) struct Options {
    pub url: String,
    /// Other servers of the same cluster, tried in turn after `url`.
    pub fallbacks: Vec<String>,
    pub token: Option<String>,
    pub name: Option<String>,
    pub codec: Codec,
    pub publish_buffer: usize,
    pub request_timeout: Duration,
    pub reconnect: Backoff,
    pub max_reconnects: Option<u32>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Options")
            .field("url", &self.url)
            .field("fallbacks", &self.fallbacks)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("name", &self.name)
            .field("codec", &self.codec)
            .field("publish_buffer", &self.publish_buffer)
            .field("request_timeout", &self.request_timeout)
            .field("reconnect", &self.reconnect)
            .field("max_reconnects", &self.max_reconnects)
            .finish()
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WRITE_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + MAX_MESSAGE)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Encodes a client frame as the WebSocket message kind of `codec`.
pub(super) fn encode(codec: Codec, frame: &ClientFrame) -> Result<Message, String> {
    let bytes = encode_client(codec, frame).map_err(|e| e.to_string())?;
    Ok(match codec {
        Codec::MsgPack => Message::Binary(Bytes::from(bytes)),
        Codec::Json => Message::Text(String::from_utf8(bytes).map_err(|e| e.to_string())?.into()),
    })
}

/// Decodes a data message; `None` for control messages (ping, pong, close).
pub(super) fn decode(codec: Codec, message: &Message) -> Option<Result<ServerFrame, String>> {
    let bytes: &[u8] = match message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        _ => return None,
    };
    Some(decode_server(codec, bytes).map_err(|e| e.to_string()))
}

impl Options {
    /// The server for connection attempt `attempt` (0 first): the URL,
    /// then each fallback in turn, round and round.
    pub fn url_for(&self, attempt: u32) -> &str {
        let count = self.fallbacks.len() + 1;
        match usize::try_from(attempt).unwrap_or(0) % count {
            0 => &self.url,
            n => &self.fallbacks[n - 1],
        }
    }
}

/// Opens a connection to the server for attempt `attempt` (see
/// [`Options::url_for`]) and completes `connect` → `connected`, all within
/// the request timeout.
pub(super) fn establish(options: Arc<Options>, attempt: u32) -> Connecting {
    Box::pin(async move {
        let timeout = options.request_timeout;
        let url = options.url_for(attempt).to_owned();
        match tokio::time::timeout(timeout, open(&options, &url)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::new(
                ConnectErrorKind::TimedOut,
                format!("no `connected` within {timeout:?}"),
            )),
        }
    })
}

async fn open(options: &Options, url: &str) -> Result<(Socket, Connected), ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::new(ConnectErrorKind::InvalidUrl, e.to_string()))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(options.codec.subprotocol()),
    );
    let (mut ws, _response) =
        tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true)
            .await
            .map_err(|e| {
                let kind = match e {
                    WsError::Url(_) => ConnectErrorKind::InvalidUrl,
                    _ => ConnectErrorKind::Io,
                };
                ConnectError::new(kind, e.to_string())
            })?;
    let connect = ClientFrame::Connect(Connect {
        token: options.token.clone(),
        client: options.name.clone(),
        batch: Some(true),
    });
    let message = encode(options.codec, &connect)
        .map_err(|e| ConnectError::new(ConnectErrorKind::Protocol, e))?;
    ws.send(message)
        .await
        .map_err(|e| ConnectError::new(ConnectErrorKind::Io, e.to_string()))?;
    loop {
        let message = match ws.next().await {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(ConnectError::new(ConnectErrorKind::Io, e.to_string())),
            None => {
                return Err(ConnectError::new(
                    ConnectErrorKind::Closed { code: None },
                    "connection closed before `connected`",
                ));
            }
        };
        if let Message::Close(frame) = &message {
            let (code, reason) = frame.as_ref().map_or((None, String::new()), |f| {
                (Some(u16::from(f.code)), f.reason.to_string())
            });
            return Err(ConnectError::new(ConnectErrorKind::Closed { code }, reason));
        }
        match decode(options.codec, &message) {
            None => continue,
            Some(Ok(ServerFrame::Connected(connected))) => return Ok((ws, connected)),
            Some(Ok(ServerFrame::Error(e))) => {
                return Err(ConnectError::new(
                    ConnectErrorKind::Rejected { code: e.code },
                    e.message,
                ));
            }
            Some(Ok(other)) => {
                return Err(ConnectError::new(
                    ConnectErrorKind::Protocol,
                    format!("expected `connected`, got `{}`", other.kind()),
                ));
            }
            Some(Err(e)) => return Err(ConnectError::new(ConnectErrorKind::Protocol, e)),
        }
    }
}

/// A live connection, owned by the driver.
pub(super) struct Conn {
    sink: SplitSink<Socket, Message>,
    stream: SplitStream<Socket>,
    /// Frames waiting for the socket to accept them, in send order.
    out: VecDeque<Message>,
    /// Frames were handed to the sink since its last completed flush.
    dirty: bool,
    /// The server's `connected` reply: heartbeat and limits.
    pub connected: Connected,
    /// When anything (a frame, a ping, a pong) last arrived: the liveness clock.
    pub last_rx: Instant,
    /// When the next heartbeat ping is due (`None`: heartbeats are off).
    pub next_ping: Option<Instant>,
    /// The close code and reason the server sent, if it sent a close frame.
    pub close: Option<(u16, String)>,
}

impl Conn {
    pub fn new(socket: Socket, connected: Connected) -> Self {
        let (sink, stream) = socket.split();
        let now = Instant::now();
        let next_ping = (connected.heartbeat_ms > 0).then(|| now + ping_interval(&connected));
        Self {
            sink,
            stream,
            out: VecDeque::new(),
            dirty: false,
            connected,
            last_rx: now,
            next_ping,
            close: None,
        }
    }

    /// The heartbeat interval the server announced (`None`: off).
    pub fn heartbeat(&self) -> Option<Duration> {
        (self.connected.heartbeat_ms > 0)
            .then(|| Duration::from_millis(self.connected.heartbeat_ms))
    }

    /// Queues a message for the socket.
    pub fn queue(&mut self, message: Message) {
        self.out.push_back(message);
    }

    /// Frames not yet accepted by the socket.
    pub fn backlog(&self) -> usize {
        self.out.len()
    }

    /// True while there is something to write or flush.
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty() || self.dirty
    }

    /// The reading half and a writer future, borrowed apart so the driver
    /// can wait on both at once.
    pub fn halves(&mut self) -> (&mut SplitStream<Socket>, Writer<'_>) {
        let writer = Writer {
            sink: &mut self.sink,
            out: &mut self.out,
            dirty: &mut self.dirty,
        };
        (&mut self.stream, writer)
    }

    /// Sends a close frame and waits (at most `grace`) for the server's reply.
    pub async fn close(mut self, grace: Duration) {
        let _ = tokio::time::timeout(grace, async {
            let writer = Writer {
                sink: &mut self.sink,
                out: &mut self.out,
                dirty: &mut self.dirty,
            };
            if writer.await.is_err() {
                return;
            }
            if self.sink.close().await.is_err() {
                return;
            }
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }
}

/// The heartbeat ping period: half the server's heartbeat.
pub(super) fn ping_interval(connected: &Connected) -> Duration {
    Duration::from_millis(connected.heartbeat_ms / 2).max(Duration::from_millis(1))
}

/// Moves queued frames into the socket and flushes; completes when all are
/// written. Cancel-safe: a frame leaves the queue only when the sink takes it.
pub(super) struct Writer<'a> {
    sink: &'a mut SplitSink<Socket, Message>,
    out: &'a mut VecDeque<Message>,
    dirty: &'a mut bool,
}

impl Future for Writer<'_> {
    type Output = Result<(), WsError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        while !this.out.is_empty() {
            ready!(this.sink.poll_ready_unpin(cx))?;
            if let Some(message) = this.out.pop_front() {
                this.sink.start_send_unpin(message)?;
                *this.dirty = true;
            }
        }
        if *this.dirty {
            ready!(this.sink.poll_flush_unpin(cx))?;
            *this.dirty = false;
        }
        Poll::Ready(Ok(()))
    }
}
