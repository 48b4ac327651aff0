//! The HTTP publish API for backends: `POST /api/publish` (one message) and
//! `POST /api/publish/batch` (several), JSON or MessagePack bodies, answered
//! with the seqs once the messages are durable.
//!
//! Not a connection: it calls the broker directly, with the same limits as
//! a `publish` frame ([`check_publish`]). API keys (`[auth] api_keys`) say
//! who may publish where; with none configured the API is open (the
//! development default, warned about at start-up).
//!
//! A batch is validated whole before anything is stored: one bad message
//! (name, size, permission) refuses the batch and stores nothing. Storing is
//! not atomic: the messages go to the channel writer in batch order, and a
//! storage failure part-way leaves a prefix stored; the error response lists
//! which messages were stored, and a retry with `msg_id`s is safe.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::broker::{BrokerError, PublishOutcome};
use crate::config::{ApiKey, Config};
use crate::protocol::{B64Payload, ErrorCode, Headers, Payload, Publish, data_field};
use crate::session::check_publish;

/// One message of a publish request body (the fields of a `publish` frame
/// without `type` and `id`).
#[derive(Debug, Deserialize)]
pub struct PublishBody {
    pub channel: String,
    #[serde(default, deserialize_with = "data_field")]
    pub data: Option<Payload>,
    #[serde(default)]
    pub data_b64: Option<B64Payload>,
    #[serde(default)]
    pub headers: Option<Headers>,
    #[serde(default)]
    pub msg_id: Option<String>,
}

impl PublishBody {
    /// The equivalent `publish` frame, or why the body cannot be one.
    pub fn into_publish(self, id: u64) -> Result<Publish, (ErrorCode, String)> {
        if self.data.is_some() && self.data_b64.is_some() {
            return Err((
                ErrorCode::BadRequest,
                "give `data` or `data_b64`, not both".to_owned(),
            ));
        }
        if self.data.is_none() && self.data_b64.is_none() {
            return Err((
                ErrorCode::BadRequest,
                "a message needs `data` (or `data_b64`)".to_owned(),
            ));
        }
        Ok(Publish {
            id,
            channel: self.channel,
            data: self.data,
            data_b64: self.data_b64,
            headers: self.headers,
            msg_id: self.msg_id,
        })
    }
}

#[derive(Debug, Deserialize)]
struct BatchBody {
    messages: Vec<PublishBody>,
}

/// Where one message went.
#[derive(Debug, Serialize)]
struct Stored {
    channel: String,
    seq: u64,
    /// The `msg_id` was seen within the dedup window: nothing new was stored.
    duplicate: bool,
}

/// One entry of a batch's results when the batch failed part-way.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Outcome {
    Stored(Stored),
    Failed { channel: String, error: FailedBody },
}

#[derive(Debug, Serialize)]
struct FailedBody {
    code: ErrorCode,
    message: String,
}

/// The two body encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCodec {
    Json,
    MsgPack,
}

/// The body's encoding from `Content-Type` (JSON when there is none).
pub fn body_codec(headers: &HeaderMap) -> Result<BodyCodec, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyCodec::Json);
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyCodec::Json),
        t if t.starts_with("application/") && t.ends_with("+json") => Ok(BodyCodec::Json),
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
            Ok(BodyCodec::MsgPack)
        }
        _ => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "unsupported Content-Type {essence:?}: send application/json or application/msgpack"
            ),
        )
        .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)),
    }
}

/// Reads at most `limit` bytes of body; more is a 413 `too_large`.
pub async fn read_body(body: Body, limit: u64) -> Result<Bytes, ApiError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiError::new(
                ErrorCode::TooLarge,
                format!("the request body is larger than {limit} bytes"),
            )
        } else {
            ApiError::new(ErrorCode::BadRequest, "cannot read the request body")
        }
    })
}

/// Decodes a body, naming the field at fault.
pub fn decode_body<T: DeserializeOwned>(codec: BodyCodec, bytes: &[u8]) -> Result<T, ApiError> {
    let result = match codec {
        BodyCodec::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| located(&e))
        }
        BodyCodec::MsgPack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
            serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| located(&e))
        }
    };
    result.map_err(|message| {
        ApiError::new(ErrorCode::BadRequest, format!("malformed body: {message}"))
    })
}

fn located<E: std::fmt::Display>(e: &serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path == "." {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}

/// Who is calling: `Ok(None)` when no API key is configured (open API).
fn authenticate<'a>(
    config: &'a Config,
    headers: &HeaderMap,
) -> Result<Option<&'a ApiKey>, ApiError> {
    let keys = &config.auth.api_keys;
    if keys.is_empty() {
        return Ok(None);
    }
    let unauthorized = |message: &str| ApiError {
        challenge: true,
        ..ApiError::new(ErrorCode::Unauthorized, message)
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "an API key is required: send Authorization: Bearer <key>",
        ));
    };
    let given = value.to_str().ok().and_then(super::bearer).unwrap_or("");
    // Compare with every key, in constant time, so the time taken tells
    // nothing about which key (or how much of one) matched.
    let mut found = None;
    for key in keys {
        if bool::from(key.key.as_bytes().ct_eq(given.as_bytes())) {
            found = Some(key);
        }
    }
    found
        .map(Some)
        .ok_or_else(|| unauthorized("unknown API key"))
}

/// A message that passed every check, ready for the writer.
struct Checked {
    publish: Publish,
    name: crate::protocol::ChannelName,
    data: Bytes,
}

/// Checks one message; `at` names it in errors (`messages[3]: …`).
fn check(
    config: &Config,
    key: Option<&ApiKey>,
    body: PublishBody,
    at: &str,
) -> Result<Checked, ApiError> {
    let fail = |code: ErrorCode, message: String| ApiError::new(code, format!("{at}{message}"));
    let publish = body.into_publish(0).map_err(|(c, m)| fail(c, m))?;
    let (name, data) = check_publish(&publish).map_err(|(c, m)| fail(c, m))?;
    let max = config.server.max_frame;
    if u64::try_from(data.len()).unwrap_or(u64::MAX) > max {
        return Err(fail(
            ErrorCode::TooLarge,
            format!("the payload is larger than max_frame ({max} bytes)"),
        ));
    }
    if let Some(key) = key
        && !key.may_publish(name.as_str())
    {
        return Err(fail(
            ErrorCode::Forbidden,
            format!("API key {:?} may not publish to {name}", key.name),
        ));
    }
    Ok(Checked {
        publish,
        name,
        data,
    })
}

/// Takes the messages' rates from the caller's publish limits (per API
/// key, as `[limits]` sets them per connection and user): all of them
/// pass, or the request is `429` with `Retry-After` and nothing is stored.
fn rate_limit(app: &AppState, key: Option<&ApiKey>, messages: &[Checked]) -> Result<(), ApiError> {
    let name = key.map_or("(open)", |k| k.name.as_str());
    let mut publishers = app
        .publishers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limits = publishers.entry(name.to_owned()).or_insert_with(|| {
        app.broker
            .limits()
            .connection(Some(&format!("api-key:{name}")))
    });
    for message in messages {
        if let Err(limited) = limits.check_publish(message.data.len()) {
            let mut error = ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "the publish rate limit ({}) of this API key is exceeded; retry after {} ms",
                    limited.what, limited.retry_after_ms
                ),
            );
            error.retry_after_ms = Some(limited.retry_after_ms);
            return Err(error);
        }
    }
    Ok(())
}

/// Hands every message to the writer in order, then waits for each.
async fn store(
    app: &AppState,
    messages: Vec<Checked>,
) -> Vec<(String, Result<Stored, BrokerError>)> {
    let mut receivers = Vec::with_capacity(messages.len());
    for message in messages {
        let channel_name = message.publish.channel.clone();
        let handed = match app.broker.channel(&message.name) {
            Ok(channel) => {
                app.broker
                    .publish(
                        channel,
                        message.data,
                        message.publish.headers,
                        message.publish.msg_id,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        receivers.push((channel_name, handed));
    }
    let mut results = Vec::with_capacity(receivers.len());
    for (channel, handed) in receivers {
        let result = match handed {
            Ok(receiver) => match receiver.await {
                Ok(Ok(PublishOutcome { seq, duplicate })) => Ok(Stored {
                    channel: channel.clone(),
                    seq,
                    duplicate,
                }),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(BrokerError::Unavailable(
                    "the broker is shutting down".into(),
                )),
            },
            Err(e) => Err(e),
        };
        results.push((channel, result));
    }
    results
}

/// `POST /api/publish`: one message; `{channel, seq, duplicate}` once durable.
pub async fn publish(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let config = Arc::clone(app.broker.config());
    let key = authenticate(&config, &headers)?;
    let codec = body_codec(&headers)?;
    let bytes = read_body(body, config.server.max_frame).await?;
    let message: PublishBody = decode_body(codec, &bytes)?;
    let checked = vec![check(&config, key, message, "")?];
    rate_limit(&app, key, &checked)?;
    match store(&app, checked).await.pop().map(|(_, r)| r) {
        Some(Ok(stored)) => Ok(axum::Json(stored).into_response()),
        Some(Err(e)) => Err(ApiError::new(e.code(), e.to_string())),
        None => Err(ApiError::new(ErrorCode::Internal, "no result")),
    }
}

/// `POST /api/publish/batch`: `{messages: [..]}`; `{results: [..]}` once
/// every message is durable.
pub async fn publish_batch(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let config = Arc::clone(app.broker.config());
    let key = authenticate(&config, &headers)?;
    let codec = body_codec(&headers)?;
    let bytes = read_body(body, config.http.publish_batch_max_bytes).await?;
    let batch: BatchBody = decode_body(codec, &bytes)?;
    let max = config.http.publish_batch_max;
    {
        if batch.messages.is_empty() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "`messages` is empty: a batch has 1 message or more",
            ));
        }
        if batch.messages.len() > max {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "a batch has at most {max} messages (http.publish_batch_max); this one has {}",
                    batch.messages.len()
                ),
            ));
        }
    }
    let checked = batch
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| check(&config, key, message, &format!("messages[{i}]: ")))
        .collect::<Result<Vec<_>, _>>()?;
    rate_limit(&app, key, &checked)?;
    let results = store(&app, checked).await;
    let first_error = results.iter().find_map(|(_, r)| r.as_ref().err()).cloned();
    let outcomes: Vec<Outcome> = results
        .into_iter()
        .map(|(channel, r)| match r {
            Ok(stored) => Outcome::Stored(stored),
            Err(e) => Outcome::Failed {
                channel,
                error: FailedBody {
                    code: e.code(),
                    message: e.to_string(),
                },
            },
        })
        .collect();
    Ok(match first_error {
        None => axum::Json(serde_json::json!({ "results": outcomes })).into_response(),
        Some(e) => {
            let status = super::status_of(e.code());
            let body = serde_json::json!({
                "code": e.code(),
                "message": format!("not every message was stored: {e}; `results` says which were (retrying with msg_ids is safe)"),
                "results": outcomes,
            });
            (status, axum::Json(body)).into_response()
        }
    })
}
