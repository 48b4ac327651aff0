//! Message payloads on the wire.
//!
//! A payload is opaque bytes. MessagePack carries it as `bin`; JSON carries it
//! as a JSON value in `data` (the payload is that value's compact UTF-8 text)
//! or as base64 text in `data_b64`. Which serializer is in use is told by
//! serde's `is_human_readable`: JSON says yes, MessagePack says no.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::de::{Error as _, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// A payload carried in a frame's `data` field.
///
/// In JSON frames the bytes must be valid JSON text; the codec moves any
/// other payload to `data_b64` before encoding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload(pub Bytes);

/// A payload carried as base64 text in a JSON frame's `data_b64` field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct B64Payload(pub Bytes);

/// True when `bytes` is one complete JSON value, so a JSON frame can carry it in `data`.
pub fn is_json(bytes: &[u8]) -> bool {
    // `from_slice` does not check the UTF-8 of strings it skips, so check it here.
    std::str::from_utf8(bytes).is_ok_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok())
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            let text = std::str::from_utf8(&self.0)
                .map_err(|_| serde::ser::Error::custom("payload in `data` is not UTF-8"))?;
            let raw: &RawValue = serde_json::from_str(text)
                .map_err(|_| serde::ser::Error::custom("payload in `data` is not JSON"))?;
            raw.serialize(serializer)
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let raw = <Box<RawValue>>::deserialize(deserializer)?;
            Ok(Self(compact_json(raw.get())))
        } else {
            let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
            Ok(Self(Bytes::from(bytes.into_vec())))
        }
    }
}

/// The compact text of a JSON value: its text without insignificant
/// whitespace, everything else (key order, numbers, escapes) unchanged.
fn compact_json(text: &str) -> Bytes {
    let is_space = |b: &u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t');
    if !text.as_bytes().iter().any(is_space) {
        return Bytes::copy_from_slice(text.as_bytes());
    }
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in text.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if is_space(&b) {
            continue;
        } else if b == b'"' {
            in_string = true;
        }
        out.push(b);
    }
    Bytes::from(out)
}

/// Deserializes an optional `data` field. In JSON a present `data` is always
/// a payload, so `"data": null` is the 4-byte payload `null`, not "absent".
pub fn data_field<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Payload>, D::Error> {
    if deserializer.is_human_readable() {
        Payload::deserialize(deserializer).map(Some)
    } else {
        Option::<Payload>::deserialize(deserializer)
    }
}

impl Serialize for B64Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&BASE64.encode(&self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for B64Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        BASE64
            .decode(text.as_bytes())
            .map(|bytes| Self(Bytes::from(bytes)))
            .map_err(|e| D::Error::custom(format!("data_b64 is not valid base64: {e}")))
    }
}
