//! Long polling: `GET /poll` returns the session's frames as a JSON batch,
//! or an empty batch when nothing came within `wait`. `POST /poll/ack`,
//! `/poll/publish` and `/poll/close` act on the session between polls.
//!
//! The first poll (no `cursor`) opens a session and subscribes it; its
//! response names the session and a cursor. Each response that returns
//! frames is a numbered batch, and its cursor is `<session>.<batch>`. The
//! next poll sends that cursor back: every `msg` of the batches up to it is
//! acked then (a cumulative ack), except those the client nacked, termed
//! or acked by itself through `/poll/ack` meanwhile. Batches after the
//! cursor (a response that was lost) are returned again first. So a poll
//! can be repeated safely, and nothing the client never saw is acked.
//!
//! Between polls a router task drains the session's queue into `pending`.
//! What waits there is bounded by the subscriptions' windows (poll
//! subscriptions are always `ack: "manual"`: the cursor acks), except for
//! ephemeral channels (always at most once), whose deliveries are dropped
//! beyond [`PENDING_MAX`] frames. A session no poll or request has used
//! for `http.session_idle_timeout` is closed: its unacked deliveries go
//! back to its consumer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::http_api::{PublishBody, body_codec, decode_body, read_body};
use super::sessions::{self, HttpSession, SessionField, SubscribeParams};
use super::{ApiError, AppState};
use crate::broker::Broker;
use crate::config::HumanDuration;
use crate::protocol::{
    Ack, AckMode, ClientFrame, Codec, ErrorCode, ServerFrame, encode_server, namespace_of,
};
use crate::session::Outgoing;

/// Frames waiting for a poll, beyond which ephemeral deliveries are dropped.
pub const PENDING_MAX: usize = 10_000;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a poll session keeps between polls.
#[derive(Default)]
pub struct PollState {
    inner: Mutex<PollInner>,
    /// Woken when frames arrive, the session closes, or a newer poll starts.
    changed: Notify,
}

#[derive(Default)]
struct PollInner {
    /// Frames not yet returned by a poll.
    pending: VecDeque<ServerFrame>,
    /// Frames returned, by batch, until a cursor acks (or replays) them.
    batches: VecDeque<Batch>,
    /// The number of the next batch (the first is 1; cursor 0 acks nothing).
    next_batch: u64,
    /// The session ended: code and reason.
    closed: Option<(u16, String)>,
    /// Counts polls; a poll that sees a newer one returns at once.
    generation: u64,
    /// A poll is waiting: the idle timeout does not run.
    busy: bool,
}

struct Batch {
    number: u64,
    frames: Vec<ServerFrame>,
}

impl PollState {
    fn new() -> Self {
        Self {
            inner: Mutex::new(PollInner {
                next_batch: 1,
                ..PollInner::default()
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PollInner> {
        lock(&self.inner)
    }

    fn close(&self, code: u16, reason: &str) {
        self.lock().closed.get_or_insert((code, reason.to_owned()));
        self.changed.notify_waiters();
    }

    /// The client acked, nacked or termed these itself: never ack or replay them.
    fn forget(&self, channel: &str, seqs: &[u64], upto: Option<u64>) {
        let mut inner = self.lock();
        for batch in &mut inner.batches {
            batch.frames.retain(|f| match f {
                ServerFrame::Msg(m) if m.channel == channel => {
                    !seqs.contains(&m.seq) && upto.is_none_or(|upto| m.seq > upto)
                }
                _ => true,
            });
        }
    }
}

impl PollInner {
    /// Applies cursor `n`: returns the seqs to ack (per channel) from the
    /// batches up to it, and puts the frames of later batches back in front.
    fn take_acked(&mut self, n: u64) -> BTreeMap<String, Vec<u64>> {
        let mut acks: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut replay = Vec::new();
        for batch in self.batches.drain(..) {
            if batch.number <= n {
                for frame in batch.frames {
                    if let ServerFrame::Msg(m) = frame {
                        acks.entry(m.channel).or_default().push(m.seq);
                    }
                }
            } else {
                replay.extend(batch.frames);
            }
        }
        for frame in replay.into_iter().rev() {
            self.pending.push_front(frame);
        }
        acks
    }

    /// The next batch, bounded by count and bytes (one frame always fits).
    fn take_batch(
        &mut self,
        max_frames: usize,
        max_bytes: u64,
    ) -> (Option<u64>, Vec<Box<RawValue>>) {
        let mut frames = Vec::new();
        let mut raw = Vec::new();
        let mut bytes: u64 = 0;
        while let Some(frame) = self.pending.front() {
            if frames.len() >= max_frames {
                break;
            }
            let text = encode_server(Codec::Json, frame)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| RawValue::from_string(t).ok());
            let Some(text) = text else {
                tracing::error!(frame = frame.kind(), "cannot encode frame; skipped");
                self.pending.pop_front();
                continue;
            };
            let size = u64::try_from(text.get().len()).unwrap_or(u64::MAX);
            if !frames.is_empty() && bytes.saturating_add(size) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(size);
            raw.push(text);
            if let Some(frame) = self.pending.pop_front() {
                frames.push(frame);
            }
        }
        if frames.is_empty() {
            return (None, raw);
        }
        let number = self.next_batch;
        self.next_batch += 1;
        self.batches.push_back(Batch { number, frames });
        (Some(number), raw)
    }
}

#[derive(Serialize)]
struct PollResponse<'a> {
    session: &'a str,
    cursor: String,
    frames: Vec<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    closed: Option<Closed>,
}

#[derive(Serialize)]
struct Closed {
    code: u16,
    reason: String,
}

/// `<session>.<batch>` → (session, batch).
fn parse_cursor(cursor: &str) -> Option<(&str, u64)> {
    let (id, number) = cursor.split_once('.')?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((id, number.parse().ok()?))
}

fn bad_cursor() -> ApiError {
    ApiError::new(
        ErrorCode::BadRequest,
        "malformed cursor: send back the `cursor` of the last response",
    )
}

fn unknown_session() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "unknown or expired poll session: poll again without a cursor (a named consumer resumes where it was)",
    )
}

/// `wait`: "25s", "500ms" or a number of seconds; clamped to `poll_wait_max`.
fn parse_wait(
    value: Option<&String>,
    default: Duration,
    max: Duration,
) -> Result<Duration, ApiError> {
    let wait = match value {
        None => default,
        Some(text) => match text.parse::<u64>() {
            Ok(seconds) => Duration::from_secs(seconds),
            Err(_) => text
                .parse::<HumanDuration>()
                .map(|d| d.0)
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("wait: {e}")))?,
        },
    };
    Ok(wait.min(max))
}

/// `GET /poll?channels=…` (a new session) or `GET /poll?cursor=…`.
pub async fn poll(
    State(app): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = sessions::query_params(query)?;
    let http = &app.broker.config().http;
    let wait = parse_wait(query.get("wait"), http.poll_wait, http.poll_wait_max)?;
    let (session, cursor) = match query.get("cursor") {
        Some(cursor) => {
            let (id, number) = parse_cursor(cursor).ok_or_else(bad_cursor)?;
            let session = app.sessions.get(id, "poll").ok_or_else(unknown_session)?;
            if let Some(list) = query.get("channels") {
                let asked: Vec<&str> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                if asked != session.channels {
                    return Err(ApiError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "this poll session subscribes to {:?}; poll without a cursor to subscribe to other channels",
                            session.channels.join(",")
                        ),
                    ));
                }
            }
            (session, Some(number))
        }
        None => {
            let credentials = super::credentials(&headers, query.get("token").map(String::as_str));
            (open(&app, remote, &query, credentials).await?, None)
        }
    };
    run_poll(
        &session,
        cursor,
        wait,
        http.poll_max_frames,
        http.poll_max_bytes,
    )
    .await
}

async fn open(
    app: &Arc<AppState>,
    remote: SocketAddr,
    query: &HashMap<String, String>,
    credentials: Option<String>,
) -> Result<Arc<HttpSession>, ApiError> {
    let params = SubscribeParams::from_query(query)?;
    if params.ack == Some(AckMode::Auto) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "poll subscriptions are acked by the next poll's cursor; ack=auto is not supported here",
        ));
    }
    let subscribes = (0..params.channels.len())
        .map(|i| params.subscribe(i))
        .collect();
    let state = Arc::new(PollState::new());
    let opened = sessions::open(
        app,
        "poll",
        remote,
        subscribes,
        Some(Arc::clone(&state)),
        credentials,
    )
    .await?;
    state.lock().pending.extend(opened.prelude);
    let idle = app.broker.config().http.session_idle_timeout;
    app.tracker.spawn(route(
        Arc::clone(&opened.session),
        state,
        opened.out,
        idle,
        Arc::clone(&app.broker),
    ));
    Ok(opened.session)
}

/// Drains the session's queue into `pending` until the session ends;
/// closes the session after `idle` without use.
async fn route(
    session: Arc<HttpSession>,
    state: Arc<PollState>,
    mut out: mpsc::Receiver<Outgoing>,
    idle: Duration,
    broker: Arc<Broker>,
) {
    loop {
        let idle_at = session.last_used() + idle;
        tokio::select! {
            outgoing = out.recv() => match outgoing {
                None => {
                    state.close(1000, "the session ended");
                    return;
                }
                Some(Outgoing::Close(close)) => {
                    state.close(close.0, &close.1);
                    session.cancel.cancel();
                    return;
                }
                Some(Outgoing::Frame(frame)) => {
                    let Some(frame) = session.route(*frame) else { continue };
                    let mut inner = state.lock();
                    let ephemeral = matches!(&frame, ServerFrame::Msg(m)
                        if !broker.config().policy(namespace_of(&m.channel)).durable);
                    if ephemeral && inner.pending.len() >= PENDING_MAX {
                        tracing::debug!(session = %session.id, "poll session full: ephemeral delivery dropped");
                        continue;
                    }
                    inner.pending.push_back(frame);
                    drop(inner);
                    state.changed.notify_waiters();
                }
            },
            _ = tokio::time::sleep_until(idle_at) => {
                let idle_for = Instant::now().saturating_duration_since(session.last_used());
                if !state.lock().busy && idle_for >= idle {
                    tracing::debug!(session = %session.id, "poll session idle: closed");
                    state.close(1001, "no poll for session_idle_timeout");
                    session.cancel.cancel();
                    return;
                }
            }
        }
    }
}

/// Acks what cursor `number` covers (through the session, as `ack` frames).
async fn apply_cursor(
    session: &HttpSession,
    state: &PollState,
    number: u64,
) -> Result<(), ApiError> {
    let acks = {
        let mut inner = state.lock();
        if number >= inner.next_batch {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("cursor batch {number} was never returned by this session"),
            ));
        }
        inner.take_acked(number)
    };
    for (channel, seqs) in acks {
        let ack = ClientFrame::Ack(Ack {
            id: None,
            channel: channel.clone(),
            seqs: Some(seqs),
            upto: None,
        });
        // Best effort: a seq that is no longer the consumer's to ack (it
        // was moved by `since`, or dead-lettered) needs no ack.
        if let Err(e) = session.request(ack).await {
            tracing::debug!(session = %session.id, %channel, error = ?e, "cursor ack refused");
        }
    }
    Ok(())
}

async fn run_poll(
    session: &Arc<HttpSession>,
    cursor: Option<u64>,
    wait: Duration,
    max_frames: usize,
    max_bytes: u64,
) -> Result<Response, ApiError> {
    let state = session.poll.as_ref().ok_or_else(unknown_session)?;
    session.touch();
    if let Some(number) = cursor {
        apply_cursor(session, state, number).await?;
    }
    let generation = {
        let mut inner = state.lock();
        inner.generation += 1;
        inner.busy = true;
        inner.generation
    };
    // An older poll of this session returns now, empty.
    state.changed.notify_waiters();
    let deadline = Instant::now() + wait;
    let (number, frames, closed) = loop {
        let notified = state.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut inner = state.lock();
            if inner.generation != generation {
                break (None, Vec::new(), None);
            }
            if !inner.pending.is_empty() || inner.closed.is_some() {
                let (number, frames) = inner.take_batch(max_frames, max_bytes);
                let closed = if inner.pending.is_empty() {
                    inner.closed.clone()
                } else {
                    None
                };
                break (number, frames, closed);
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => break (None, Vec::new(), None),
        }
    };
    {
        let mut inner = state.lock();
        if inner.generation == generation {
            inner.busy = false;
        }
    }
    session.touch();
    let cursor = format!("{}.{}", session.id, number.or(cursor).unwrap_or(0));
    Ok(axum::Json(PollResponse {
        session: &session.id,
        cursor,
        frames,
        closed: closed.map(|(code, reason)| Closed { code, reason }),
    })
    .into_response())
}

/// The poll session a body names (`session`, or the session of `cursor`).
fn session_of(
    app: &AppState,
    field: &SessionField,
) -> Result<(Arc<HttpSession>, Option<u64>), ApiError> {
    let (id, number) = match (&field.session, &field.cursor) {
        (_, Some(cursor)) => {
            let (id, number) = parse_cursor(cursor).ok_or_else(bad_cursor)?;
            (id.to_owned(), Some(number))
        }
        (Some(id), None) => (id.clone(), None),
        (None, None) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "`session` is required: the id from the poll response",
            ));
        }
    };
    let session = app.sessions.get(&id, "poll").ok_or_else(unknown_session)?;
    session.touch();
    Ok((session, number))
}

/// `POST /poll/ack`: `{session, type: ack|nack|progress|term, …}`.
pub async fn ack(State(app): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, app.broker.config().server.max_frame).await?;
    let (field, frame) = sessions::decode_ack(&bytes)?;
    let (session, _) = session_of(&app, &field)?;
    let forget = match &frame {
        ClientFrame::Ack(a) => Some((
            a.channel.clone(),
            a.seqs.clone().unwrap_or_default(),
            a.upto,
        )),
        ClientFrame::Nack(n) => Some((n.channel.clone(), vec![n.seq], None)),
        ClientFrame::Term(t) => Some((t.channel.clone(), vec![t.seq], None)),
        _ => None,
    };
    session
        .request(frame)
        .await
        .map_err(sessions::RequestError::into_api)?;
    if let (Some(state), Some((channel, seqs, upto))) = (session.poll.as_ref(), forget) {
        state.forget(&channel, &seqs, upto);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /poll/publish`: `{session, channel, data | data_b64, headers?, msg_id?}`;
/// `{channel, seq}` once durable.
pub async fn publish(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let codec = body_codec(&headers)?;
    let bytes = read_body(body, app.broker.config().server.max_frame).await?;
    let field: SessionField = decode_body(codec, &bytes)?;
    let message: PublishBody = decode_body(codec, &bytes)?;
    let (session, _) = session_of(&app, &field)?;
    let publish = message
        .into_publish(0)
        .map_err(|(code, message)| ApiError::new(code, message))?;
    let reply = session
        .request(ClientFrame::Publish(publish))
        .await
        .map_err(sessions::RequestError::into_api)?;
    match reply {
        Some(ServerFrame::Puback(puback)) => Ok(axum::Json(
            serde_json::json!({"channel": puback.channel, "seq": puback.seq}),
        )
        .into_response()),
        _ => Err(ApiError::new(
            ErrorCode::Internal,
            "unexpected reply to a publish",
        )),
    }
}

/// `POST /poll/close`: `{cursor}` (acks up to it first) or `{session}`.
pub async fn close(State(app): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, app.broker.config().server.max_frame).await?;
    let field: SessionField = decode_body(super::http_api::BodyCodec::Json, &bytes)?;
    let (session, number) = session_of(&app, &field)?;
    if let (Some(state), Some(number)) = (session.poll.as_ref(), number) {
        apply_cursor(&session, state, number).await?;
    }
    session.cancel.cancel();
    Ok(StatusCode::NO_CONTENT.into_response())
}
