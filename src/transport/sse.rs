//! Server-Sent Events: `GET /sse` streams a session's frames as events;
//! `POST /sse/ack` carries its acks, nacks, progress and terms.
//!
//! Events: first a `retry:` hint, then `event: connected` (the `connected`
//! frame plus `session`, the id that `/sse/ack` names), one
//! `event: subscribed` per channel, then `event: msg` per delivery (`data:`
//! the JSON `msg` frame), and `gap` / `error` / `close` events. A `msg` (and
//! a `gap`) event's `id:` is the stream's position: `<channel>:<seq>`, or for
//! several channels `<channel>:<seq>,<channel>:<seq>,…` with every channel
//! that has had a delivery, each at its highest seq delivered. A browser
//! that reconnects sends it back as `Last-Event-ID`; see [`subscribes`] for
//! how that resumes. Comment lines are heartbeats.
//!
//! The stream ends when the client goes, after `http.sse_max_age` (the
//! browser reconnects), or when the session closes (shutdown, kick): then a
//! last `event: close` says why. Ending the stream ends the session.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream::{self, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::DropGuard;

use super::http_api::read_body;
use super::sessions::{self, HttpSession, MAX_CHANNELS, SubscribeParams};
use super::{ApiError, AppState};
use crate::protocol::{AckMode, Codec, ErrorCode, ServerFrame, Subscribe, encode_server};
use crate::session::Outgoing;

/// `GET /sse?channels=a,b&consumer=…&since=…`: opens a session and streams it.
pub async fn stream(
    State(app): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = sessions::query_params(query)?;
    let params = SubscribeParams::from_query(&query)?;
    let last_event = match headers.get("last-event-id") {
        None => None,
        Some(value) => match value.to_str().ok().and_then(parse_position) {
            Some(position) => Some(position),
            None => {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    "Last-Event-ID is not a position this server sent (<channel>:<seq>,…)",
                ));
            }
        },
    };
    let opened = sessions::open(
        &app,
        "sse",
        remote,
        subscribes(&params, last_event.as_ref()),
        None,
        super::credentials(&headers, query.get("token").map(String::as_str)),
    )
    .await?;
    let config = app.broker.config();
    let yielded = Arc::new(std::sync::atomic::AtomicU64::new(0));
    app.tracker.spawn(watch_stall(
        Arc::clone(&opened.session),
        opened.out_probe.clone(),
        Arc::clone(&yielded),
        config.server.slow_consumer_timeout,
    ));
    let state = StreamState {
        guard: opened.session.cancel.clone().drop_guard(),
        session: Arc::clone(&opened.session),
        out: opened.out,
        prelude: opened.prelude.into(),
        positions: last_event.unwrap_or_default(),
        deadline: Box::pin(tokio::time::sleep(config.http.sse_max_age)),
        done: false,
        yielded,
    };
    let first = Event::default()
        .retry(config.http.sse_retry)
        .comment("courier");
    let events = stream::once(async move { Ok(first) }).chain(events(state));
    let sse = Sse::new(events).keep_alive(KeepAlive::new().interval(config.server.heartbeat));
    let mut response = sse.into_response();
    let out = response.headers_mut();
    out.insert("x-accel-buffering", HeaderValue::from_static("no"));
    out.insert(
        "cache-control",
        HeaderValue::from_static("no-cache, no-transform"),
    );
    if let Ok(id) = HeaderValue::from_str(&opened.session.id) {
        out.insert("x-courier-session", id);
    }
    Ok(response)
}

/// The `subscribe` frames of a stream. With a `Last-Event-ID`:
/// - a channel it names resumes after its position (`since`), which also
///   acks everything up to it, when the stream is `ack=auto` or anonymous;
///   a named consumer in `ack=manual` resumes from its own state instead
///   (what it has not acked comes again);
/// - a channel it does not name: a named consumer resumes from its state,
///   an anonymous one starts as `since`/`from` say.
///
/// `since` and `from` of the URL never move a named consumer on a
/// reconnect: the browser repeats the URL, and must not start over.
pub fn subscribes(
    params: &SubscribeParams,
    last_event: Option<&BTreeMap<String, u64>>,
) -> Vec<Subscribe> {
    let auto = params.ack == Some(AckMode::Auto);
    (0..params.channels.len())
        .map(|i| {
            let mut subscribe = params.subscribe(i);
            if let Some(positions) = last_event {
                match positions.get(&subscribe.channel) {
                    Some(&seq) if auto || !params.named() => {
                        subscribe.since = Some(seq);
                        subscribe.from = None;
                    }
                    None if !params.named() => {}
                    _ => {
                        subscribe.since = None;
                        subscribe.from = None;
                    }
                }
            }
            subscribe
        })
        .collect()
}

/// Parses `<channel>:<seq>[,<channel>:<seq>…]`.
pub fn parse_position(text: &str) -> Option<BTreeMap<String, u64>> {
    let mut positions = BTreeMap::new();
    for entry in text.split(',').filter(|e| !e.is_empty()) {
        let (channel, seq) = entry.rsplit_once(':')?;
        crate::protocol::ChannelName::new(channel).ok()?;
        positions.insert(channel.to_owned(), seq.parse().ok()?);
        if positions.len() > MAX_CHANNELS {
            return None;
        }
    }
    Some(positions)
}

/// The `id:` of a position.
pub fn format_position(positions: &BTreeMap<String, u64>) -> String {
    positions
        .iter()
        .map(|(channel, seq)| format!("{channel}:{seq}"))
        .collect::<Vec<_>>()
        .join(",")
}

struct StreamState {
    /// Ends the session when the response body is dropped (client gone).
    #[allow(dead_code)]
    guard: DropGuard,
    session: Arc<HttpSession>,
    out: mpsc::Receiver<Outgoing>,
    prelude: VecDeque<ServerFrame>,
    /// Highest seq delivered per channel: the events' `id`.
    positions: BTreeMap<String, u64>,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    done: bool,
    /// Events handed to the response body so far (the stall watchdog reads it).
    yielded: Arc<std::sync::atomic::AtomicU64>,
}

/// Ends an SSE session whose client reads nothing: its queue stays full
/// and the response body takes no event for `timeout` (counted as a 4009
/// close, like a stalled WebSocket).
async fn watch_stall(
    session: Arc<sessions::HttpSession>,
    out: mpsc::WeakSender<Outgoing>,
    yielded: Arc<std::sync::atomic::AtomicU64>,
    timeout: std::time::Duration,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let period = (timeout / 4).max(std::time::Duration::from_millis(50));
    let mut stalled_since: Option<(tokio::time::Instant, u64)> = None;
    loop {
        tokio::select! {
            () = session.cancel.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let Some(sender) = out.upgrade() else { return };
        let full = sender.capacity() == 0;
        drop(sender);
        let count = yielded.load(Relaxed);
        stalled_since = match stalled_since {
            Some((since, seen)) if full && seen == count => {
                if since.elapsed() >= timeout {
                    crate::metrics::CONNECTIONS_CLOSED
                        .with_label_values(&[&crate::protocol::close::SLOW_CONSUMER.to_string()])
                        .inc();
                    tracing::info!(session = %session.id, "closing an SSE stream that read nothing for {timeout:?} (slow consumer, 4009)");
                    session.cancel.cancel();
                    return;
                }
                Some((since, seen))
            }
            _ if full => Some((tokio::time::Instant::now(), count)),
            _ => None,
        };
    }
}

fn events(state: StreamState) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(state, |mut state| async move {
        state
            .yielded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            if state.done {
                return None;
            }
            let outgoing = match state.prelude.pop_front() {
                Some(frame) => Outgoing::Frame(Box::new(frame)),
                None => tokio::select! {
                    biased;
                    _ = state.deadline.as_mut() => return None,
                    outgoing = state.out.recv() => outgoing?,
                },
            };
            match outgoing {
                Outgoing::Close(close) => {
                    state.done = true;
                    let data = serde_json::json!({"code": close.0, "reason": close.1});
                    let event = Event::default().event("close").data(data.to_string());
                    return Some((Ok(event), state));
                }
                Outgoing::Frame(frame) => {
                    let Some(frame) = state.session.route(*frame) else {
                        continue;
                    };
                    if let Some(event) = event_for(&state.session, &mut state.positions, &frame) {
                        return Some((Ok(event), state));
                    }
                }
            }
        }
    })
}

fn event_for(
    session: &HttpSession,
    positions: &mut BTreeMap<String, u64>,
    frame: &ServerFrame,
) -> Option<Event> {
    let moved = match frame {
        ServerFrame::Msg(m) => Some((&m.channel, m.seq)),
        ServerFrame::Gap(g) => Some((&g.channel, g.to)),
        _ => None,
    };
    let text = if let ServerFrame::Connected(connected) = frame {
        let mut value = serde_json::to_value(ServerFrame::Connected(connected.clone())).ok()?;
        value["session"] = serde_json::Value::String(session.id.clone());
        value.to_string()
    } else {
        let bytes = match encode_server(Codec::Json, frame) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, frame = frame.kind(), "cannot encode frame");
                return None;
            }
        };
        // A raw CR or LF in JSON text is insignificant whitespace.
        String::from_utf8(bytes).ok()?.replace(['\r', '\n'], " ")
    };
    let mut event = Event::default().event(frame.kind()).data(text);
    if let Some((channel, seq)) = moved {
        let entry = positions.entry(channel.clone()).or_insert(0);
        *entry = (*entry).max(seq);
        event = event.id(format_position(positions));
    }
    Some(event)
}

/// `POST /sse/ack`: `{session, type: ack|nack|progress|term, …}`; 204 when
/// the session took it, else the error the session answered.
pub async fn ack(State(app): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, app.broker.config().server.max_frame).await?;
    let (field, frame) = sessions::decode_ack(&bytes)?;
    let id = field.session.ok_or_else(|| {
        ApiError::new(
            ErrorCode::BadRequest,
            "`session` is required: the id from the stream's `connected` event",
        )
    })?;
    let session = app.sessions.get(&id, "sse").ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            "no open SSE session has this id (the stream has ended?)",
        )
    })?;
    session
        .request(frame)
        .await
        .map_err(sessions::RequestError::into_api)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
