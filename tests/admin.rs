//! The admin API over real HTTP against a real broker: every route, the
//! token, paging, DLQ idempotence, purge/delete/reset, connections and
//! kicks, presence, metrics that move, and the OpenAPI document agreeing
//! with the router both ways.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use courier::protocol::*;
use serde_json::{Value, json};

fn term(channel: &str, seq: u64) -> ClientFrame {
    ClientFrame::Term(Term {
        id: None,
        channel: channel.into(),
        seq,
        reason: Some("bad payload".into()),
    })
}

fn named(channel: &str, consumer: &str) -> Subscribe {
    Subscribe {
        consumer: Some(consumer.into()),
        ..sub(channel)
    }
}

/// A broker with `jobs:a` holding 3 messages, a consumer `w` that has seen
/// them, and seq 2 in the dead-letter queue.
async fn with_dead_letter() -> (TestBroker, Client) {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(named("jobs:a", "w")).await;
    for i in 1..=3u8 {
        client.publish("jobs:a", &[b'0' + i]).await;
    }
    client.deliveries(3).await;
    client.send(&term("jobs:a", 2)).await;
    client.ack("jobs:a", vec![1, 3]).await;
    client.sync().await;
    (broker, client)
}

#[tokio::test]
async fn every_route_needs_the_admin_token() {
    let broker = TestBroker::start().await;
    let admin = broker.admin();
    for (method, path) in courier::admin::ROUTES {
        let path = path
            .replace("{channel}", "chat:x")
            .replace("{consumer}", "c%2Fw")
            .replace("{id}", "c1");
        for token in [None, Some("wrong-token-wrong-token")] {
            let (status, body) = admin.call_as(token, method, &path, None).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(body["code"], "unauthorized", "{method} {path}: {body}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    // The dashboard also takes the token in the query, so a link opens it.
    let page = reqwest::get(format!("{}/admin/ui?token={}", admin.base, admin.token))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let cookie = page
        .headers()
        .get("set-cookie")
        .expect("a cookie for reloads")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(page.text().await.unwrap().contains("<html"));
    // A reload drops `?token=` but sends the cookie; only the page takes it.
    let http = reqwest::Client::new();
    let reload = http
        .get(format!("{}/admin/ui", admin.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let api = http
        .get(format!("{}/admin/info", admin.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401, "the cookie opens the page, not the API");
    let forged = http
        .get(format!("{}/admin/ui", admin.base))
        .header("cookie", "courier_admin_token=guess")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    // ...but no other route does.
    let (status, _) = admin
        .call_as(
            None,
            "GET",
            &format!("/admin/info?token={}", admin.token),
            None,
        )
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn metrics_can_be_made_public() {
    let broker = TestBroker::start_with(|c| c.admin.metrics_public = true).await;
    let admin = broker.admin();
    let (status, body) = admin.call_as(None, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.as_str().unwrap().contains("courier_connections"));
    let (status, _) = admin.call_as(None, "GET", "/admin/info", None).await;
    assert_eq!(status, 401, "only /metrics becomes public");
}

#[tokio::test]
async fn channels_are_listed_by_name_with_paging_and_a_prefix() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    for name in ["a:3", "a:1", "b:1", "a:2"] {
        client.publish(name, b"\"hello\"").await;
    }
    client.publish("a:1", b"\"again\"").await;
    client.subscribe(sub("a:2")).await;
    let admin = broker.admin();

    let first = admin.get("/admin/channels?prefix=a:&limit=2").await;
    let names: Vec<_> = first["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a:1", "a:2"]);
    assert_eq!(first["next"], "a:2");
    let a1 = &first["channels"][0];
    assert_eq!(a1["namespace"], "a");
    assert_eq!(a1["last_seq"], 2);
    assert_eq!(a1["first_seq"], 1);
    assert_eq!(a1["messages"], 2);
    assert!(a1["bytes"].as_u64().unwrap() >= 14);
    assert_eq!(a1["durable"], true);
    assert!(a1["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(first["channels"][1]["subscribers"], 1);

    let second = admin
        .get("/admin/channels?prefix=a:&limit=2&after=a:2")
        .await;
    assert_eq!(second["channels"].as_array().unwrap().len(), 1);
    assert_eq!(second["channels"][0]["name"], "a:3");
    assert_eq!(second["next"], Value::Null);

    let all = admin.get("/admin/channels").await;
    assert_eq!(all["channels"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn publish_rate_follows_publishing() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    let admin = broker.admin();
    for i in 0..60u32 {
        client.publish("rate:x", i.to_string().as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let rate = admin.get("/admin/channels/rate:x").await["publish_rate"]
        .as_f64()
        .unwrap();
    assert!(
        rate > 0.5,
        "a channel published to ~30/s shows a rate: {rate}"
    );
}

#[tokio::test]
async fn a_channel_shows_its_policy_and_each_consumer() {
    let broker = TestBroker::start().await;
    let admin = broker.admin();
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(named("orders:1", "billing")).await;
    for i in 1..=5u8 {
        client.publish("orders:1", &[b'0' + i]).await;
    }
    client.deliveries(5).await;
    client.ack("orders:1", vec![1, 2]).await;
    client.sync().await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    let detail = admin.get("/admin/channels/orders:1").await;
    assert_eq!(detail["last_seq"], 5);
    assert_eq!(detail["policy"]["max_deliver"], 10);
    assert_eq!(detail["policy"]["ack_wait_ms"], 30_000);
    let consumers = detail["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1, "{detail}");
    let billing = &consumers[0];
    assert_eq!(billing["name"], "c/billing");
    assert_eq!(billing["kind"], "fanout");
    assert_eq!(billing["floor"], 2);
    assert_eq!(billing["lag"], 3);
    assert_eq!(billing["in_flight"], 3);
    assert_eq!(billing["connected"], true);
    assert_eq!(billing["subscriptions"], 1);
    assert!(
        billing["oldest_unacked_age_ms"].as_u64().unwrap() >= 20,
        "{billing}"
    );

    // Gone from memory, still listed from the store.
    drop(client);
    let mut listed = Value::Null;
    for _ in 0..100 {
        listed = admin.get("/admin/channels/orders:1").await["consumers"][0].clone();
        if listed["connected"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(listed["connected"], false, "{listed}");
    assert_eq!(listed["floor"], 2);
    assert_eq!(listed["lag"], 3);

    let (status, body) = admin.call("GET", "/admin/channels/orders:404", None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = admin.call("GET", "/admin/channels/bad%20name", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
}

#[tokio::test]
async fn peek_shows_text_and_binary_payloads_by_seq_range() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.publish("logs:1", b"plain text").await;
    client.publish("logs:1", &[0xff, 0x00, 0x01]).await;
    client.publish("logs:1", b"{\"k\":1}").await;
    let admin = broker.admin();

    let page = admin.get("/admin/channels/logs:1/messages?limit=2").await;
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["seq"], 1);
    assert_eq!(messages[0]["data"], "plain text");
    assert!(messages[0].get("data_b64").is_none());
    assert_eq!(messages[1]["data_b64"], "/wAB");
    assert!(messages[1]["ts"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(page["next"], 3);

    let rest = admin.get("/admin/channels/logs:1/messages?from=3").await;
    assert_eq!(rest["messages"][0]["data"], "{\"k\":1}");
    assert_eq!(rest["next"], Value::Null);
    let one = admin
        .get("/admin/channels/logs:1/messages?from=2&to=2")
        .await;
    assert_eq!(one["messages"].as_array().unwrap().len(), 1);

    for bad in ["from=x", "limit=0", "limit=5000", "colour=red"] {
        let (status, body) = admin
            .call(
                "GET",
                &format!("/admin/channels/logs:1/messages?{bad}"),
                None,
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "bad_request");
    }
}

#[tokio::test]
async fn dead_letters_are_listed_requeued_and_purged_and_a_repeat_changes_nothing() {
    let (broker, mut client) = with_dead_letter().await;
    let admin = broker.admin();
    let list = admin.get("/admin/channels/jobs:a/dlq").await;
    let entries = list["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["seq"], 2);
    assert_eq!(entries[0]["consumer"], "c/w");
    assert_eq!(entries[0]["reason"], "term");
    assert_eq!(entries[0]["detail"], "bad payload");
    assert_eq!(entries[0]["message"]["data"], "2");
    assert_eq!(admin.get("/admin/channels/jobs:a").await["dead_letters"], 1);

    let requeued = admin
        .post("/admin/channels/jobs:a/dlq/requeue", json!({"seq": 2}))
        .await;
    assert_eq!(requeued["requeued"], 1);
    let again = admin
        .post("/admin/channels/jobs:a/dlq/requeue", json!({"seq": 2}))
        .await;
    assert_eq!(again["requeued"], 0, "safe to repeat");
    let back = client.deliveries(1).await;
    assert_eq!(
        (back[0].0, back[0].2),
        (2, 1),
        "delivered again, attempt reset"
    );
    assert_eq!(
        admin.get("/admin/channels/jobs:a/dlq").await["entries"],
        json!([])
    );

    client.send(&term("jobs:a", 2)).await;
    client.sync().await;
    let purged = admin
        .post("/admin/channels/jobs:a/dlq/purge", json!({"all": true}))
        .await;
    assert_eq!(purged["purged"], 1);
    let again = admin
        .post("/admin/channels/jobs:a/dlq/purge", json!({"all": true}))
        .await;
    assert_eq!(again["purged"], 0);
    client.expect_no_delivery(Duration::from_millis(300)).await;

    for bad in [
        json!({}),
        json!({"seq": 1, "all": true}),
        json!({"from": 5, "to": 1}),
        json!({"from": 1}),
        json!({"seq": "two"}),
        json!({"sequence": 2}),
    ] {
        let (status, body) = admin
            .call(
                "POST",
                "/admin/channels/jobs:a/dlq/requeue",
                Some(bad.clone()),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = admin
        .call(
            "POST",
            "/admin/channels/nope:1/dlq/purge",
            Some(json!({"all": true})),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn dead_letter_pages_follow_next() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(named("jobs:p", "w")).await;
    for i in 1..=5u8 {
        client.publish("jobs:p", &[b'0' + i]).await;
    }
    client.deliveries(5).await;
    for seq in 1..=5 {
        client.send(&term("jobs:p", seq)).await;
    }
    client.sync().await;
    let admin = broker.admin();
    let mut seen = Vec::new();
    let mut path = "/admin/channels/jobs:p/dlq?limit=2".to_owned();
    loop {
        let page = admin.get(&path).await;
        seen.extend(
            page["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_u64().unwrap()),
        );
        match page["next"].as_str() {
            Some(next) => path = format!("/admin/channels/jobs:p/dlq?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    let (status, _) = admin
        .call("GET", "/admin/channels/jobs:p/dlq?after=garbage", None)
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn purge_gives_a_new_epoch_ends_subscriptions_and_survives_a_restart() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    let before = client.subscribe(named("feed:1", "reader")).await;
    for i in 1..=3u8 {
        client.publish("feed:1", &[b'0' + i]).await;
    }
    client.deliveries(3).await;
    let admin = broker.admin();

    let purged = admin.post("/admin/channels/feed:1/purge", json!({})).await;
    assert_ne!(purged["epoch"], before.epoch.as_str());
    assert_eq!(purged["last_seq"], 0);
    assert_eq!(purged["messages"], 0);
    let ended = client
        .wait_for(|f| match f {
            ServerFrame::Unsubscribed(u) => Some(u.clone()),
            _ => None,
        })
        .await;
    assert_eq!((ended.id, ended.channel.as_str()), (0, "feed:1"));

    let after = client.subscribe(named("feed:1", "reader")).await;
    assert_eq!(after.epoch, purged["epoch"].as_str().unwrap());
    assert_eq!((after.first_seq, after.last_seq), (1, 0));
    assert_eq!(
        client.publish("feed:1", b"\"new\"").await,
        1,
        "seqs start again"
    );
    assert_eq!(client.deliveries(1).await[0].0, 1);
    drop(client);

    let broker = broker.restart().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    let restarted = client.subscribe(named("feed:1", "reader")).await;
    assert_eq!(restarted.epoch, after.epoch, "the purge was durable");
    assert_eq!(restarted.last_seq, 1);
    let peek = broker.admin().get("/admin/channels/feed:1/messages").await;
    assert_eq!(peek["messages"].as_array().unwrap().len(), 1);
    assert_eq!(peek["messages"][0]["data"], "\"new\"");
}

#[tokio::test]
async fn deleting_a_channel_removes_it_and_a_repeat_is_not_found() {
    let (broker, _client) = with_dead_letter().await;
    let admin = broker.admin();
    let deleted = admin.call("DELETE", "/admin/channels/jobs:a", None).await;
    assert_eq!(deleted.0, 200, "{}", deleted.1);
    assert_eq!(deleted.1["deleted"], "jobs:a");
    let (status, body) = admin.call("DELETE", "/admin/channels/jobs:a", None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let list = admin.get("/admin/channels").await;
    assert_eq!(list["channels"], json!([]));

    let broker = broker.restart().await;
    assert_eq!(
        broker.admin().get("/admin/channels").await["channels"],
        json!([])
    );
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    let fresh = client.subscribe(named("jobs:a", "w")).await;
    assert_eq!((fresh.first_seq, fresh.last_seq), (1, 0));
    client.expect_no_delivery(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn resetting_a_consumer_replays_from_the_given_seq() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(named("replay:1", "r")).await;
    for i in 1..=3u8 {
        client.publish("replay:1", &[b'0' + i]).await;
    }
    client.deliveries(3).await;
    client.ack("replay:1", vec![1, 2, 3]).await;
    client.sync().await;
    let admin = broker.admin();
    let reset = admin
        .post(
            "/admin/channels/replay:1/consumers/c%2Fr/reset",
            json!({"seq": 1}),
        )
        .await;
    assert_eq!(reset["floor"], 1);
    assert_eq!(reset["lag"], 2);
    let again: Vec<u64> = client.deliveries(2).await.iter().map(|d| d.0).collect();
    assert_eq!(again, [2, 3]);

    let (status, _) = admin
        .call(
            "POST",
            "/admin/channels/replay:1/consumers/c%2Fr/reset",
            Some(json!({"seq": 99})),
        )
        .await;
    assert_eq!(status, 400, "past the last seq");
    let (status, _) = admin
        .call(
            "POST",
            "/admin/channels/replay:1/consumers/c%2Fnobody/reset",
            Some(json!({"seq": 0})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = admin
        .call(
            "POST",
            "/admin/channels/replay:1/consumers/c%2Fr/reset",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 400, "seq is required");
}

#[tokio::test]
async fn connections_are_listed_and_an_operator_can_kick_one() {
    let broker = TestBroker::start().await;
    let mut alice = Client::connect(&broker.url(), Codec::Json).await;
    let mut bob = Client::connect(&broker.url(), Codec::MsgPack).await;
    alice.subscribe(sub("room:1")).await;
    bob.publish("room:1", b"\"hi\"").await;
    alice.deliveries(1).await;
    let admin = broker.admin();

    let list = admin.get("/admin/connections").await;
    let connections = list["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 2, "{list}");
    let a = &connections[0];
    assert_eq!(a["subscriptions"], json!(["room:1"]));
    assert_eq!(a["transport"], "ws");
    assert_eq!(a["msgs_out"], 1);
    assert!(a["msgs_in"].as_u64().unwrap() >= 2, "{a}");
    assert!(a["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(a["user"], Value::Null);

    let page = admin.get("/admin/connections?limit=1").await;
    assert_eq!(page["connections"].as_array().unwrap().len(), 1);
    let next = page["next"].as_str().unwrap().to_owned();
    let rest = admin.get(&format!("/admin/connections?after={next}")).await;
    assert_eq!(rest["connections"][0]["id"], connections[1]["id"]);

    let presence = admin.get("/admin/channels/room:1/presence").await;
    assert_eq!(presence["clients"].as_array().unwrap().len(), 1);
    assert_eq!(presence["clients"][0]["conn_id"], a["id"]);

    let bob_id = connections[1]["id"].as_str().unwrap().to_owned();
    let path = format!("/admin/connections/{bob_id}/kick");
    let (status, _) = admin.call("POST", &path, Some(json!({"code": 1000}))).await;
    assert_eq!(status, 400, "only application close codes");
    let kicked = admin
        .post(&path, json!({"code": 4003, "reason": "you were rude"}))
        .await;
    assert_eq!(kicked["code"], 4003);
    assert_eq!(bob.expect_close().await, 4003);
    let mut gone = 0;
    for _ in 0..100 {
        gone = admin.call("POST", &path, None).await.0;
        if gone == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gone, 404, "a repeat finds no such connection");
    let left = admin.get("/admin/connections").await;
    assert_eq!(left["connections"].as_array().unwrap().len(), 1);

    // The default code is 4008 (policy).
    let alice_id = a["id"].as_str().unwrap().to_owned();
    let kicked = admin
        .post(&format!("/admin/connections/{alice_id}/kick"), json!({}))
        .await;
    assert_eq!(kicked["code"], 4008);
    assert_eq!(alice.expect_close().await, 4008);
}

/// Counter and gauge samples of the text format, by series.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn metrics_move_when_clients_publish_ack_nack_and_term() {
    let broker = TestBroker::start_with(|c| {
        c.namespaces.insert(
            "jobs".into(),
            courier::config::NamespacePolicy {
                backoff_base: Duration::from_millis(20),
                backoff_max: Duration::from_millis(40),
                ..Default::default()
            },
        );
    })
    .await;
    let admin = broker.admin();
    let read = async || {
        let text = admin.get("/metrics").await;
        samples(text.as_str().unwrap())
    };
    let before = read().await;
    let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);

    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(named("jobs:m", "w")).await;
    for i in 1..=3u8 {
        client.publish("jobs:m", &[b'0' + i]).await;
    }
    client.publish("other:x", b"1").await;
    client.deliveries(3).await;
    client.ack("jobs:m", vec![1]).await;
    client
        .send(&ClientFrame::Nack(Nack {
            id: None,
            channel: "jobs:m".into(),
            seq: 2,
            delay_ms: Some(10),
        }))
        .await;
    assert_eq!(client.deliveries(1).await[0].2, 2, "redelivered");
    client.send(&term("jobs:m", 3)).await;
    client.sync().await;

    let after = read().await;
    let delta = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(
        delta("courier_messages_published_total{namespace=\"jobs\"}"),
        3.0
    );
    assert_eq!(
        delta("courier_messages_published_total{namespace=\"default\"}"),
        1.0
    );
    assert_eq!(
        delta("courier_messages_delivered_total{namespace=\"jobs\"}"),
        4.0
    );
    assert_eq!(
        delta("courier_messages_redelivered_total{namespace=\"jobs\"}"),
        1.0
    );
    assert_eq!(
        delta("courier_messages_acked_total{namespace=\"jobs\"}"),
        1.0
    );
    assert_eq!(
        delta("courier_messages_dead_lettered_total{reason=\"term\"}"),
        1.0
    );
    assert!(delta("courier_publish_durable_seconds_count") >= 4.0);
    assert!(delta("courier_ack_latency_seconds_count") >= 1.0);
    assert!(delta("courier_frames_in_total{type=\"publish\"}") >= 4.0);
    assert!(get(&after, "courier_connections") >= 1.0);
    assert!(get(&after, "courier_store_bytes") > 0.0);
    assert!(get(&after, "courier_channels") >= 2.0);
    // Never one label value per channel.
    let text = admin.get("/metrics").await;
    assert!(!text.as_str().unwrap().contains("jobs:m"));
    assert!(!text.as_str().unwrap().contains("other:x"));
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let broker = TestBroker::start().await;
    let admin = broker.admin();
    let (status, body) = admin.call("GET", "/admin/nothing-here", None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = admin.call("PUT", "/admin/channels", None).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["code"], "bad_request");
    let (status, body) = admin.call("GET", "/admin/channels?limit=-1", None).await;
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("limit"),
        "{body}"
    );
    let (status, body) = admin
        .call(
            "POST",
            "/admin/connections/c999/kick",
            Some(json!({"reason": "x".repeat(200)})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = admin
        .call("POST", "/admin/connections/c999/kick", None)
        .await;
    assert_eq!(status, 404);
    let (status, body) = admin.call("GET", "/admin/info", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn the_token_is_generated_once_kept_in_the_data_dir_and_printed_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = ChildBroker::start(dir.path(), "");
    let token_file = dir.path().join("data").join("admin.token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(token.len(), 48);
    let admin_addr = wait_for_log(&broker, "admin=");
    let admin = Admin::new(format!("http://{admin_addr}"), &token);
    rt.block_on(async {
        assert_eq!(admin.call("GET", "/admin/info", None).await.0, 200);
    });
    assert!(
        broker.log_text().contains(&token),
        "printed at the first start"
    );
    let mut broker = broker;
    broker.sigterm();
    let _ = broker.child.wait();

    let broker = ChildBroker::start(dir.path(), "");
    wait_for_log(&broker, "admin token: read from");
    assert!(!broker.log_text().contains(&token), "printed only once");
    drop(broker);

    let broker = ChildBroker::start(
        dir.path(),
        "[admin]\ntoken = \"a-configured-admin-token\"\n",
    );
    let admin_addr = wait_for_log(&broker, "admin=");
    rt.block_on(async {
        let admin = Admin::new(format!("http://{admin_addr}"), "a-configured-admin-token");
        assert_eq!(admin.call("GET", "/admin/info", None).await.0, 200);
        let old = Admin::new(format!("http://{admin_addr}"), &token);
        assert_eq!(old.call("GET", "/admin/info", None).await.0, 401);
    });
}

#[test]
fn a_short_configured_token_stops_start_up_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), "[admin]\ntoken = \"short\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(dir.path().join("c.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("admin.token"), "{stderr}");
}

/// Waits until the broker logged a line containing `needle`; returns what
/// follows it up to the next space (e.g. an address).
fn wait_for_log(broker: &ChildBroker, needle: &str) -> String {
    for _ in 0..500 {
        let log = broker.log_text();
        if let Some(rest) = log.split(needle).nth(1) {
            return rest.split_whitespace().next().unwrap_or("").to_owned();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the broker never logged {needle:?}:\n{}", broker.log_text());
}

/// Every (method, path) of the OpenAPI document, with the statuses it
/// documents and the required fields of its 200 body.
fn documented() -> Vec<(String, String, BTreeSet<u16>, Vec<String>)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proto/admin.openapi.yaml"
    ))
    .unwrap();
    let doc: Value = serde_yaml_ng::from_str(&text).unwrap();
    let resolve = |v: &Value| -> Value {
        let mut v = v.clone();
        while let Some(r) = v.get("$ref").and_then(Value::as_str) {
            let mut target = &doc;
            for part in r.trim_start_matches("#/").split('/') {
                target = &target[part];
            }
            v = target.clone();
        }
        v
    };
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let responses = op["responses"].as_object().unwrap();
            let statuses = responses.keys().map(|k| k.parse().unwrap()).collect();
            let ok = resolve(&responses["200"]);
            let schema = resolve(&ok["content"]["application/json"]["schema"]);
            let mut required: Vec<String> = Vec::new();
            let parts = match schema.get("allOf") {
                Some(all) => all.as_array().unwrap().iter().map(&resolve).collect(),
                None => vec![schema],
            };
            for part in parts {
                if let Some(r) = part["required"].as_array() {
                    required.extend(r.iter().map(|f| f.as_str().unwrap().to_owned()));
                }
            }
            out.push((method.to_uppercase(), path.clone(), statuses, required));
        }
    }
    out
}

#[test]
fn the_openapi_document_lists_exactly_the_served_routes() {
    let documented: BTreeSet<(String, String)> = documented()
        .into_iter()
        .map(|(m, p, _, _)| (m, p))
        .collect();
    let served: BTreeSet<(String, String)> = courier::admin::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not served"
    );
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served but not documented"
    );
}

#[tokio::test]
async fn every_documented_route_answers_as_documented() {
    let (broker, client) = with_dead_letter().await;
    let admin = broker.admin();
    let conn_id = admin.get("/admin/connections").await["connections"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bodies: HashMap<&str, Value> = [
        (
            "/admin/channels/{channel}/consumers/{consumer}/reset",
            json!({"seq": 0}),
        ),
        ("/admin/channels/{channel}/dlq/requeue", json!({"seq": 2})),
        ("/admin/channels/{channel}/dlq/purge", json!({"all": true})),
        ("/admin/connections/{id}/kick", json!({"code": 4008})),
    ]
    .into_iter()
    .collect();
    // Destructive routes last, so the others see the channel.
    let mut routes = documented();
    routes.sort_by_key(|(m, p, _, _)| {
        (
            m == "DELETE",
            p.ends_with("/purge") && !p.contains("dlq"),
            p.contains("kick"),
        )
    });
    for (method, path, statuses, required) in routes {
        let concrete = path
            .replace("{channel}", "jobs:a")
            .replace("{consumer}", "c%2Fw")
            .replace("{id}", &conn_id);
        let (status, body) = admin
            .call(&method, &concrete, bodies.get(path.as_str()).cloned())
            .await;
        assert!(
            statuses.contains(&status),
            "{method} {path}: {status} not documented: {body}"
        );
        assert_eq!(status, 200, "{method} {path}: {body}");
        for field in &required {
            assert!(
                body.get(field).is_some(),
                "{method} {path}: the documented field {field} is missing: {body}"
            );
        }
        // Errors are documented too: an unknown channel where one is named.
        if path.contains("{channel}") && statuses.contains(&404) {
            let missing = path
                .replace("{channel}", "missing:404")
                .replace("{consumer}", "c%2Fw")
                .replace("{id}", &conn_id);
            let (status, body) = admin
                .call(&method, &missing, bodies.get(path.as_str()).cloned())
                .await;
            assert_eq!(status, 404, "{method} {missing}: {body}");
            assert_eq!(body["code"], "not_found");
        }
    }
    drop(client);
}

#[tokio::test]
async fn channels_nobody_published_to_are_forgotten_when_idle() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(named("ghost:1", "x")).await;
    client.publish("real:1", b"1").await;
    client.subscribe(sub("ghost:2")).await;
    drop(client);
    let mut watcher = Client::connect(&broker.url(), Codec::Json).await;
    watcher.subscribe(sub("ghost:2")).await;
    let names = |body: Value| -> Vec<String> {
        body["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let admin = broker.admin();
    let mut left = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        broker
            .broker()
            .evict_unused_channels(Duration::from_millis(1))
            .await
            .unwrap();
        left = names(admin.get("/admin/channels").await);
        if !left.contains(&"ghost:1".to_owned()) {
            break;
        }
    }
    assert_eq!(
        left,
        ["ghost:2", "real:1"],
        "published-to and subscribed channels stay"
    );
    drop(watcher);
    let broker = broker.restart().await;
    assert!(
        !names(broker.admin().get("/admin/channels").await).contains(&"ghost:1".to_owned()),
        "forgotten in the store too"
    );
}
