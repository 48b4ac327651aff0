//! The admin listener: `/metrics`, the JSON API under `/admin/`, and the
//! dashboard at `/admin/ui`. Documented in `proto/admin.openapi.yaml`;
//! [`ROUTES`] is the list the router is built from, and a test checks it
//! against that document both ways.
//!
//! Every route needs the admin token (`Authorization: Bearer`); `/metrics`
//! may be made public, and `/admin/ui` also takes `?token=` so the link
//! printed at start-up opens it.
//!
//! In a cluster every node's API shows the whole cluster: the channels of
//! the shared store, and every node's connections (`connections.rs`) and
//! live consumers (`channel_detail.rs`), asked from the other nodes
//! (`peers.rs`); a kick reaches the node that holds the connection.

mod channel_detail;
mod connections;
mod peers;
mod token;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, on};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::broker::admin::StoredMessage;
use crate::metrics;
use crate::protocol::{ChannelName, ErrorCode};
use crate::transport::{ApiError, json_error};

pub use connections::{ConnectionPage, ConnectionView};
pub use token::{TOKEN_FILE, TokenSource, resolve_token};

/// Largest page of any list.
pub const MAX_LIMIT: usize = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;

/// What the admin handlers share.
pub struct AdminState {
    pub broker: Arc<Broker>,
    pub token: String,
    pub metrics_public: bool,
}

type Shared = Arc<AdminState>;

/// Every served route: method and path as `proto/admin.openapi.yaml` writes them.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("GET", "/admin/info"),
    ("GET", "/admin/channels"),
    ("GET", "/admin/channels/{channel}"),
    ("DELETE", "/admin/channels/{channel}"),
    ("POST", "/admin/channels/{channel}/purge"),
    ("GET", "/admin/channels/{channel}/messages"),
    (
        "POST",
        "/admin/channels/{channel}/consumers/{consumer}/reset",
    ),
    ("GET", "/admin/channels/{channel}/dlq"),
    ("POST", "/admin/channels/{channel}/dlq/requeue"),
    ("POST", "/admin/channels/{channel}/dlq/purge"),
    ("GET", "/admin/channels/{channel}/presence"),
    ("GET", "/admin/connections"),
    ("POST", "/admin/connections/{id}/kick"),
    ("GET", "/admin/ui"),
];

fn handler(method: &str, path: &str) -> MethodRouter<Shared> {
    use axum::routing::MethodFilter as M;
    let filter = match method {
        "GET" => M::GET,
        "POST" => M::POST,
        "DELETE" => M::DELETE,
        _ => unreachable!("ROUTES uses GET, POST and DELETE only"),
    };
    match (method, path) {
        ("GET", "/metrics") => on(filter, metrics_text),
        ("GET", "/admin/info") => on(filter, info),
        ("GET", "/admin/channels") => on(filter, list_channels),
        ("GET", "/admin/channels/{channel}") => on(filter, get_channel),
        ("DELETE", "/admin/channels/{channel}") => on(filter, delete_channel),
        ("POST", "/admin/channels/{channel}/purge") => on(filter, purge_channel),
        ("GET", "/admin/channels/{channel}/messages") => on(filter, peek),
        ("POST", "/admin/channels/{channel}/consumers/{consumer}/reset") => {
            on(filter, reset_consumer)
        }
        ("GET", "/admin/channels/{channel}/dlq") => on(filter, dlq_list),
        ("POST", "/admin/channels/{channel}/dlq/requeue") => on(filter, dlq_requeue),
        ("POST", "/admin/channels/{channel}/dlq/purge") => on(filter, dlq_purge),
        ("GET", "/admin/channels/{channel}/presence") => on(filter, presence),
        ("GET", "/admin/connections") => on(filter, connections::list_connections),
        ("POST", "/admin/connections/{id}/kick") => on(filter, connections::kick),
        ("GET", "/admin/ui") => on(filter, dashboard),
        _ => unreachable!("every entry of ROUTES has a handler"),
    }
}

/// The admin router, built from [`ROUTES`].
pub fn router(state: AdminState) -> Router {
    let state = Arc::new(state);
    let mut by_path: Vec<(&str, MethodRouter<Shared>)> = Vec::new();
    for (method, path) in ROUTES {
        let route = handler(method, path);
        match by_path.iter_mut().find(|(p, _)| p == path) {
            Some((_, existing)) => *existing = std::mem::take(existing).merge(route),
            None => by_path.push((path, route)),
        }
    }
    let mut router = Router::new();
    for (path, route) in by_path {
        router = router.route(path, route);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .with_state(state)
}

/// Constant-time comparison: the token is a secret.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.ct_eq(expected))
}

async fn authorize(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if state.metrics_public && path == "/metrics" {
        return next.run(request).await;
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::transport::bearer);
    let page = path == "/admin/ui";
    let from_query = page
        .then(|| query_pairs(request.uri().query()).remove("token"))
        .flatten();
    let from_cookie = page.then(|| cookie(&request, UI_COOKIE)).flatten();
    let via_query = bearer.is_none() && from_query.is_some();
    let given = bearer.map(str::to_owned).or(from_query).or(from_cookie);
    match given {
        Some(token) if same_secret(token.as_bytes(), state.token.as_bytes()) => {
            let mut response = next.run(request).await;
            if via_query {
                // So a reload of the page (which drops `?token=`) still opens it.
                if let Ok(value) = HeaderValue::from_str(&format!(
                    "{UI_COOKIE}={token}; Path=/admin/ui; HttpOnly; SameSite=Strict"
                )) {
                    response.headers_mut().insert(header::SET_COOKIE, value);
                }
            }
            response
        }
        Some(_) => unauthorized("wrong admin token"),
        None => unauthorized(
            "the admin API needs `Authorization: Bearer <admin token>` (the token is [admin] token, COURIER_ADMIN_TOKEN, or the admin.token file in the data dir)",
        ),
    }
}

/// The cookie that lets a reload of `/admin/ui` through (that path only).
const UI_COOKIE: &str = "courier_admin_token";

fn cookie(request: &Request, name: &str) -> Option<String> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn unauthorized(message: &str) -> Response {
    let mut response = json_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"courier-admin\""),
    );
    response
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such admin route; see proto/admin.openapi.yaml",
    )
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        "this route does not take that method; see proto/admin.openapi.yaml",
    )
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

fn not_found_error(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::NotFound, message)
}

fn query_pairs(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// Query parameters, each checked with an error naming it.
struct Params(HashMap<String, String>);

impl Params {
    fn new(query: Option<String>, allowed: &[&str]) -> Result<Self, ApiError> {
        let pairs = query_pairs(query.as_deref());
        if let Some(unknown) = pairs.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(bad_request(format!(
                "unknown query parameter `{unknown}` (this route takes: {})",
                allowed.join(", ")
            )));
        }
        Ok(Self(pairs))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.text(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    bad_request(format!(
                        "query parameter `{name}` must be a whole number ≥ 0, not {v:?}"
                    ))
                })
            })
            .transpose()
    }

    /// A `true`/`false` parameter, false when absent.
    fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.text(name) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(bad_request(format!(
                "query parameter `{name}` must be true or false, not {other:?}"
            ))),
        }
    }

    fn limit(&self) -> Result<usize, ApiError> {
        match self.number("limit")? {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT as u64).contains(&n) => {
                Ok(usize::try_from(n).unwrap_or(MAX_LIMIT))
            }
            Some(n) => Err(bad_request(format!("limit must be 1–{MAX_LIMIT}, not {n}"))),
        }
    }
}

fn channel_name(raw: &str) -> Result<ChannelName, ApiError> {
    ChannelName::new(raw).map_err(|e| bad_request(format!("channel {raw:?}: {e}")))
}

/// A JSON body, with errors that name the field.
fn json_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| bad_request(format!("request body: {e}")))
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    update_gauges(&state.broker);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        metrics::render(),
    )
        .into_response()
}

/// Refreshes the gauges that are read, not counted.
pub fn update_gauges(broker: &Broker) {
    metrics::STORE_BYTES.set(i64::try_from(broker.store_size()).unwrap_or(i64::MAX));
    metrics::RETRY_QUEUE_DEPTH.set(i64::try_from(broker.retries_waiting()).unwrap_or(i64::MAX));
    metrics::CHANNELS.set(i64::try_from(broker.channels().len()).unwrap_or(i64::MAX));
}

#[derive(Serialize)]
struct Info {
    version: &'static str,
    /// This node's id.
    node: String,
    /// The live nodes of the cluster (just this one on sled).
    nodes: Vec<crate::broker::cluster::NodeInfo>,
    started_ms: u64,
    uptime_s: u64,
    connections: usize,
    channels: usize,
    data_dir: String,
    fsync: String,
}

async fn info(State(state): State<Shared>) -> ApiResult<Info> {
    let broker = &state.broker;
    let config = broker.config();
    Ok(axum::Json(Info {
        version: env!("CARGO_PKG_VERSION"),
        node: broker.node().id().to_owned(),
        nodes: peers::live_nodes(broker).await?,
        started_ms: broker.started_ms(),
        uptime_s: crate::broker::now_ms().saturating_sub(broker.started_ms()) / 1000,
        connections: broker.connections().len(),
        channels: broker.channel_count().await?,
        data_dir: config.server.data_dir.display().to_string(),
        fsync: config.server.fsync.to_string(),
    }))
}

#[derive(Serialize)]
struct Page<T> {
    #[serde(flatten)]
    items: T,
    next: Option<String>,
}

#[derive(Serialize)]
struct Channels {
    channels: Vec<crate::broker::admin::ChannelSummary>,
}

async fn list_channels(
    State(state): State<Shared>,
    RawQuery(query): RawQuery,
) -> ApiResult<Page<Channels>> {
    let params = Params::new(query, &["prefix", "after", "limit"])?;
    let limit = params.limit()?;
    let prefix = params.text("prefix").unwrap_or("");
    let mut channels = state
        .broker
        .channel_list(prefix, params.text("after"), limit + 1)
        .await?;
    let more = channels.len() > limit;
    channels.truncate(limit);
    let next = more
        .then(|| channels.last().map(|c| c.name.clone()))
        .flatten();
    Ok(axum::Json(Page {
        items: Channels { channels },
        next,
    }))
}

async fn get_channel(
    State(state): State<Shared>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<channel_detail::ClusterDetail> {
    let name = channel_name(&channel)?;
    let params = Params::new(query, &["local"])?;
    let detail = if params.flag("local")? {
        channel_detail::ClusterDetail {
            detail: state.broker.channel_detail(&name, true).await?,
            unreachable: Vec::new(),
        }
    } else {
        channel_detail::channel_detail(&state, &name).await?
    };
    Ok(axum::Json(detail))
}

#[derive(Serialize)]
struct Deleted {
    deleted: String,
    messages_removed: u64,
}

async fn delete_channel(
    State(state): State<Shared>,
    Path(channel): Path<String>,
) -> ApiResult<Deleted> {
    let name = channel_name(&channel)?;
    let messages_removed = state.broker.delete_channel(&name).await?;
    Ok(axum::Json(Deleted {
        deleted: channel,
        messages_removed,
    }))
}

async fn purge_channel(
    State(state): State<Shared>,
    Path(channel): Path<String>,
) -> ApiResult<crate::broker::admin::ChannelSummary> {
    let name = channel_name(&channel)?;
    Ok(axum::Json(state.broker.purge_channel(&name).await?))
}

#[derive(Serialize)]
struct MessagePage {
    messages: Vec<StoredMessage>,
    next: Option<u64>,
}

async fn peek(
    State(state): State<Shared>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<MessagePage> {
    let name = channel_name(&channel)?;
    let params = Params::new(query, &["from", "to", "limit"])?;
    let limit = params.limit()?;
    let (found, summary) = state.broker.channel_view(&name).await?;
    let (first, last) = (summary.first_seq, summary.last_seq);
    let from = params.number("from")?.unwrap_or(first).max(first);
    let to = params.number("to")?.unwrap_or(last).min(last);
    let messages = state.broker.peek(&found, from, to, limit).await?;
    let next = match messages.last() {
        Some(m) if messages.len() == limit && m.seq < to => Some(m.seq + 1),
        _ => None,
    };
    Ok(axum::Json(MessagePage { messages, next }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    seq: u64,
}

async fn reset_consumer(
    State(state): State<Shared>,
    Path((channel, consumer)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<crate::broker::admin::ConsumerInfo> {
    let name = channel_name(&channel)?;
    let ResetBody { seq } = json_body(&body)?;
    Ok(axum::Json(
        state.broker.reset_consumer(&name, &consumer, seq).await?,
    ))
}

/// A dead letter as the API shows it.
#[derive(Serialize)]
struct DeadLetterView {
    seq: u64,
    consumer: String,
    reason: String,
    detail: Option<String>,
    attempts: u32,
    dead_ms: u64,
    message: Option<StoredMessage>,
}

#[derive(Serialize)]
struct DeadLetters {
    entries: Vec<DeadLetterView>,
}

async fn dlq_list(
    State(state): State<Shared>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Page<DeadLetters>> {
    let name = channel_name(&channel)?;
    let params = Params::new(query, &["after", "limit"])?;
    let limit = params.limit()?;
    let after = match params.text("after") {
        None => None,
        Some(cursor) => {
            let parsed = cursor
                .split_once(':')
                .and_then(|(seq, consumer)| Some((seq.parse::<u64>().ok()?, consumer.to_owned())));
            Some(parsed.ok_or_else(|| {
                bad_request(format!(
                    "after must be the `next` of a previous page (seq:consumer), not {cursor:?}"
                ))
            })?)
        }
    };
    let mut records = state
        .broker
        .dlq_list(&name, after, 0..=u64::MAX, limit + 1)
        .await?;
    let more = records.len() > limit;
    records.truncate(limit);
    let next = more
        .then(|| records.last().map(|r| format!("{}:{}", r.seq, r.consumer)))
        .flatten();
    let entries = records
        .into_iter()
        .map(|r| DeadLetterView {
            message: r.message.map(|m| StoredMessage::from_record(r.seq, m)),
            seq: r.seq,
            consumer: r.consumer,
            reason: r.reason,
            detail: r.detail,
            attempts: r.attempts,
            dead_ms: r.dead_ms,
        })
        .collect();
    Ok(axum::Json(Page {
        items: DeadLetters { entries },
        next,
    }))
}

/// Which dead letters a requeue or purge takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    seq: Option<u64>,
    from: Option<u64>,
    to: Option<u64>,
    all: Option<bool>,
    consumer: Option<String>,
}

impl Selection {
    fn seqs(&self) -> Result<std::ops::RangeInclusive<u64>, ApiError> {
        match (self.seq, self.from, self.to, self.all) {
            (Some(seq), None, None, None | Some(false)) => Ok(seq..=seq),
            (None, Some(from), Some(to), None | Some(false)) if from <= to => Ok(from..=to),
            (None, Some(from), Some(to), None | Some(false)) => {
                Err(bad_request(format!("from ({from}) is after to ({to})")))
            }
            (None, None, None, Some(true)) => Ok(0..=u64::MAX),
            _ => Err(bad_request(
                "give exactly one of `seq`, `from` with `to`, or `all: true`",
            )),
        }
    }
}

#[derive(Serialize)]
struct Requeued {
    requeued: usize,
}

async fn dlq_requeue(
    State(state): State<Shared>,
    Path(channel): Path<String>,
    body: Bytes,
) -> ApiResult<Requeued> {
    let name = channel_name(&channel)?;
    let selection: Selection = json_body(&body)?;
    let seqs = selection.seqs()?;
    let requeued = state
        .broker
        .dlq_requeue(&name, seqs, selection.consumer.as_deref())
        .await?;
    Ok(axum::Json(Requeued { requeued }))
}

#[derive(Serialize)]
struct Purged {
    purged: usize,
}

async fn dlq_purge(
    State(state): State<Shared>,
    Path(channel): Path<String>,
    body: Bytes,
) -> ApiResult<Purged> {
    let name = channel_name(&channel)?;
    let selection: Selection = json_body(&body)?;
    let seqs = selection.seqs()?;
    let purged = state
        .broker
        .dlq_purge(&name, seqs, selection.consumer.as_deref())
        .await?;
    Ok(axum::Json(Purged { purged }))
}

#[derive(Serialize)]
struct PresenceClient {
    conn_id: String,
    user: Option<String>,
    transport: &'static str,
    since_ms: u64,
}

/// A user subscribed to the channel, as the `presence` frame counts it.
#[derive(Serialize)]
struct PresenceUser {
    user: String,
    connections: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
}

#[derive(Serialize)]
struct Presence {
    channel: String,
    /// This node's connections.
    clients: Vec<PresenceClient>,
    /// The users on every live node of a cluster (this node's alone on
    /// sled or for a namespace without presence).
    members: Vec<PresenceUser>,
}

async fn presence(State(state): State<Shared>, Path(channel): Path<String>) -> ApiResult<Presence> {
    let name = channel_name(&channel)?;
    let clients = state
        .broker
        .connections()
        .subscribed_to(name.as_str())
        .into_iter()
        .filter_map(|c| {
            Some(PresenceClient {
                since_ms: c.subscribed_since(name.as_str())?,
                conn_id: c.id.clone(),
                user: c.user(),
                transport: c.transport,
            })
        })
        .collect();
    let members = state
        .broker
        .presence(&name)
        .await?
        .into_iter()
        .map(|m| PresenceUser {
            user: m.user,
            connections: m.connections,
            client: m.client,
        })
        .collect();
    Ok(axum::Json(Presence {
        channel,
        clients,
        members,
    }))
}

async fn dashboard() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}
