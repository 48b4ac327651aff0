//! Transports: how frames travel. The public listener serves `/ws`
//! (WebSocket), `/sse` (Server-Sent Events), `/poll` (long polling), the
//! HTTP publish API `/api/publish`, `/healthz` and `/readyz`; every
//! transport feeds the same transport-neutral [`crate::session::Session`].

pub mod http_api;
pub mod poll;
pub mod sessions;
pub mod sse;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
    /// SSE and poll sessions, which outlive single HTTP requests.
    pub sessions: Arc<sessions::Registry>,
    /// The HTTP publish API's rate limits: one set per API key (one shared
    /// set when no key is configured), created on first use.
    pub publishers:
        std::sync::Mutex<std::collections::HashMap<String, crate::limits::ConnectionLimits>>,
}

/// The credentials of an HTTP request: `Authorization: Bearer <token>`,
/// else the `token` query parameter.
pub fn credentials(headers: &axum::http::HeaderMap, query_token: Option<&str>) -> Option<String> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .map(str::to_owned)
        .or_else(|| query_token.map(str::to_owned))
        .filter(|t| !t.is_empty())
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in
/// any case, as RFC 9110 says).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
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

/// The HTTP status of an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An HTTP error whose status follows from its code.
pub fn code_error(code: ErrorCode, message: &str) -> Response {
    json_error(status_of(code), code, message)
}

/// An HTTP error of the SSE, poll and publish endpoints: a `{code, message}`
/// JSON body, the status its code implies unless set otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Answer with `WWW-Authenticate: Bearer` (a 401 of the publish API).
    pub challenge: bool,
    /// A rate limit's wait: `Retry-After` (whole seconds, rounded up) and
    /// `retry_after_ms` in the body.
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    /// An error with the status of `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: status_of(code),
            code,
            message: message.into(),
            challenge: false,
            retry_after_ms: None,
        }
    }

    /// The same error with another HTTP status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }
}

impl From<crate::broker::BrokerError> for ApiError {
    fn from(e: crate::broker::BrokerError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = match self.retry_after_ms {
            Some(ms) => {
                let mut response = (
                    self.status,
                    axum::Json(serde_json::json!({
                        "code": self.code,
                        "message": self.message,
                        "retry_after_ms": ms,
                    })),
                )
                    .into_response();
                if let Ok(value) =
                    axum::http::HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string())
                {
                    response
                        .headers_mut()
                        .insert(axum::http::header::RETRY_AFTER, value);
                }
                response
            }
            None => json_error(self.status, self.code, &self.message),
        };
        if self.challenge {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"courier\""),
            );
        }
        response
    }
}

/// The public router: `/ws`, `/sse`, `/poll`, `/api/publish`, `/healthz`, `/readyz`.
pub fn public_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/sse", get(sse::stream))
        .route("/sse/ack", post(sse::ack))
        .route("/poll", get(poll::poll))
        .route("/poll/ack", post(poll::ack))
        .route("/poll/publish", post(poll::publish))
        .route("/poll/close", post(poll::close))
        .route("/api/publish", post(http_api::publish))
        .route("/api/publish/batch", post(http_api::publish_batch))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            cors,
        ))
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
    if let Err(e) = state.broker.ready().await {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            &e.to_string(),
        );
    }
    axum::Json(serde_json::json!({"status": "ready"})).into_response()
}

/// CORS for browsers on other origins (`http.cors_allow_origins`): answers
/// preflights, and names the allowed origin on every response. Without a
/// configured origin nothing is added, and browsers keep pages of other
/// origins out (same-origin only).
async fn cors(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::{HeaderValue, Method, header};
    let allowed = &state.broker.config().http.cors_allow_origins;
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .filter(|o| {
            allowed
                .iter()
                .any(|a| a == "*" || o.to_str().is_ok_and(|o| o == a))
        })
        .cloned();
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-courier-session, retry-after"),
    );
    if preflight {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, last-event-id"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        "this endpoint does not take that method; see proto/public.openapi.yaml",
    )
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint; see proto/public.openapi.yaml (WebSocket: /ws, SSE: /sse, long polling: /poll, publish: /api/publish)",
    )
}
