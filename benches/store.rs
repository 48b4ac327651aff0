//! Store throughput: `Store::append` of 256-byte messages under each fsync
//! policy, done the way the channel writer does it.
//!
//! - `always`: append, then `flush_durable` (sled flush + fdatasync), per message;
//! - `batch`: 1000 appends, then one `flush_durable` (one group commit);
//! - `interval`: appends only; the broker's timer flush is left out, so this
//!   is the cost of an append on the writer thread and nothing more.
//!
//! The broker runs append and flush on two threads, so under `batch` it
//! appends the next batch while the last one syncs; here they run one after
//! the other, which makes `batch` a lower bound. Each policy gets a fresh
//! store in its own temp dir (`TMPDIR` picks the disk).
//!
//! Run: `cargo bench --bench store` (see `docs/benchmarks.md`).

use std::time::Duration;

use courier::config::ServerConfig;
use courier::storage::{HeadRecord, MessageRecord, Store};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

/// Payload size of every message, bytes.
const PAYLOAD_LEN: u64 = 256;

/// Messages per group commit in the `batch` case.
const BATCH: u64 = 1000;

/// The channel id every message goes to.
const CHANNEL: u64 = 1;

/// A store in a fresh temp dir and the channel's head, appended to in seq order.
struct Log {
    store: Store,
    head: HeadRecord,
    record: MessageRecord,
    _dir: tempfile::TempDir,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Store::open(dir.path(), ServerConfig::default().store_cache).expect("open store");
        let record = MessageRecord {
            ts: 1_767_225_600_000,
            msg_id: None,
            headers: None,
            data: (0..PAYLOAD_LEN)
                .map(|i| u8::try_from(i % 251).unwrap_or(0))
                .collect(),
        };
        Self {
            store,
            head: HeadRecord::default(),
            record,
            _dir: dir,
        }
    }

    /// Appends the next message, as the writer does (the head record is
    /// written once per batch, in `flush`).
    fn append(&mut self) {
        self.head.last_seq += 1;
        self.head.appended_bytes += self.record.size();
        self.store
            .append(CHANNEL, self.head.last_seq, &self.record)
            .expect("append");
    }

    /// Ends a batch as the writer does: the head, then flush + fdatasync.
    fn flush(&self) {
        self.store.put_head(CHANNEL, &self.head).expect("put_head");
        self.store.flush_durable().expect("flush_durable");
    }
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_append_256B");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    // Each iteration syncs the disk: few, slow iterations.
    group.sampling_mode(SamplingMode::Flat);

    group.throughput(Throughput::Elements(1));
    let mut log = Log::new();
    group.bench_function("always", |b| {
        b.iter(|| {
            log.append();
            log.flush();
        });
    });
    drop(log);

    group.throughput(Throughput::Elements(BATCH));
    let mut log = Log::new();
    group.bench_function("batch", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                log.append();
            }
            log.flush();
        });
    });
    drop(log);

    group.sampling_mode(SamplingMode::Auto);
    group.throughput(Throughput::Elements(1));
    let mut log = Log::new();
    group.bench_function("interval", |b| {
        b.iter(|| log.append());
    });
    drop(log);

    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
