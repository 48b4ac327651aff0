//! Bad input, limits, heartbeats and shutdown: every bad input gets an
//! `error` frame or the documented close code, the server keeps serving
//! everyone else, and nothing stored is corrupted.

mod common;

use std::time::Duration;

use common::*;
use courier::protocol::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A fresh connection still publishes and reads back everything stored.
async fn still_serves(broker: &TestBroker, channel: &str, expect_last: u64) {
    for codec in CODECS {
        let mut client = Client::connect(&broker.url(), codec).await;
        client.sync().await;
        let subscribed = client
            .subscribe(Subscribe {
                from: Some(StartFrom::First),
                ack: Some(AckMode::Auto),
                ..sub(channel)
            })
            .await;
        assert_eq!(subscribed.last_seq, expect_last, "stored data intact");
        let got = client
            .deliveries(usize::try_from(expect_last).unwrap())
            .await;
        for (i, (seq, data, _)) in got.iter().enumerate() {
            assert_eq!(*seq, u64::try_from(i).unwrap() + 1);
            assert_eq!(data, format!("\"m{seq}\"").as_bytes());
        }
    }
}

async fn seed(broker: &TestBroker, channel: &str, count: u64) {
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    for seq in 1..=count {
        assert_eq!(
            client
                .publish(channel, format!("\"m{seq}\"").as_bytes())
                .await,
            seq
        );
    }
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_stays() {
    let broker = TestBroker::start().await;
    seed(&broker, "safe:log", 3).await;

    let mut json = Client::connect(&broker.url(), Codec::Json).await;
    let cases: Vec<(&str, Option<u64>, &str)> = vec![
        ("not json at all {", None, "malformed"),
        ("[1,2,3]", None, "malformed"),
        (r#"{"id": 7, "channel": "a"}"#, Some(7), "no `type`"),
        (
            r#"{"type": "teleport", "id": 8}"#,
            Some(8),
            "unknown frame type",
        ),
        (
            r#"{"type": "publish", "id": 9, "data": 1}"#,
            Some(9),
            "channel",
        ),
        (
            r#"{"type": "publish", "id": 10, "channel": "safe:log"}"#,
            Some(10),
            "data",
        ),
        (
            r#"{"type": "subscribe", "id": 11, "channel": "safe:log", "since": "yesterday"}"#,
            Some(11),
            "since",
        ),
        (
            r#"{"type": "ack", "channel": "safe:log", "seqs": [-1]}"#,
            None,
            "bad `ack`",
        ),
        (
            r#"{"type": "publish", "id": 12, "channel": "bad name!", "data": 1}"#,
            Some(12),
            "channel name",
        ),
        (
            r#"{"type": "publish", "id": 13, "channel": "", "data": 1}"#,
            Some(13),
            "empty",
        ),
        (
            r#"{"type": "publish", "id": 14, "channel": "a", "data_b64": "%%%"}"#,
            Some(14),
            "base64",
        ),
    ];
    for (text, id, needle) in cases {
        json.ws.send(Message::Text(text.into())).await.unwrap();
        let e = json.error().await;
        assert_eq!(e.code, ErrorCode::BadRequest, "{text}");
        assert_eq!(e.id, id, "{text}: id echoed when readable");
        assert!(
            e.message.contains(needle),
            "{text}: {:?} should mention {needle:?}",
            e.message
        );
        json.sync().await;
    }
    json.ws
        .send(Message::Binary(vec![0x81, 0xa4].into()))
        .await
        .unwrap();
    let e = json.error().await;
    assert!(e.message.contains("text frames"), "{}", e.message);

    let mut msgpack = Client::connect(&broker.url(), Codec::MsgPack).await;
    for garbage in [
        vec![0xc1],
        vec![0x93, 1, 2, 3],
        vec![0x81, 0xa4, b't', b'y', b'p', b'e', 0x05],
        vec![],
    ] {
        msgpack
            .ws
            .send(Message::Binary(garbage.clone().into()))
            .await
            .unwrap();
        assert_eq!(
            msgpack.error().await.code,
            ErrorCode::BadRequest,
            "{garbage:?}"
        );
    }
    msgpack.ws.send(Message::Text("{}".into())).await.unwrap();
    assert!(msgpack.error().await.message.contains("binary frames"));
    msgpack.sync().await;
    still_serves(&broker, "safe:log", 3).await;
}

#[tokio::test]
async fn request_errors_are_clear_and_harmless() {
    let broker = TestBroker::start().await;
    seed(&broker, "safe:req", 2).await;
    let mut c = Client::connect(&broker.url(), Codec::MsgPack).await;

    c.ack("safe:req", vec![1]).await;
    let e = c.error().await;
    assert_eq!(
        e.code,
        ErrorCode::NotFound,
        "ack without a subscription: {e:?}"
    );

    c.subscribe(Subscribe {
        consumer: Some("careful".into()),
        ..sub("safe:req")
    })
    .await;
    c.ack("safe:req", vec![99]).await;
    let e = c.error().await;
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("99"), "{e:?}");
    c.send(&ClientFrame::Ack(Ack {
        id: Some(4),
        channel: "safe:req".into(),
        seqs: Some(vec![1]),
        upto: Some(1),
    }))
    .await;
    assert_eq!(c.error().await.id, Some(4));
    c.send(&ClientFrame::Nack(Nack {
        id: Some(5),
        channel: "safe:req".into(),
        seq: 2,
        delay_ms: None,
    }))
    .await;
    assert_eq!(c.error().await.id, Some(5), "nack of a seq never delivered");

    let id = c.id();
    c.send(&ClientFrame::Subscribe(Subscribe {
        id,
        ..sub("safe:req")
    }))
    .await;
    let e = c.error().await;
    assert_eq!(
        (e.code, e.id),
        (ErrorCode::Conflict, Some(id)),
        "already subscribed"
    );

    let id = c.id();
    c.send(&ClientFrame::Subscribe(Subscribe {
        id,
        since: Some(1),
        from: Some(StartFrom::First),
        ..sub("safe:x")
    }))
    .await;
    assert_eq!(c.error().await.id, Some(id));
    let id = c.id();
    c.send(&ClientFrame::Subscribe(Subscribe {
        id,
        max_in_flight: Some(0),
        ..sub("safe:y")
    }))
    .await;
    assert_eq!(c.error().await.id, Some(id));
    let id = c.id();
    c.send(&ClientFrame::Subscribe(Subscribe {
        id,
        consumer: Some("no spaces".into()),
        ..sub("safe:z")
    }))
    .await;
    assert_eq!(c.error().await.id, Some(id));
    let id = c.id();
    c.send(&ClientFrame::Publish(Publish {
        id,
        channel: "safe:req".into(),
        data: Some(Payload(b"1".to_vec().into())),
        msg_id: Some("x".repeat(300)),
        ..Publish::default()
    }))
    .await;
    assert_eq!(c.error().await.id, Some(id));
    let id = c.id();
    c.send(&ClientFrame::Unsubscribe(ChannelRequest {
        id,
        channel: "never:subscribed".into(),
    }))
    .await;
    assert_eq!(c.error().await.code, ErrorCode::NotFound);
    c.send(&ClientFrame::Connect(Connect::default())).await;
    assert!(c.error().await.message.contains("already connected"));
    c.sync().await;
    still_serves(&broker, "safe:req", 2).await;
}

#[tokio::test]
async fn frames_over_max_frame_are_refused() {
    let broker = TestBroker::start_with(|c| c.server.max_frame = 1024).await;
    seed(&broker, "safe:big", 1).await;
    let mut c = Client::connect(&broker.url(), Codec::Json).await;
    let big = format!(
        r#"{{"type":"publish","id":1,"channel":"safe:big","data":"{}"}}"#,
        "x".repeat(1500)
    );
    c.ws.send(Message::Text(big.into())).await.unwrap();
    let e = c.error().await;
    assert_eq!(e.code, ErrorCode::TooLarge, "{e:?}");
    c.sync().await;

    let huge = format!(
        r#"{{"type":"publish","id":2,"channel":"safe:big","data":"{}"}}"#,
        "x".repeat(5000)
    );
    c.ws.send(Message::Text(huge.into())).await.unwrap();
    assert_eq!(c.expect_close().await, close::MESSAGE_TOO_BIG);
    still_serves(&broker, "safe:big", 1).await;
}

#[tokio::test]
async fn the_first_frame_must_be_connect_and_abuse_is_closed() {
    let broker = TestBroker::start().await;
    let mut ws = open(&broker.url(), None).await;
    ws.send(Message::Text(r#"{"type":"ping","id":3}"#.into()))
        .await
        .unwrap();
    let mut client = Client::raw(ws, Codec::Json);
    let e = client.error().await;
    assert_eq!(e.id, Some(3));
    assert_eq!(client.expect_close().await, close::PROTOCOL_ERROR);

    let mut abuser = Client::connect(&broker.url(), Codec::Json).await;
    for _ in 0..MAX_BAD_FRAMES_FOR_TEST {
        abuser
            .ws
            .send(Message::Text("garbage".into()))
            .await
            .unwrap();
    }
    assert_eq!(abuser.expect_close().await, close::PROTOCOL_ERROR);
    seed(&broker, "safe:after", 1).await;
}

const MAX_BAD_FRAMES_FOR_TEST: usize = 10;

#[tokio::test]
async fn a_silent_connection_is_dropped_after_two_heartbeats() {
    let broker = TestBroker::start_with(|c| c.server.heartbeat = Duration::from_millis(200)).await;
    let (mut silent, connected) =
        Client::connect_with(&broker.url(), Codec::Json, Connect::default()).await;
    assert_eq!(connected.heartbeat_ms, 200);
    // Not reading means not answering pings: the server must give up.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(silent.expect_close().await, close::GOING_AWAY);

    let mut alive = Client::connect(&broker.url(), Codec::Json).await;
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(900);
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until, alive.ws.next()).await {
        if matches!(message, Message::Ping(_)) {
            pings += 1;
        }
    }
    assert!(pings >= 3, "the server pings every heartbeat ({pings})");
    alive.sync().await;
}

#[tokio::test]
async fn graceful_shutdown_tells_clients_to_reconnect() {
    let mut broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.subscribe(sub("bye:now")).await;
    broker.stop().await;
    assert_eq!(client.expect_close().await, close::RESTARTING);
}

#[tokio::test]
async fn bad_upgrades_get_json_errors() {
    let broker = TestBroker::start().await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            broker.url(),
        )
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP error, got {err:?}");
    };
    assert_eq!(response.status(), 400);
    let body: serde_json::Value =
        serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
    assert_eq!(body["code"], "bad_request");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("courier.v1.json")
    );

    let plain = http_get(broker.addr, "/ws").await;
    assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    assert!(plain.contains("\"code\":\"bad_request\""), "{plain}");
    let health = http_get(broker.addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(broker.addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}
