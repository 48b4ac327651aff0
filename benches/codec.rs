//! Codec cost per frame: encoding and decoding a `msg` (the frame every
//! delivery is) and decoding a `publish` (the frame every publish is), in
//! MessagePack and in JSON, with a 256-byte payload.
//!
//! The frames are built the way the broker builds them: a `msg` always holds
//! its payload in `data`, and the JSON codec moves a payload that is not JSON
//! text to `data_b64` while encoding (that move is part of what is measured).
//!
//! Run: `cargo bench --bench codec` (see `docs/benchmarks.md`).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use courier::protocol::{
    ClientFrame, Codec, Msg, Payload, Publish, ServerFrame, decode_client, decode_server,
    encode_client, encode_server,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Payload size of every frame measured, bytes.
const PAYLOAD_LEN: usize = 256;

/// 256 bytes that are not UTF-8, so JSON must carry them as `data_b64`.
fn binary_payload() -> Bytes {
    let payload: Bytes = (0..PAYLOAD_LEN)
        .map(|i| u8::try_from((i * 131 + 7) % 256).unwrap_or(0) | 0x80)
        .collect();
    assert!(std::str::from_utf8(&payload).is_err());
    payload
}

/// A compact JSON object of exactly 256 bytes, so JSON carries it in `data`.
fn json_payload() -> Bytes {
    let head = r#"{"user":"alice","room":"chat:lobby","n":12345,"text":""#;
    let tail = r#""}"#;
    let fill = PAYLOAD_LEN - head.len() - tail.len();
    let text = format!("{head}{}{tail}", "x".repeat(fill));
    assert_eq!(text.len(), PAYLOAD_LEN);
    Bytes::from(text)
}

fn msg(payload: Bytes) -> ServerFrame {
    ServerFrame::Msg(Msg {
        channel: "chat:lobby".to_owned(),
        seq: 1_234_567,
        data: Some(Payload(payload)),
        data_b64: None,
        headers: None,
        ts: 1_767_225_600_000,
        attempt: 1,
    })
}

fn publish(payload: Bytes) -> ClientFrame {
    ClientFrame::Publish(Publish {
        id: 42,
        channel: "chat:lobby".to_owned(),
        data: Some(Payload(payload)),
        ..Publish::default()
    })
}

/// The three ways a 256-byte payload travels: (name, codec, payload).
fn cases() -> [(&'static str, Codec, Bytes); 3] {
    [
        ("msgpack", Codec::MsgPack, binary_payload()),
        ("json_data", Codec::Json, json_payload()),
        ("json_data_b64", Codec::Json, binary_payload()),
    ]
}

fn encode_msg(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_msg");
    group.throughput(Throughput::Elements(1));
    for (name, codec, payload) in cases() {
        let frame = msg(payload);
        group.bench_function(name, |b| {
            b.iter(|| encode_server(codec, black_box(&frame)));
        });
    }
    group.finish();
}

fn decode_msg(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_msg");
    group.throughput(Throughput::Elements(1));
    for (name, codec, payload) in cases() {
        let bytes = encode_server(codec, &msg(payload)).expect("a msg frame encodes");
        assert!(
            matches!(decode_server(codec, &bytes), Ok(ServerFrame::Msg(_))),
            "{name}: the encoded msg decodes"
        );
        group.bench_function(name, |b| {
            b.iter(|| decode_server(codec, black_box(&bytes)));
        });
    }
    group.finish();
}

fn decode_publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_publish");
    group.throughput(Throughput::Elements(1));
    for (name, codec, payload) in cases() {
        let bytes = encode_client(codec, &publish(payload)).expect("a publish frame encodes");
        assert!(
            matches!(decode_client(codec, &bytes), Ok(ClientFrame::Publish(_))),
            "{name}: the encoded publish decodes"
        );
        group.bench_function(name, |b| {
            b.iter(|| decode_client(codec, black_box(&bytes)));
        });
    }
    group.finish();
}

/// Short runs: these are sub-microsecond to microsecond operations, where
/// 100 samples over 2 s are plenty and the whole file stays under a minute.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = encode_msg, decode_msg, decode_publish
}
criterion_main!(benches);
