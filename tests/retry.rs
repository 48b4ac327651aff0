//! Retries over a real WebSocket: backoff after nacks and missed deadlines,
//! nack delays, progress, term, dead letters and the DLQ operations, kill -9
//! with retries scheduled, and the same on the Redis backend.

mod common;

use std::time::{Duration, Instant};

use common::*;
use courier::config::{Config, NamespacePolicy, RetryBackend};
use courier::protocol::*;

fn jobs(policy: NamespacePolicy) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.namespaces.insert("jobs".into(), policy);
    }
}

fn policy(base_ms: u64, max_ms: u64, max_deliver: u32) -> NamespacePolicy {
    NamespacePolicy {
        backoff_base: Duration::from_millis(base_ms),
        backoff_max: Duration::from_millis(max_ms),
        max_deliver,
        ..NamespacePolicy::default()
    }
}

fn worker(channel: &str) -> Subscribe {
    Subscribe {
        consumer: Some("worker".into()),
        ..sub(channel)
    }
}

async fn nack(client: &mut Client, channel: &str, seq: u64, delay_ms: Option<u64>) {
    client
        .send(&ClientFrame::Nack(Nack {
            id: None,
            channel: channel.into(),
            seq,
            delay_ms,
        }))
        .await;
}

/// Asserts `elapsed` is `nominal` ± 20 % jitter, with slack for a busy
/// machine (tests run in parallel on two cores).
fn assert_about(elapsed: Duration, nominal: Duration, what: &str) {
    let low = nominal
        .mul_f64(0.8)
        .saturating_sub(Duration::from_millis(60));
    let high = nominal.mul_f64(1.2) + Duration::from_millis(300);
    assert!(
        elapsed >= low && elapsed <= high,
        "{what}: {elapsed:?} is not about {nominal:?}"
    );
}

#[tokio::test]
async fn nacks_back_off_exponentially_and_delay_overrides() {
    let broker = TestBroker::start_with(jobs(policy(300, 10_000, 10))).await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.subscribe(worker("jobs:nack")).await;
    client.publish("jobs:nack", b"work").await;
    assert_eq!(client.deliveries(1).await[0].2, 1);
    for (attempt, nominal_ms) in [(2, 300), (3, 600), (4, 1200)] {
        let sent = Instant::now();
        nack(&mut client, "jobs:nack", 1, None).await;
        let got = client.deliveries(1).await;
        assert_eq!((got[0].0, got[0].2), (1, attempt));
        assert_about(
            sent.elapsed(),
            Duration::from_millis(nominal_ms),
            &format!("attempt {attempt}"),
        );
    }
    let sent = Instant::now();
    nack(&mut client, "jobs:nack", 1, Some(1500)).await;
    assert_eq!(client.deliveries(1).await[0].2, 5);
    let elapsed = sent.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_millis(1900),
        "delay_ms: {elapsed:?}"
    );
    client.ack("jobs:nack", vec![1]).await;
    client.expect_no_delivery(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn missed_deadlines_back_off_like_nacks_up_to_backoff_max() {
    let broker = TestBroker::start_with(jobs(NamespacePolicy {
        ack_wait: Duration::from_millis(300),
        ..policy(300, 700, 10)
    }))
    .await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(worker("jobs:slow")).await;
    client.publish("jobs:slow", b"1").await;
    client.deliveries(1).await;
    let mut last = Instant::now();
    // Each gap is ack_wait (300) + backoff: 300, 600, then capped at 700.
    for (attempt, backoff_ms) in [(2, 300), (3, 600), (4, 700), (5, 700)] {
        let got = client.deliveries(1).await;
        assert_eq!(got[0].2, attempt);
        let now = Instant::now();
        assert_about(
            now - last - Duration::from_millis(300),
            Duration::from_millis(backoff_ms),
            &format!("attempt {attempt}"),
        );
        last = now;
    }
    client.ack("jobs:slow", vec![1]).await;
    client.expect_no_delivery(Duration::from_millis(1200)).await;
}

#[tokio::test]
async fn progress_keeps_a_slow_job_from_being_redelivered() {
    let broker = TestBroker::start_with(jobs(NamespacePolicy {
        ack_wait: Duration::from_millis(400),
        ..policy(100, 1000, 10)
    }))
    .await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.subscribe(worker("jobs:long")).await;
    client.publish("jobs:long", b"long").await;
    client.deliveries(1).await;
    for _ in 0..6 {
        client
            .send(&ClientFrame::Progress(Progress {
                id: None,
                channel: "jobs:long".into(),
                seqs: vec![1],
            }))
            .await;
        client.expect_no_delivery(Duration::from_millis(200)).await;
    }
    client
        .send(&ClientFrame::Progress(Progress {
            id: Some(77),
            channel: "jobs:long".into(),
            seqs: vec![9],
        }))
        .await;
    assert_eq!(
        client.error().await.id,
        Some(77),
        "progress of a seq not in flight"
    );
    client.ack("jobs:long", vec![1]).await;
    client.expect_no_delivery(Duration::from_millis(600)).await;
}

#[tokio::test]
async fn termed_messages_never_come_back_not_after_resume_or_restart() {
    let mut broker = TestBroker::start_with(jobs(policy(100, 1000, 10))).await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(worker("jobs:t")).await;
    for i in 1..=3u8 {
        client.publish("jobs:t", &[b'0' + i]).await;
    }
    client.deliveries(3).await;
    client
        .send(&ClientFrame::Term(Term {
            id: Some(5),
            channel: "jobs:t".into(),
            seq: 2,
            reason: Some("cannot parse".into()),
        }))
        .await;
    client.sync().await;
    client
        .send(&ClientFrame::Term(Term {
            id: Some(6),
            channel: "jobs:t".into(),
            seq: 2,
            reason: None,
        }))
        .await;
    assert_eq!(
        client.error().await.id,
        Some(6),
        "a second term of the same seq is refused"
    );
    drop(client);

    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(worker("jobs:t")).await;
    let back = client.deliveries(2).await;
    assert_eq!(
        back.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![1, 3],
        "2 was termed"
    );
    drop(client);

    broker = broker.restart().await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(worker("jobs:t")).await;
    let back = client.deliveries(2).await;
    assert_eq!(back.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 3]);
    client.ack("jobs:t", vec![1, 3]).await;
    client.expect_no_delivery(Duration::from_millis(300)).await;
    let channel = ChannelName::new("jobs:t").unwrap();
    let dead = broker
        .broker()
        .dlq_list(&channel, None, 0..=u64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].seq,
            dead[0].reason.as_str(),
            dead[0].detail.as_deref()
        ),
        (2, "term", Some("cannot parse"))
    );
    assert_eq!(
        dead[0].message.as_ref().unwrap().data,
        b"2",
        "the DLQ keeps a copy of the message"
    );
}

#[tokio::test]
async fn max_deliver_dead_letters_then_requeue_and_purge() {
    let broker = TestBroker::start_with(jobs(policy(50, 100, 3))).await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.subscribe(worker("jobs:poison")).await;
    client.publish("jobs:poison", b"poison").await;
    client.publish("jobs:poison", b"fine").await;
    let first = client.deliveries(2).await;
    client.ack("jobs:poison", vec![2]).await;
    assert_eq!(first[0].2, 1);
    for attempt in 2..=3 {
        nack(&mut client, "jobs:poison", 1, None).await;
        assert_eq!(client.deliveries(1).await[0].2, attempt);
    }
    nack(&mut client, "jobs:poison", 1, None).await;
    client.expect_no_delivery(Duration::from_millis(400)).await;

    let channel = ChannelName::new("jobs:poison").unwrap();
    let dlq = broker.broker();
    let dead = dlq
        .dlq_list(&channel, None, 0..=u64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].seq, dead[0].reason.as_str(), dead[0].attempts),
        (1, "max_deliver", 3)
    );
    assert_eq!(dead[0].consumer, "c/worker");
    let peeked = dlq
        .dlq_peek(&channel, 1, "c/worker")
        .await
        .unwrap()
        .expect("peek finds it");
    assert_eq!(peeked.message.as_ref().unwrap().data, b"poison");
    assert!(
        dlq.dlq_peek(&channel, 1, "c/other")
            .await
            .unwrap()
            .is_none()
    );

    assert_eq!(dlq.dlq_requeue(&channel, 1..=1, None).await.unwrap(), 1);
    assert_eq!(
        dlq.dlq_requeue(&channel, 1..=1, None).await.unwrap(),
        0,
        "requeue is safe to repeat"
    );
    let again = client.deliveries(1).await;
    assert_eq!(
        (again[0].0, again[0].1.as_slice(), again[0].2),
        (1, b"poison".as_slice(), 1),
        "back with attempt 1"
    );
    client
        .send(&ClientFrame::Term(Term {
            id: None,
            channel: "jobs:poison".into(),
            seq: 1,
            reason: None,
        }))
        .await;
    client.sync().await;
    assert_eq!(
        dlq.dlq_list(&channel, None, 0..=u64::MAX, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        dlq.dlq_purge(&channel, 0..=u64::MAX, None).await.unwrap(),
        1
    );
    assert_eq!(
        dlq.dlq_purge(&channel, 0..=u64::MAX, None).await.unwrap(),
        0,
        "purge is safe to repeat"
    );
    assert!(
        dlq.dlq_list(&channel, None, 0..=u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    client.expect_no_delivery(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_dropped_connection_counts_as_a_failed_attempt() {
    let broker = TestBroker::start_with(jobs(policy(50, 100, 2))).await;
    let mut publisher = Client::connect(&broker.url(), Codec::MsgPack).await;
    publisher.publish("jobs:crashy", b"boom").await;
    for attempt in 1..=2 {
        let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
        let start = if attempt == 1 {
            Some(StartFrom::First)
        } else {
            None
        };
        client
            .subscribe(Subscribe {
                from: start,
                ..worker("jobs:crashy")
            })
            .await;
        assert_eq!(client.deliveries(1).await[0].2, attempt);
        drop(client);
    }
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.subscribe(worker("jobs:crashy")).await;
    client.expect_no_delivery(Duration::from_millis(300)).await;
    let channel = ChannelName::new("jobs:crashy").unwrap();
    let dead = broker
        .broker()
        .dlq_list(&channel, None, 0..=u64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(
        dead.len(),
        1,
        "the poison message went to the DLQ instead of looping"
    );
}

const CRASH_CONFIG: &str =
    "[server]\nfsync = \"batch\"\n[namespaces.jobs]\nbackoff_base = \"100ms\"\n";

#[tokio::test]
async fn kill_9_with_deliveries_in_flight_and_retries_scheduled() {
    let dir = tempfile::tempdir().unwrap();
    let broker = ChildBroker::start(dir.path(), CRASH_CONFIG);
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.subscribe(worker("jobs:crash")).await;
    for i in 1..=6u8 {
        client.publish("jobs:crash", &[i]).await;
    }
    client.deliveries(6).await;
    nack(&mut client, "jobs:crash", 1, Some(200)).await;
    nack(&mut client, "jobs:crash", 2, Some(200)).await;
    nack(&mut client, "jobs:crash", 3, Some(60_000)).await;
    nack(&mut client, "jobs:crash", 4, Some(60_000)).await;
    // term flushes consumer state before the next frame is read: after the
    // pong, everything above is durable. 6 stays in flight.
    client
        .send(&ClientFrame::Term(Term {
            id: None,
            channel: "jobs:crash".into(),
            seq: 5,
            reason: None,
        }))
        .await;
    client.sync().await;
    // Let the short retries come due while the broker is down.
    broker.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let broker = ChildBroker::start(dir.path(), CRASH_CONFIG);
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.subscribe(worker("jobs:crash")).await;
    let mut back = client.deliveries(3).await;
    back.sort();
    assert_eq!(
        back.iter().map(|d| (d.0, d.2)).collect::<Vec<_>>(),
        vec![(1, 2), (2, 2), (6, 2)],
        "due retries and the in-flight delivery come back, each as attempt 2"
    );
    client.ack("jobs:crash", vec![1, 2, 6]).await;
    client.expect_no_delivery(Duration::from_millis(800)).await;
    assert!(
        back.iter().all(|d| d.0 != 3 && d.0 != 4 && d.0 != 5),
        "retries not yet due stay scheduled; the termed message never returns"
    );
    broker.kill9();
}

#[tokio::test]
async fn redis_backend_retries_and_dead_letters() {
    let redis = RedisServer::start();
    let url = redis.url();
    let broker = TestBroker::start_with(move |c| {
        c.retry.backend = RetryBackend::Redis;
        c.retry.redis_url = Some(url);
        c.retry.poll_interval = Duration::from_millis(50);
        c.namespaces.insert("jobs".into(), policy(1000, 10_000, 3));
    })
    .await;
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.subscribe(worker("jobs:r")).await;
    client.publish("jobs:r", b"1").await;
    client.deliveries(1).await;
    for (attempt, nominal_s) in [(2, 1.0), (3, 2.0)] {
        let sent = Instant::now();
        nack(&mut client, "jobs:r", 1, None).await;
        let got = client.deliveries(1).await;
        assert_eq!(got[0].2, attempt);
        let elapsed = sent.elapsed().as_secs_f64();
        // ±20 % jitter, rounded up to Redis's whole seconds.
        assert!(
            elapsed >= nominal_s * 0.8 - 0.01 && elapsed <= nominal_s * 1.2 + 1.3,
            "attempt {attempt}: {elapsed}s"
        );
    }
    nack(&mut client, "jobs:r", 1, None).await;
    client.expect_no_delivery(Duration::from_millis(300)).await;
    let channel = ChannelName::new("jobs:r").unwrap();
    let dead = broker
        .broker()
        .dlq_list(&channel, None, 0..=u64::MAX, 10)
        .await
        .unwrap();
    assert_eq!((dead.len(), dead[0].attempts), (1, 3));
}
