//! The pump of one subscription: deliver from the log by cursor.
//!
//! Replay and live delivery are one path. The pump registers for wake-ups
//! first (the head watch and the consumer's notify), then asks its consumer
//! what to send next, reads those messages from the channel cache or the
//! store, and queues the frames. When nothing is due it sleeps until the head
//! moves or the window opens. A slow client makes its sends wait; it costs a
//! bounded outbound queue and a window of in-flight seqs, nothing else.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Outgoing;
use super::registry::ConnectionHandle;
use crate::broker::{Broker, Message, Subscription, now_ms};
use crate::metrics;
use crate::protocol::{AckMode, Gap, MsgItem, Msgs, Payload, ServerFrame};

/// Most deliveries picked per round (and per `msgs` frame).
const MAX_PICK: usize = 256;

/// Longest a pump sleeps without looking at its window.
const IDLE: Duration = Duration::from_secs(3600);

/// How late a retry job may be before the pump looks by itself (Redis
/// schedules in whole seconds and polls; a job can also be lost).
const LOST_JOB_GRACE_MS: u64 = 2_000;

/// Wait after a store read failed before trying again.
const READ_RETRY: Duration = Duration::from_millis(100);

pub(super) async fn pump(
    broker: Arc<Broker>,
    subscription: Arc<Subscription>,
    out: mpsc::Sender<Outgoing>,
    connection: Option<Arc<ConnectionHandle>>,
    batch: bool,
    cancel: CancellationToken,
) {
    let channel = &subscription.channel;
    let consumer = &subscription.consumer;
    let name = channel.name().as_str().to_owned();
    let batch_bytes = usize::try_from(broker.config().server.max_frame / 2).unwrap_or(usize::MAX);
    let mut head = channel.watch_head();
    loop {
        let notified = consumer.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = now_ms();
        // The earliest ack deadline: an O(window) scan, done once per round.
        // Still right for the idle wait below: a round that picks nothing
        // adds no deadline, and one that picks goes round again.
        let mut deadline = consumer.lock().next_deadline(subscription.id);
        if deadline.is_some_and(|d| d <= now) {
            let expired = consumer
                .update(|state| state.expire(subscription.id, now, &mut || rand::random::<f64>()))
                .await;
            tracing::debug!(channel = %name, expired, "ack deadline passed");
            consumer.wake();
            deadline = consumer.lock().next_deadline(subscription.id);
        }
        let last = *head.borrow_and_update();
        let first = channel.first_seq();
        let picked = consumer
            .update(|state| state.pick(subscription.id, first, last, MAX_PICK, now_ms()))
            .await;
        if let Some((from, to)) = picked.gap {
            let gap = ServerFrame::Gap(Gap {
                channel: name.clone(),
                from,
                to,
            });
            if !send(&out, &cancel, gap).await {
                return;
            }
        }
        if picked.deliveries.is_empty() {
            // Wake for the next ack deadline; and, should a retry job be
            // lost, a while after the earliest retry is due.
            let retry_due = consumer.lock().next_retry_due();
            let wake_at = [
                deadline,
                retry_due.map(|due| due.saturating_add(LOST_JOB_GRACE_MS)),
            ]
            .into_iter()
            .flatten()
            .min();
            let until_deadline = wake_at.map_or(IDLE, |at| {
                Duration::from_millis(at.saturating_sub(now_ms()))
            });
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut notified => {}
                changed = head.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(until_deadline) => {}
            }
            continue;
        }
        let seqs: Vec<u64> = picked.deliveries.iter().map(|d| d.seq).collect();
        let messages = match channel.fetch(broker.store(), &seqs).await {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(channel = %name, consumer = consumer.key(), error = %e, "store read failed; retrying");
                {
                    // Not delivered after all: give them back as they were.
                    let mut state = consumer.lock();
                    for seq in &seqs {
                        let _ = state.release(subscription.id, *seq);
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(READ_RETRY) => continue,
                }
            }
        };
        let attempt_of = |seq: u64| {
            picked
                .deliveries
                .iter()
                .find(|d| d.seq == seq)
                .map_or(1, |d| d.attempt)
        };
        let frames = frames_for(&name, &messages, attempt_of, batch, batch_bytes);
        for frame in frames {
            if !send(&out, &cancel, frame).await {
                return;
            }
        }
        let redelivered = picked.deliveries.iter().filter(|d| d.attempt > 1).count();
        if let Some(connection) = &connection {
            connection.delivered(messages.len());
        }
        let counters = channel.counters();
        counters
            .delivered
            .inc_by(u64::try_from(messages.len()).unwrap_or(0));
        counters
            .redelivered
            .inc_by(u64::try_from(redelivered).unwrap_or(0));
        if subscription.ack == AckMode::Auto {
            let sent: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            // Every sent seq is in flight on this subscription, so this cannot fail.
            let _ = consumer.lock().ack(subscription.id, &sent);
        }
    }
}

async fn send(
    out: &mpsc::Sender<Outgoing>,
    cancel: &CancellationToken,
    frame: ServerFrame,
) -> bool {
    metrics::FRAMES_OUT.with_label_values(&[frame.kind()]).inc();
    tokio::select! {
        _ = cancel.cancelled() => false,
        sent = out.send(Outgoing::Frame(Box::new(frame))) => sent.is_ok(),
    }
}

/// `msg` frames, or `msgs` batches bounded by count and bytes when the
/// client opted in.
fn frames_for(
    channel: &str,
    messages: &[Arc<Message>],
    attempt_of: impl Fn(u64) -> u32,
    batch: bool,
    batch_bytes: usize,
) -> Vec<ServerFrame> {
    let item = |m: &Message| MsgItem {
        seq: m.seq,
        data: Some(Payload(m.data.clone())),
        data_b64: None,
        headers: m.headers.clone(),
        ts: m.ts,
        attempt: attempt_of(m.seq),
    };
    if !batch || messages.len() < 2 {
        return messages
            .iter()
            .map(|m| ServerFrame::Msg(item(m).into_msg(channel.to_owned())))
            .collect();
    }
    let mut frames = Vec::new();
    let mut items = Vec::new();
    let mut bytes = 0;
    for m in messages {
        if !items.is_empty() && bytes + m.size() > batch_bytes {
            frames.push(ServerFrame::Msgs(Msgs {
                channel: channel.to_owned(),
                items: std::mem::take(&mut items),
            }));
            bytes = 0;
        }
        bytes += m.size();
        items.push(item(m));
    }
    if !items.is_empty() {
        frames.push(ServerFrame::Msgs(Msgs {
            channel: channel.to_owned(),
            items,
        }));
    }
    frames
}
