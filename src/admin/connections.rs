//! The connection routes: every node's connections, listed from any node,
//! and kicks passed on to the node that holds the connection.
//!
//! A connection id names its node in a cluster (`c<n>-<node id>`, see
//! [`crate::broker::Broker::next_connection_id`]), so lists page by (node
//! id, connection number) with the last id as the cursor, and a kick knows
//! where to go without asking around.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::peers::{self, PeerError};
use super::{ApiError, MAX_LIMIT, Params, Shared, bad_request, json_body, not_found_error};
use crate::broker::Broker;
use crate::broker::cluster::node_of_connection;
use crate::protocol::ErrorCode;
use crate::session::registry::{ConnectionHandle, Control};

/// A connection as the API lists it (also read back from other nodes).
/// One open connection as the admin API lists it (also what
/// `courier admin connections` reads).
#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectionView {
    pub id: String,
    /// The node that holds it.
    pub node: String,
    pub user: Option<String>,
    pub remote: Option<String>,
    pub transport: String,
    pub subscriptions: Vec<String>,
    pub connected_ms: u64,
    pub msgs_in: u64,
    pub msgs_out: u64,
}

impl ConnectionView {
    fn new(c: &ConnectionHandle, node: &str) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        Self {
            id: c.id.clone(),
            node: node.to_owned(),
            user: c.user(),
            remote: c.remote.map(|r| r.to_string()),
            transport: c.transport.to_owned(),
            subscriptions: c.subscriptions(),
            connected_ms: c.connected_ms,
            msgs_in: c.msgs_in.load(Relaxed),
            msgs_out: c.msgs_out.load(Relaxed),
        }
    }
}

/// The number `n` of a connection id `c<n>` or `c<n>-<node>`; ids of
/// another form sort last.
fn connection_number(id: &str) -> u64 {
    let number = id.strip_prefix('c').unwrap_or(id);
    let number = number.split_once('-').map_or(number, |(n, _)| n);
    number.parse().unwrap_or(u64::MAX)
}

/// Up to `limit` of this node's connections numbered after `after`, by
/// number (the order they were accepted in), and whether there are more.
/// Sorts them all: a page costs O(n log n) in this node's connections,
/// which is fine for an operator's request.
fn local_connections(broker: &Broker, after: u64, limit: usize) -> (Vec<ConnectionView>, bool) {
    let mut open: Vec<(u64, Arc<ConnectionHandle>)> = broker
        .connections()
        .page(0, usize::MAX)
        .into_iter()
        .map(|c| (connection_number(&c.id), c))
        .filter(|(number, _)| *number > after)
        .collect();
    open.sort_by_key(|(number, _)| *number);
    let more = open.len() > limit;
    let node = broker.node().id();
    let page = open
        .iter()
        .take(limit)
        .map(|(_, c)| ConnectionView::new(c, node))
        .collect();
    (page, more)
}

/// The `after` of a connection list: a connection id (`c<n>` is this
/// node's), or a bare number, as the API gave `next` before connection ids
/// named their node.
fn connection_cursor(broker: &Broker, after: &str) -> Result<Cursor, ApiError> {
    let node = node_of_connection(after).unwrap_or(broker.node().id());
    let number = connection_number(after);
    if number == u64::MAX {
        return Err(bad_request(format!(
            "after must be the `next` of a previous page (a connection id), not {after:?}"
        )));
    }
    Ok(Cursor {
        node: node.to_owned(),
        number,
    })
}

pub(super) async fn list_connections(
    State(state): State<Shared>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<ConnectionPage>, ApiError> {
    let params = Params::new(query, &["after", "limit", "local"])?;
    let limit = params.limit()?;
    let after = params
        .text("after")
        .map(|after| connection_cursor(&state.broker, after))
        .transpose()?;
    if params.flag("local")? {
        let this = state.broker.node().id();
        let from = after.filter(|c| c.node == this).map_or(0, |c| c.number);
        let (connections, more) = local_connections(&state.broker, from, limit);
        let next = more
            .then(|| connections.last().map(|c| c.id.clone()))
            .flatten();
        return Ok(axum::Json(ConnectionPage {
            connections,
            next,
            unreachable: Vec::new(),
        }));
    }
    Ok(axum::Json(cluster_page(&state, after, limit).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KickBody {
    code: Option<u16>,
    reason: Option<String>,
}

#[derive(Serialize)]
struct Kicked {
    kicked: String,
    code: u16,
}

pub(super) async fn kick(
    State(state): State<Shared>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let local = Params::new(query, &["local"])?.flag("local")?;
    let body: KickBody = if body.is_empty() {
        KickBody::default()
    } else {
        json_body(&body)?
    };
    let code = body.code.unwrap_or(crate::protocol::close::POLICY);
    if !(4000..=4999).contains(&code) {
        return Err(bad_request(format!(
            "code must be an application close code, 4000–4999, not {code}"
        )));
    }
    let reason = body
        .reason
        .unwrap_or_else(|| "kicked by an operator".to_owned());
    if reason.len() > 120 {
        return Err(bad_request(
            "reason must be at most 120 bytes (a close frame's limit)",
        ));
    }
    let node = node_of_connection(&id);
    if let Some(node) = node.filter(|n| *n != state.broker.node().id() && !local) {
        let body = serde_json::json!({"code": code, "reason": reason});
        return forward_kick(&state, node, &id, body).await;
    }
    let connection = state
        .broker
        .connections()
        .get(&id)
        .ok_or_else(|| not_found_error(format!("no open connection {id:?}")))?;
    if !connection.send(Control::Kick { code, reason }) {
        return Err(not_found_error(format!(
            "connection {id:?} has just closed"
        )));
    }
    Ok(axum::Json(Kicked { kicked: id, code }).into_response())
}

/// A page of connections over every live node.
#[derive(Debug, serde::Serialize, Deserialize)]
pub struct ConnectionPage {
    pub connections: Vec<ConnectionView>,
    pub next: Option<String>,
    /// Live nodes that did not answer: their connections are missing.
    pub unreachable: Vec<String>,
}

/// Where a connection list continues: after connection `number` of `node`.
struct Cursor {
    node: String,
    number: u64,
}

/// Up to `limit` connections after `after`, ordered by node id, then by
/// connection number within a node. Nodes are asked one after the other
/// until the page is full, so a page costs a call to each node it spans.
async fn cluster_page(
    state: &Shared,
    after: Option<Cursor>,
    limit: usize,
) -> Result<ConnectionPage, ApiError> {
    let broker = &state.broker;
    let nodes = peers::live_nodes(broker).await?;
    let this = broker.node().id();
    let want = limit + 1;
    let mut items: Vec<ConnectionView> = Vec::with_capacity(want.min(MAX_LIMIT));
    let mut unreachable = Vec::new();
    // Whether the last node asked has more than it gave.
    let mut more = false;
    for node in nodes
        .iter()
        .filter(|n| after.as_ref().is_none_or(|c| n.id >= c.node))
    {
        let from = match &after {
            Some(cursor) if cursor.node == node.id => cursor.number,
            _ => 0,
        };
        let ask = (want - items.len()).min(MAX_LIMIT);
        if node.id == this {
            let (page, rest) = local_connections(broker, from, ask);
            items.extend(page);
            more = rest;
        } else {
            let mut path = format!("/admin/connections?local=true&limit={ask}");
            if from > 0 {
                path.push_str(&format!("&after=c{from}"));
            }
            match peers::get_json::<ConnectionPage>(node, &state.token, &path).await {
                Ok(Some(page)) => {
                    more = page.next.is_some();
                    items.extend(page.connections);
                }
                Ok(None) => {
                    peers::log_unreachable(&PeerError::new(node, "has no connection list (404)"));
                    unreachable.push(node.id.clone());
                    more = false;
                }
                Err(e) => {
                    peers::log_unreachable(&e);
                    unreachable.push(node.id.clone());
                    more = false;
                }
            }
        }
        if items.len() >= want || more {
            break;
        }
    }
    let more = more || items.len() > limit;
    items.truncate(limit);
    let next = more.then(|| items.last().map(|c| c.id.clone())).flatten();
    Ok(ConnectionPage {
        connections: items,
        next,
        unreachable,
    })
}

/// Kicks connection `id`, held by node `node_id`: forwards the kick to
/// that node and relays its answer.
async fn forward_kick(
    state: &Shared,
    node_id: &str,
    id: &str,
    body: serde_json::Value,
) -> Result<Response, ApiError> {
    let nodes = peers::live_nodes(&state.broker).await?;
    let node = nodes.iter().find(|n| n.id == node_id).ok_or_else(|| {
        not_found_error(format!(
            "no open connection {id:?}: its node {node_id} is not in the cluster (any more)"
        ))
    })?;
    let path = format!("/admin/connections/{}/kick?local=true", peers::segment(id));
    let body = Bytes::from(body.to_string());
    let (status, reply) = peers::call(node, &state.token, hyper::Method::POST, &path, Some(body))
        .await
        .map_err(|e| {
            peers::log_unreachable(&e);
            ApiError::new(
                ErrorCode::Unavailable,
                format!("the kick could not be passed on: {e}"),
            )
        })?;
    if status == StatusCode::UNAUTHORIZED {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "node {node_id} refused this node's admin token (the nodes of a cluster must share it)"
            ),
        ));
    }
    Ok((
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        reply,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::connection_number;

    #[test]
    fn connection_ids_sort_by_their_number() {
        assert_eq!(connection_number("c7"), 7);
        assert_eq!(connection_number("c12-0a1b2c3d4e5f"), 12);
        assert_eq!(connection_number("12"), 12);
        assert_eq!(connection_number("c-x"), u64::MAX);
        assert_eq!(connection_number("bogus"), u64::MAX);
    }
}
