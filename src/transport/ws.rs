//! WebSocket: the upgrade on the public listener, then two halves per
//! connection: the reader turns WebSocket messages into [`Inbound`] events
//! for the session; the writer encodes the session's [`Outgoing`] frames,
//! batches them into one flush, and sends heartbeat pings.
//!
//! The upgrade is done by hand on axum's router (axum's own `ws` feature
//! would pull a second tungstenite), so the checks tungstenite's handshake
//! would make are made here: method, `Upgrade`, version 13, key format.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::SinkExt;
use futures_util::stream::{self, SplitSink, SplitStream, Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{AppState, json_error};
use crate::protocol::{Codec, ErrorCode, close, decode_client, encode_server};
use crate::session::registry::{ConnectionHandle, Control};
use crate::session::{ConnectionInfo, Inbound, Outgoing, Session};

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Most frames written before one flush.
const WRITE_BATCH: usize = 256;

/// How long a closed connection waits for the peer's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Read buffer per connection; small so idle connections stay cheap.
const READ_BUFFER: usize = 1024;

/// `GET /ws`: checks the upgrade request, negotiates the codec, and hands
/// the upgraded socket to a session.
pub async fn upgrade(
    State(app): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let headers = request.headers();
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return json_error(
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::BadRequest,
            "this endpoint speaks WebSocket: send an Upgrade: websocket request",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return json_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "Sec-WebSocket-Version must be 13",
        );
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| valid_key(k.as_bytes()))
        .cloned()
    else {
        return json_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        );
    };
    let offer = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let chosen = match Codec::negotiate(offer) {
        Ok(chosen) => chosen,
        Err(message) => {
            return json_error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &message);
        }
    };
    let Ok(permit) = Arc::clone(&app.connections).try_acquire_owned() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the server is at max_connections; retry later",
        );
    };
    let query_token = request.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    let credentials = super::credentials(request.headers(), query_token.as_deref());
    let on_upgrade = hyper::upgrade::on(&mut request);
    let codec = chosen.unwrap_or(Codec::Json);
    let config = ws_config(app.broker.config().server.max_frame);
    let task_app = Arc::clone(&app);
    app.tracker.spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        serve_socket(task_app, socket, codec, remote, credentials).await;
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out: &mut HeaderMap = response.headers_mut();
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(codec) = chosen {
        out.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(codec.subprotocol()),
        );
    }
    response.into_response()
}

fn valid_key(key: &[u8]) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16)
}

/// Limits tied to `max_frame`, never tungstenite's 64 MiB defaults. Frames
/// up to twice `max_frame` are read so the session can answer `too_large`;
/// larger ones end the connection with 1009.
fn ws_config(max_frame: u64) -> WebSocketConfig {
    let hard = usize::try_from(max_frame.saturating_mul(2)).unwrap_or(usize::MAX);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(hard.saturating_add(64 * 1024))
        .max_message_size(Some(hard))
        .max_frame_size(Some(hard))
}

async fn serve_socket(
    app: Arc<AppState>,
    socket: Socket,
    codec: Codec,
    remote: SocketAddr,
    credentials: Option<String>,
) {
    let server = &app.broker.config().server;
    let (sink, stream) = socket.split();
    let (out_tx, out_rx) = mpsc::channel(server.outbound_buffer);
    let info = ConnectionInfo {
        conn_id: app.broker.next_connection_id(),
        remote: Some(remote),
        transport: "ws",
        credentials,
    };
    let session = Session::new(Arc::clone(&app.broker), info, out_tx);
    let connection = Arc::clone(session.connection());
    let (heartbeat, stall) = (server.heartbeat, server.slow_consumer_timeout);
    let writer = tokio::spawn(write_loop(
        sink, out_rx, codec, heartbeat, stall, connection,
    ));
    // Fused: the closing handshake below may poll it after it ended.
    let mut inbound = Box::pin(inbound(stream, codec, server.max_frame, server.heartbeat).fuse());
    session.run(&mut inbound, app.shutdown.clone()).await;
    let _ = writer.await;
    // Closing handshake: let the peer read our close and answer it before
    // the socket goes (dropping it at once could reset the connection and
    // discard the close frame on the client's side).
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while inbound.next().await.is_some() {}
    })
    .await;
}

/// The socket's messages as session events; ends when the peer closes.
/// A peer silent for two heartbeats gets [`Inbound::Fatal`] with 1001.
fn inbound(
    stream: SplitStream<Socket>,
    codec: Codec,
    max_frame: u64,
    heartbeat: Duration,
) -> impl Stream<Item = Inbound> {
    let limit = usize::try_from(max_frame).unwrap_or(usize::MAX);
    stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        loop {
            let next = match tokio::time::timeout(heartbeat * 2, stream.next()).await {
                Err(_) => {
                    let fatal = Inbound::Fatal {
                        code: close::GOING_AWAY,
                        reason: "no traffic for two heartbeats".into(),
                    };
                    // Keep the stream: the closing handshake still reads it.
                    return Some((fatal, Some(stream)));
                }
                Ok(next) => next?,
            };
            let event = match next {
                Ok(Message::Text(text)) => frame_event(codec, Codec::Json, text.as_bytes(), limit),
                Ok(Message::Binary(bytes)) => frame_event(codec, Codec::MsgPack, &bytes, limit),
                Ok(Message::Close(_)) => return None,
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. })) => {
                    let fatal = Inbound::Fatal {
                        code: close::MESSAGE_TOO_BIG,
                        reason: format!("frame of {size} bytes is far over max_frame"),
                    };
                    return Some((fatal, None));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "websocket read ended");
                    return None;
                }
            };
            return Some((event, Some(stream)));
        }
    })
}

fn frame_event(codec: Codec, arrived_as: Codec, bytes: &[u8], limit: usize) -> Inbound {
    if bytes.len() > limit {
        return Inbound::TooLarge(bytes.len());
    }
    if codec != arrived_as {
        return Inbound::WrongKind(match codec {
            Codec::Json => "this connection speaks courier.v1.json: send text frames",
            Codec::MsgPack => "this connection speaks courier.v1.msgpack: send binary frames",
        });
    }
    Inbound::Frame(decode_client(codec, bytes))
}

/// Why the write loop stopped writing.
enum Stop {
    /// The socket failed (the peer is gone).
    Failed,
    /// A write could not finish within `slow_consumer_timeout`: the peer
    /// reads nothing.
    Stalled,
}

/// Awaits one socket write for at most `limit`.
async fn timed(
    limit: Duration,
    write: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), Stop> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Stop::Failed),
        Err(_) => Err(Stop::Stalled),
    }
}

/// Encodes and writes the session's frames, many per flush; pings every
/// heartbeat. Ends on a close, when the session is gone, on a write error,
/// or when the peer reads nothing for `stall` (then it is cut with 4009);
/// then tells the session (`connection`) that nothing reaches the client
/// any more. (A parameter, not a wrapping task: a wrapper would keep a
/// second copy of the arguments in every connection's writer task.)
async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    frames: mpsc::Receiver<Outgoing>,
    codec: Codec,
    heartbeat: Duration,
    stall: Duration,
    connection: Arc<ConnectionHandle>,
) {
    if let Err(Stop::Stalled) = write_frames(&mut sink, frames, codec, heartbeat, stall).await {
        crate::metrics::CONNECTIONS_CLOSED
            .with_label_values(&[&close::SLOW_CONSUMER.to_string()])
            .inc();
        tracing::info!(
            "closing a connection that read nothing for {stall:?} (slow consumer, 4009)"
        );
        let frame = CloseFrame {
            code: close::SLOW_CONSUMER.into(),
            reason: "slow consumer: the client read nothing for too long".into(),
        };
        // Best effort: the socket is full, so this may never reach the peer.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
    connection.send(Control::TransportGone);
}

async fn write_frames(
    sink: &mut SplitSink<Socket, Message>,
    mut frames: mpsc::Receiver<Outgoing>,
    codec: Codec,
    heartbeat: Duration,
    stall: Duration,
) -> Result<(), Stop> {
    let mut ping = tokio::time::interval(heartbeat);
    ping.reset();
    loop {
        let first = tokio::select! {
            biased;
            first = frames.recv() => first,
            _ = ping.tick() => {
                timed(stall, sink.send(Message::Ping(Default::default()))).await?;
                continue;
            }
        };
        let Some(first) = first else {
            let _ = tokio::time::timeout(heartbeat, sink.close()).await;
            return Ok(());
        };
        let mut next = Some(first);
        let mut written = 0;
        while let Some(outgoing) = next.take() {
            let message = match outgoing {
                Outgoing::Frame(frame) => match encode_server(codec, &frame) {
                    Ok(bytes) => match codec {
                        Codec::MsgPack => Message::Binary(bytes.into()),
                        Codec::Json => match String::from_utf8(bytes) {
                            Ok(text) => Message::Text(text.into()),
                            Err(_) => continue,
                        },
                    },
                    Err(e) => {
                        tracing::error!(error = %e, frame = frame.kind(), "cannot encode frame");
                        continue;
                    }
                },
                Outgoing::Close(close) => {
                    let (code, reason) = *close;
                    let frame = CloseFrame {
                        code: code.into(),
                        reason: reason.into(),
                    };
                    let _ = tokio::time::timeout(heartbeat, sink.send(Message::Close(Some(frame))))
                        .await;
                    // Read side ends when the peer answers the close; drop the rest.
                    frames.close();
                    return Ok(());
                }
            };
            timed(stall, sink.feed(message)).await?;
            written += 1;
            if written < WRITE_BATCH {
                next = frames.try_recv().ok();
            }
        }
        timed(stall, sink.flush()).await?;
    }
}
