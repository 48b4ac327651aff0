//! Calls from one node's admin API to the others' (cluster mode).
//!
//! A node answers for the whole cluster by asking the other live nodes, on
//! their admin listeners, for what only their memory holds; it calls them
//! with its own admin token (the nodes of a cluster share it) and
//! `?local=true`, which makes a node answer for itself only, so a request
//! never goes round.
//!
//! Every call has a deadline ([`PEER_TIMEOUT`]). A node that does not
//! answer in time, refuses the token or answers something unexpected is
//! reported (`unreachable` in the API) and left out, never waited for.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::broker::Broker;
use crate::broker::cluster::{self, NodeInfo};
use crate::protocol::ErrorCode;

/// How long one call to another node may take, connecting included.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest answer read from another node (a page of 1000 connections
/// with their subscriptions fits many times over).
const MAX_PEER_REPLY: usize = 16 << 20;

/// Why another node's answer could not be used.
#[derive(Debug, thiserror::Error)]
#[error("node {node} ({admin}): {reason}")]
pub struct PeerError {
    node: String,
    admin: String,
    reason: String,
}

impl PeerError {
    /// `node` gave an answer that is of no use, for `reason`.
    pub(super) fn new(node: &NodeInfo, reason: impl Into<String>) -> Self {
        Self {
            node: node.id.clone(),
            admin: node.admin.clone(),
            reason: reason.into(),
        }
    }
}

/// The live nodes of the cluster by id (just this one on sled).
pub(super) async fn live_nodes(broker: &Arc<Broker>) -> Result<Vec<NodeInfo>, ApiError> {
    let b = Arc::clone(broker);
    let mut nodes = tokio::task::spawn_blocking(move || cluster::live_nodes(&b))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("cannot list the cluster's nodes: {e}"),
            )
        })?;
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(nodes)
}

/// One request to `node`'s admin listener: its status and body.
pub(super) async fn call(
    node: &NodeInfo,
    token: &str,
    method: hyper::Method,
    path_and_query: &str,
    body: Option<Bytes>,
) -> Result<(StatusCode, Bytes), PeerError> {
    let failed = |reason: String| PeerError::new(node, reason);
    tokio::time::timeout(
        PEER_TIMEOUT,
        exchange(node, token, method, path_and_query, body),
    )
    .await
    .map_err(|_| failed(format!("no answer within {PEER_TIMEOUT:?}")))?
    .map_err(failed)
}

async fn exchange(
    node: &NodeInfo,
    token: &str,
    method: hyper::Method,
    path_and_query: &str,
    body: Option<Bytes>,
) -> Result<(StatusCode, Bytes), String> {
    if node.admin.is_empty() {
        return Err("its admin address is not known yet".into());
    }
    let stream = tokio::net::TcpStream::connect(node.admin.as_str())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(header::HOST, node.admin.as_str())
        .header(header::ACCEPT, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONNECTION, "close")
        .header(
            header::USER_AGENT,
            concat!("courier-node/", env!("CARGO_PKG_VERSION")),
        );
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| format!("request: {e}"))?;
    // The connection is driven here, beside the request: no task to track.
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_PEER_REPLY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, bytes))
    };
    let (reply, _) = tokio::join!(exchange, connection);
    reply
}

/// A GET answered with JSON; `None` when the node answers 404 (it does
/// not have what was asked for).
pub(super) async fn get_json<T: DeserializeOwned>(
    node: &NodeInfo,
    token: &str,
    path_and_query: &str,
) -> Result<Option<T>, PeerError> {
    let (status, body) = call(node, token, hyper::Method::GET, path_and_query, None).await?;
    let failed = |reason: String| PeerError::new(node, reason);
    match status {
        StatusCode::OK => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| failed(format!("unexpected answer: {e}"))),
        StatusCode::NOT_FOUND => Ok(None),
        StatusCode::UNAUTHORIZED => Err(failed(
            "refused this node's admin token (the nodes of a cluster must share it)".into(),
        )),
        other => Err(failed(format!("answered {other}"))),
    }
}

pub(super) fn log_unreachable(error: &PeerError) {
    tracing::warn!(%error, "admin API: another cluster node did not answer");
}

/// `text` as one percent-encoded path segment.
pub(super) fn segment(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
