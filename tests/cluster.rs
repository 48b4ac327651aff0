//! Cluster mode: several `courier serve` processes sharing one real
//! `redis-server` (started by the test on a free loopback port). Messages
//! published on one node reach subscribers on the others in order; SDK
//! clients of a node killed with SIGKILL resume on another with nothing
//! lost; a Redis restart makes the nodes unavailable, then they recover on
//! their own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use common::cluster::{ADMIN_TOKEN, from_first, node_config, start_nodes};
use common::sdk::{consume, fast_reconnect, pubacked, publish_concurrently, read_stored, seen_all};
use common::{ChildBroker, Client, RedisServer, WAIT, http, sub};
use courier::protocol::{Codec, ErrorCode, Subscribe};

#[tokio::test]
async fn a_publish_on_one_node_reaches_subscribers_on_the_others_in_order() {
    const COUNT: u64 = 300;
    const CHANNEL: &str = "room:cluster";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &node_config(&redis, ""), 3).await;

    let mut on_2 = Client::connect(&nodes[1].url(), Codec::MsgPack).await;
    let mut on_3 = Client::connect(&nodes[2].url(), Codec::Json).await;
    on_2.subscribe(from_first(CHANNEL, "two")).await;
    on_3.subscribe(from_first(CHANNEL, "three")).await;
    let mut publisher = Client::connect(&nodes[0].url(), Codec::MsgPack).await;
    for i in 1..=COUNT {
        let seq = publisher
            .publish(CHANNEL, format!("message {i}").as_bytes())
            .await;
        assert_eq!(seq, i, "seqs are gapless across the cluster");
    }
    for (who, client) in [("node 2", &mut on_2), ("node 3", &mut on_3)] {
        let got = client.deliveries(usize::try_from(COUNT).unwrap()).await;
        let seqs: Vec<u64> = got.iter().map(|(seq, _, _)| *seq).collect();
        assert_eq!(seqs, (1..=COUNT).collect::<Vec<_>>(), "{who}: in order");
        for (seq, data, _) in &got {
            assert_eq!(data, format!("message {seq}").as_bytes(), "{who}");
        }
    }
    on_3.ack(CHANNEL, (1..=COUNT).collect()).await;
    on_3.sync().await;

    // Node 1's admin API sees the acks made on node 3, and node 2's
    // consumer, which acked nothing, at its full lag.
    let admin = nodes[0].admin(ADMIN_TOKEN);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let detail = admin.get(&format!("/admin/channels/{CHANNEL}")).await;
        let consumer = |name: &str| {
            detail["consumers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .cloned()
        };
        let (three, two) = (consumer("c/three"), consumer("c/two"));
        if let (Some(three), Some(two)) = (&three, &two)
            && three["floor"] == COUNT
        {
            assert_eq!(three["lag"], 0, "{detail}");
            assert_eq!(two["floor"], 0, "{detail}");
            assert_eq!(detail["last_seq"], COUNT, "{detail}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 1 never saw node 3's acks: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sdk_clients_of_a_killed_node_resume_on_another_and_lose_nothing() {
    const COUNT: usize = 2000;
    const CHANNEL: &str = "orders:cluster";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(dir.path(), &node_config(&redis, ""), 3).await;
    let urls: Vec<String> = nodes.iter().map(ChildBroker::url).collect();
    let connect = |name: &str| {
        courier::client::Client::builder(urls[0].clone())
            .fallback(urls[1].clone())
            .fallback(urls[2].clone())
            .name(name)
            .request_timeout(Duration::from_secs(30))
            .reconnect(fast_reconnect())
            .connect()
    };
    let publisher = connect("publisher").await.unwrap();
    let reader = connect("reader").await.unwrap();
    let subscription = reader
        .subscribe(CHANNEL)
        .consumer("reader")
        .from_first()
        .max_in_flight(100)
        .await
        .unwrap();
    let mut seen = consume(subscription);
    // A reader on a node that survives sees the killed node's publishes too.
    let remote = courier::client::Client::connect(urls[2].clone())
        .await
        .unwrap();
    let subscription = remote
        .subscribe(CHANNEL)
        .consumer("remote")
        .from_first()
        .await
        .unwrap();
    let mut remote_seen = consume(subscription);

    let (publishing, mut acked_so_far) = publish_concurrently(&publisher, CHANNEL, "order", COUNT);
    tokio::time::timeout(WAIT, acked_so_far.wait_for(|n| *n >= COUNT / 3))
        .await
        .expect("a third pubacked in time")
        .unwrap();
    nodes.remove(0).kill9();

    let pubacked = pubacked(publishing).await;
    assert_eq!(pubacked.len(), COUNT);
    seen_all(&mut seen, &pubacked, "reader").await;
    seen_all(&mut remote_seen, &pubacked, "reader on node 3").await;

    // Stored exactly once each: a fresh consumer on the last node reads all.
    let auditor = courier::client::Client::connect(urls[2].clone())
        .await
        .unwrap();
    let (last, stored) = read_stored(&auditor, CHANNEL).await;
    assert_eq!(last, u64::try_from(COUNT).unwrap());
    let unique: BTreeSet<&Bytes> = stored.values().collect();
    assert_eq!(unique.len(), COUNT, "a payload was stored twice");
    assert_eq!(stored, pubacked, "every puback names the stored message");
    for client in [publisher, reader, remote, auditor] {
        client.close().await;
    }
}

#[tokio::test]
async fn a_redis_restart_makes_nodes_unavailable_then_they_recover_with_nothing_lost() {
    const CHANNEL: &str = "jobs:restart";
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &node_config(&redis, ""), 2).await;
    let mut publisher = Client::connect(&nodes[0].url(), Codec::Json).await;
    let mut reader = Client::connect(&nodes[1].url(), Codec::MsgPack).await;
    reader.subscribe(from_first(CHANNEL, "reader")).await;
    for i in 1..=50u64 {
        assert_eq!(publisher.publish(CHANNEL, b"before").await, i);
    }
    let got = reader.deliveries(50).await;
    reader
        .ack(CHANNEL, got.iter().map(|(seq, _, _)| *seq).collect())
        .await;

    redis.kill9();
    // A publish now is refused as unavailable, and readiness fails.
    publisher
        .send(&courier::protocol::ClientFrame::Publish(
            courier::protocol::Publish {
                id: 999,
                channel: CHANNEL.into(),
                data: Some(courier::protocol::Payload(Bytes::from_static(b"lost"))),
                ..Default::default()
            },
        ))
        .await;
    let refused = publisher.error().await;
    assert_eq!(refused.code, ErrorCode::Unavailable, "{refused:?}");
    assert_eq!(refused.id, Some(999));
    for node in &nodes {
        let ready = http::get(node.addr, "/readyz").await;
        assert_eq!(ready.status, 503, "readyz with Redis down");
        assert_eq!(ready.json()["code"], "unavailable");
    }

    redis.start_again();
    for node in &nodes {
        node.wait_ready().await;
    }
    // The same connections work again; the AOF kept every pubacked message.
    for i in 51..=80u64 {
        assert_eq!(publisher.publish(CHANNEL, b"after").await, i);
    }
    let got = reader.deliveries(30).await;
    let seqs: Vec<u64> = got.iter().map(|(seq, _, _)| *seq).collect();
    assert_eq!(seqs, (51..=80).collect::<Vec<_>>());
    let mut audit = Client::connect(&nodes[1].url(), Codec::Json).await;
    audit.subscribe(from_first(CHANNEL, "audit")).await;
    let all = audit.deliveries(80).await;
    let payloads: Vec<&[u8]> = all.iter().map(|(_, data, _)| data.as_slice()).collect();
    assert_eq!(all.len(), 80);
    assert!(payloads[..50].iter().all(|d| *d == b"before"));
    assert!(payloads[50..].iter().all(|d| *d == b"after"));
}

#[test]
fn a_node_that_cannot_reach_redis_at_start_says_so_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    // A port that stays ours and is no Redis: it hangs up on every
    // connection. (A port freed again could be taken by another test's
    // Redis, and the node would start and never exit.)
    let not_redis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = not_redis.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in not_redis.incoming() {
            drop(stream);
        }
    });
    let config = dir.path().join("courier.toml");
    std::fs::write(
        &config,
        format!("[storage]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}/\"\n"),
    )
    .unwrap();
    let mut output = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while output.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = output.kill();
            panic!("the node did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = output.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

/// One member of a queue group: acks what it gets (nacking its first
/// delivery when `nack_first`), until the group has acked `total`.
async fn group_member(
    mut client: Client,
    channel: &'static str,
    total: usize,
    acked: std::sync::Arc<std::sync::Mutex<Vec<(usize, u64)>>>,
    me: usize,
    nack_first: bool,
) -> usize {
    let mut nacked = !nack_first;
    let mut received = 0;
    loop {
        if acked.lock().unwrap().len() >= total {
            return received;
        }
        let frame = tokio::time::timeout(Duration::from_millis(200), client.recv()).await;
        let seqs: Vec<u64> = match frame {
            Ok(courier::protocol::ServerFrame::Msg(m)) => vec![m.seq],
            Ok(courier::protocol::ServerFrame::Msgs(m)) => m.items.iter().map(|i| i.seq).collect(),
            Ok(_) | Err(_) => continue,
        };
        received += seqs.len();
        let mut to_ack = Vec::new();
        for seq in seqs {
            if nacked {
                to_ack.push(seq);
            } else {
                nacked = true;
                client
                    .send(&courier::protocol::ClientFrame::Nack(
                        courier::protocol::Nack {
                            id: None,
                            channel: channel.into(),
                            seq,
                            delay_ms: Some(0),
                        },
                    ))
                    .await;
            }
        }
        if !to_ack.is_empty() {
            acked
                .lock()
                .unwrap()
                .extend(to_ack.iter().map(|seq| (me, *seq)));
            client.ack(channel, to_ack).await;
        }
    }
}

#[tokio::test]
async fn a_queue_group_spread_over_three_nodes_acks_each_message_once() {
    const COUNT: usize = 300;
    const CHANNEL: &str = "work:cluster";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &node_config(&redis, ""), 3).await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut members = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut client = Client::connect(&node.url(), Codec::MsgPack).await;
        client
            .subscribe(Subscribe {
                group: Some("workers".into()),
                max_in_flight: Some(4),
                ..sub(CHANNEL)
            })
            .await;
        // The member on node 3 nacks its first delivery: it must come back
        // (to any member) and be acked once all the same.
        members.push(tokio::spawn(group_member(
            client,
            CHANNEL,
            COUNT,
            std::sync::Arc::clone(&acked),
            i,
            i == 2,
        )));
    }
    let mut publisher = Client::connect(&nodes[0].url(), Codec::MsgPack).await;
    for i in 1..=COUNT {
        publisher
            .publish(CHANNEL, format!("job {i}").as_bytes())
            .await;
    }
    let mut received = Vec::new();
    for member in members {
        let got = tokio::time::timeout(Duration::from_secs(60), member)
            .await
            .expect("the group acks everything in time")
            .unwrap();
        received.push(got);
    }
    let acked = acked.lock().unwrap().clone();
    let mut by_seq: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (member, seq) in &acked {
        by_seq.entry(*seq).or_default().push(*member);
    }
    let twice: Vec<_> = by_seq.iter().filter(|(_, m)| m.len() > 1).collect();
    assert!(twice.is_empty(), "acked more than once: {twice:?}");
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=u64::try_from(COUNT).unwrap()).collect::<Vec<_>>()
    );
    for (member, got) in received.iter().enumerate() {
        assert!(
            *got > 0,
            "member on node {} got nothing: {received:?}",
            member + 1
        );
    }
}

#[tokio::test]
async fn when_the_node_serving_a_consumer_dies_its_remote_members_move_on() {
    remote_members_move_on("feed:killed", |node| {
        node.kill9();
        None
    })
    .await;
}

#[tokio::test]
async fn when_the_node_serving_a_consumer_stops_its_remote_members_move_on() {
    // SIGTERM: the node hands its consumers back before it goes (kept
    // until the end of the test, so that dropping it does not kill it).
    remote_members_move_on("feed:stopped", |node| {
        node.sigterm();
        Some(node)
    })
    .await;
}

/// An SDK client on node 2 reads a consumer served by node 1 while node 3
/// publishes; `stop` ends node 1 a third of the way through (returning it
/// when it must be kept until the end).
async fn remote_members_move_on(
    channel: &'static str,
    stop: impl FnOnce(ChildBroker) -> Option<ChildBroker>,
) {
    const COUNT: usize = 600;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(dir.path(), &node_config(&redis, ""), 3).await;
    let urls: Vec<String> = nodes.iter().map(ChildBroker::url).collect();
    // Node 1 serves consumer "shared" (its first subscriber is there)…
    let mut first = Client::connect(&urls[0], Codec::MsgPack).await;
    first.subscribe(from_first(channel, "shared")).await;
    // …and an SDK client on node 2 reads it through node 1.
    let reader = courier::client::Client::builder(urls[1].clone())
        .fallback(urls[2].clone())
        .reconnect(fast_reconnect())
        .request_timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap();
    let subscription = reader
        .subscribe(channel)
        .consumer("shared")
        .from_first()
        .await
        .unwrap();
    let mut seen = consume(subscription);
    let publisher = courier::client::Client::connect(urls[2].clone())
        .await
        .unwrap();
    let mut pubacked = BTreeMap::new();
    let mut stop = Some(stop);
    let mut stopped = None;
    for i in 0..COUNT {
        if i == COUNT / 3
            && let Some(stop) = stop.take()
        {
            stopped = stop(nodes.remove(0));
        }
        let data = Bytes::from(format!("item {i:04}"));
        let seq = publisher.publish(channel, data.clone()).await.unwrap();
        pubacked.insert(seq, data);
    }
    seen_all(&mut seen, &pubacked, "remote member").await;
    drop((first, stopped));
    for client in [reader, publisher] {
        client.close().await;
    }
}

#[tokio::test]
async fn an_operator_changes_a_consumer_through_the_node_that_serves_it() {
    const CHANNEL: &str = "ops:reset";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &node_config(&redis, ""), 2).await;
    let mut reader = Client::connect(&nodes[0].url(), Codec::MsgPack).await;
    reader.subscribe(from_first(CHANNEL, "r")).await;
    let mut publisher = Client::connect(&nodes[1].url(), Codec::MsgPack).await;
    for _ in 0..5 {
        publisher.publish(CHANNEL, b"x").await;
    }
    reader.deliveries(5).await;
    let path = format!("/admin/channels/{CHANNEL}/consumers/c%2Fr/reset");
    let node_1 = nodes[0].admin(ADMIN_TOKEN).get("/admin/info").await["node"]
        .as_str()
        .unwrap()
        .to_owned();
    // The consumer is saved to Redis within a persist period (100 ms).
    let deadline = tokio::time::Instant::now() + WAIT;
    let (status, body) = loop {
        let (status, body) = nodes[1]
            .admin(ADMIN_TOKEN)
            .call("POST", &path, Some(serde_json::json!({"seq": 3})))
            .await;
        if status != 404 || tokio::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(&node_1),
        "{body}"
    );
    let (status, body) = nodes[0]
        .admin(ADMIN_TOKEN)
        .call("POST", &path, Some(serde_json::json!({"seq": 3})))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["floor"], 3, "{body}");
}

#[tokio::test]
async fn a_cluster_node_without_an_admin_token_makes_one_in_a_fresh_data_dir() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[storage]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
        redis.url()
    );
    // `data/` does not exist yet: on Redis nothing else would create it.
    let node = ChildBroker::start(dir.path(), &config);
    let token = std::fs::read_to_string(dir.path().join("data").join("admin.token"))
        .expect("the generated token is stored");
    let info = node.admin(token.trim()).get("/admin/info").await;
    assert_eq!(info["nodes"].as_array().unwrap().len(), 1, "{info}");
}

#[tokio::test]
async fn ephemeral_messages_reach_subscribers_on_every_node_once() {
    const CHANNEL: &str = "live:cursor";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(&redis, "[namespaces.live]\ndurable = false\n");
    let nodes = start_nodes(dir.path(), &config, 2).await;
    let mut here = Client::connect(&nodes[0].url(), Codec::Json).await;
    let mut there = Client::connect(&nodes[1].url(), Codec::MsgPack).await;
    here.subscribe(sub(CHANNEL)).await;
    there.subscribe(sub(CHANNEL)).await;
    let mut publisher = Client::connect(&nodes[0].url(), Codec::Json).await;
    for i in 0..20 {
        publisher
            .publish(CHANNEL, format!("x={i}").as_bytes())
            .await;
    }
    for (who, client) in [("same node", &mut here), ("other node", &mut there)] {
        let got = client.deliveries(20).await;
        let payloads: Vec<String> = got
            .iter()
            .map(|(_, data, _)| String::from_utf8(data.clone()).unwrap())
            .collect();
        let expected: Vec<String> = (0..20).map(|i| format!("x={i}")).collect();
        assert_eq!(payloads, expected, "{who}");
        client.expect_no_delivery(Duration::from_millis(300)).await;
    }
}
