//! The retry queue: durable timers on apalis that wake a consumer when a
//! failed delivery is due again.
//!
//! A job carries (channel, consumer, seqs, attempt, due). The consumer's own
//! record is the truth about what waits (`scheduled` seq → due); a job only
//! says "look again at `due`". So a job that fires twice, or early, or that a
//! crash loses after its consumer was saved, changes nothing: firing is
//! idempotent and a consumer loaded later fires whatever is already due.
//!
//! Two backends behind [`RetryQueue`]:
//!
//! - **sled** (embedded default): an apalis [`CustomBackend`] whose fetch
//!   stream takes due jobs from the store's `retries` tree (key: due ms ‖ id,
//!   so the tree is the schedule) and sleeps until the next due time or a
//!   push. Millisecond timing; jobs are durable with the store's next flush.
//! - **redis**: [`apalis_redis::RedisStorage`], shared by every node. It
//!   schedules in whole seconds and may fire up to a second early, so the
//!   handler sleeps until the job's real due time. Our worker never fails a
//!   job (apalis-redis would retry it linearly on its own), and finished jobs
//!   are vacuumed every minute.
//!
//! Only retries go through the queue: a delivery acked in time creates no job.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::{TaskSink, WorkerBuilder};
use apalis_core::backend::Vacuum;
use apalis_core::backend::custom::BackendBuilder;
use apalis_core::backend::ext::BackendExt;
use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::worker::context::WorkerContext;
use apalis_redis::RedisStorage;
use futures_util::stream::{self, BoxStream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage::Store;

/// "Look at these seqs of this consumer again at `due_ms`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryJob {
    pub channel: String,
    /// The consumer's registry key.
    pub consumer: String,
    pub seqs: Vec<u64>,
    /// The attempt that failed.
    pub attempt: u32,
    /// Due time, ms since the epoch.
    pub due_ms: u64,
}

/// A retry queue failure.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("retry queue storage: {0}")]
    Store(#[from] crate::storage::StoreError),
    #[error("retry queue on redis: {0}")]
    Redis(String),
    #[error("retry worker: {0}")]
    Worker(String),
}

/// What a fired job calls: the broker wakes the consumer.
pub type RetryHandler = Arc<dyn Fn(RetryJob) + Send + Sync>;

/// Most jobs the sled fetcher takes per look.
const FETCH_BATCH: usize = 256;
/// Longest the sled fetcher sleeps without looking (a safety net; pushes wake it).
const IDLE_LOOK: Duration = Duration::from_secs(1);
/// How often finished jobs are removed from Redis.
const VACUUM_EVERY: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The retry queue, cheap to clone.
#[derive(Clone)]
pub enum RetryQueue {
    Sled(SledJobs),
    Redis(Box<RedisJobs>),
}

/// The Redis side: a storage for pushing (on the caller's runtime) and
/// what the worker needs to open its own connection on its own runtime.
#[derive(Clone)]
pub struct RedisJobs {
    storage: RedisStorage<RetryJob>,
    url: String,
    queue: String,
}

/// Longest a push to Redis may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The sled side: the store's `retries` tree plus a wake-up for the fetcher.
#[derive(Clone)]
pub struct SledJobs {
    store: Arc<Store>,
    pushed: Arc<Notify>,
    next_id: Arc<AtomicU64>,
    depth: Arc<AtomicU64>,
}

impl SledJobs {
    fn push(&self, job: &RetryJob) -> Result<(), RetryError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = rmp_serde::to_vec_named(job).map_err(|e| RetryError::Worker(e.to_string()))?;
        self.store.retry_put(job.due_ms, id, &bytes)?;
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.pushed.notify_one();
        Ok(())
    }

    /// Due jobs, in due order, waiting for them when there are none.
    fn due_jobs(self) -> BoxStream<'static, Result<Option<Task<RetryJob>>, BoxDynError>> {
        stream::unfold(
            (self, Vec::<RetryJob>::new()),
            |(jobs, mut ready)| async move {
                loop {
                    if let Some(job) = ready.pop() {
                        let task = TaskBuilder::new(job).build();
                        return Some((Ok(Some(task)), (jobs, ready)));
                    }
                    let store = Arc::clone(&jobs.store);
                    let now = now_ms();
                    let taken = tokio::task::spawn_blocking(move || {
                        let due = store.retry_take_due(now, FETCH_BATCH)?;
                        let next = store.retry_next_due()?;
                        Ok::<_, crate::storage::StoreError>((due, next))
                    })
                    .await;
                    let (due, next) = match taken {
                        Ok(Ok(found)) => found,
                        Ok(Err(e)) => {
                            return Some((Err(Box::new(e) as BoxDynError), (jobs, ready)));
                        }
                        Err(e) => return Some((Err(Box::new(e) as BoxDynError), (jobs, ready))),
                    };
                    jobs.depth.fetch_sub(
                        u64::try_from(due.len())
                            .unwrap_or(0)
                            .min(jobs.depth.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                    for bytes in due.iter().rev() {
                        match rmp_serde::from_slice::<RetryJob>(bytes) {
                            Ok(job) => ready.push(job),
                            Err(e) => {
                                tracing::error!(error = %e, "dropping an unreadable retry job")
                            }
                        }
                    }
                    if !ready.is_empty() {
                        continue;
                    }
                    let wait = next.map_or(IDLE_LOOK, |due| {
                        Duration::from_millis(due.saturating_sub(now_ms())).min(IDLE_LOOK)
                    });
                    tokio::select! {
                        _ = jobs.pushed.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            },
        )
        .boxed()
    }
}

impl RetryQueue {
    /// The embedded queue in the broker's sled store.
    pub fn sled(store: Arc<Store>) -> Result<Self, RetryError> {
        let (depth, max_id) = store.retry_stats()?;
        Ok(Self::Sled(SledJobs {
            store,
            pushed: Arc::new(Notify::new()),
            next_id: Arc::new(AtomicU64::new(max_id + 1)),
            depth: Arc::new(AtomicU64::new(depth)),
        }))
    }

    /// The shared queue on Redis at `url`, under the key prefix `queue`.
    pub async fn redis(url: &str, queue: &str) -> Result<Self, RetryError> {
        let storage = redis_storage(url, queue).await?;
        Ok(Self::Redis(Box::new(RedisJobs {
            storage,
            url: url.to_owned(),
            queue: queue.to_owned(),
        })))
    }

    /// Schedules a job for its `due_ms`.
    pub async fn schedule(&self, job: RetryJob) -> Result<(), RetryError> {
        match self {
            Self::Sled(jobs) => {
                let jobs = jobs.clone();
                tokio::task::spawn_blocking(move || jobs.push(&job))
                    .await
                    .map_err(|e| RetryError::Worker(e.to_string()))?
            }
            Self::Redis(jobs) => {
                let run_at = UNIX_EPOCH + Duration::from_millis(job.due_ms);
                let task = TaskBuilder::new(job).run_at_time(run_at).build();
                let mut storage = jobs.storage.clone();
                match tokio::time::timeout(PUSH_TIMEOUT, storage.push_task(task)).await {
                    Ok(pushed) => pushed.map_err(|e| RetryError::Redis(e.to_string())),
                    Err(_) => Err(RetryError::Redis("push timed out".to_owned())),
                }
            }
        }
    }

    /// Jobs waiting (sled: exact; redis: not tracked, 0).
    pub fn depth(&self) -> u64 {
        match self {
            Self::Sled(jobs) => jobs.depth.load(Ordering::Relaxed),
            Self::Redis(_) => 0,
        }
    }

    /// Runs the apalis worker on its own thread with a single-threaded
    /// runtime until `cancel` fires. (Its future is not provably `Send`, a
    /// limit of apalis 1.0's generic backend types; a thread of its own also
    /// keeps retry work off the connection runtime.)
    pub fn spawn_worker(
        self,
        handler: RetryHandler,
        poll_interval: Duration,
        cancel: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("courier-retry".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the retry worker's runtime");
                        return;
                    }
                };
                if let Err(e) = runtime.block_on(self.run_worker(handler, poll_interval, cancel)) {
                    tracing::error!(error = %e, "the retry worker stopped");
                }
            })
    }

    /// Runs the apalis worker that fires due jobs into `handler` until
    /// `cancel` fires.
    async fn run_worker(
        self,
        handler: RetryHandler,
        poll_interval: Duration,
        cancel: CancellationToken,
    ) -> Result<(), RetryError> {
        let service = move |job: RetryJob| {
            let handler = Arc::clone(&handler);
            async move {
                // Redis schedules in whole seconds and may fire early.
                let early = job.due_ms.saturating_sub(now_ms());
                if early > 0 {
                    tokio::time::sleep(Duration::from_millis(early)).await;
                }
                handler(job);
                Ok::<(), BoxDynError>(())
            }
        };
        match self {
            Self::Sled(jobs) => {
                let backend = BackendBuilder::new()
                    .database(jobs)
                    .fetcher(fetch_due as FetchFn)
                    .sink(sink_jobs as SinkFn)
                    .build()
                    .map_err(|e| RetryError::Worker(e.to_string()))?;
                WorkerBuilder::new("courier-retry-sled")
                    .backend(backend)
                    .build(service)
                    .run_until(stopped(cancel))
                    .await
                    .map_err(|e| RetryError::Worker(e.to_string()))
            }
            Self::Redis(jobs) => {
                // This runtime's own connection: a connection's I/O belongs
                // to the runtime that opened it.
                let storage = redis_storage(&jobs.url, &jobs.queue).await?;
                let vacuum = {
                    let (mut storage, cancel) = (storage.clone(), cancel.clone());
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(VACUUM_EVERY);
                        loop {
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tick.tick() => {}
                            }
                            if let Err(e) = storage.vacuum().await {
                                tracing::warn!(error = %e, "retry queue vacuum failed");
                            }
                        }
                    })
                };
                let backend = storage.poll_with_interval(poll_interval);
                let result = WorkerBuilder::new("courier-retry-redis")
                    .backend(backend)
                    .build(service)
                    .run_until(stopped(cancel))
                    .await
                    .map_err(|e| RetryError::Worker(e.to_string()));
                vacuum.abort();
                result
            }
        }
    }
}

async fn redis_storage(url: &str, queue: &str) -> Result<RedisStorage<RetryJob>, RetryError> {
    let conn = apalis_redis::connect(url)
        .await
        .map_err(|e| RetryError::Redis(format!("cannot connect to {url}: {e}")))?;
    let config = apalis_redis::Config::default().queue(queue);
    Ok(RedisStorage::new(conn).with_config(config))
}

type JobResult<T> = Result<T, BoxDynError>;
type PushStep = fn(SledJobs, Task<RetryJob>) -> std::future::Ready<JobResult<SledJobs>>;
type JobSink =
    futures_util::sink::Unfold<SledJobs, PushStep, std::future::Ready<JobResult<SledJobs>>>;
type FetchFn =
    fn(&mut SledJobs, &(), &WorkerContext) -> BoxStream<'static, JobResult<Option<Task<RetryJob>>>>;
type SinkFn = fn(&mut SledJobs, &()) -> JobSink;

/// The apalis fetcher of the sled backend: the due-job stream.
fn fetch_due(
    jobs: &mut SledJobs,
    _: &(),
    _: &WorkerContext,
) -> BoxStream<'static, JobResult<Option<Task<RetryJob>>>> {
    jobs.clone().due_jobs()
}

/// One push through apalis's sink: a sled insert, no await needed.
fn push_step(jobs: SledJobs, task: Task<RetryJob>) -> std::future::Ready<JobResult<SledJobs>> {
    std::future::ready(
        jobs.push(&task.args)
            .map(|()| jobs)
            .map_err(BoxDynError::from),
    )
}

/// The apalis sink of the sled backend.
fn sink_jobs(jobs: &mut SledJobs, _: &()) -> JobSink {
    futures_util::sink::unfold(jobs.clone(), push_step as PushStep)
}

/// Resolves when `cancel` fires, in the shape apalis's `run_until` wants.
async fn stopped(cancel: CancellationToken) -> Result<(), std::io::Error> {
    cancel.cancelled().await;
    Ok(())
}
