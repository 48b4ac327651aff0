//! Every setting of the broker: the TOML file, environment variables and flags
//! merged into one [`Config`] (flags beat env beat file beat defaults).
//!
//! Durations and sizes are human-readable strings ("30s", "7d", "1MiB").
//! Unknown keys and bad values stop start-up with a message naming the key
//! and the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// A duration written as "250ms", "30s", "5m", "7d".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim()).map(Self).map_err(|e| {
            format!("{s:?} is not a duration like \"500ms\", \"30s\", \"5m\", \"7d\": {e}")
        })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A size written as "512", "64KiB", "1MiB", "1GiB" (or KB/MB/GB, powers of 1000).
///
/// Parsed by hand: the grammar is six suffixes, smaller than any crate's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let bad = || format!("{s:?} is not a size like \"512\", \"64KiB\", \"1MiB\", \"1GiB\"");
        let number: u64 = number.parse().map_err(|_| bad())?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        number.checked_mul(factor).map(Self).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// When a published message counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// One flush + fdatasync per message before its puback.
    Always,
    /// Group commit: many messages share one flush + fdatasync, every puback after it.
    #[default]
    Batch,
    /// Puback at once; a background flush every `fsync_interval` (the loss window).
    Interval,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Always => "always",
            Self::Batch => "batch",
            Self::Interval => "interval",
        })
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "batch" => Ok(Self::Batch),
            "interval" => Ok(Self::Interval),
            _ => Err(format!(
                "{s:?} is not an fsync policy: always, batch or interval"
            )),
        }
    }
}

/// `[server]`: listeners, storage, connection limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Public listener: `/ws`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// The host (IP address or DNS name) other nodes of a cluster use to
    /// reach this node's listeners, with their bound ports; `None`: the
    /// bound addresses themselves.
    pub advertise_host: Option<String>,
    /// Where sled keeps its files.
    pub data_dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// Flush period under `fsync = "interval"`.
    pub fsync_interval: Duration,
    /// Largest frame accepted; frames up to twice this get an error, larger ones close the connection.
    pub max_frame: u64,
    /// Server ping period; a connection silent for two of these is dropped.
    pub heartbeat: Duration,
    /// Time a new connection has to send `connect`.
    pub connect_timeout: Duration,
    /// Open connections at most; more are refused with HTTP 503.
    pub max_connections: usize,
    /// Frames queued towards one connection before its senders wait.
    pub outbound_buffer: usize,
    /// Publishes one connection may have waiting for their puback.
    pub max_pending_publishes: u32,
    /// Messages kept in memory per channel for fast delivery.
    pub cache_msgs: usize,
    /// Bytes of messages kept in memory per channel.
    pub cache_bytes: u64,
    /// sled's page cache.
    pub store_cache: u64,
    /// How long a `msg_id` is remembered.
    pub dedup_window: Duration,
    /// `msg_id`s remembered per channel at most (oldest forgotten first).
    pub dedup_max: usize,
    /// Period of the retention sweep.
    pub retention_interval: Duration,
    /// How long shutdown waits for connections to drain.
    pub shutdown_timeout: Duration,
    /// A connection whose socket takes no data for this long (its outbound
    /// queue stays full) is closed with 4009.
    pub slow_consumer_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            advertise_host: None,
            data_dir: PathBuf::from("courier-data"),
            fsync: FsyncPolicy::Batch,
            fsync_interval: Duration::from_millis(100),
            max_frame: 1 << 20,
            heartbeat: Duration::from_secs(25),
            connect_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            outbound_buffer: 256,
            max_pending_publishes: 1024,
            cache_msgs: 4096,
            cache_bytes: 8 << 20,
            store_cache: 128 << 20,
            dedup_window: Duration::from_secs(120),
            dedup_max: 100_000,
            retention_interval: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            slow_consumer_timeout: Duration::from_secs(30),
        }
    }
}

/// The policy of one namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespacePolicy {
    /// Persisted and acked (true) or memory only, at most once (false).
    pub durable: bool,
    pub ack_wait: Duration,
    pub max_deliver: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Largest delivery window a subscription may have.
    pub max_in_flight: u32,
    pub max_msgs: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
    /// Seqs one consumer may have waiting for a retry; past it a failure dead-letters.
    pub max_retries: usize,
    /// Dead letters kept per channel; past it the oldest are dropped (logged, counted).
    pub dlq_max: u64,
    /// Connections without a token may use this namespace (only matters
    /// once `[auth]` has a key: without one every connection is anonymous
    /// and allowed).
    pub anonymous: bool,
    /// Who may publish from a client connection: `clients` (anyone allowed
    /// in) or `server` (server-side only: the HTTP publish API with an API key).
    pub publish: PublishRule,
    /// `presence` requests are answered for channels of this namespace.
    pub presence: bool,
    /// Subscribers get `join` / `leave` events (needs `presence`).
    pub join_leave: bool,
}

/// Who may publish to a namespace from a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishRule {
    /// Every connection that may use the namespace.
    #[default]
    Clients,
    /// Nobody over a client connection: server-side publishing only.
    Server,
}

impl Default for NamespacePolicy {
    fn default() -> Self {
        Self {
            durable: true,
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            max_in_flight: 1000,
            max_msgs: 1_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_retries: 100_000,
            dlq_max: 100_000,
            anonymous: false,
            publish: PublishRule::Clients,
            presence: false,
            join_leave: false,
        }
    }
}

/// Where the retry queue keeps its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryBackend {
    /// An apalis backend over the broker's own sled store (millisecond timing).
    #[default]
    Sled,
    /// apalis-redis (whole-second timing; shared by cluster nodes).
    Redis,
}

/// `[retry]`: the retry queue.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    pub backend: RetryBackend,
    /// Needed with `backend = "redis"`.
    pub redis_url: Option<String>,
    /// Queue name (Redis key prefix).
    pub queue: String,
    /// How often the Redis worker looks for due jobs.
    pub poll_interval: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            backend: RetryBackend::Sled,
            redis_url: None,
            queue: "courier:retry".to_owned(),
            poll_interval: Duration::from_millis(200),
        }
    }
}

/// Where channels, consumers and dead letters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// Embedded sled in `server.data_dir`: one node.
    #[default]
    Sled,
    /// Redis shared by every node of a cluster.
    Redis,
}

/// `[storage]`: the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// Needed with `backend = "redis"`.
    pub redis_url: Option<String>,
    /// Key prefix in Redis: nodes with the same prefix form one cluster.
    pub prefix: String,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Sled,
            redis_url: None,
            prefix: "courier".to_owned(),
        }
    }
}

/// `[admin]`: the admin listener.
#[derive(Clone, PartialEq, Default)]
pub struct AdminConfig {
    /// The bearer token of every admin route (`COURIER_ADMIN_TOKEN` beats
    /// the file). `None`: one is generated at first start and kept in the
    /// data dir.
    pub token: Option<String>,
    /// Serve `/metrics` without the token.
    pub metrics_public: bool,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("metrics_public", &self.metrics_public)
            .finish()
    }
}

/// `[log]`: what the broker logs and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `courier=debug,info`, …); `RUST_LOG` beats it.
    pub level: String,
    /// `text` or `json`; `--log-format` beats it.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: "text".to_owned(),
        }
    }
}

/// `[http]`: the SSE and long-polling transports and the HTTP publish API.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// The `retry:` hint an SSE stream sends: how long a browser waits before it reconnects.
    pub sse_retry: Duration,
    /// An SSE response ends after this long; the browser reconnects with `Last-Event-ID`.
    pub sse_max_age: Duration,
    /// `GET /poll` without `wait`: how long a poll waits for something to return.
    pub poll_wait: Duration,
    /// The longest `wait` a poll may ask for (longer ones are clamped).
    pub poll_wait_max: Duration,
    /// Frames one poll response carries at most.
    pub poll_max_frames: usize,
    /// Bytes of frames one poll response carries at most (one frame always fits).
    pub poll_max_bytes: u64,
    /// An SSE or poll session nobody uses for this long is closed.
    pub session_idle_timeout: Duration,
    /// SSE and poll sessions open at once, at most.
    pub max_sessions: usize,
    /// Messages in one `POST /api/publish/batch`, at most.
    pub publish_batch_max: usize,
    /// Body of one `POST /api/publish/batch`, at most.
    pub publish_batch_max_bytes: u64,
    /// Origins whose pages may call `/sse`, `/poll` and `/api` (CORS); `"*"` for any.
    pub cors_allow_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            sse_retry: Duration::from_secs(2),
            sse_max_age: Duration::from_secs(600),
            poll_wait: Duration::from_secs(25),
            poll_wait_max: Duration::from_secs(60),
            poll_max_frames: 256,
            poll_max_bytes: 1 << 20,
            session_idle_timeout: Duration::from_secs(90),
            max_sessions: 10_000,
            publish_batch_max: 1000,
            publish_batch_max_bytes: 8 << 20,
            cors_allow_origins: Vec::new(),
        }
    }
}

/// One API key of the HTTP publish API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Names the key in logs (never the key itself).
    pub name: String,
    /// The secret a backend sends as `Authorization: Bearer <key>`.
    pub key: String,
    /// Channel patterns the key may publish to: an exact name, or a prefix ending in `*`.
    #[serde(default)]
    pub publish: Vec<String>,
}

impl ApiKey {
    /// Whether this key may publish to `channel`.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.publish
            .iter()
            .any(|pattern| crate::auth::Pattern::new(pattern, None).matches(channel))
    }
}

/// `[auth]`: credentials: JWTs for client connections, API keys for the
/// HTTP publish API.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Keys of the HTTP publish API. None configured: `/api/publish` is open.
    pub api_keys: Vec<ApiKey>,
    /// HS256 secret (at least 32 bytes).
    pub jwt_secret: Option<String>,
    /// A file holding the HS256 secret (trailing newline ignored).
    pub jwt_secret_file: Option<PathBuf>,
    /// A PEM public key: RS256 (RSA) or ES256 (P-256).
    pub jwt_public_key: Option<PathBuf>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// How long before its token expires a connection is told to `refresh`.
    #[serde(with = "humantime_serde_compat")]
    pub refresh_window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_public_key: None,
            audience: None,
            issuer: None,
            refresh_window: Duration::from_secs(30),
        }
    }
}

impl AuthConfig {
    /// Whether client tokens are checked.
    pub fn tokens_configured(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_secret_file.is_some() || self.jwt_public_key.is_some()
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "api_keys",
                &self.api_keys.iter().map(|k| &k.name).collect::<Vec<_>>(),
            )
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_secret_file", &self.jwt_secret_file)
            .field("jwt_public_key", &self.jwt_public_key)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("refresh_window", &self.refresh_window)
            .finish()
    }
}

/// Reads a humantime duration string for `#[serde(with)]`.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(super::HumanDuration::deserialize(d)?.0)
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub log: LogConfig,
    pub limits: crate::limits::LimitsConfig,
    pub server: ServerConfig,
    pub retry: RetryConfig,
    pub storage: StorageConfig,
    pub admin: AdminConfig,
    pub http: HttpConfig,
    pub auth: AuthConfig,
    /// `[namespaces.default]`, merged over the built-in defaults.
    pub default_namespace: NamespacePolicy,
    /// Other namespaces, each merged over `default_namespace`.
    pub namespaces: BTreeMap<String, NamespacePolicy>,
}

impl Config {
    /// The policy of a namespace (`""` and unknown ones get the default).
    pub fn policy(&self, namespace: &str) -> &NamespacePolicy {
        self.namespaces
            .get(namespace)
            .unwrap_or(&self.default_namespace)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    namespaces: BTreeMap<String, FileNamespace>,
    #[serde(default)]
    retry: FileRetry,
    #[serde(default)]
    storage: FileStorage,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    auth: AuthConfig,
    #[serde(default)]
    limits: crate::limits::LimitsConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    token: Option<String>,
    metrics_public: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    sse_retry: Option<HumanDuration>,
    sse_max_age: Option<HumanDuration>,
    poll_wait: Option<HumanDuration>,
    poll_wait_max: Option<HumanDuration>,
    poll_max_frames: Option<usize>,
    poll_max_bytes: Option<ByteSize>,
    session_idle_timeout: Option<HumanDuration>,
    max_sessions: Option<usize>,
    publish_batch_max: Option<usize>,
    publish_batch_max_bytes: Option<ByteSize>,
    cors_allow_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStorage {
    backend: Option<StorageBackend>,
    redis_url: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetry {
    backend: Option<RetryBackend>,
    redis_url: Option<String>,
    queue: Option<String>,
    poll_interval: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    advertise_host: Option<String>,
    data_dir: Option<PathBuf>,
    fsync: Option<FsyncPolicy>,
    fsync_interval: Option<HumanDuration>,
    max_frame: Option<ByteSize>,
    heartbeat: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    max_connections: Option<usize>,
    outbound_buffer: Option<usize>,
    max_pending_publishes: Option<u32>,
    cache_msgs: Option<usize>,
    cache_bytes: Option<ByteSize>,
    store_cache: Option<ByteSize>,
    dedup_window: Option<HumanDuration>,
    dedup_max: Option<usize>,
    retention_interval: Option<HumanDuration>,
    shutdown_timeout: Option<HumanDuration>,
    slow_consumer_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNamespace {
    durable: Option<bool>,
    ack_wait: Option<HumanDuration>,
    max_deliver: Option<u32>,
    backoff_base: Option<HumanDuration>,
    backoff_max: Option<HumanDuration>,
    max_in_flight: Option<u32>,
    max_msgs: Option<u64>,
    max_bytes: Option<ByteSize>,
    max_age: Option<HumanDuration>,
    max_retries: Option<usize>,
    dlq_max: Option<u64>,
    anonymous: Option<bool>,
    publish: Option<PublishRule>,
    presence: Option<bool>,
    join_leave: Option<bool>,
}

/// Replaces `$field` of `$target` with the file's value when it set one.
/// An IP address, or a DNS name: dot-separated labels of letters, digits
/// and `-`.
fn valid_host(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
        || (host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }))
}

macro_rules! merge {
    ($target:expr, $source:expr, { $($field:ident),* }, { $($dur:ident),* }) => {{
        $(if let Some(v) = $source.$field { $target.$field = v.into(); })*
        $(if let Some(v) = $source.$dur { $target.$dur = v.0; })*
    }};
}

impl From<ByteSize> for u64 {
    fn from(size: ByteSize) -> u64 {
        size.0
    }
}

impl FileNamespace {
    fn over(&self, base: &NamespacePolicy) -> NamespacePolicy {
        let mut policy = base.clone();
        let source = self.clone();
        merge!(policy, source, { durable, max_deliver, max_in_flight, max_msgs, max_bytes, max_retries, dlq_max,
            anonymous, publish, presence, join_leave },
            { ack_wait, backoff_base, backoff_max, max_age });
        policy
    }
}

/// What flags and environment variables override.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// `COURIER_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
}

impl Config {
    /// Reads `path` (when given), applies `overrides`, validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (file, origin) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                (Self::parse_file(&text, path)?, path.display().to_string())
            }
            None => (FileConfig::default(), "defaults".to_owned()),
        };
        let mut config = Self::from_file(file);
        if let Some(listen) = overrides.listen {
            config.server.listen = listen;
        }
        if let Some(admin) = overrides.admin_listen {
            config.server.admin_listen = admin;
        }
        if let Some(dir) = &overrides.data_dir {
            config.server.data_dir = dir.clone();
        }
        if let Some(token) = &overrides.admin_token {
            config.admin.token = Some(token.clone());
        }
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { origin, message })?;
        Ok(config)
    }

    /// Parses a config file's text; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config = Self::from_file(Self::parse_file(text, path)?);
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: path.display().to_string(),
            message,
        })?;
        Ok(config)
    }

    fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
    }

    fn from_file(file: FileConfig) -> Self {
        let mut server = ServerConfig::default();
        let s = file.server;
        server.advertise_host = s.advertise_host;
        merge!(server, s, { listen, admin_listen, data_dir, fsync, max_frame, max_connections,
            outbound_buffer, max_pending_publishes, cache_msgs, cache_bytes, store_cache, dedup_max },
            { fsync_interval, heartbeat, connect_timeout, dedup_window, retention_interval,
              shutdown_timeout, slow_consumer_timeout });
        let builtin = NamespacePolicy::default();
        let default_namespace = file
            .namespaces
            .get("default")
            .map_or(builtin.clone(), |ns| ns.over(&builtin));
        let namespaces = file
            .namespaces
            .iter()
            .filter(|(name, _)| name.as_str() != "default")
            .map(|(name, ns)| (name.clone(), ns.over(&default_namespace)))
            .collect();
        let mut storage = StorageConfig::default();
        let st = file.storage;
        storage.redis_url = st.redis_url;
        merge!(storage, st, { backend, prefix }, {});
        let mut retry = RetryConfig::default();
        let r = file.retry;
        // A cluster shares its retry queue: on Redis storage the queue is on
        // the same Redis unless the file says otherwise.
        if storage.backend == StorageBackend::Redis && r.backend.is_none() {
            retry.backend = RetryBackend::Redis;
            retry.redis_url.clone_from(&storage.redis_url);
        }
        if r.redis_url.is_some() {
            retry.redis_url = r.redis_url;
        }
        merge!(retry, r, { backend, queue }, { poll_interval });
        let admin = AdminConfig {
            token: file.admin.token,
            metrics_public: file.admin.metrics_public.unwrap_or(false),
        };
        let defaults = LogConfig::default();
        let log = LogConfig {
            level: file.log.level.unwrap_or(defaults.level),
            format: match file.log.format {
                Some(LogFormat::Json) => "json".to_owned(),
                Some(LogFormat::Text) | None => defaults.format,
            },
        };
        let mut http = HttpConfig::default();
        let h = file.http;
        merge!(http, h, { poll_max_frames, poll_max_bytes, max_sessions, publish_batch_max,
            publish_batch_max_bytes, cors_allow_origins },
            { sse_retry, sse_max_age, poll_wait, poll_wait_max, session_idle_timeout });
        Self {
            limits: file.limits,
            log,
            server,
            retry,
            storage,
            admin,
            http,
            auth: file.auth,
            default_namespace,
            namespaces,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.server;
        let positive = [
            ("server.max_frame", s.max_frame == 0),
            ("server.heartbeat", s.heartbeat.is_zero()),
            ("server.connect_timeout", s.connect_timeout.is_zero()),
            ("server.max_connections", s.max_connections == 0),
            ("server.outbound_buffer", s.outbound_buffer == 0),
            ("server.max_pending_publishes", s.max_pending_publishes == 0),
            ("server.fsync_interval", s.fsync_interval.is_zero()),
            ("server.retention_interval", s.retention_interval.is_zero()),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, zero)| *zero) {
            return Err(format!("{key} must be greater than zero"));
        }
        if self.retry.backend == RetryBackend::Redis && self.retry.redis_url.is_none() {
            return Err("retry.backend = \"redis\" needs retry.redis_url".to_owned());
        }
        if self.storage.backend == StorageBackend::Redis {
            if self.storage.redis_url.is_none() {
                return Err("storage.backend = \"redis\" needs storage.redis_url".to_owned());
            }
            if self.retry.backend != RetryBackend::Redis {
                return Err("storage.backend = \"redis\" needs retry.backend = \"redis\": every node of a cluster must share the retry queue (leave retry.backend out to use storage.redis_url)".to_owned());
            }
            let prefix = &self.storage.prefix;
            if prefix.is_empty()
                || prefix.len() > 64
                || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err("storage.prefix must be 1 to 64 characters without spaces".to_owned());
            }
        }
        if let Some(host) = &self.server.advertise_host
            && !valid_host(host)
        {
            return Err(format!(
                "server.advertise_host {host:?} is not an IP address or a DNS name (no port: the bound ports are advertised)"
            ));
        }
        if self.retry.poll_interval.is_zero() {
            return Err("retry.poll_interval must be greater than zero".to_owned());
        }
        if let Some(token) = &self.admin.token
            && (token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(
                "admin.token must be at least 16 characters without spaces (or leave it out to have one generated)"
                    .to_owned(),
            );
        }
        self.validate_http()?;
        self.validate_auth()?;
        self.limits.validate()?;
        if self.auth.refresh_window.is_zero() {
            return Err("auth.refresh_window must be greater than zero".to_owned());
        }
        if s.slow_consumer_timeout.is_zero() {
            return Err("server.slow_consumer_timeout must be greater than zero".to_owned());
        }
        if s.max_frame > 64 << 20 {
            return Err("server.max_frame must be at most 64MiB".to_owned());
        }
        for (name, ns) in std::iter::once(("default", &self.default_namespace))
            .chain(self.namespaces.iter().map(|(n, p)| (n.as_str(), p)))
        {
            if !name.is_empty() && crate::protocol::ChannelName::new(name).is_err()
                || name.contains(':')
            {
                return Err(format!(
                    "namespaces.{name}: a namespace name is a channel-name prefix without ':'"
                ));
            }
            if ns.join_leave && !ns.presence {
                return Err(format!(
                    "namespaces.{name}.join_leave needs namespaces.{name}.presence = true"
                ));
            }
            let checks = [
                ("max_in_flight", ns.max_in_flight == 0),
                ("max_deliver", ns.max_deliver == 0),
                ("max_msgs", ns.max_msgs == 0),
                ("max_bytes", ns.max_bytes == 0),
                ("max_age", ns.max_age.is_zero()),
                ("ack_wait", ns.ack_wait.is_zero()),
                ("backoff_base", ns.backoff_base.is_zero()),
                ("max_retries", ns.max_retries == 0),
                ("dlq_max", ns.dlq_max == 0),
            ];
            if let Some((key, _)) = checks.iter().find(|(_, zero)| *zero) {
                return Err(format!("namespaces.{name}.{key} must be greater than zero"));
            }
            if ns.backoff_max < ns.backoff_base {
                return Err(format!(
                    "namespaces.{name}.backoff_max must be at least backoff_base"
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_http(&self) -> Result<(), String> {
        let h = &self.http;
        let positive = [
            ("http.sse_retry", h.sse_retry.is_zero()),
            ("http.sse_max_age", h.sse_max_age.is_zero()),
            ("http.poll_wait_max", h.poll_wait_max.is_zero()),
            ("http.poll_max_frames", h.poll_max_frames == 0),
            ("http.poll_max_bytes", h.poll_max_bytes == 0),
            (
                "http.session_idle_timeout",
                h.session_idle_timeout.is_zero(),
            ),
            ("http.max_sessions", h.max_sessions == 0),
            ("http.publish_batch_max", h.publish_batch_max == 0),
            (
                "http.publish_batch_max_bytes",
                h.publish_batch_max_bytes == 0,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, zero)| *zero) {
            return Err(format!("{key} must be greater than zero"));
        }
        if h.poll_wait > h.poll_wait_max {
            return Err("http.poll_wait must be at most http.poll_wait_max".to_owned());
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        for (i, key) in self.auth.api_keys.iter().enumerate() {
            let at = format!("auth.api_keys[{i}]");
            if key.name.is_empty() {
                return Err(format!("{at}.name must not be empty"));
            }
            if !names.insert(key.name.as_str()) {
                return Err(format!("{at}.name {:?} is used twice", key.name));
            }
            if key.key.len() < 16 {
                return Err(format!(
                    "{at}.key (of {:?}) must be at least 16 bytes",
                    key.name
                ));
            }
            for pattern in &key.publish {
                let name = pattern.strip_suffix('*').unwrap_or(pattern);
                let valid = (name.is_empty() && pattern == "*")
                    || crate::protocol::ChannelName::new(name).is_ok();
                if !valid {
                    return Err(format!(
                        "{at}.publish: {pattern:?} is neither a channel name nor a prefix ending in '*'"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("courier.toml"))
    }

    #[test]
    fn the_design_example_parses() {
        let config = parse(
            r#"
[server]
listen = "127.0.0.1:7070"
admin_listen = "127.0.0.1:7071"
data_dir = "courier-data"
fsync = "batch"
max_frame = "1MiB"

[namespaces.default]
durable = true
ack_wait = "30s"
max_deliver = 10
backoff_base = "1s"
backoff_max = "5m"
max_in_flight = 1000
max_msgs = 1000000
max_bytes = "1GiB"
max_age = "7d"

[namespaces.typing]
durable = false
"#,
        )
        .unwrap();
        assert_eq!(config.server.max_frame, 1 << 20);
        assert_eq!(
            config.default_namespace.max_age,
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(
            config.default_namespace.backoff_max,
            Duration::from_secs(300)
        );
        let typing = config.policy("typing");
        assert!(!typing.durable);
        assert_eq!(typing.max_in_flight, 1000, "inherits from default");
        assert!(config.policy("chat").durable);
    }

    #[test]
    fn namespaces_inherit_from_the_configured_default() {
        let config =
            parse("[namespaces.default]\nmax_deliver = 3\n[namespaces.jobs]\nack_wait = \"5s\"\n")
                .unwrap();
        let jobs = config.policy("jobs");
        assert_eq!(jobs.max_deliver, 3);
        assert_eq!(jobs.ack_wait, Duration::from_secs(5));
    }

    #[test]
    fn advertise_host_is_a_host_without_a_port() {
        for good in ["10.0.0.5", "::1", "node-1.example.com", "localhost"] {
            let config = parse(&format!("[server]\nadvertise_host = \"{good}\"\n")).unwrap();
            assert_eq!(config.server.advertise_host.as_deref(), Some(good));
        }
        for bad in ["10.0.0.5:7071", "node 1", "", "-node.example.com", "a..b"] {
            let err = parse(&format!("[server]\nadvertise_host = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("server.advertise_host"), "{bad:?}: {err}");
        }
        assert_eq!(parse("").unwrap().server.advertise_host, None);
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let err = parse("[server]\nlisten_addr = \"127.0.0.1:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("courier.toml"), "{err}");
        assert!(err.contains("listen_addr"), "{err}");
        let err = parse("[namespaces.chat]\nmax_inflight = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_inflight"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse("[server]\nmax_frame = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_frame") && err.contains("lots"), "{err}");
        let err = parse("[server]\nfsync = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fsync"), "{err}");
        let err = parse("[namespaces.chat]\nack_wait = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ack_wait"), "{err}");
        let err = parse("[namespaces.chat]\nmax_in_flight = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespaces.chat.max_in_flight"), "{err}");
        let err = parse("[namespaces.\"a:b\"]\ndurable = false\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespaces.a:b"), "{err}");
    }

    #[test]
    fn retry_section() {
        let config =
            parse("[retry]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n")
                .unwrap();
        assert_eq!(config.retry.backend, RetryBackend::Redis);
        let err = parse("[retry]\nbackend = \"redis\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis_url"), "{err}");
        let err = parse("[retry]\nbackend = \"kafka\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka"), "{err}");
    }

    #[test]
    fn http_and_auth_sections() {
        let config = parse(
            r#"
[http]
sse_retry = "500ms"
poll_max_frames = 10

[auth]
api_keys = [{ name = "backend", key = "0123456789abcdef", publish = ["orders:*", "chat:room-1"] }]
"#,
        )
        .unwrap();
        assert_eq!(config.http.sse_retry, Duration::from_millis(500));
        assert_eq!(config.http.poll_max_frames, 10);
        let key = &config.auth.api_keys[0];
        assert!(key.may_publish("orders:eu") && key.may_publish("chat:room-1"));
        assert!(!key.may_publish("chat:room-2") && !key.may_publish("orders"));
        let err = parse("[http]\npoll_wiat = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("poll_wiat"), "{err}");
        let err =
            parse("[auth]\napi_keys = [{ name = \"a\", key = \"0123456789abcdef\", pub = [] }]\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("pub"), "{err}");
        let err = parse("[auth]\napi_keys = [{ name = \"a\", key = \"short\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.api_keys[0].key"), "{err}");
        let err = parse(
            "[auth]\napi_keys = [{ name = \"a\", key = \"0123456789abcdef\", publish = [\"a b*\"] }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("auth.api_keys[0].publish"), "{err}");
        let err = parse("[http]\npoll_wait = \"2m\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.poll_wait"), "{err}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("2MB".parse::<ByteSize>().unwrap().0, 2_000_000);
        assert_eq!("17".parse::<ByteSize>().unwrap().0, 17);
        assert!("1.5MiB".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert!("forever".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn overrides_beat_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:1000\"\ndata_dir = \"from-file\"\n",
        )
        .unwrap();
        let overrides = Overrides {
            listen: Some("127.0.0.1:2000".parse().unwrap()),
            ..Overrides::default()
        };
        let config = Config::load(Some(&path), &overrides).unwrap();
        assert_eq!(config.server.listen.port(), 2000);
        assert_eq!(config.server.data_dir, PathBuf::from("from-file"));
    }
}
