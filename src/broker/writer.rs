//! The channel writer: the one place that assigns seqs and appends to the
//! store, and the group commit that makes appends durable before their puback.
//!
//! Two OS threads (sled is blocking I/O, so neither runs on the runtime):
//!
//! - the *writer* takes publish requests in batches, checks `msg_id` dedup,
//!   assigns each message the next seq of its channel and appends it;
//! - the *flusher* takes whole batches from the writer, runs one sled flush +
//!   fdatasync for all of them, then makes them visible and sends the
//!   pubacks. While it flushes, the writer appends the next batch: the batch
//!   grows with load, which is what group commit means.
//!
//! `fsync = "always"` flushes after every message on the writer thread
//! (then the writer is the only caller of [`Store::flush_durable`]);
//! otherwise the flusher is, and under `"interval"` it acknowledges at once
//! and flushes on a timer. Either way, one thread flushes.
//!
//! On the shared Redis store (cluster mode) Redis assigns the seqs: the
//! writer sends each batch as one pipeline of append scripts, and a reply
//! means Redis has the batch (durable as Redis' own `appendfsync` says).
//! The writer then makes the batch visible in seq order, reading from the
//! store what other nodes appended in between, and answers the publishers.
//! The flusher thread idles.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::channel::{Channel, ChannelState, Message};
use super::{BrokerError, PublishOutcome, now_ms};
use crate::config::FsyncPolicy;
use crate::metrics;
use crate::protocol::Headers;
use crate::storage::redis::{AppendItem, Appended};
use crate::storage::{HeadRecord, MessageRecord, Store};

/// Most requests the writer takes in one batch.
const MAX_BATCH: usize = 64;

/// Requests queued for the writer before publishers wait.
pub(crate) const QUEUE_CAPACITY: usize = 8192;

/// A publish waiting for its seq.
pub(crate) struct AppendRequest {
    pub channel: Arc<Channel>,
    pub data: Bytes,
    pub headers: Option<Headers>,
    pub msg_id: Option<String>,
    pub reply: oneshot::Sender<Result<PublishOutcome, BrokerError>>,
    /// When the publish arrived, for the publish-to-durable histogram.
    pub received: Instant,
}

/// What the writer sends.
pub(crate) enum WriterRequest {
    Append(AppendRequest),
    /// Make everything written so far durable (consumer state, channel records).
    Flush(Option<oneshot::Sender<()>>),
    /// Finish what is queued before this, then stop (the flusher flushes last).
    Stop,
    /// Remove a deleted channel from the store, after the appends queued
    /// before this (the channel is already marked deleted, so no append
    /// follows). Replies with the number of messages removed.
    Delete {
        name: String,
        id: u64,
        reply: oneshot::Sender<Result<u64, crate::storage::StoreError>>,
    },
}

enum Done {
    New {
        channel: Arc<Channel>,
        message: Arc<Message>,
        reply: oneshot::Sender<Result<PublishOutcome, BrokerError>>,
        received: Instant,
    },
    Duplicate {
        seq: u64,
        reply: oneshot::Sender<Result<PublishOutcome, BrokerError>>,
    },
    Flushed(oneshot::Sender<()>),
}

/// Starts the writer and flusher threads.
pub(crate) fn start(
    store: Arc<Store>,
    policy: FsyncPolicy,
    interval: Duration,
    dedup_window_ms: u64,
    requests: mpsc::Receiver<WriterRequest>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let (batches_tx, batches_rx) = std_mpsc::channel::<Vec<Done>>();
    let flusher_store = Arc::clone(&store);
    let flusher = std::thread::Builder::new()
        .name("courier-flusher".into())
        .spawn(move || flusher_loop(&flusher_store, policy, interval, &batches_rx))?;
    let writer = std::thread::Builder::new()
        .name("courier-writer".into())
        .spawn(move || writer_loop(&store, policy, dedup_window_ms, requests, &batches_tx))?;
    Ok(vec![writer, flusher])
}

fn writer_loop(
    store: &Store,
    policy: FsyncPolicy,
    dedup_window_ms: u64,
    mut requests: mpsc::Receiver<WriterRequest>,
    batches: &std_mpsc::Sender<Vec<Done>>,
) {
    let shared = store.shared().is_some();
    let max_batch = if policy == FsyncPolicy::Always {
        1
    } else {
        MAX_BATCH
    };
    let mut stopping = false;
    while let Some(first) = requests.blocking_recv() {
        let mut done = Vec::with_capacity(64);
        let mut appends = Vec::new();
        let mut deletes = Vec::new();
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                WriterRequest::Append(append) if shared => appends.push(append),
                WriterRequest::Append(append) => {
                    if let Some(d) = append_one(store, append) {
                        done.push(d);
                    }
                }
                WriterRequest::Stop => stopping = true,
                WriterRequest::Delete { name, id, reply } => deletes.push((name, id, reply)),
                WriterRequest::Flush(reply) => {
                    if let Some(reply) = reply {
                        done.push(Done::Flushed(reply));
                    } else if done.is_empty() {
                        done.push(Done::Flushed(oneshot::channel().0));
                    }
                }
            }
            if done.len() + appends.len() < max_batch && !stopping {
                next = requests.try_recv().ok();
            }
        }
        if shared {
            let mut all = append_shared(store, appends, dedup_window_ms);
            all.append(&mut done);
            for (name, id, reply) in deletes {
                let _ = reply.send(store.delete_channel(&name, id));
            }
            complete(all, Ok(()));
            if stopping {
                return;
            }
            continue;
        }
        write_heads(store, &done);
        for (name, id, reply) in deletes {
            let _ = reply.send(store.delete_channel(&name, id));
        }
        if policy == FsyncPolicy::Always {
            let flushed = flush(store);
            complete(done, flushed);
        } else if batches.send(done).is_err() {
            return;
        }
        if stopping {
            return;
        }
    }
}

/// Writes the head record of each channel the batch appended to, once,
/// after its messages (so a crash leaves the head at most behind the log,
/// which start-up repairs).
fn write_heads(store: &Store, done: &[Done]) {
    let mut written: Vec<u64> = Vec::new();
    for d in done.iter().rev() {
        let Done::New { channel, .. } = d else {
            continue;
        };
        if written.contains(&channel.id()) {
            continue;
        }
        written.push(channel.id());
        let head = channel.lock().head_record;
        if let Err(e) = store.put_head(channel.id(), &head) {
            tracing::error!(channel = %channel.name(), error = %e, "writing the channel head failed");
        }
    }
}

/// Publishes to an ephemeral channel on the caller's task: seq, cache and
/// head move under one lock, so concurrent publishers stay in order.
pub(crate) fn publish_ephemeral(request: AppendRequest) {
    let channel = Arc::clone(&request.channel);
    let mut state = channel.lock();
    match assign(&mut state, request) {
        Some(Done::New { message, reply, .. }) => {
            let seq = message.seq;
            channel.counters().published.inc();
            channel.commit_locked(&mut state, message);
            let _ = reply.send(Ok(PublishOutcome {
                seq,
                duplicate: false,
            }));
        }
        Some(Done::Duplicate { seq, reply }) => {
            let _ = reply.send(Ok(PublishOutcome {
                seq,
                duplicate: true,
            }));
        }
        Some(Done::Flushed(_)) | None => {}
    }
}

/// Assigns a seq and appends to the store. The channel lock is not held
/// during the append: sled can stall an insert for milliseconds, and the
/// flusher's commits and the pumps' reads of earlier messages must not wait
/// for it. Only this thread assigns seqs, so `seq` stays free meanwhile.
fn append_one(store: &Store, request: AppendRequest) -> Option<Done> {
    let AppendRequest {
        channel,
        data,
        headers,
        msg_id,
        reply,
        received,
    } = request;
    let ts = now_ms();
    let (seq, head) = {
        let mut state = channel.lock();
        if let Some(early) = refuse_or_dedup(&channel, &mut state, msg_id.as_deref(), ts) {
            return early.answer(reply);
        }
        (state.assigned + 1, state.head_record)
    };
    let message = Arc::new(Message {
        seq,
        ts,
        headers,
        data,
    });
    let record = MessageRecord {
        ts,
        msg_id: msg_id.clone(),
        headers: message.headers.clone(),
        data: message.data.to_vec(),
    };
    if let Err(e) = store.append(channel.id(), seq, &record) {
        tracing::error!(channel = %channel.name(), error = %e, "append failed");
        let _ = reply.send(Err(BrokerError::Unavailable(format!("storage: {e}"))));
        return None;
    }
    {
        let mut state = channel.lock();
        state.head_record = HeadRecord {
            last_seq: seq,
            appended_bytes: head.appended_bytes + record.size(),
        };
        counted(&mut state, &message, msg_id, ts);
    }
    Some(Done::New {
        channel,
        message,
        reply,
        received,
    })
}

/// Cluster mode: appends a batch through Redis, which assigns the seqs and
/// checks `msg_id`s, then makes each channel visible up to its new seqs
/// (so `complete` finds them committed).
fn append_shared(store: &Store, requests: Vec<AppendRequest>, dedup_window_ms: u64) -> Vec<Done> {
    let Some(shared) = store.shared() else {
        return Vec::new();
    };
    let ts = now_ms();
    let mut accepted = Vec::with_capacity(requests.len());
    for request in requests {
        if request.channel.lock().deleted {
            let _ = request.reply.send(Err(BrokerError::Unavailable(format!(
                "channel {} was deleted by an operator while this publish waited; publish again",
                request.channel.name()
            ))));
            continue;
        }
        let record = MessageRecord {
            ts,
            msg_id: request.msg_id.clone(),
            headers: request.headers.clone(),
            data: request.data.to_vec(),
        };
        accepted.push((request, record));
    }
    if accepted.is_empty() {
        return Vec::new();
    }
    let items: Vec<AppendItem<'_>> = accepted
        .iter()
        .map(|(request, record)| AppendItem {
            channel: request.channel.id(),
            record,
            dedup_window_ms,
        })
        .collect();
    let appended = match shared.append_batch(&items) {
        Ok(appended) => appended,
        Err(e) => {
            tracing::error!(error = %e, "append to the shared store failed");
            for (request, _) in accepted {
                let _ = request
                    .reply
                    .send(Err(BrokerError::Unavailable(format!("storage: {e}"))));
            }
            return Vec::new();
        }
    };
    let mut done = Vec::with_capacity(accepted.len());
    let mut fresh: Vec<(Arc<Channel>, Vec<Arc<Message>>)> = Vec::new();
    for ((request, _), appended) in accepted.into_iter().zip(appended) {
        let AppendRequest {
            channel,
            data,
            headers,
            reply,
            received,
            ..
        } = request;
        match appended {
            Appended::Duplicate { seq } => done.push(Done::Duplicate { seq, reply }),
            Appended::New { seq } => {
                let message = Arc::new(Message {
                    seq,
                    ts,
                    headers,
                    data,
                });
                match fresh.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &channel)) {
                    Some((_, messages)) => messages.push(Arc::clone(&message)),
                    None => fresh.push((Arc::clone(&channel), vec![Arc::clone(&message)])),
                }
                done.push(Done::New {
                    channel,
                    message,
                    reply,
                    received,
                });
            }
        }
    }
    for (channel, mut messages) in fresh {
        messages.sort_by_key(|m| m.seq);
        let target = messages.last().map_or(0, |m| m.seq);
        if let Err(e) = channel.catch_up(store, target, &messages) {
            // Stored all the same; readers catch up on the next notice.
            tracing::warn!(channel = %channel.name(), error = %e, "reading other nodes' appends failed");
            let mut state = channel.lock();
            for message in messages {
                channel.commit_locked(&mut state, message);
            }
        }
    }
    done
}

/// Why a publish ends before it gets a seq.
enum Early {
    Deleted(String),
    Duplicate(u64),
}

impl Early {
    /// Answers the publisher (a refusal) or hands on a duplicate's seq.
    fn answer(self, reply: oneshot::Sender<Result<PublishOutcome, BrokerError>>) -> Option<Done> {
        match self {
            Self::Deleted(message) => {
                let _ = reply.send(Err(BrokerError::Unavailable(message)));
                None
            }
            Self::Duplicate(seq) => Some(Done::Duplicate { seq, reply }),
        }
    }
}

/// A deleted channel refuses; a `msg_id` seen within the window is a duplicate.
fn refuse_or_dedup(
    channel: &Channel,
    state: &mut ChannelState,
    msg_id: Option<&str>,
    ts: u64,
) -> Option<Early> {
    if state.deleted {
        return Some(Early::Deleted(format!(
            "channel {} was deleted by an operator while this publish waited; publish again",
            channel.name()
        )));
    }
    msg_id
        .and_then(|id| state.dedup.get(id, ts))
        .map(Early::Duplicate)
}

/// The channel's counters after `message` got its seq.
fn counted(state: &mut ChannelState, message: &Message, msg_id: Option<String>, ts: u64) {
    state.assigned = message.seq;
    state.bytes += u64::try_from(message.size()).unwrap_or(u64::MAX);
    if let Some(id) = msg_id {
        state.dedup.insert(id, message.seq, ts);
    }
}

/// Under the channel lock, for an ephemeral channel: the `msg_id` dedup
/// check, the next seq and the channel's counters.
fn assign(state: &mut ChannelState, request: AppendRequest) -> Option<Done> {
    let AppendRequest {
        channel,
        data,
        headers,
        msg_id,
        reply,
        received,
    } = request;
    let ts = now_ms();
    if let Some(early) = refuse_or_dedup(&channel, state, msg_id.as_deref(), ts) {
        return early.answer(reply);
    }
    let message = Arc::new(Message {
        seq: state.assigned + 1,
        ts,
        headers,
        data,
    });
    counted(state, &message, msg_id, ts);
    Some(Done::New {
        channel,
        message,
        reply,
        received,
    })
}

fn flush(store: &Store) -> Result<(), String> {
    let started = Instant::now();
    let result = store.flush_durable().map_err(|e| e.to_string());
    metrics::STORE_FLUSH_SECONDS.observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        tracing::error!(error = %e, "store flush failed");
    }
    result
}

fn flusher_loop(
    store: &Store,
    policy: FsyncPolicy,
    interval: Duration,
    batches: &std_mpsc::Receiver<Vec<Done>>,
) {
    let mut last_flush = Instant::now();
    loop {
        let first = match policy {
            FsyncPolicy::Interval => match batches.recv_timeout(interval) {
                Ok(batch) => Some(batch),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            },
            _ => match batches.recv() {
                Ok(batch) => Some(batch),
                Err(_) => break,
            },
        };
        let mut all = first.unwrap_or_default();
        while let Ok(more) = batches.try_recv() {
            all.extend(more);
        }
        match policy {
            FsyncPolicy::Interval => {
                complete(all, Ok(()));
                if last_flush.elapsed() >= interval {
                    let _ = flush(store);
                    last_flush = Instant::now();
                }
            }
            _ => {
                if all.is_empty() {
                    continue;
                }
                let flushed = flush(store);
                complete(all, flushed);
            }
        }
    }
    let _ = flush(store);
}

/// Makes a flushed batch visible and answers its publishers.
fn complete(done: Vec<Done>, flushed: Result<(), String>) {
    for d in done {
        match d {
            Done::New {
                channel,
                message,
                reply,
                received,
            } => {
                let seq = message.seq;
                match &flushed {
                    Ok(()) => {
                        channel.counters().published.inc();
                        channel.commit(message);
                        metrics::PUBLISH_SECONDS.observe(received.elapsed().as_secs_f64());
                        let _ = reply.send(Ok(PublishOutcome {
                            seq,
                            duplicate: false,
                        }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(BrokerError::Unavailable(format!(
                            "storage flush failed: {e}"
                        ))));
                    }
                }
            }
            Done::Duplicate { seq, reply } => {
                let outcome = flushed
                    .as_ref()
                    .map(|()| PublishOutcome {
                        seq,
                        duplicate: true,
                    })
                    .map_err(|e| BrokerError::Unavailable(format!("storage flush failed: {e}")));
                let _ = reply.send(outcome);
            }
            Done::Flushed(reply) => {
                let _ = reply.send(());
            }
        }
    }
}
