//! The Rust SDK (`courier::client`) against a real broker over real sockets:
//! round trips in both codecs, kill -9 and restart on the same port while
//! publishing and consuming, the publish buffer, request timeouts, and the
//! reconnect policy after 4001 (against a small fake server).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::sdk::{consume, fast_reconnect, pubacked, publish_concurrently, read_stored, seen_all};
use common::{CODECS, ChildBroker, TestBroker, WAIT};
use courier::client::{
    Backoff, Client, Delivery, ErrorCode, Event, PublishErrorKind, PublishOptions,
    RequestErrorKind, SubscribeErrorKind, Subscription,
};
use courier::protocol::{
    ClientFrame, Codec, Connected, Limits, PubAck, Publish, ServerFrame, close, decode_client,
    encode_server,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The next delivery, under the test timeout.
async fn next(subscription: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a delivery in time")
        .expect("the subscription is open")
}

/// Waits for the first event `pick` accepts.
async fn wait_event(
    events: &mut broadcast::Receiver<Event>,
    mut pick: impl FnMut(&Event) -> bool,
) -> Event {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(event) if pick(&event) => return event,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
            }
        }
    })
    .await
    .expect("the event in time")
}

#[tokio::test]
async fn publish_subscribe_ack_round_trip_in_both_codecs() {
    let broker = TestBroker::start().await;
    for codec in CODECS {
        let channel = format!("sdk:round-trip-{}", codec.subprotocol());
        let client = Client::builder(broker.url())
            .codec(codec)
            .name("sdk-test")
            .connect()
            .await
            .expect("connects");
        let mut subscription = client
            .subscribe(&channel)
            .consumer("reader")
            .await
            .expect("subscribes");
        assert_eq!(subscription.last_seq(), 0);
        assert!(subscription.recovered());
        assert!(!subscription.epoch().is_empty());

        let json = Bytes::from_static(br#"{"text":"hi"}"#);
        let binary = Bytes::from_static(&[0, 0xff, 0xfe, 0x80]);
        let headers = BTreeMap::from([("x-trace".to_owned(), "7f3a".to_owned())]);
        let seq1 = client.publish(&channel, json.clone()).await.unwrap();
        let seq2 = client.publish(&channel, binary.clone()).await.unwrap();
        let options = PublishOptions {
            headers: Some(headers.clone()),
            msg_id: Some("m-1".into()),
        };
        let seq3 = client
            .publish_with(&channel, "third", options.clone())
            .await
            .unwrap();
        assert_eq!((seq1, seq2, seq3), (1, 2, 3));
        // The same msg_id again: the original seq, nothing stored.
        let again = client.publish_with(&channel, "third", options).await;
        assert_eq!(again, Ok(3));

        let first = next(&mut subscription).await;
        assert_eq!((first.seq, &first.data, first.attempt), (1, &json, 1));
        assert_eq!(first.channel, channel);
        assert!(first.headers.is_empty());
        assert!(first.ts > 0);
        first.ack().await.unwrap();
        let second = next(&mut subscription).await;
        assert_eq!((second.seq, &second.data), (2, &binary));
        second.progress().await.unwrap();
        second.nack(Some(Duration::from_millis(20))).await.unwrap();
        let third = next(&mut subscription).await;
        assert_eq!(
            (third.seq, &third.data[..], &third.headers),
            (3, &b"third"[..], &headers)
        );
        third.term(Some("not wanted".into())).await.unwrap();
        let retried = next(&mut subscription).await;
        assert_eq!((retried.seq, retried.attempt), (2, 2), "the nacked one");
        retried.ack().await.unwrap();
        assert!(client.ping().await.is_ok());

        // Everything was acked or termed: the consumer resumes with nothing
        // pending, so the next delivery is the next message.
        subscription.unsubscribe().await.unwrap();
        let mut again = client.subscribe(&channel).consumer("reader").await.unwrap();
        assert_eq!(again.last_seq(), 3);
        let seq4 = client.publish(&channel, "fourth").await.unwrap();
        let fourth = next(&mut again).await;
        assert_eq!((fourth.seq, fourth.attempt), (seq4, 1));
        again.ack_upto(seq4).await.unwrap();

        // One subscription per channel per client; names are checked locally.
        let twice = client.subscribe(&channel).await.unwrap_err();
        assert!(matches!(
            twice.kind,
            SubscribeErrorKind::Rejected {
                code: ErrorCode::Conflict,
                ..
            }
        ));
        let bad = client.publish("no spaces", "x").await.unwrap_err();
        assert!(matches!(
            bad.kind,
            PublishErrorKind::Rejected {
                code: ErrorCode::BadRequest,
                ..
            }
        ));

        client.close().await;
        assert!(client.is_closed());
        assert_eq!(
            client.publish(&channel, "late").await.unwrap_err().kind,
            PublishErrorKind::Closed
        );
        assert!(again.next().await.is_none(), "the stream ends on close");
    }
}

const BATCH: &str = "[server]\nfsync = \"batch\"\n";

#[tokio::test]
async fn kill_9_and_restart_on_the_same_port_loses_and_duplicates_nothing() {
    const COUNT: usize = 3000;
    const CHANNEL: &str = "crash:sdk";
    let dir = tempfile::tempdir().unwrap();
    let broker = ChildBroker::start(dir.path(), BATCH);
    let addr = broker.addr;
    let url = broker.url();
    let connect = |name: &str| {
        Client::builder(url.clone())
            .name(name)
            .request_timeout(Duration::from_secs(30))
            .reconnect(fast_reconnect())
            .connect()
    };
    let publisher = connect("publisher").await.unwrap();
    let durable = connect("durable").await.unwrap();
    let anonymous = connect("anonymous").await.unwrap();
    let publisher_events = record(&publisher);
    let durable_events = record(&durable);
    let anonymous_events = record(&anonymous);
    let subscription = durable
        .subscribe(CHANNEL)
        .consumer("durable-1")
        .from_first()
        .max_in_flight(100)
        .await
        .unwrap();
    let mut durable_seen = consume(subscription);
    let subscription = anonymous.subscribe(CHANNEL).await.unwrap();
    let mut anonymous_seen = consume(subscription);

    let (publishing, mut acked_so_far) =
        publish_concurrently(&publisher, CHANNEL, "message", COUNT);

    tokio::time::timeout(WAIT, acked_so_far.wait_for(|n| *n >= COUNT / 3))
        .await
        .expect("a third pubacked in time")
        .unwrap();
    broker.kill9();
    let _broker = ChildBroker::start_on(dir.path(), BATCH, &addr.to_string());

    let pubacked = pubacked(publishing).await;
    assert_eq!(pubacked.len(), COUNT);

    seen_all(&mut durable_seen, &pubacked, "durable consumer").await;
    seen_all(&mut anonymous_seen, &pubacked, "anonymous subscription").await;

    // Every payload is stored exactly once: read it all with a fresh consumer.
    let auditor = connect("auditor").await.unwrap();
    let (_, payloads) = read_stored(&auditor, CHANNEL).await;
    let unique: BTreeSet<&Bytes> = payloads.values().collect();
    assert_eq!(unique.len(), payloads.len(), "a payload was stored twice");
    assert_eq!(payloads.len(), COUNT, "stored exactly what was published");
    assert_eq!(payloads, pubacked, "every puback names the stored message");
    for client in [publisher, durable, anonymous, auditor] {
        client.close().await;
    }

    // Each client saw the drop and the reconnect; subscribers saw their
    // resubscribe; nobody saw an error (acks of deliveries the crashed
    // server forgot are not errors the application can act on).
    let resumed = Event::Resumed {
        channel: CHANNEL.into(),
        recovered: true,
        epoch_changed: false,
    };
    for (who, events, subscribes) in [
        ("publisher", publisher_events, false),
        ("durable", durable_events, true),
        ("anonymous", anonymous_events, true),
    ] {
        let events = events.await.unwrap();
        let has = |pick: fn(&Event) -> bool| events.iter().any(pick);
        assert!(
            has(|e| matches!(e, Event::Disconnected { .. })),
            "{who}: {events:?}"
        );
        assert!(
            has(|e| matches!(e, Event::Reconnecting { .. })),
            "{who}: {events:?}"
        );
        assert!(
            has(|e| matches!(e, Event::Connected { .. })),
            "{who}: {events:?}"
        );
        assert!(
            !has(|e| matches!(e, Event::ServerError { .. })),
            "{who}: {events:?}"
        );
        assert_eq!(events.contains(&resumed), subscribes, "{who}: {events:?}");
    }
}

/// Every event of `client` until it closes.
fn record(client: &Client) -> tokio::task::JoinHandle<Vec<Event>> {
    let mut events = client.events();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            match events.recv().await {
                Ok(Event::Closed) | Err(broadcast::error::RecvError::Closed) => return seen,
                Ok(event) => seen.push(event),
                Err(broadcast::error::RecvError::Lagged(n)) => panic!("lost {n} events"),
            }
        }
    })
}

#[tokio::test]
async fn a_full_publish_buffer_fails_the_publish_instead_of_dropping_it() {
    let mut broker = TestBroker::start().await;
    let client = Client::builder(broker.url())
        .publish_buffer(2)
        .request_timeout(Duration::from_millis(800))
        .reconnect(fast_reconnect())
        .connect()
        .await
        .unwrap();
    let mut events = client.events();
    broker.stop().await;
    let dropped = wait_event(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(
            dropped,
            Event::Disconnected {
                code: Some(close::RESTARTING),
                ..
            }
        ),
        "{dropped:?}"
    );
    let (first, second, third) = tokio::join!(
        client.publish("buffer:test", "1"),
        client.publish("buffer:test", "2"),
        client.publish("buffer:test", "3"),
    );
    assert_eq!(third.unwrap_err().kind, PublishErrorKind::BufferFull);
    // The two buffered ones waited for a connection that never came back.
    assert_eq!(first.unwrap_err().kind, PublishErrorKind::TimedOut);
    assert_eq!(second.unwrap_err().kind, PublishErrorKind::TimedOut);
    client.close().await;
}

#[tokio::test]
async fn the_client_closes_itself_after_max_reconnects() {
    let mut broker = TestBroker::start().await;
    let client = Client::builder(broker.url())
        .reconnect(fast_reconnect())
        .max_reconnects(Some(2))
        .connect()
        .await
        .unwrap();
    let events = record(&client);
    broker.stop().await;
    let events = tokio::time::timeout(WAIT, events).await.unwrap().unwrap();
    let attempts: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2], "{events:?}");
    assert!(client.is_closed());
    let error = client.publish("gone:x", "late").await.unwrap_err();
    assert_eq!(error.kind, PublishErrorKind::Closed);
}

#[tokio::test]
async fn unacked_publishes_are_sent_again_in_order_with_the_same_msg_ids() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut nth = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let mut ws = accept(stream).await;
            let connect = read_frame(&mut ws).await.expect("connect");
            let connect = decode_client(Codec::MsgPack, &connect.into_data()).unwrap();
            let mut publishes = Vec::new();
            ws.send(connected_frame(25_000)).await.unwrap();
            while publishes.len() < 3 {
                let frame = read_frame(&mut ws).await.expect("a publish");
                if let ClientFrame::Publish(publish) =
                    decode_client(Codec::MsgPack, &frame.into_data()).unwrap()
                {
                    publishes.push(publish);
                }
            }
            seen_tx.send((connect, publishes.clone())).await.unwrap();
            if nth == 0 {
                // Drop the connection without a single puback.
                let frame = CloseFrame {
                    code: CloseCode::from(close::RESTARTING),
                    reason: "restarting".into(),
                };
                let _ = ws.close(Some(frame)).await;
            } else {
                for (seq, publish) in (1..).zip(&publishes) {
                    let puback = ServerFrame::Puback(PubAck {
                        id: publish.id,
                        channel: publish.channel.clone(),
                        seq,
                    });
                    let bytes = encode_server(Codec::MsgPack, &puback).unwrap();
                    ws.send(Message::Binary(bytes.into())).await.unwrap();
                }
            }
            tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
            nth += 1;
        }
    });
    let client = Client::builder(url)
        .token("tok_alice")
        .name("sdk-test/1")
        .reconnect(fast_reconnect())
        .connect()
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(
        client.publish("resend:x", "a"),
        client.publish("resend:x", "b"),
        client.publish("resend:x", "c"),
    );
    assert_eq!((a, b, c), (Ok(1), Ok(2), Ok(3)));
    let (connect, first) = seen.recv().await.unwrap();
    let (reconnect, again) = seen.recv().await.unwrap();
    for connect in [connect, reconnect] {
        let ClientFrame::Connect(connect) = connect else {
            panic!("the first frame is not connect: {connect:?}");
        };
        assert_eq!(connect.token.as_deref(), Some("tok_alice"));
        assert_eq!(connect.client.as_deref(), Some("sdk-test/1"));
    }
    let summary = |publishes: &[Publish]| -> Vec<(Option<String>, Bytes)> {
        publishes
            .iter()
            .map(|p| (p.msg_id.clone(), p.payload().unwrap()))
            .collect()
    };
    assert_eq!(summary(&first), summary(&again), "same order, same msg_ids");
    let payloads: Vec<Bytes> = summary(&again).into_iter().map(|(_, data)| data).collect();
    assert_eq!(payloads, ["a", "b", "c"]);
    let msg_ids: BTreeSet<_> = first.iter().map(|p| p.msg_id.clone().unwrap()).collect();
    assert_eq!(msg_ids.len(), 3, "each publish has its own msg_id");
    client.close().await;
}

/// Accepts a WebSocket, choosing the subprotocol the client offered first.
// The callback's error type is tungstenite's (an HTTP response).
#[allow(clippy::result_large_err)]
async fn accept(stream: TcpStream) -> WebSocketStream<TcpStream> {
    let callback = |request: &Request, mut response: Response| {
        if let Some(offer) = request.headers().get("Sec-WebSocket-Protocol") {
            let first = offer.to_str().unwrap_or("").split(',').next().unwrap_or("");
            let value = first.trim().parse().expect("header value");
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", value);
        }
        Ok(response)
    };
    tokio_tungstenite::accept_hdr_async(stream, callback)
        .await
        .expect("handshake")
}

/// A `connected` frame as the real server sends it (MessagePack).
fn connected_frame(heartbeat_ms: u64) -> Message {
    let frame = ServerFrame::Connected(Connected {
        conn_id: "c-fake".into(),
        user: None,
        heartbeat_ms,
        limits: Limits {
            max_frame: 1 << 20,
            max_in_flight: 1000,
            max_pending_publishes: 1024,
        },
    });
    Message::Binary(encode_server(Codec::MsgPack, &frame).unwrap().into())
}

/// Waits for the client's first data frame (its `connect`, or a request).
async fn read_frame(ws: &mut WebSocketStream<TcpStream>) -> Option<Message> {
    while let Some(Ok(message)) = ws.next().await {
        if matches!(message, Message::Binary(_) | Message::Text(_)) {
            return Some(message);
        }
    }
    None
}

#[tokio::test]
async fn a_server_that_never_answers_makes_requests_time_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = accept(stream).await;
                read_frame(&mut ws).await;
                ws.send(connected_frame(25_000)).await.unwrap();
                // Then read (and ignore) everything.
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    let timeout = Duration::from_millis(500);
    let client = Client::builder(url)
        .request_timeout(timeout)
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    let error = client.publish("silent:x", "hello").await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(error.kind, PublishErrorKind::TimedOut);
    assert!(
        took >= timeout && took < timeout * 4,
        "timed out after {took:?}"
    );
    let error = client.subscribe("silent:x").await.unwrap_err();
    assert_eq!(error.kind, SubscribeErrorKind::TimedOut);
    let error = client.ping().await.unwrap_err();
    assert_eq!(error.kind, RequestErrorKind::TimedOut);
    client.close().await;
}

#[tokio::test]
async fn close_4001_is_reported_and_retried_only_every_backoff_max() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepts);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let nth = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut ws = accept(stream).await;
                read_frame(&mut ws).await;
                if nth == 0 {
                    // The first connection works until the client's first
                    // request; then its credentials "expire".
                    ws.send(connected_frame(25_000)).await.unwrap();
                    read_frame(&mut ws).await;
                }
                let frame = CloseFrame {
                    code: CloseCode::from(close::UNAUTHORIZED),
                    reason: "token expired".into(),
                };
                let _ = ws.close(Some(frame)).await;
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    let max = Duration::from_secs(1);
    let client = Client::builder(url)
        .reconnect(Backoff {
            base: Duration::from_millis(10),
            max,
            jitter: 0.2,
        })
        .connect()
        .await
        .unwrap();
    let mut events = client.events();
    let pinger = client.clone();
    tokio::spawn(async move { pinger.ping().await });

    let dropped = wait_event(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    let window = Instant::now();
    assert_eq!(
        dropped,
        Event::Disconnected {
            code: Some(close::UNAUTHORIZED),
            reason: "token expired".into(),
        }
    );
    let retry = wait_event(&mut events, |e| matches!(e, Event::Reconnecting { .. })).await;
    assert_eq!(
        retry,
        Event::Reconnecting {
            attempt: 1,
            delay: max
        }
    );
    // The attempt after `max` is refused with 4001 too, and reported.
    let refused = wait_event(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(
            refused,
            Event::Disconnected {
                code: Some(close::UNAUTHORIZED),
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(
        window.elapsed() >= max.mul_f64(0.9),
        "{:?}",
        window.elapsed()
    );
    // Measure the attempt rate over 1.5 s from the first drop.
    tokio::time::sleep_until(window + Duration::from_millis(1500)).await;
    let count = accepts.load(Ordering::SeqCst);
    assert!(
        count <= 2,
        "{count} connections in 1.5 s: a reconnect storm"
    );
    client.close().await;
}

#[tokio::test]
async fn a_server_gone_silent_is_dropped_after_two_heartbeats() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = accept(stream).await;
                read_frame(&mut ws).await;
                ws.send(connected_frame(200)).await.unwrap();
                // Hold the socket open and never read it again: no pongs.
                std::future::pending::<()>().await;
                drop(ws);
            });
        }
    });
    let client = Client::builder(url).connect().await.unwrap();
    let connected_at = Instant::now();
    let mut events = client.events();
    let dropped = wait_event(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(&dropped, Event::Disconnected { code: None, reason } if reason.contains("heartbeats")),
        "{dropped:?}"
    );
    let took = connected_at.elapsed();
    assert!(took >= Duration::from_millis(400), "dropped after {took:?}");
    wait_event(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    client.close().await;
}

#[tokio::test]
async fn a_purged_channel_is_subscribed_again_and_reported_as_an_epoch_change() {
    let broker = TestBroker::start().await;
    let url = broker.url();
    let client = Client::builder(url.as_str()).connect().await.unwrap();
    let mut events = client.events();
    let mut sub = client.subscribe("feed:p").consumer("reader").await.unwrap();
    client.publish("feed:p", "1").await.unwrap();
    next(&mut sub).await.ack().await.unwrap();

    broker
        .admin()
        .post("/admin/channels/feed:p/purge", serde_json::json!({}))
        .await;
    let resumed = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(event @ Event::Resumed { .. }) = events.recv().await {
                return event;
            }
        }
    })
    .await
    .expect("a resumed event");
    assert_eq!(
        resumed,
        Event::Resumed {
            channel: "feed:p".into(),
            recovered: true,
            epoch_changed: true,
        }
    );
    // The same Subscription goes on under the new epoch.
    assert_eq!(client.publish("feed:p", "after").await.unwrap(), 1);
    let delivery = next(&mut sub).await;
    assert_eq!((delivery.seq, &delivery.data[..]), (1, &b"after"[..]));
    client.close().await;
}

#[tokio::test]
async fn refresh_replaces_an_expiring_token_and_a_foreign_one_is_refused() {
    const SECRET: &str = "sdk-test-secret-of-at-least-32-bytes";
    let broker = TestBroker::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.refresh_window = Duration::from_secs(1);
    })
    .await;
    let auth = courier::auth::Auth::from_config(&broker_auth(SECRET)).unwrap();
    // Expired a moment ago, inside the 5 s leeway: the server closes the
    // connection with 4001 about 5 s from now unless it is refreshed.
    let expiring = auth
        .mint(&courier::auth::claims_for("alice", 0, None))
        .unwrap();
    let url = broker.url();
    let client = Client::builder(url.as_str())
        .token(expiring)
        .connect()
        .await
        .unwrap();
    let mut events = client.events();

    let bob = auth
        .mint(&courier::auth::claims_for("bob", 3600, None))
        .unwrap();
    let refused = client.refresh(bob).await.unwrap_err();
    assert!(
        matches!(
            &refused.kind,
            RequestErrorKind::Rejected {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{refused:?}"
    );
    let fresh = auth
        .mint(&courier::auth::claims_for("alice", 3600, None))
        .unwrap();
    client.refresh(fresh).await.unwrap();

    tokio::time::sleep(Duration::from_millis(6500)).await;
    assert_eq!(client.publish("chat:r", "still here").await.unwrap(), 1);
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, Event::Disconnected { .. }),
            "the refreshed connection stayed up: {event:?}"
        );
    }
    client.close().await;
}

fn broker_auth(secret: &str) -> courier::config::AuthConfig {
    courier::config::AuthConfig {
        jwt_secret: Some(secret.into()),
        ..courier::config::AuthConfig::default()
    }
}
