//! The broker core over a real WebSocket: publish, subscribe, ack, resume,
//! restart, queue groups, dedup, retention, ephemeral namespaces.

mod common;

use std::time::Duration;

use common::*;
use courier::config::NamespacePolicy;
use courier::protocol::*;

/// Sends `count` publishes without waiting, then collects the pubacks.
async fn pipeline(client: &mut Client, channel: &str, count: u64) -> Vec<u64> {
    let first_id = 1_000_000;
    for i in 0..count {
        client
            .send(&ClientFrame::Publish(Publish {
                id: first_id + i,
                channel: channel.into(),
                data: Some(Payload(format!("{{\"n\":{i}}}").into_bytes().into())),
                ..Publish::default()
            }))
            .await;
    }
    let mut seqs = vec![0; usize::try_from(count).unwrap()];
    for _ in 0..count {
        let (id, seq) = client
            .wait_for(|f| match f {
                ServerFrame::Puback(p) => Some((p.id, p.seq)),
                ServerFrame::Error(e) => panic!("publish failed: {e:?}"),
                _ => None,
            })
            .await;
        seqs[usize::try_from(id - first_id).unwrap()] = seq;
    }
    seqs
}

#[tokio::test]
async fn ten_thousand_publishes_are_gapless_and_replay_in_order() {
    for codec in CODECS {
        let broker = TestBroker::start().await;
        let mut publisher = Client::connect(&broker.url(), codec).await;
        let seqs = pipeline(&mut publisher, "chat:big", 10_000).await;
        assert_eq!(
            seqs,
            (1..=10_000).collect::<Vec<_>>(),
            "{codec:?}: seqs 1..10000 in publish order"
        );

        let mut subscriber = Client::connect(&broker.url(), codec).await;
        let subscribed = subscriber
            .subscribe(Subscribe {
                from: Some(StartFrom::First),
                ack: Some(AckMode::Auto),
                ..sub("chat:big")
            })
            .await;
        assert_eq!(
            (
                subscribed.first_seq,
                subscribed.last_seq,
                subscribed.recovered
            ),
            (1, 10_000, true)
        );
        let got = subscriber.deliveries(10_000).await;
        for (i, (seq, data, attempt)) in got.iter().enumerate() {
            let n = u64::try_from(i).unwrap();
            assert_eq!(*seq, n + 1, "{codec:?}: in order");
            assert_eq!(
                data,
                format!("{{\"n\":{n}}}").as_bytes(),
                "{codec:?}: payload intact"
            );
            assert_eq!(*attempt, 1);
        }
    }
}

#[tokio::test]
async fn binary_and_json_payloads_cross_codecs_intact() {
    let broker = TestBroker::start().await;
    let mut json = Client::connect(&broker.url(), Codec::Json).await;
    let mut msgpack = Client::connect(&broker.url(), Codec::MsgPack).await;
    json.subscribe(sub("x:mixed")).await;
    msgpack.subscribe(sub("x:mixed")).await;
    let payloads: [&[u8]; 3] = [b"{\"a\":[1,2]}", &[0, 159, 146, 150, 255], b"plain text"];
    for payload in payloads {
        msgpack.publish("x:mixed", payload).await;
    }
    for client in [&mut json, &mut msgpack] {
        let got = client.deliveries(3).await;
        let data: Vec<&[u8]> = got.iter().map(|(_, d, _)| d.as_slice()).collect();
        assert_eq!(data, payloads.to_vec(), "{:?}", client.codec);
    }
}

#[tokio::test]
async fn unacked_half_comes_back_after_reconnect() {
    for codec in CODECS {
        let broker = TestBroker::start().await;
        let mut publisher = Client::connect(&broker.url(), codec).await;
        let mut reader = Client::connect(&broker.url(), codec).await;
        let consumer = Subscribe {
            consumer: Some("worker".into()),
            ..sub("jobs:a")
        };
        reader.subscribe(consumer.clone()).await;
        for i in 1..=20u8 {
            publisher.publish("jobs:a", &[i]).await;
        }
        let got = reader.deliveries(20).await;
        assert_eq!(
            got.iter().map(|d| d.0).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
        let even: Vec<u64> = (1..=20).filter(|s| s % 2 == 0).collect();
        reader.ack("jobs:a", even).await;
        reader.sync().await;
        drop(reader);

        let mut again = Client::connect(&broker.url(), codec).await;
        let subscribed = again.subscribe(consumer).await;
        assert!(subscribed.recovered);
        let back = again.deliveries(10).await;
        assert_eq!(
            back.iter().map(|d| d.0).collect::<Vec<_>>(),
            (1..=20).filter(|s| s % 2 == 1).collect::<Vec<_>>(),
            "{codec:?}: exactly the unacked half, in order"
        );
        assert!(back.iter().all(|d| d.2 == 2), "second attempt");
        again
            .ack("jobs:a", back.iter().map(|d| d.0).collect())
            .await;
        again.expect_no_delivery(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn restart_keeps_seqs_and_consumer_state() {
    let mut broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    let consumer = Subscribe {
        consumer: Some("keeper".into()),
        from: Some(StartFrom::First),
        ..sub("orders:eu")
    };
    client.subscribe(consumer.clone()).await;
    for i in 1..=5u8 {
        assert_eq!(client.publish("orders:eu", &[i]).await, u64::from(i));
    }
    let got = client.deliveries(5).await;
    client
        .ack("orders:eu", got.iter().take(3).map(|d| d.0).collect())
        .await;
    client.sync().await;
    let epoch = client.subscribe(sub("orders:other")).await.epoch;
    drop(client);

    broker = broker.restart().await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    assert_eq!(
        client.publish("orders:eu", b"after").await,
        6,
        "seqs continue"
    );
    let resumed = client
        .subscribe(Subscribe {
            from: None,
            ..consumer
        })
        .await;
    assert_eq!(
        (resumed.first_seq, resumed.last_seq, resumed.recovered),
        (1, 6, true)
    );
    let back = client.deliveries(3).await;
    assert_eq!(
        back.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![4, 5, 6],
        "acked 1..3 never return"
    );
    assert_eq!(
        client.subscribe(sub("orders:other")).await.epoch,
        epoch,
        "epoch survives a restart"
    );
    broker.stop().await;
}

#[tokio::test]
async fn queue_group_of_three_processes_each_message_once() {
    let broker = TestBroker::start().await;
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut member = Client::connect(&broker.url(), Codec::MsgPack).await;
        member
            .subscribe(Subscribe {
                group: Some("workers".into()),
                max_in_flight: Some(5),
                ..sub("tasks:q")
            })
            .await;
        members.push(member);
    }
    let mut publisher = Client::connect(&broker.url(), Codec::MsgPack).await;
    let seqs = pipeline(&mut publisher, "tasks:q", 300).await;
    assert_eq!(seqs.len(), 300);

    let mut seen = std::collections::BTreeMap::new();
    let mut per_member = [0usize; 3];
    while seen.len() < 300 {
        let mut progressed = false;
        for (i, member) in members.iter_mut().enumerate() {
            let got = tokio::time::timeout(Duration::from_millis(50), member.deliveries(1)).await;
            if let Ok(got) = got {
                for (seq, _, _) in got {
                    *seen.entry(seq).or_insert(0) += 1;
                    per_member[i] += 1;
                    member.ack("tasks:q", vec![seq]).await;
                    progressed = true;
                }
            }
        }
        assert!(
            progressed || seen.len() == 300,
            "the group stalled at {}",
            seen.len()
        );
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=300).collect::<Vec<_>>()
    );
    assert!(
        seen.values().all(|n| *n == 1),
        "each message delivered to exactly one member"
    );
    assert!(
        per_member.iter().all(|n| *n > 0),
        "work spread over the group: {per_member:?}"
    );
    for member in &mut members {
        member.expect_no_delivery(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn msg_id_makes_publish_idempotent_across_restart() {
    let mut broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    let first = client.publish_with("pay:x", b"1", Some("order-17")).await;
    let again = client.publish_with("pay:x", b"1", Some("order-17")).await;
    let other = client.publish_with("pay:x", b"2", Some("order-18")).await;
    assert_eq!((first, again, other), (1, 1, 2));
    drop(client);
    broker = broker.restart().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    assert_eq!(
        client.publish_with("pay:x", b"1", Some("order-17")).await,
        1,
        "remembered after restart"
    );
    let subscribed = client
        .subscribe(Subscribe {
            from: Some(StartFrom::First),
            ..sub("pay:x")
        })
        .await;
    assert_eq!(subscribed.last_seq, 2, "duplicates stored nothing");
}

#[tokio::test]
async fn retention_trims_and_resume_reports_recovered_false() {
    let broker = TestBroker::start_with(|c| {
        c.server.retention_interval = Duration::from_millis(50);
        c.namespaces.insert(
            "short".into(),
            NamespacePolicy {
                max_msgs: 5,
                ..NamespacePolicy::default()
            },
        );
    })
    .await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    let consumer = Subscribe {
        consumer: Some("late".into()),
        from: Some(StartFrom::First),
        ..sub("short:log")
    };
    client.subscribe(consumer.clone()).await;
    let mut unsub = ClientFrame::Unsubscribe(ChannelRequest {
        id: 5,
        channel: "short:log".into(),
    });
    client.send(&unsub).await;
    client
        .wait_for(|f| matches!(f, ServerFrame::Unsubscribed(_)).then_some(()))
        .await;
    for i in 1..=20u8 {
        client.publish("short:log", &[i]).await;
    }
    let first_seq = loop {
        let probe = client.subscribe(sub("short:log")).await;
        if let ClientFrame::Unsubscribe(r) = &mut unsub {
            r.id += 1;
        }
        client.send(&unsub).await;
        client
            .wait_for(|f| matches!(f, ServerFrame::Unsubscribed(_)).then_some(()))
            .await;
        if probe.first_seq == 16 {
            break probe.first_seq;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first_seq, 16);
    let resumed = client
        .subscribe(Subscribe {
            from: None,
            ..consumer
        })
        .await;
    assert!(!resumed.recovered, "the consumer never saw 1..15");
    let got = client.deliveries(5).await;
    assert_eq!(
        got.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![16, 17, 18, 19, 20]
    );

    let mut fresh = Client::connect(&broker.url(), Codec::Json).await;
    let since = fresh
        .subscribe(Subscribe {
            since: Some(3),
            ..sub("short:log")
        })
        .await;
    assert!(!since.recovered, "since 3 cannot be served");
    let ok = fresh
        .subscribe(Subscribe {
            since: Some(17),
            ..sub("short:other")
        })
        .await;
    assert!(
        !ok.recovered,
        "a since beyond the head means the channel was reset"
    );
}

#[tokio::test]
async fn live_subscriber_behind_retention_gets_a_gap() {
    let broker = TestBroker::start_with(|c| {
        c.server.retention_interval = Duration::from_millis(50);
        c.namespaces.insert(
            "tiny".into(),
            NamespacePolicy {
                max_msgs: 3,
                max_in_flight: 1,
                ..NamespacePolicy::default()
            },
        );
    })
    .await;
    let mut reader = Client::connect(&broker.url(), Codec::MsgPack).await;
    reader
        .subscribe(Subscribe {
            consumer: Some("slow".into()),
            ..sub("tiny:t")
        })
        .await;
    let mut publisher = Client::connect(&broker.url(), Codec::MsgPack).await;
    for i in 1..=10u8 {
        publisher.publish("tiny:t", &[i]).await;
    }
    let first = reader.deliveries(1).await;
    assert_eq!(first[0].0, 1);
    // Wait until retention has dropped seqs 1..=7, then ack to open the window.
    loop {
        let probe = publisher.subscribe(sub("tiny:t")).await;
        publisher
            .send(&ClientFrame::Unsubscribe(ChannelRequest {
                id: 9,
                channel: "tiny:t".into(),
            }))
            .await;
        publisher
            .wait_for(|f| matches!(f, ServerFrame::Unsubscribed(_)).then_some(()))
            .await;
        if probe.first_seq == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.ack("tiny:t", vec![1]).await;
    let gap = reader
        .wait_for(|f| match f {
            ServerFrame::Gap(g) => Some(g.clone()),
            _ => None,
        })
        .await;
    assert_eq!((gap.from, gap.to), (2, 7), "holes are announced");
    let next = reader.deliveries(1).await;
    assert_eq!(next[0].0, 8);
}

#[tokio::test]
async fn ephemeral_namespace_stores_nothing() {
    let mut broker = TestBroker::start_with(|c| {
        c.namespaces.insert(
            "typing".into(),
            NamespacePolicy {
                durable: false,
                ..NamespacePolicy::default()
            },
        );
    })
    .await;
    let mut watcher = Client::connect(&broker.url(), Codec::Json).await;
    watcher.subscribe(sub("typing:room1")).await;
    let mut typist = Client::connect(&broker.url(), Codec::Json).await;
    assert_eq!(typist.publish("typing:room1", b"\"alice\"").await, 1);
    let got = watcher.deliveries(1).await;
    assert_eq!(got[0].1, b"\"alice\"");
    let first_epoch = watcher.subscribe(sub("typing:room2")).await.epoch;
    typist.publish("typing:room2", b"1").await;
    drop((watcher, typist));

    broker = broker.restart().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    let after = client
        .subscribe(Subscribe {
            from: Some(StartFrom::First),
            ..sub("typing:room2")
        })
        .await;
    assert_eq!(
        (after.first_seq, after.last_seq),
        (1, 0),
        "nothing survived the restart"
    );
    assert_ne!(
        after.epoch, first_epoch,
        "a new epoch tells clients the channel was reset"
    );
    client.expect_no_delivery(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn two_subscriptions_of_one_user_consumer_both_see_everything() {
    let broker = TestBroker::start().await;
    let mut tab1 = Client::connect(&broker.url(), Codec::Json).await;
    let mut tab2 = Client::connect(&broker.url(), Codec::Json).await;
    for tab in [&mut tab1, &mut tab2] {
        tab.subscribe(Subscribe {
            consumer: Some("alice".into()),
            ..sub("chat:room")
        })
        .await;
    }
    let mut publisher = Client::connect(&broker.url(), Codec::Json).await;
    for i in 1..=3u8 {
        publisher.publish("chat:room", &[b'0' + i]).await;
    }
    assert_eq!(tab1.deliveries(3).await.len(), 3);
    let got2 = tab2.deliveries(3).await;
    assert_eq!(got2.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 2, 3]);
}

#[tokio::test]
async fn window_of_one_delivers_in_strict_order_with_nack() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client
        .subscribe(Subscribe {
            consumer: Some("strict".into()),
            max_in_flight: Some(1),
            ..sub("seq:s")
        })
        .await;
    for i in 1..=3u8 {
        client.publish("seq:s", &[i]).await;
    }
    let first = client.deliveries(1).await;
    assert_eq!(first[0].0, 1);
    client.expect_no_delivery(Duration::from_millis(200)).await;
    client
        .send(&ClientFrame::Nack(Nack {
            id: None,
            channel: "seq:s".into(),
            seq: 1,
            delay_ms: None,
        }))
        .await;
    let again = client.deliveries(1).await;
    assert_eq!(
        (again[0].0, again[0].2),
        (1, 2),
        "the nacked seq comes back before seq 2"
    );
    client.ack("seq:s", vec![1]).await;
    assert_eq!(client.deliveries(1).await[0].0, 2);
}

#[tokio::test]
async fn batch_clients_receive_msgs_frames() {
    let broker = TestBroker::start().await;
    let mut publisher = Client::connect(&broker.url(), Codec::MsgPack).await;
    pipeline(&mut publisher, "feed:b", 50).await;
    let (mut reader, _) = Client::connect_with(
        &broker.url(),
        Codec::MsgPack,
        Connect {
            batch: Some(true),
            ..Connect::default()
        },
    )
    .await;
    reader
        .subscribe(Subscribe {
            from: Some(StartFrom::First),
            ..sub("feed:b")
        })
        .await;
    let frame = reader.recv().await;
    let ServerFrame::Msgs(batch) = frame else {
        panic!("expected a msgs batch, got {frame:?}");
    };
    assert!(batch.items.len() > 1);
    assert_eq!(batch.items[0].seq, 1);
}

#[tokio::test]
async fn ack_upto_acks_everything_delivered_up_to_n() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    let consumer = Subscribe {
        consumer: Some("bulk".into()),
        ..sub("bulk:x")
    };
    client.subscribe(consumer.clone()).await;
    for i in 1..=6u8 {
        client.publish("bulk:x", &[b'0' + i]).await;
    }
    client.deliveries(6).await;
    client
        .send(&ClientFrame::Ack(Ack {
            id: Some(3),
            channel: "bulk:x".into(),
            seqs: None,
            upto: Some(4),
        }))
        .await;
    client
        .send(&ClientFrame::Unsubscribe(ChannelRequest {
            id: 4,
            channel: "bulk:x".into(),
        }))
        .await;
    client
        .wait_for(|f| matches!(f, ServerFrame::Unsubscribed(_)).then_some(()))
        .await;
    client.subscribe(consumer).await;
    let back = client.deliveries(2).await;
    assert_eq!(back.iter().map(|d| d.0).collect::<Vec<_>>(), vec![5, 6]);
}
