//! Every metric, registered once in [`REGISTRY`] with the `prometheus` crate.
//!
//! Names are `courier_*` with unit suffixes; labels are bounded (frame
//! types, close codes), never a channel, user or seq.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The registry `/metrics` serves.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<T: prometheus::core::Collector + Clone + 'static>(metric: T) -> T {
    // Each metric is registered exactly once, from its own LazyLock; a
    // duplicate name is a programming error caught by the tests.
    if let Err(e) = REGISTRY.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    metric
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).unwrap_or_else(|_| unreachable_metric()))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable_metric()),
    )
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .unwrap_or_else(|_| unreachable_metric()),
    )
}

fn unreachable_metric<T>() -> T {
    panic!("metric definitions are static and valid")
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ]
}

pub static CONNECTIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new("courier_connections", "Open client connections")
            .unwrap_or_else(|_| unreachable_metric()),
    )
});
pub static CONNECTIONS_OPENED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "courier_connections_opened_total",
        "Client connections accepted",
    )
});
pub static CONNECTIONS_CLOSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "courier_connections_closed_total",
        "Client connections closed, by close code",
        &["code"],
    )
});
pub static FRAMES_IN: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "courier_frames_in_total",
        "Frames received, by type",
        &["type"],
    )
});
pub static FRAMES_OUT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "courier_frames_out_total",
        "Frames sent, by type",
        &["type"],
    )
});
pub static MESSAGES_PUBLISHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "courier_messages_published_total",
        "Messages stored (duplicates excluded), by namespace",
        &["namespace"],
    )
});
pub static MESSAGES_DELIVERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "courier_messages_delivered_total",
        "Deliveries sent, redeliveries included, by namespace",
        &["namespace"],
    )
});
pub static MESSAGES_REDELIVERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "courier_messages_redelivered_total",
        "Deliveries with attempt > 1, by namespace",
        &["namespace"],
    )
});
pub static MESSAGES_ACKED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "courier_messages_acked_total",
        "Seqs acknowledged by consumers, by namespace",
        &["namespace"],
    )
});

/// One namespace's message counters, resolved once per channel so the hot
/// path does not look labels up. The label is a configured namespace's
/// name or `default`: bounded by the config, never by clients.
#[derive(Debug, Clone)]
pub struct NamespaceCounters {
    pub published: IntCounter,
    pub delivered: IntCounter,
    pub redelivered: IntCounter,
    pub acked: IntCounter,
}

impl NamespaceCounters {
    pub fn new(label: &str) -> Self {
        Self {
            published: MESSAGES_PUBLISHED.with_label_values(&[label]),
            delivered: MESSAGES_DELIVERED.with_label_values(&[label]),
            redelivered: MESSAGES_REDELIVERED.with_label_values(&[label]),
            acked: MESSAGES_ACKED.with_label_values(&[label]),
        }
    }
}

pub static MESSAGES_DEAD_LETTERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "courier_messages_dead_lettered_total",
        "Messages moved to a dead-letter queue, by reason",
        &["reason"],
    )
});
pub static DLQ_EVICTED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "courier_dlq_evicted_total",
        "Dead letters dropped because a channel's DLQ was at dlq_max",
    )
});
pub static RETRIES_SCHEDULED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "courier_retries_scheduled_total",
        "Failed deliveries scheduled for a retry",
    )
});
pub static RETRIES_FIRED: LazyLock<IntCounter> =
    LazyLock::new(|| counter("courier_retry_jobs_fired_total", "Retry jobs that fired"));
pub static PUBLISH_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "courier_publish_durable_seconds",
        "Time from receiving a publish to its puback (durable under the fsync policy)",
        latency_buckets(),
    )
});
pub static STORE_FLUSH_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "courier_store_flush_seconds",
        "Duration of one flush + fdatasync",
        latency_buckets(),
    )
});

pub static ACK_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "courier_ack_latency_seconds",
        "Time from a delivery (or its last progress) to its ack",
        vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ],
    )
});
pub static STORE_BYTES: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("courier_store_bytes", "Bytes the store uses on disk"));
pub static RETRY_QUEUE_DEPTH: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "courier_retry_queue_depth",
        "Seqs waiting for a retry (consumers in memory)",
    )
});
pub static CHANNELS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("courier_channels", "Channels known to this node"));

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).unwrap_or_else(|_| unreachable_metric()))
}

/// The text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    String::from_utf8_lossy(&buf).into_owned()
}
