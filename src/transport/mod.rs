//! Transports: how frames travel. The public listener serves `/ws`
//! (WebSocket), `/healthz` and `/readyz`; every transport feeds the same
//! transport-neutral [`crate::session::Session`].

pub mod ws;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::protocol::ErrorCode;

/// What every handler of the public listener shares.
pub struct AppState {
    pub broker: Arc<Broker>,
    /// Every connection task, waited for at shutdown.
    pub tracker: TaskTracker,
    /// Fires at shutdown: sessions close their clients with 4010.
    pub shutdown: CancellationToken,
    /// One permit per open connection (`max_connections`).
    pub connections: Arc<Semaphore>,
}

/// The JSON body of every HTTP error.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
}

/// An HTTP error with a `{code, message}` JSON body.
pub fn json_error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    (status, axum::Json(ErrorBody { code, message })).into_response()
}

/// The public router: `/ws`, `/healthz`, `/readyz`.
pub fn public_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "shutting down",
        );
    }
    axum::Json(serde_json::json!({"status": "ready"})).into_response()
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint; the WebSocket endpoint is /ws",
    )
}
