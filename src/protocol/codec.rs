//! Encoding and decoding frames in either codec. Pure: bytes in, frames out.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::frames::*;
use super::payload::{B64Payload, Payload, is_json};

/// WebSocket subprotocol of the MessagePack codec.
pub const SUBPROTOCOL_MSGPACK: &str = "courier.v1.msgpack";
/// WebSocket subprotocol of the JSON codec.
pub const SUBPROTOCOL_JSON: &str = "courier.v1.json";

/// The two encodings of v1 frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Text frames, JSON objects.
    Json,
    /// Binary frames, MessagePack maps with string keys.
    MsgPack,
}

impl Codec {
    /// The codec a subprotocol name selects, if it is one of ours.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name.trim() {
            SUBPROTOCOL_MSGPACK => Some(Self::MsgPack),
            SUBPROTOCOL_JSON => Some(Self::Json),
            _ => None,
        }
    }

    /// The subprotocol name of this codec.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::Json => SUBPROTOCOL_JSON,
            Self::MsgPack => SUBPROTOCOL_MSGPACK,
        }
    }

    /// Picks a codec from a `Sec-WebSocket-Protocol` offer: the first of ours
    /// in the client's order; JSON when the client offered none.
    /// `Err` when the client offered only subprotocols we do not speak.
    pub fn negotiate(offer: Option<&str>) -> Result<Option<Self>, String> {
        let Some(offer) = offer else {
            return Ok(None);
        };
        let mut names = offer.split(',').map(str::trim).filter(|s| !s.is_empty());
        let all: Vec<&str> = names.by_ref().collect();
        if all.is_empty() {
            return Ok(None);
        }
        all.iter()
            .find_map(|name| Self::from_subprotocol(name))
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "unsupported subprotocol {offer:?}; offer {SUBPROTOCOL_MSGPACK} or {SUBPROTOCOL_JSON}"
                )
            })
    }
}

/// Why a frame could not be decoded. Carries the request `id` when the frame
/// had a readable one, so the error reply can echo it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    /// The request id, when it could be read.
    pub id: Option<u64>,
    /// What is wrong, for the `error` frame.
    pub message: String,
}

/// A frame could not be encoded (a bug on our side or a JSON payload that is
/// not JSON; never a peer's fault).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode frame: {0}")]
pub struct EncodeError(String);

/// Reads only `type` and `id`, ignoring every other field.
struct Head {
    kind: Option<String>,
    id: Option<u64>,
}

impl<'de> Deserialize<'de> for Head {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadVisitor;
        impl<'de> Visitor<'de> for HeadVisitor {
            type Value = Head;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a frame map with a `type` field")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
                let mut head = Head {
                    kind: None,
                    id: None,
                };
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "type" => {
                            // Any value; a non-string `type` counts as missing.
                            let kind = map.next_value::<serde_json::Value>()?;
                            head.kind = kind.as_str().map(str::to_owned);
                        }
                        "id" => head.id = map.next_value::<LenientId>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(head)
            }
        }
        deserializer.deserialize_map(HeadVisitor)
    }
}

/// An `id` read leniently: a u64 when it is one, `None` for anything else.
struct LenientId(Option<u64>);

impl<'de> Deserialize<'de> for LenientId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl<'de> Visitor<'de> for IdVisitor {
            type Value = LenientId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LenientId, E> {
                Ok(LenientId(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LenientId, E> {
                Ok(LenientId(u64::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<LenientId, E> {
                Ok(LenientId(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LenientId, E> {
                Ok(LenientId(None))
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<LenientId, E> {
                Ok(LenientId(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LenientId, E> {
                Ok(LenientId(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<LenientId, E> {
                Ok(LenientId(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<LenientId, E> {
                Ok(LenientId(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<LenientId, D::Error> {
                LenientId::deserialize(d)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<LenientId, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LenientId(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LenientId, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LenientId(None))
            }
        }
        deserializer.deserialize_any(IdVisitor)
    }
}

/// Deserializes, naming the field at fault (`since: invalid type …`).
fn from_bytes<T: DeserializeOwned>(codec: Codec, bytes: &[u8]) -> Result<T, String> {
    fn located<E: fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    }
    // The plain decode is the fast path; only a frame that fails is read
    // again to name the field at fault.
    match codec {
        Codec::Json => serde_json::from_slice(bytes).map_err(|plain| {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) => located(e),
                Ok(_) => plain.to_string(),
            }
        }),
        Codec::MsgPack => rmp_serde::from_slice(bytes).map_err(|plain| {
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
            match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) => located(e),
                Ok(_) => plain.to_string(),
            }
        }),
    }
}

/// Reads the head, then the whole frame as the struct its `type` names.
macro_rules! decode_tagged {
    ($codec:expr, $bytes:expr, $enum:ident { $($name:literal => $variant:ident($ty:ty)),* $(,)? }) => {{
        let head: Head = from_bytes($codec, $bytes).map_err(|e| DecodeError {
            id: None,
            message: format!("malformed frame: {e}"),
        })?;
        let id = head.id;
        let bad = |message: String| DecodeError { id, message };
        match head.kind.as_deref() {
            $(Some($name) => from_bytes::<$ty>($codec, $bytes)
                .map($enum::$variant)
                .map_err(|e| bad(format!("bad `{}` frame: {e}", $name))),)*
            Some(other) => Err(bad(format!("unknown frame type {other:?}"))),
            None => Err(bad("frame has no `type` field".to_owned())),
        }
    }};
}

/// Decodes a frame sent by a client.
pub fn decode_client(codec: Codec, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    let frame = decode_tagged!(codec, bytes, ClientFrame {
        "connect" => Connect(Connect),
        "publish" => Publish(Publish),
        "subscribe" => Subscribe(Subscribe),
        "unsubscribe" => Unsubscribe(ChannelRequest),
        "ack" => Ack(Ack),
        "nack" => Nack(Nack),
        "progress" => Progress(Progress),
        "term" => Term(Term),
        "presence" => Presence(ChannelRequest),
        "refresh" => Refresh(Refresh),
        "ping" => Ping(IdOnly),
    })?;
    if let ClientFrame::Publish(publish) = &frame {
        let message = match (&publish.data, &publish.data_b64) {
            (None, None) => Some("publish needs `data` (or `data_b64` in JSON)"),
            (Some(_), Some(_)) => Some("publish takes `data` or `data_b64`, not both"),
            _ => None,
        };
        if let Some(message) = message {
            return Err(DecodeError {
                id: Some(publish.id),
                message: message.to_owned(),
            });
        }
    }
    Ok(frame)
}

/// Decodes a frame sent by the server (the SDK's side).
pub fn decode_server(codec: Codec, bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    decode_tagged!(codec, bytes, ServerFrame {
        "connected" => Connected(Connected),
        "puback" => Puback(PubAck),
        "subscribed" => Subscribed(Subscribed),
        "unsubscribed" => Unsubscribed(Unsubscribed),
        "msg" => Msg(Msg),
        "msgs" => Msgs(Msgs),
        "presence" => Presence(PresenceReply),
        "join" => Join(PresenceEvent),
        "leave" => Leave(PresenceEvent),
        "gap" => Gap(Gap),
        "pong" => Pong(IdOnly),
        "error" => Error(ErrorFrame),
    })
}

/// Puts a payload in the field the codec carries it in: MessagePack always
/// `data`; JSON `data` when the bytes are JSON text, else `data_b64`.
fn place_payload(codec: Codec, data: &mut Option<Payload>, data_b64: &mut Option<B64Payload>) {
    match codec {
        Codec::MsgPack => {
            if let Some(b64) = data_b64.take() {
                *data = Some(Payload(b64.0));
            }
        }
        Codec::Json => {
            if let Some(payload) = data.take_if(|p| !is_json(&p.0)) {
                *data_b64 = Some(B64Payload(payload.0));
            }
        }
    }
}

fn misplaced(codec: Codec, data: &Option<Payload>, data_b64: &Option<B64Payload>) -> bool {
    match codec {
        Codec::MsgPack => data_b64.is_some(),
        Codec::Json => data.as_ref().is_some_and(|p| !is_json(&p.0)),
    }
}

fn to_bytes<T: Serialize>(codec: Codec, frame: &T) -> Result<Vec<u8>, EncodeError> {
    match codec {
        Codec::Json => serde_json::to_vec(frame).map_err(|e| EncodeError(e.to_string())),
        Codec::MsgPack => rmp_serde::to_vec_named(frame).map_err(|e| EncodeError(e.to_string())),
    }
}

/// Encodes a frame the server sends.
pub fn encode_server(codec: Codec, frame: &ServerFrame) -> Result<Vec<u8>, EncodeError> {
    let needs_move = match frame {
        ServerFrame::Msg(m) => misplaced(codec, &m.data, &m.data_b64),
        ServerFrame::Msgs(m) => m
            .items
            .iter()
            .any(|i| misplaced(codec, &i.data, &i.data_b64)),
        _ => false,
    };
    if !needs_move {
        return to_bytes(codec, frame);
    }
    let mut frame = frame.clone();
    match &mut frame {
        ServerFrame::Msg(m) => place_payload(codec, &mut m.data, &mut m.data_b64),
        ServerFrame::Msgs(m) => {
            for item in &mut m.items {
                place_payload(codec, &mut item.data, &mut item.data_b64);
            }
        }
        _ => {}
    }
    to_bytes(codec, &frame)
}

/// Encodes a frame a client sends (the SDK's side).
pub fn encode_client(codec: Codec, frame: &ClientFrame) -> Result<Vec<u8>, EncodeError> {
    match frame {
        ClientFrame::Publish(p) if misplaced(codec, &p.data, &p.data_b64) => {
            let mut p = p.clone();
            place_payload(codec, &mut p.data, &mut p.data_b64);
            to_bytes(codec, &ClientFrame::Publish(p))
        }
        _ => to_bytes(codec, frame),
    }
}
