//! The HTTP publish API: single and batch, JSON and MessagePack, msg_id
//! idempotency, batch validation (all or nothing), API keys, and every
//! error path.

mod common;

use common::http::{self, Reply};
use common::*;
use courier::config::ApiKey;
use courier::protocol::*;
use serde_json::{Value, json};

const KEY: &str = "backend-key-0123456789";

async fn publish_with(broker: &TestBroker, path: &str, key: Option<&str>, body: &Value) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth.as_str()));
    }
    http::request(
        broker.addr,
        "POST",
        path,
        &headers,
        body.to_string().into_bytes(),
    )
    .await
}

async fn with_keys() -> TestBroker {
    TestBroker::start_with(|config| {
        config.auth.api_keys = vec![ApiKey {
            name: "backend".into(),
            key: KEY.into(),
            publish: vec!["orders:*".into(), "chat:room-1".into()],
        }];
        config.http.publish_batch_max = 3;
    })
    .await
}

/// Everything stored in `channel`, read back over a WebSocket.
async fn stored(broker: &TestBroker, channel: &str, count: usize) -> Vec<(u64, Vec<u8>)> {
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client
        .subscribe(Subscribe {
            from: Some(StartFrom::First),
            ack: Some(AckMode::Auto),
            ..sub(channel)
        })
        .await;
    client
        .deliveries(count)
        .await
        .into_iter()
        .map(|(seq, data, _)| (seq, data))
        .collect()
}

#[tokio::test]
async fn single_publish_json_and_msgpack_with_idempotency() {
    let broker = TestBroker::start().await;
    let reply = publish_with(
        &broker,
        "/api/publish",
        None,
        &json!({"channel": "orders:eu", "data": {"id": 1}}),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        json!({"channel": "orders:eu", "seq": 1, "duplicate": false})
    );

    let body = json!({"channel": "orders:eu", "data_b64": "AP/+gA==", "msg_id": "m-1", "headers": {"x-trace": "7"}});
    let first = publish_with(&broker, "/api/publish", None, &body)
        .await
        .json();
    let again = publish_with(&broker, "/api/publish", None, &body)
        .await
        .json();
    assert_eq!(
        first,
        json!({"channel": "orders:eu", "seq": 2, "duplicate": false})
    );
    assert_eq!(
        again,
        json!({"channel": "orders:eu", "seq": 2, "duplicate": true}),
        "same msg_id: same seq, nothing new"
    );

    #[derive(serde::Serialize)]
    struct Body<'a> {
        channel: &'a str,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    }
    let msgpack = rmp_serde::to_vec_named(&Body {
        channel: "orders:eu",
        data: &[1, 2, 3],
    })
    .unwrap();
    let reply = http::request(
        broker.addr,
        "POST",
        "/api/publish",
        &[("content-type", "application/msgpack")],
        msgpack,
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["seq"], 3);

    assert_eq!(
        stored(&broker, "orders:eu", 3).await,
        vec![
            (1, br#"{"id":1}"#.to_vec()),
            (2, vec![0, 255, 254, 128]),
            (3, vec![1, 2, 3])
        ]
    );
}

#[tokio::test]
async fn batch_publish_is_ordered_and_idempotent() {
    let broker = TestBroker::start().await;
    let body = json!({"messages": [
        {"channel": "orders:a", "data": 1, "msg_id": "a1"},
        {"channel": "orders:b", "data": 2},
        {"channel": "orders:a", "data": 3, "msg_id": "a3"},
    ]});
    let reply = publish_with(&broker, "/api/publish/batch", None, &body).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let results = reply.json()["results"].clone();
    assert_eq!(
        results,
        json!([
            {"channel": "orders:a", "seq": 1, "duplicate": false},
            {"channel": "orders:b", "seq": 1, "duplicate": false},
            {"channel": "orders:a", "seq": 2, "duplicate": false},
        ])
    );
    // The same batch again: the messages with a msg_id are not stored twice.
    let again = publish_with(&broker, "/api/publish/batch", None, &body)
        .await
        .json();
    assert_eq!(
        again["results"][0],
        json!({"channel": "orders:a", "seq": 1, "duplicate": true})
    );
    assert_eq!(
        again["results"][2],
        json!({"channel": "orders:a", "seq": 2, "duplicate": true})
    );
    assert_eq!(again["results"][1]["seq"], 2, "no msg_id: stored again");
}

#[tokio::test]
async fn a_bad_message_refuses_the_whole_batch() {
    let broker = TestBroker::start().await;
    let body = json!({"messages": [
        {"channel": "orders:a", "data": 1},
        {"channel": "not a channel", "data": 2},
    ]});
    let reply = publish_with(&broker, "/api/publish/batch", None, &body).await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "bad_request"));
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("messages[1]"),
        "{:?}",
        reply.json()
    );
    // Nothing of it was stored: the next publish to orders:a is seq 1.
    let reply = publish_with(
        &broker,
        "/api/publish",
        None,
        &json!({"channel": "orders:a", "data": 9}),
    )
    .await;
    assert_eq!(reply.json()["seq"], 1);
}

#[tokio::test]
async fn api_keys_authenticate_and_authorize() {
    let broker = with_keys().await;
    let body = json!({"channel": "orders:eu", "data": 1});
    let reply = publish_with(&broker, "/api/publish", None, &body).await;
    assert_eq!((reply.status, reply.code().as_str()), (401, "unauthorized"));
    assert!(reply.headers.contains_key("www-authenticate"));
    let reply = publish_with(
        &broker,
        "/api/publish",
        Some("backend-key-wrong!!!!!"),
        &body,
    )
    .await;
    assert_eq!((reply.status, reply.code().as_str()), (401, "unauthorized"));
    let reply = publish_with(&broker, "/api/publish", Some(KEY), &body).await;
    assert_eq!(reply.status, 200);
    let reply = publish_with(
        &broker,
        "/api/publish",
        Some(KEY),
        &json!({"channel": "chat:room-1", "data": 1}),
    )
    .await;
    assert_eq!(reply.status, 200, "an exact pattern");
    for channel in ["chat:room-2", "orders"] {
        let reply = publish_with(
            &broker,
            "/api/publish",
            Some(KEY),
            &json!({"channel": channel, "data": 1}),
        )
        .await;
        assert_eq!(
            (reply.status, reply.code().as_str()),
            (403, "forbidden"),
            "{channel}"
        );
        assert!(reply.json()["message"].as_str().unwrap().contains(channel));
    }
    // One forbidden message refuses the batch.
    let batch = json!({"messages": [{"channel": "orders:x", "data": 1}, {"channel": "chat:room-9", "data": 2}]});
    let reply = publish_with(&broker, "/api/publish/batch", Some(KEY), &batch).await;
    assert_eq!((reply.status, reply.code().as_str()), (403, "forbidden"));
    let reply = publish_with(
        &broker,
        "/api/publish",
        Some(KEY),
        &json!({"channel": "orders:x", "data": 1}),
    )
    .await;
    assert_eq!(
        reply.json()["seq"],
        1,
        "nothing of the refused batch was stored"
    );
}

#[tokio::test]
async fn every_error_path_has_a_clear_json_error() {
    let broker = with_keys().await;
    let max_frame = usize::try_from(courier::config::Config::default().server.max_frame).unwrap();
    let big = "x".repeat(max_frame);
    let cases: Vec<(&str, Value, u16, &str, &str)> = vec![
        (
            "/api/publish",
            json!({"channel": "orders:a"}),
            400,
            "bad_request",
            "data",
        ),
        (
            "/api/publish",
            json!({"channel": "orders:a", "data": 1, "data_b64": "AA=="}),
            400,
            "bad_request",
            "not both",
        ),
        (
            "/api/publish",
            json!({"channel": "orders:a", "data_b64": "!!"}),
            400,
            "bad_request",
            "base64",
        ),
        (
            "/api/publish",
            json!({"data": 1}),
            400,
            "bad_request",
            "channel",
        ),
        (
            "/api/publish",
            json!({"channel": "orders:a", "data": 1, "msg_id": ""}),
            400,
            "bad_request",
            "msg_id",
        ),
        (
            "/api/publish",
            json!({"channel": "orders:a", "data": 1, "headers": {"h": "v".repeat(5000)}}),
            413,
            "too_large",
            "header",
        ),
        (
            "/api/publish",
            json!({"channel": "orders:a", "data": big}),
            413,
            "too_large",
            "larger",
        ),
        (
            "/api/publish/batch",
            json!({"messages": []}),
            400,
            "bad_request",
            "empty",
        ),
        (
            "/api/publish/batch",
            json!({"messages": [{"channel": "orders:a", "data": 1}, {"channel": "orders:a", "data": 1}, {"channel": "orders:a", "data": 1}, {"channel": "orders:a", "data": 1}]}),
            413,
            "too_large",
            "at most 3",
        ),
        (
            "/api/publish/batch",
            json!({"msgs": []}),
            400,
            "bad_request",
            "messages",
        ),
    ];
    for (path, body, status, code, needle) in cases {
        let reply = publish_with(&broker, path, Some(KEY), &body).await;
        assert_eq!(
            (reply.status, reply.code().as_str()),
            (status, code),
            "{path} {:.100}",
            body.to_string()
        );
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    }
    let auth = format!("Bearer {KEY}");
    let reply = http::request(
        broker.addr,
        "POST",
        "/api/publish",
        &[("authorization", &auth), ("content-type", "text/plain")],
        b"hi".to_vec(),
    )
    .await;
    assert_eq!((reply.status, reply.code().as_str()), (415, "bad_request"));
    let reply = http::request(
        broker.addr,
        "POST",
        "/api/publish",
        &[("authorization", &auth)],
        b"{oops".to_vec(),
    )
    .await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "bad_request"));
    let reply = http::request(
        broker.addr,
        "POST",
        "/api/publish",
        &[
            ("authorization", &auth),
            ("content-type", "application/msgpack"),
        ],
        vec![0xc1],
    )
    .await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "bad_request"));
    let reply = http::get(broker.addr, "/api/publish").await;
    assert_eq!(
        (reply.status, reply.code().as_str()),
        (405, "bad_request"),
        "GET is not a publish"
    );
    let reply = http::get(broker.addr, "/api/nothing").await;
    assert_eq!((reply.status, reply.code().as_str()), (404, "not_found"));
}

#[tokio::test]
async fn the_publish_api_is_rate_limited_per_key_and_says_when_to_retry() {
    let broker = TestBroker::start_with(|c| {
        c.limits.publish_per_sec = 1;
        c.limits.publish_burst = 2;
    })
    .await;
    let addr = broker.addr;
    let one = json!({"channel": "rl:api", "data": 1});
    for _ in 0..2 {
        assert_eq!(
            http::post_json(addr, "/api/publish", &one).await.status,
            200
        );
    }
    let limited = http::post_json(addr, "/api/publish", &one).await;
    assert_eq!(
        (limited.status, limited.code().as_str()),
        (429, "rate_limited")
    );
    assert!(limited.headers.get("retry-after").is_some());
    let wait = limited.json()["retry_after_ms"].as_u64().unwrap();
    // A batch over the limit stores nothing.
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    let batch = json!({"messages": [one.clone(), one.clone(), one.clone()]});
    let refused = http::post_json(addr, "/api/publish/batch", &batch).await;
    assert_eq!(refused.status, 429, "{}", refused.json());
    let stored = broker.admin().get("/admin/channels/rl:api").await;
    assert_eq!(stored["last_seq"], 2, "the refused batch stored nothing");
}
