//! Sessions that outlive one HTTP request: an SSE stream (acked through
//! `POST /sse/ack`) and a long-polling session (between polls).
//!
//! Each is one ordinary [`Session`] fed by a channel instead of a socket:
//! the HTTP handlers push client frames into it and something drains its
//! [`Outgoing`] queue (the SSE response body, or the poll session's router
//! task). So auth, limits, subscribe/resume, windows, acks, retries behave
//! exactly as over WebSocket.
//!
//! Requests made by HTTP handlers (an ack, a publish) carry an *internal*
//! id (≥ [`INTERNAL_IDS`]); [`HttpSession::route`] hands the frames that
//! answer them to the waiting handler instead of the client. Frames
//! answered by no reply on success (`ack`, `nack`, `progress`, `term`) are
//! followed by a `ping` with the same id: its `pong` says "done, no error".
//!
//! Sessions are kept in a [`Registry`] by an unguessable id (128 random bits,
//! hex), at most `http.max_sessions` at once; each also holds one
//! `max_connections` permit. A session leaves the registry when its
//! `Session` ends (client gone, idle timeout, kick, shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::{self, Stream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ApiError, AppState};
use crate::protocol::{
    AckMode, ChannelName, ClientFrame, Connect, ErrorCode, ErrorFrame, IdOnly, ServerFrame,
    StartFrom, Subscribe,
};
use crate::session::{ConnectionInfo, Inbound, Outgoing, Session};

/// Ids at and above this are the server's own requests, never the client's.
pub const INTERNAL_IDS: u64 = 1 << 62;

/// How long an HTTP handler waits for the session to answer its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Client frames queued towards one session.
const INBOUND_BUFFER: usize = 64;

/// Channels one SSE stream or poll session may subscribe to.
pub const MAX_CHANNELS: usize = 64;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every open SSE and poll session, by id.
pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<HttpSession>>>,
    max: usize,
}

impl Registry {
    /// An empty registry for at most `max` sessions.
    pub fn new(max: usize) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// The open session `id` of this `kind` ("sse", "poll"). A session
    /// being closed is gone at once, though its task may still be ending.
    pub fn get(&self, id: &str, kind: &str) -> Option<Arc<HttpSession>> {
        lock(&self.sessions)
            .get(id)
            .filter(|s| s.kind == kind && !s.cancel.is_cancelled())
            .cloned()
    }

    fn insert(&self, session: Arc<HttpSession>) -> bool {
        let mut sessions = lock(&self.sessions);
        if sessions.len() >= self.max {
            return false;
        }
        sessions.insert(session.id.clone(), session);
        true
    }

    fn remove(&self, id: &str) {
        lock(&self.sessions).remove(id);
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// No session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One SSE or poll session.
pub struct HttpSession {
    /// The registry key, given to the client (SSE: the `connected` event;
    /// poll: every response).
    pub id: String,
    /// "sse" or "poll".
    pub kind: &'static str,
    /// The channels subscribed at creation, in the client's order.
    pub channels: Vec<String>,
    /// Client frames for the session.
    inbound: mpsc::Sender<Inbound>,
    /// Ends the session (its inbound stream ends, so `Session::run` returns);
    /// also cancelled once it has ended, whatever the reason.
    pub cancel: CancellationToken,
    /// Handlers waiting for the reply to an internal id.
    waiters: Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>,
    next_request: AtomicU64,
    /// The last time a client request used this session (poll idle timeout).
    last_used: Mutex<Instant>,
    /// A poll session's frames between polls (`None` for SSE).
    pub poll: Option<Arc<super::poll::PollState>>,
}

/// Why a request through a session failed.
#[derive(Debug)]
pub enum RequestError {
    /// The session answered with an `error` frame.
    Refused(ErrorFrame),
    /// The session is gone or did not answer in time.
    Gone(&'static str),
}

impl RequestError {
    /// The HTTP error for this failure.
    pub fn into_api(self) -> ApiError {
        match self {
            Self::Refused(e) => {
                let mut error = ApiError::new(e.code, e.message);
                error.retry_after_ms = e.retry_after_ms;
                error
            }
            Self::Gone(message) => ApiError::new(ErrorCode::Unavailable, message),
        }
    }
}

impl HttpSession {
    /// Marks the session used now.
    pub fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    /// When the session was last used.
    pub fn last_used(&self) -> Instant {
        *lock(&self.last_used)
    }

    /// Sends `frame` with an internal id and waits for its answer:
    /// `Ok(Some(puback))` for a publish, `Ok(None)` for a frame that has no
    /// reply on success (`ack`, `nack`, `progress`, `term`).
    pub async fn request(
        &self,
        mut frame: ClientFrame,
    ) -> Result<Option<ServerFrame>, RequestError> {
        let id = INTERNAL_IDS + self.next_request.fetch_add(1, Ordering::Relaxed);
        let silent = match &mut frame {
            ClientFrame::Ack(f) => {
                f.id = Some(id);
                true
            }
            ClientFrame::Nack(f) => {
                f.id = Some(id);
                true
            }
            ClientFrame::Progress(f) => {
                f.id = Some(id);
                true
            }
            ClientFrame::Term(f) => {
                f.id = Some(id);
                true
            }
            ClientFrame::Publish(f) => {
                f.id = id;
                false
            }
            // Answered by `pong` (or an `error`) with this id.
            ClientFrame::Refresh(f) => {
                f.id = id;
                false
            }
            _ => return Err(RequestError::Gone("not a request this endpoint makes")),
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id, tx);
        let sent = async {
            self.inbound.send(Inbound::Frame(Ok(frame))).await?;
            if silent {
                self.inbound
                    .send(Inbound::Frame(Ok(ClientFrame::Ping(IdOnly { id }))))
                    .await?;
            }
            Ok::<_, mpsc::error::SendError<Inbound>>(())
        };
        let answer = tokio::select! {
            _ = self.cancel.cancelled() => None,
            answer = async {
                sent.await.ok()?;
                tokio::time::timeout(REQUEST_TIMEOUT, rx).await.ok()?.ok()
            } => answer,
        };
        lock(&self.waiters).remove(&id);
        match answer {
            None if self.cancel.is_cancelled() => Err(RequestError::Gone("the session has ended")),
            None => Err(RequestError::Gone("the session did not answer in time")),
            Some(ServerFrame::Error(e)) => Err(RequestError::Refused(e)),
            Some(ServerFrame::Pong(_)) => Ok(None),
            Some(other) => Ok(Some(other)),
        }
    }

    /// A frame from the session: `None` when it answered an internal request
    /// (it went to the waiting handler), else the frame for the client.
    pub fn route(&self, frame: ServerFrame) -> Option<ServerFrame> {
        let id = match &frame {
            ServerFrame::Puback(p) => Some(p.id),
            ServerFrame::Error(e) => e.id,
            ServerFrame::Pong(p) => Some(p.id),
            _ => None,
        };
        match id {
            Some(id) if id >= INTERNAL_IDS => {
                if let Some(waiter) = lock(&self.waiters).remove(&id) {
                    let _ = waiter.send(frame);
                }
                None
            }
            _ => Some(frame),
        }
    }
}

/// The query of `/sse` and `/poll`, or `bad_request` when it does not parse.
pub fn query_params(
    query: Result<
        axum::extract::Query<HashMap<String, String>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|axum::extract::Query(query)| query)
        .map_err(|_| ApiError::new(ErrorCode::BadRequest, "malformed query string"))
}

/// What a new SSE stream or poll session subscribes to.
#[derive(Debug, Clone, Default)]
pub struct SubscribeParams {
    pub channels: Vec<ChannelName>,
    pub consumer: Option<String>,
    pub group: Option<String>,
    pub since: Option<u64>,
    pub from: Option<StartFrom>,
    pub ack: Option<AckMode>,
    pub max_in_flight: Option<u32>,
}

impl SubscribeParams {
    /// Reads the query parameters `channels`, `consumer`, `group`, `since`,
    /// `from`, `ack`, `max_in_flight`; checks what a `subscribe` would.
    pub fn from_query(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let bad = |message: String| ApiError::new(ErrorCode::BadRequest, message);
        let list = query.get("channels").map(String::as_str).unwrap_or("");
        let mut channels: Vec<ChannelName> = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let channel = ChannelName::new(name).map_err(|e| bad(format!("channels: {e}")))?;
            if channels.contains(&channel) {
                return Err(bad(format!("channels: {name:?} is listed twice")));
            }
            channels.push(channel);
        }
        if channels.is_empty() {
            return Err(bad(
                "`channels` is required: a comma-separated list of channel names".to_owned(),
            ));
        }
        if channels.len() > MAX_CHANNELS {
            return Err(bad(format!("at most {MAX_CHANNELS} channels")));
        }
        let name = |key: &str| -> Result<Option<String>, ApiError> {
            match query.get(key) {
                None => Ok(None),
                Some(value) => ChannelName::new(value)
                    .map(|_| Some(value.clone()))
                    .map_err(|e| bad(format!("{key}: {e}"))),
            }
        };
        let number = |key: &str| -> Result<Option<u64>, ApiError> {
            query
                .get(key)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        bad(format!("{key} must be a non-negative integer, not {v:?}"))
                    })
                })
                .transpose()
        };
        let from = match query.get("from").map(String::as_str) {
            None => None,
            Some("first") => Some(StartFrom::First),
            Some("new") => Some(StartFrom::New),
            Some(other) => {
                return Err(bad(format!(
                    "from must be \"first\" or \"new\", not {other:?}"
                )));
            }
        };
        let ack = match query.get("ack").map(String::as_str) {
            None => None,
            Some("manual") => Some(AckMode::Manual),
            Some("auto") => Some(AckMode::Auto),
            Some(other) => {
                return Err(bad(format!(
                    "ack must be \"manual\" or \"auto\", not {other:?}"
                )));
            }
        };
        let since = number("since")?;
        if since.is_some() && from.is_some() {
            return Err(bad("give `since` or `from`, not both".to_owned()));
        }
        let max_in_flight = match number("max_in_flight")? {
            None => None,
            Some(0) => return Err(bad("max_in_flight must be at least 1".to_owned())),
            Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        };
        Ok(Self {
            channels,
            consumer: name("consumer")?,
            group: name("group")?,
            since,
            from,
            ack,
            max_in_flight,
        })
    }

    /// The `subscribe` frame for channel number `index` (its id is `index + 1`).
    pub fn subscribe(&self, index: usize) -> Subscribe {
        Subscribe {
            id: u64::try_from(index).unwrap_or(u64::MAX).saturating_add(1),
            channel: self.channels[index].as_str().to_owned(),
            consumer: self.consumer.clone(),
            group: self.group.clone(),
            since: self.since,
            from: self.from,
            max_in_flight: self.max_in_flight,
            ack: self.ack,
        }
    }

    /// Whether a named (durable) consumer reads the channels.
    pub fn named(&self) -> bool {
        self.consumer.is_some() || self.group.is_some()
    }
}

/// A session just opened: `connected` and every `subscribed` are in `prelude`
/// (with whatever deliveries came in between).
pub struct Opened {
    pub session: Arc<HttpSession>,
    pub out: mpsc::Receiver<Outgoing>,
    pub prelude: Vec<ServerFrame>,
    /// The session's side of `out`, to see whether the queue is full.
    pub out_probe: mpsc::WeakSender<Outgoing>,
}

/// Opens a session of `kind`, connects it and sends `subscribes`; waits for
/// their answers. A refused subscribe ends the session and is the error.
pub async fn open(
    app: &Arc<AppState>,
    kind: &'static str,
    remote: SocketAddr,
    subscribes: Vec<Subscribe>,
    poll: Option<Arc<super::poll::PollState>>,
    credentials: Option<String>,
) -> Result<Opened, ApiError> {
    let Ok(permit) = Arc::clone(&app.connections).try_acquire_owned() else {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the server is at max_connections; retry later",
        ));
    };
    let server = &app.broker.config().server;
    let (in_tx, in_rx) = mpsc::channel(INBOUND_BUFFER);
    let (out_tx, mut out_rx) = mpsc::channel(server.outbound_buffer);
    let id = crate::broker::random_hex::<16>();
    let session = Arc::new(HttpSession {
        id: id.clone(),
        kind,
        channels: subscribes.iter().map(|s| s.channel.clone()).collect(),
        inbound: in_tx.clone(),
        cancel: CancellationToken::new(),
        waiters: Mutex::new(HashMap::new()),
        next_request: AtomicU64::new(0),
        last_used: Mutex::new(Instant::now()),
        poll,
    });
    if !app.sessions.insert(Arc::clone(&session)) {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the server is at http.max_sessions; retry later",
        ));
    }
    let info = ConnectionInfo {
        conn_id: app.broker.next_connection_id(),
        remote: Some(remote),
        transport: kind,
        credentials: None,
    };
    let mut inbound = inbound_stream(in_rx, session.cancel.clone());
    let (broker, registry, shutdown) = (
        Arc::clone(&app.broker),
        Arc::clone(&app.sessions),
        app.shutdown.clone(),
    );
    let task_session = Arc::clone(&session);
    let out_probe = out_tx.downgrade();
    app.tracker.spawn(async move {
        let _permit = permit;
        Session::new(broker, info, out_tx)
            .run(&mut inbound, shutdown)
            .await;
        registry.remove(&task_session.id);
        task_session.cancel.cancel();
    });

    let count = subscribes.len();
    let connect = Connect {
        token: credentials,
        ..Connect::default()
    };
    let mut frames = vec![Inbound::Frame(Ok(ClientFrame::Connect(connect)))];
    frames.extend(
        subscribes
            .into_iter()
            .map(|s| Inbound::Frame(Ok(ClientFrame::Subscribe(s)))),
    );
    for frame in frames {
        if in_tx.send(frame).await.is_err() {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "the session ended at once",
            ));
        }
    }
    drop(in_tx);
    let mut prelude = Vec::new();
    let mut answered = 0;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while answered < count {
        let next = tokio::time::timeout_at(deadline, out_rx.recv()).await;
        let frame = match next {
            Ok(Some(Outgoing::Frame(frame))) => *frame,
            Ok(Some(Outgoing::Close(close))) => {
                session.cancel.cancel();
                let code = match close.0 {
                    crate::protocol::close::UNAUTHORIZED => ErrorCode::Unauthorized,
                    crate::protocol::close::FORBIDDEN => ErrorCode::Forbidden,
                    crate::protocol::close::POLICY => ErrorCode::RateLimited,
                    _ => ErrorCode::Unavailable,
                };
                return Err(ApiError::new(code, close.1.clone()));
            }
            Ok(None) | Err(_) => {
                session.cancel.cancel();
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "the session did not start in time",
                ));
            }
        };
        match &frame {
            ServerFrame::Subscribed(_) => answered += 1,
            ServerFrame::Error(e)
                if e.id
                    .and_then(|id| usize::try_from(id).ok())
                    .is_some_and(|id| (1..=count).contains(&id)) =>
            {
                session.cancel.cancel();
                let index = usize::try_from(e.id.unwrap_or(1) - 1).unwrap_or(0);
                let channel = session.channels.get(index).cloned().unwrap_or_default();
                return Err(ApiError::new(
                    e.code,
                    format!("channel {channel}: {}", e.message),
                ));
            }
            _ => {}
        }
        prelude.push(frame);
    }
    Ok(Opened {
        session,
        out: out_rx,
        prelude,
        out_probe,
    })
}

/// The session's inbound stream: the handlers' frames, until `cancel`.
fn inbound_stream(
    rx: mpsc::Receiver<Inbound>,
    cancel: CancellationToken,
) -> impl Stream<Item = Inbound> + Unpin {
    Box::pin(stream::unfold(
        (rx, cancel),
        |(mut rx, cancel)| async move {
            tokio::select! {
                _ = cancel.cancelled() => None,
                item = rx.recv() => item.map(|item| (item, (rx, cancel))),
            }
        },
    ))
}

/// Reads the `session` field of an ack body.
#[derive(Debug, serde::Deserialize)]
pub struct SessionField {
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Decodes an ack body: `{session, type: ack|nack|progress|term, …frame fields}`.
pub fn decode_ack(bytes: &[u8]) -> Result<(SessionField, ClientFrame), ApiError> {
    let bad = |message: String| ApiError::new(ErrorCode::BadRequest, message);
    let field: SessionField =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("malformed body: {e}")))?;
    let frame = crate::protocol::decode_client(crate::protocol::Codec::Json, bytes)
        .map_err(|e| bad(e.message))?;
    match frame {
        ClientFrame::Ack(_)
        | ClientFrame::Nack(_)
        | ClientFrame::Progress(_)
        | ClientFrame::Term(_)
        | ClientFrame::Refresh(_) => Ok((field, frame)),
        other => Err(bad(format!(
            "this endpoint takes `ack`, `nack`, `progress`, `term` or `refresh`, not `{}`",
            other.kind()
        ))),
    }
}
