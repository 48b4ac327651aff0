//! A work queue on the Rust SDK: two workers share one group consumer, so
//! each job goes to one of them; a worker acks a job when it is done. One
//! job fails on its first try: the worker nacks it, and it comes back (to
//! either worker) with `attempt: 2`. Every job is acked exactly once.
//!
//! Start a broker first (`cargo run -- serve`), then:
//!
//! ```text
//! cargo run --example work_queue                          # ws://127.0.0.1:7070/ws
//! cargo run --example work_queue -- ws://127.0.0.1:7171/ws
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier::client::{Client, Subscription};
use futures_util::StreamExt;
use tokio::sync::mpsc;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Longest wait for the whole queue to drain.
const WAIT: Duration = Duration::from_secs(20);

const JOBS: usize = 6;

/// The job that fails on its first attempt.
const FLAKY: &str = "job-3";

/// A job some worker finished: (job, worker, attempt).
type Done = (String, &'static str, u32);

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:7070/ws".into());
    let queue = format!("jobs:thumbnails-{}", unique());

    let (done_tx, mut done) = mpsc::channel::<Done>(JOBS * 2);
    let mut workers = Vec::new();
    for name in ["worker-a", "worker-b"] {
        let client = Client::builder(&url).name(name).connect().await?;
        // Same group: the two subscriptions share one consumer.
        let jobs = client
            .subscribe(&queue)
            .group("thumbnailers")
            .max_in_flight(2)
            .await?;
        tokio::spawn(work(name, jobs, done_tx.clone()));
        workers.push(client);
    }
    drop(done_tx);

    let producer = Client::builder(&url).name("producer").connect().await?;
    for i in 1..=JOBS {
        let seq = producer.publish(&queue, format!("job-{i}")).await?;
        println!("queued job-{i} as #{seq}");
    }

    let mut acked: BTreeMap<String, (&str, u32)> = BTreeMap::new();
    tokio::time::timeout(WAIT, async {
        while acked.len() < JOBS {
            let Some((job, worker, attempt)) = done.recv().await else {
                break;
            };
            let again = acked.insert(job.clone(), (worker, attempt));
            assert!(again.is_none(), "{job} was acked twice");
        }
    })
    .await?;
    println!("all {} jobs done, each acked once:", acked.len());
    for (job, (worker, attempt)) in &acked {
        println!("  {job}: {worker}, attempt {attempt}");
    }
    assert_eq!(acked.len(), JOBS);
    assert_eq!(acked.get(FLAKY).map(|(_, attempt)| *attempt), Some(2));

    producer.close().await;
    for worker in workers {
        worker.close().await;
    }
    Ok(())
}

/// Processes jobs until the subscription ends.
async fn work(name: &'static str, mut jobs: Subscription, done: mpsc::Sender<Done>) {
    while let Some(job) = jobs.next().await {
        let text = String::from_utf8_lossy(&job.data).into_owned();
        if text == FLAKY && job.attempt == 1 {
            println!("{name}: {text} failed (attempt 1), nack: retry in 300 ms");
            let _ = job.nack(Some(Duration::from_millis(300))).await;
            continue;
        }
        println!("{name}: {text} done (attempt {})", job.attempt);
        if job.ack().await.is_err() || done.send((text, name, job.attempt)).await.is_err() {
            return;
        }
    }
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}
