//! Helpers for tests that drive the Rust SDK.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use courier::client::{Backoff, Subscription};
use futures_util::StreamExt;

/// Reads deliveries, acks each, and reports `(seq, payload)` until dropped.
pub fn consume(mut subscription: Subscription) -> tokio::sync::mpsc::Receiver<(u64, Bytes)> {
    let (tx, rx) = tokio::sync::mpsc::channel(10_000);
    tokio::spawn(async move {
        while let Some(delivery) = subscription.next().await {
            if tx
                .send((delivery.seq, delivery.data.clone()))
                .await
                .is_err()
            {
                return;
            }
            let _ = delivery.ack().await;
        }
    });
    rx
}

/// Collects deliveries until every seq of `expected` was seen; checks each
/// payload and that seqs were first seen in increasing order.
pub async fn seen_all(
    deliveries: &mut tokio::sync::mpsc::Receiver<(u64, Bytes)>,
    expected: &BTreeMap<u64, Bytes>,
    who: &str,
) {
    let mut seen = BTreeSet::new();
    let mut last_first = 0;
    let wait = tokio::time::timeout(Duration::from_secs(60), async {
        while !expected.keys().all(|seq| seen.contains(seq)) {
            let (seq, data) = deliveries.recv().await.expect("consumer runs");
            if let Some(want) = expected.get(&seq) {
                assert_eq!(&data, want, "{who}: payload of seq {seq}");
            }
            if seen.insert(seq) {
                assert!(
                    seq > last_first,
                    "{who}: seq {seq} first seen after {last_first}"
                );
                last_first = seq;
            }
        }
    });
    wait.await.unwrap_or_else(|_| {
        let missing: Vec<_> = expected
            .keys()
            .filter(|s| !seen.contains(s))
            .take(10)
            .collect();
        panic!("{who}: not every pubacked message was delivered; missing {missing:?}…")
    });
}

/// A quick reconnect schedule for tests.
pub fn fast_reconnect() -> Backoff {
    Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_millis(500),
        jitter: 0.2,
    }
}

/// Publishes `count` messages `"<prefix> <i:05>"` through `publisher`, 64
/// at a time, on a task of its own. Returns the task (each payload with the
/// seq of its puback; a publish that fails panics) and the number of
/// pubacks so far.
pub fn publish_concurrently(
    publisher: &courier::client::Client,
    channel: &'static str,
    prefix: &'static str,
    count: usize,
) -> (
    tokio::task::JoinHandle<Vec<(Bytes, u64)>>,
    tokio::sync::watch::Receiver<usize>,
) {
    let (progress, pubacks) = tokio::sync::watch::channel(0usize);
    let publisher = publisher.clone();
    let task = tokio::spawn(async move {
        futures_util::stream::iter(0..count)
            .map(|i| {
                let (publisher, progress) = (publisher.clone(), progress.clone());
                async move {
                    let data = Bytes::from(format!("{prefix} {i:05}"));
                    let seq = publisher.publish(channel, data.clone()).await;
                    let seq = seq.unwrap_or_else(|e| panic!("publish {i}: {e}"));
                    progress.send_modify(|n| *n += 1);
                    (data, seq)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await
    });
    (task, pubacks)
}

/// Waits (90 s at most) for [`publish_concurrently`]'s task: every payload
/// by its seq, no seq pubacked twice.
pub async fn pubacked(
    publishing: tokio::task::JoinHandle<Vec<(Bytes, u64)>>,
) -> BTreeMap<u64, Bytes> {
    let results = tokio::time::timeout(Duration::from_secs(90), publishing)
        .await
        .expect("publishing finishes in time")
        .expect("every publish gets its puback");
    let mut pubacked = BTreeMap::new();
    for (data, seq) in results {
        assert!(
            pubacked.insert(seq, data).is_none(),
            "seq {seq} pubacked twice"
        );
    }
    pubacked
}

/// What `channel` stores, read from the first message by a fresh consumer
/// `audit` of `client` (acking each): the channel's last seq when the
/// subscription started, and every payload by seq up to it.
pub async fn read_stored(
    client: &courier::client::Client,
    channel: &str,
) -> (u64, BTreeMap<u64, Bytes>) {
    let mut audit = client
        .subscribe(channel)
        .consumer("audit")
        .from_first()
        .await
        .unwrap();
    let last = audit.last_seq();
    let mut stored = BTreeMap::new();
    while stored.len() < usize::try_from(last).unwrap() {
        let delivery = tokio::time::timeout(super::WAIT, audit.next())
            .await
            .expect("a delivery in time")
            .expect("the subscription is open");
        delivery.ack().await.unwrap();
        stored.insert(delivery.seq, delivery.data);
    }
    (last, stored)
}
