//! Retry jobs per second through the retry queue, on either backend.
//!
//! Pushes `-n` jobs due a moment later (measuring pushes/s), then measures
//! how fast the apalis worker fires them once they are due (jobs/s).
//!
//! ```sh
//! cargo run --release --example retry_jobs -- -n 50000
//! cargo run --release --example retry_jobs -- -n 5000 --redis redis://127.0.0.1:6379/
//! ```
//!
//! apalis-redis wedges when 8,000 or more jobs are due at once (a Lua
//! `unpack` limit), so keep `-n` below that on Redis; the broker itself
//! makes one job per consumer and due-second, far fewer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use courier::delivery::retry::{RetryHandler, RetryJob, RetryQueue};
use courier::storage::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(about = "Retry jobs per second through the sled or Redis retry queue")]
struct Args {
    /// Jobs to push and fire.
    #[arg(short = 'n', long = "count", default_value_t = 20_000)]
    count: u64,
    /// Use apalis-redis at this URL instead of the embedded sled backend.
    #[arg(long)]
    redis: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(dir.path(), 64 << 20)?);
    let (queue, backend) = match &args.redis {
        Some(url) => {
            let queue = format!("courier:bench:{}", now_ms());
            (RetryQueue::redis(url, &queue).await?, "redis")
        }
        None => (RetryQueue::sled(Arc::clone(&store))?, "sled"),
    };

    let fired = Arc::new(AtomicU64::new(0));
    let all_fired = Arc::new(Notify::new());
    let handler: RetryHandler = {
        let (fired, all_fired, count) = (Arc::clone(&fired), Arc::clone(&all_fired), args.count);
        Arc::new(move |_job: RetryJob| {
            if fired.fetch_add(1, Ordering::Relaxed) + 1 == count {
                all_fired.notify_one();
            }
        })
    };
    let cancel = CancellationToken::new();
    let worker = queue
        .clone()
        .spawn_worker(handler, Duration::from_millis(50), cancel.clone())?;

    // Due far enough ahead that pushing finishes first (whole seconds on Redis).
    let lead_ms = 3000 + args.count / 10;
    let due_ms = (now_ms() + lead_ms).div_ceil(1000) * 1000;
    let pushing = Instant::now();
    for i in 0..args.count {
        let job = RetryJob {
            channel: "bench:retry".into(),
            consumer: format!("c/{i}"),
            seqs: vec![i + 1],
            attempt: 1,
            due_ms,
        };
        queue.schedule(job).await?;
    }
    let push_secs = pushing.elapsed().as_secs_f64();
    anyhow::ensure!(
        now_ms() < due_ms,
        "pushing took longer than the lead time; lower -n"
    );
    tokio::time::sleep(Duration::from_millis(due_ms - now_ms())).await;
    let firing = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), all_fired.notified())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "only {} of {} jobs fired",
                fired.load(Ordering::Relaxed),
                args.count
            )
        })?;
    let fire_secs = firing.elapsed().as_secs_f64();
    cancel.cancel();
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;

    let count = args.count as f64;
    println!(
        "{backend}: {} jobs; push {:.0} jobs/s ({push_secs:.2} s); fire {:.0} jobs/s ({fire_secs:.2} s after due)",
        args.count,
        count / push_secs,
        count / fire_secs
    );
    println!(
        "{{\"backend\":\"{backend}\",\"jobs\":{},\"push_per_s\":{:.0},\"fire_per_s\":{:.0}}}",
        args.count,
        count / push_secs,
        count / fire_secs
    );
    Ok(())
}
