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
