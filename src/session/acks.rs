//! What `ack`, `nack`, `progress` and `term` do to a subscription's
//! consumer, for a session on this node and for a subscription this node
//! serves for a session on another (see [`super::relay`]).

use crate::broker::{Broker, Subscription, now_ms};
use crate::metrics;
use crate::protocol::{Ack, ErrorCode, Nack, Progress, ServerFrame, Term};

use super::{MAX_TERM_REASON, broker_error, error};

/// Acks seqs (or everything up to a seq); the `error` reply if refused.
pub(crate) fn ack(sub: &Subscription, ack: &Ack) -> Option<ServerFrame> {
    let id = ack.id;
    let (result, was_full) = {
        let mut state = sub.consumer.lock();
        // Only a full window makes a pump wait for acks; waking pumps on
        // every ack would cost each one a pick for nothing.
        let was_full = state.any_window_full();
        let ages = state.ack_ages(
            sub.id,
            now_ms(),
            ack.seqs.as_deref().unwrap_or_default(),
            ack.upto,
        );
        let result = match (&ack.seqs, ack.upto) {
            (Some(seqs), None) => state.ack(sub.id, seqs).map(|()| seqs.len()),
            (None, Some(upto)) => state.ack_upto(sub.id, upto),
            _ => {
                return Some(error(
                    id,
                    ErrorCode::BadRequest,
                    "ack takes `seqs` or `upto`, exactly one",
                ));
            }
        };
        (result.map(|count| (count, ages)), was_full)
    };
    match result {
        Ok((count, ages)) => {
            sub.channel
                .counters()
                .acked
                .inc_by(u64::try_from(count).unwrap_or(0));
            for age in ages {
                #[allow(clippy::cast_precision_loss)] // ms, far below 2^52
                metrics::ACK_SECONDS.observe(age as f64 / 1000.0);
            }
            if was_full {
                sub.consumer.wake();
            }
            None
        }
        Err(e) => Some(error(id, ErrorCode::BadRequest, e.to_string())),
    }
}

/// Fails a delivery now (it is retried after its backoff or `delay_ms`).
pub(crate) async fn nack(sub: &Subscription, nack: &Nack) -> Option<ServerFrame> {
    let (seq, delay) = (nack.seq, nack.delay_ms);
    let result = sub
        .consumer
        .update(|state| state.nack(sub.id, seq, delay, now_ms(), rand::random::<f64>()))
        .await;
    match result {
        Ok(()) => {
            sub.consumer.wake();
            None
        }
        Err(e) => Some(error(nack.id, ErrorCode::BadRequest, e.to_string())),
    }
}

/// Restarts the ack deadlines of deliveries still being worked on.
pub(crate) fn progress(sub: &Subscription, progress: &Progress) -> Option<ServerFrame> {
    let result = sub
        .consumer
        .lock()
        .progress(sub.id, &progress.seqs, now_ms());
    result.err().map(|e| {
        error(
            progress.id,
            ErrorCode::BadRequest,
            format!("{e}; it cannot make progress"),
        )
    })
}

/// Dead-letters the message, and makes that durable before answering (a
/// termed message must not come back after a crash).
pub(crate) async fn term(broker: &Broker, sub: &Subscription, term: Term) -> Option<ServerFrame> {
    if term
        .reason
        .as_ref()
        .is_some_and(|r| r.len() > MAX_TERM_REASON)
    {
        return Some(error(
            term.id,
            ErrorCode::TooLarge,
            format!("a term reason is at most {MAX_TERM_REASON} bytes"),
        ));
    }
    let (seq, reason) = (term.seq, term.reason);
    let result = sub
        .consumer
        .update(|state| state.term(sub.id, seq, reason))
        .await;
    if let Err(e) = result {
        return Some(error(term.id, ErrorCode::BadRequest, e.to_string()));
    }
    sub.consumer.wake();
    if let Err(e) = broker.persist_consumers().await.and(broker.flush().await) {
        return Some(broker_error(term.id, &e));
    }
    None
}
