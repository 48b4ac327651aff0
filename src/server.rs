//! Wiring: open the broker, serve the public listener, run the background
//! tasks, and shut down gracefully.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests
//! bind port 0 and the binary passes a signal future. Shutdown: stop
//! accepting, tell every client 4010 (reconnect), wait for sessions (at most
//! `shutdown_timeout`), save consumers, flush the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState, TokenSource, resolve_token};
use crate::broker::{Broker, BrokerError, PERSIST_INTERVAL};

/// A channel nobody ever published to is forgotten after this long
/// without a request (see `Broker::evict_unused_channels`).
const UNUSED_CHANNEL_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// How often channel publish rates are sampled.
const STATS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
use crate::config::{Config, RetryBackend};
use crate::delivery::retry::RetryQueue;
use crate::transport::{AppState, public_router};

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "cannot listen on {0} for the admin API ({1}); pick another address with --admin-listen or COURIER_ADMIN_LISTEN"
    )]
    AdminListen(SocketAddr, std::io::Error),
    #[error(
        "cannot read or write the admin token in {0} ({1}); make the data dir writable, or set [admin] token or COURIER_ADMIN_TOKEN"
    )]
    AdminToken(std::path::PathBuf, std::io::Error),
}

/// A running broker: its handle for callers in the same process (tests,
/// the bench command) and the task that serves it.
pub struct Server {
    broker: Arc<Broker>,
    addr: SocketAddr,
    admin_addr: SocketAddr,
    admin_token: String,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Server {
    /// Opens the broker and starts serving `listener`.
    pub async fn start(config: Config, listener: TcpListener) -> Result<Self, ServerError> {
        let config = Arc::new(config);
        let retry = match config.retry.backend {
            RetryBackend::Sled => None,
            RetryBackend::Redis => {
                let url = config.retry.redis_url.as_deref().unwrap_or_default();
                Some(
                    RetryQueue::redis(url, &config.retry.queue)
                        .await
                        .map_err(|e| BrokerError::Unavailable(e.to_string()))?,
                )
            }
        };
        let open_config = Arc::clone(&config);
        let broker = tokio::task::spawn_blocking(move || Broker::open(open_config, retry))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??;
        let addr = listener.local_addr()?;
        let admin_listener = match TcpListener::bind(config.server.admin_listen).await {
            Ok(listener) => listener,
            Err(e) => {
                // The writer threads stop with the broker.
                let _ = broker.shutdown().await;
                return Err(ServerError::AdminListen(config.server.admin_listen, e));
            }
        };
        let admin_addr = admin_listener.local_addr()?;
        broker
            .node()
            .set_addresses(addr, admin_addr, config.server.advertise_host.as_deref());
        if broker.store().shared().is_some()
            && config.server.advertise_host.is_none()
            && admin_addr.ip().is_unspecified()
        {
            tracing::warn!(
                admin = %admin_addr,
                "the admin listener is on every interface: other nodes would call it at {admin_addr}, which reaches only this host; set [server] advertise_host to the address they should use"
            );
        }
        let (admin_token, source) =
            resolve_token(config.admin.token.as_deref(), &config.server.data_dir)
                .map_err(|e| ServerError::AdminToken(config.server.data_dir.clone(), e))?;
        let cancel = CancellationToken::new();
        let admin = admin::router(AdminState {
            broker: Arc::clone(&broker),
            token: admin_token.clone(),
            metrics_public: config.admin.metrics_public,
        });
        let task = tokio::spawn(serve(
            Arc::clone(&broker),
            listener,
            (admin_listener, admin),
            cancel.clone(),
        ));
        if !config.auth.tokens_configured() {
            tracing::warn!(
                "no token key configured ([auth] jwt_secret, jwt_secret_file or jwt_public_key): every connection is anonymous and may use every channel but server-side-only namespaces (the development default)"
            );
        }
        if config.auth.api_keys.is_empty() {
            tracing::warn!(
                "no API key configured ([auth] api_keys): POST /api/publish accepts unauthenticated requests"
            );
        }
        tracing::info!(%addr, data_dir = %config.server.data_dir.display(), fsync = %config.server.fsync, "courier listening");
        if config.storage.backend == crate::config::StorageBackend::Redis {
            tracing::info!(node = %broker.node().id(), prefix = %config.storage.prefix,
                "cluster node: channels, consumers and the retry queue are on Redis");
            if source != TokenSource::Configured {
                tracing::warn!(
                    "cluster node with an admin token of its own (no [admin] token or COURIER_ADMIN_TOKEN): the admin API of the other nodes cannot ask this one for its connections; give every node the same token"
                );
            }
        }
        tracing::info!(admin = %admin_addr, "admin API, /metrics and the dashboard at http://{admin_addr}/admin/ui");
        match source {
            TokenSource::Generated => tracing::warn!(
                "admin token generated and stored in {}: {admin_token} (dashboard: http://{admin_addr}/admin/ui?token={admin_token})",
                config.server.data_dir.join(admin::TOKEN_FILE).display()
            ),
            TokenSource::File => tracing::info!(
                "admin token: read from {}",
                config.server.data_dir.join(admin::TOKEN_FILE).display()
            ),
            TokenSource::Configured => tracing::info!("admin token: from the configuration"),
        }
        Ok(Self {
            broker,
            addr,
            admin_addr,
            admin_token,
            cancel,
            task,
        })
    }

    /// The address the admin listener is bound to.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The admin token every admin route needs.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The broker, for in-process callers.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The address the public listener is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> Result<(), ServerError> {
        self.task
            .await
            .map_err(|e| ServerError::Broker(BrokerError::Internal(e.to_string())))?
    }
}

/// Runs the broker on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let server = Server::start(config, listener).await?;
    let cancel = server.cancel.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    server.wait().await
}

async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    (admin_listener, admin): (TcpListener, axum::Router),
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    let config = Arc::clone(broker.config());
    let tracker = TaskTracker::new();
    let state = Arc::new(AppState {
        broker: Arc::clone(&broker),
        tracker: tracker.clone(),
        shutdown: cancel.clone(),
        connections: Arc::new(Semaphore::new(config.server.max_connections)),
        sessions: Arc::new(crate::transport::sessions::Registry::new(
            config.http.max_sessions,
        )),
        publishers: std::sync::Mutex::default(),
    });
    let background = spawn_background(&broker, &tracker, &cancel);
    let app = public_router(state).into_make_service_with_connect_info::<SocketAddr>();
    let http_cancel = cancel.clone();
    // Small frames must not wait for Nagle's algorithm (it added ~40 ms to
    // every puback and delivery).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let admin_cancel = cancel.clone();
    let admin_server = tokio::spawn(async move {
        axum::serve(admin_listener, admin)
            .with_graceful_shutdown(async move { admin_cancel.cancelled().await })
            .await
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { http_cancel.cancelled().await })
        .await?;
    match admin_server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the admin listener failed"),
        Err(e) => tracing::error!(error = %e, "the admin listener task failed"),
    }

    tracing::info!("shutting down: closing connections");
    tracker.close();
    if tokio::time::timeout(config.server.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections did not close within shutdown_timeout");
    }
    for task in background {
        task.abort();
    }
    broker.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

fn spawn_background(
    broker: &Arc<Broker>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let persist = {
        let (broker, cancel) = (Arc::clone(broker), cancel.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(PERSIST_INTERVAL);
            while !cancel.is_cancelled() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = broker.persist_consumers().await {
                    tracing::error!(error = %e, "saving consumer state failed");
                }
            }
        })
    };
    let retention = {
        let (broker, cancel) = (Arc::clone(broker), cancel.clone());
        let period = broker.config().server.retention_interval;
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(period);
            while !cancel.is_cancelled() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = broker.enforce_retention().await {
                    tracing::error!(error = %e, "retention sweep failed");
                }
                if let Err(e) = broker.evict_unused_channels(UNUSED_CHANNEL_IDLE).await {
                    tracing::error!(error = %e, "sweeping unused channels failed");
                }
            }
        })
    };
    let stats = {
        let (broker, cancel) = (Arc::clone(broker), cancel.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(STATS_INTERVAL);
            let mut last = tokio::time::Instant::now();
            let mut ticks: u64 = 0;
            while !cancel.is_cancelled() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let now = tokio::time::Instant::now();
                broker.sample_rates(now - last);
                last = now;
                ticks += 1;
                if ticks.is_multiple_of(60) {
                    // Forget the rate-limit state of users idle for a while.
                    broker.limits().retain_recent();
                }
            }
        })
    };
    if let Err(e) = broker.start_retry_worker(cancel.clone()) {
        tracing::error!(error = %e, "cannot start the retry worker; retries wait for the next subscribe");
    }
    let follow = tracker.spawn(crate::broker::cluster::follow(
        Arc::clone(broker),
        cancel.clone(),
    ));
    let heartbeat = tracker.spawn(crate::broker::cluster::heartbeat(
        Arc::clone(broker),
        cancel.clone(),
    ));
    if let Some(url) = broker.store().shared().map(|s| s.url().to_owned()) {
        // Not on the tracker: it outlives the background tasks, to deliver
        // what the broker's shutdown tells the other nodes.
        tokio::spawn(Arc::clone(broker.relays()).run_sender(url));
    }
    let presence = tracker.spawn(crate::broker::presence::run(
        Arc::clone(broker),
        cancel.clone(),
    ));
    vec![persist, retention, stats, follow, heartbeat, presence]
}

/// A future that resolves on SIGINT (Ctrl-C) or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a SIGTERM that arrives between start-up and the first poll
/// must still shut down gracefully (it would otherwise kill the process, or
/// be lost where the parent ignores SIGTERM).
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}
