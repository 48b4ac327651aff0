//! Rate limits and connection caps ("trust nothing", issue 7): the `[limits]`
//! settings, one broker-wide [`Limits`] and one [`ConnectionLimits`] per
//! connection.
//!
//! What is limited, and where:
//! - per connection: publishes/s and published bytes/s, subscribe requests/s,
//!   open subscriptions ([`ConnectionLimits`]);
//! - per user, across all of the user's connections: publishes/s and bytes/s
//!   (keyed `governor` limiters in [`Limits`]);
//! - open connections per user and per IP address ([`Limits::admit`]).
//!
//! Invariants and rules:
//! - Anonymous connections have no per-user state: they are limited per
//!   connection and per IP only.
//! - Loopback addresses are never capped per IP: local tools (`courier
//!   bench`) and a reverse proxy on the same host all arrive from one
//!   loopback address. IPv4-mapped IPv6 addresses count as their IPv4 form.
//! - A refused request still spends what it was checked against so far
//!   (GCRA cannot give cells back); the connection's own buckets are checked
//!   before the user's, so a connection over its own limit does not drain the
//!   budget its user's other connections share.
//! - Every refusal counts towards abuse: `abuse_violations` refusals within
//!   `abuse_window` latch [`ConnectionLimits::abusive`], and the session then
//!   closes with 4008 (`close::POLICY`).
//! - Time comes from a `governor` clock: the real one in production,
//!   [`governor::clock::FakeRelativeClock`] in tests.
//! - The keyed limiters keep a state per user until [`Limits::retain_recent`]
//!   drops the idle ones: call it periodically.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{InsufficientCapacity, NotUntil, Quota, RateLimiter};
use serde::Deserialize;

use crate::config::{ByteSize, HumanDuration};
use crate::protocol::{ErrorCode, ErrorFrame};

/// Highest rate any `*_per_sec` key accepts. `governor` keeps the interval
/// between two cells in whole nanoseconds, so faster rates cannot be told
/// apart (and near this bound they are rounded up: a bytes rate of `r`/s may
/// let through up to `r / 1e9` more, 1.7 % at 16 MiB/s).
pub const MAX_RATE: u64 = 1_000_000_000;

/// `[limits]`: rate limits and connection caps. Every limit is on by default
/// and none can be switched off: 0 is rejected by [`LimitsConfig::validate`].
///
/// The defaults are meant to never touch a well-behaved interactive client
/// (chat, dashboards, devices) while keeping one peer from taking a large
/// share of a broker that holds 100,000 connections.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Publishes per second per connection. Default 10,000: three orders of
    /// magnitude above interactive use, and room for a backend service that
    /// publishes over one connection; a faster one gets a higher setting
    /// (`courier bench` runs its own broker without these limits).
    pub publish_per_sec: u32,
    /// Publishes a connection may send at once before the rate applies.
    /// Default 20,000: two seconds' worth, which absorbs a client flushing
    /// its offline queue after a reconnect.
    pub publish_burst: u32,
    /// Published payload bytes per second per connection. Default 32 MiB:
    /// 32 maximum-size (1 MiB) frames per second. The bucket holds one second's
    /// worth or one `server.max_frame`, whichever is more, so a frame that
    /// the transport accepts can always pass.
    pub publish_bytes_per_sec: ByteSize,
    /// Publishes per second per user, across all the user's connections
    /// (burst: one second's worth). Default 50,000: five connections at full
    /// rate; it bounds what one account can push however many connections
    /// it opens.
    pub user_publish_per_sec: u32,
    /// Published payload bytes per second per user (bucket as for
    /// `publish_bytes_per_sec`). Default 128 MiB, four connections' worth.
    pub user_publish_bytes_per_sec: ByteSize,
    /// `subscribe` requests per second per connection. Default 100.
    pub subscribe_per_sec: u32,
    /// `subscribe` requests a connection may send at once. Default 1000, as
    /// many as `max_subscriptions`: a reconnecting client resubscribes to
    /// everything at once and must not be refused for it.
    pub subscribe_burst: u32,
    /// Open subscriptions per connection. Default 1000: each costs a task
    /// and a consumer; far above what one client screen follows.
    pub max_subscriptions: usize,
    /// Open connections per user. Default 100: many tabs and devices, but not
    /// a connection flood from one stolen token.
    pub max_connections_per_user: u32,
    /// Open connections per IP address (loopback exempt). Default 1000: an
    /// office or a carrier-grade NAT puts many honest users behind one
    /// address, so this only stops floods (1 % of `server.max_connections`).
    pub max_connections_per_ip: u32,
    /// Refusals within `abuse_window` after which the connection is closed
    /// with 4008. Default 1000: a client that honours `retry_after_ms` is
    /// refused a few times per backoff; one that keeps sending at twice its
    /// limit reaches 1000 in about a second.
    pub abuse_violations: u32,
    /// The window `abuse_violations` is counted in. Default 10 s.
    pub abuse_window: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            publish_per_sec: 10_000,
            publish_burst: 20_000,
            publish_bytes_per_sec: ByteSize(32 << 20),
            user_publish_per_sec: 50_000,
            user_publish_bytes_per_sec: ByteSize(128 << 20),
            subscribe_per_sec: 100,
            subscribe_burst: 1000,
            max_subscriptions: 1000,
            max_connections_per_user: 100,
            max_connections_per_ip: 1000,
            abuse_violations: 1000,
            abuse_window: HumanDuration(Duration::from_secs(10)),
        }
    }
}

impl LimitsConfig {
    /// Limits no load test reaches: `courier bench` measures the broker,
    /// not its rate limiter.
    pub fn unlimited() -> Self {
        const RATE: u32 = 1_000_000_000;
        Self {
            publish_per_sec: RATE,
            publish_burst: RATE,
            publish_bytes_per_sec: ByteSize(u64::from(RATE)),
            user_publish_per_sec: RATE,
            user_publish_bytes_per_sec: ByteSize(u64::from(RATE)),
            subscribe_per_sec: RATE,
            subscribe_burst: RATE,
            max_subscriptions: 1_000_000_000,
            max_connections_per_user: 4_000_000_000,
            max_connections_per_ip: 4_000_000_000,
            abuse_violations: 4_000_000_000,
            abuse_window: HumanDuration(Duration::from_secs(10)),
        }
    }

    /// The `[limits]` section of [`LimitsConfig::unlimited`], for a config file.
    pub const UNLIMITED_TOML: &'static str = "[limits]\npublish_per_sec = 1000000000\npublish_burst = 1000000000\npublish_bytes_per_sec = 1000000000\nuser_publish_per_sec = 1000000000\nuser_publish_bytes_per_sec = 1000000000\nsubscribe_per_sec = 1000000000\nsubscribe_burst = 1000000000\nmax_subscriptions = 1000000000\nmax_connections_per_user = 4000000000\nmax_connections_per_ip = 4000000000\nabuse_violations = 4000000000\n";

    /// Rejects zeros and rates above [`MAX_RATE`], naming the key as
    /// `limits.<key>`.
    pub fn validate(&self) -> Result<(), String> {
        let zero = [
            ("publish_per_sec", self.publish_per_sec == 0),
            ("publish_burst", self.publish_burst == 0),
            ("publish_bytes_per_sec", self.publish_bytes_per_sec.0 == 0),
            ("user_publish_per_sec", self.user_publish_per_sec == 0),
            (
                "user_publish_bytes_per_sec",
                self.user_publish_bytes_per_sec.0 == 0,
            ),
            ("subscribe_per_sec", self.subscribe_per_sec == 0),
            ("subscribe_burst", self.subscribe_burst == 0),
            ("max_subscriptions", self.max_subscriptions == 0),
            (
                "max_connections_per_user",
                self.max_connections_per_user == 0,
            ),
            ("max_connections_per_ip", self.max_connections_per_ip == 0),
            ("abuse_violations", self.abuse_violations == 0),
            ("abuse_window", self.abuse_window.0.is_zero()),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, zero)| *zero) {
            return Err(format!("limits.{key} must be greater than zero"));
        }
        let rates = [
            ("publish_per_sec", u64::from(self.publish_per_sec)),
            ("publish_bytes_per_sec", self.publish_bytes_per_sec.0),
            ("user_publish_per_sec", u64::from(self.user_publish_per_sec)),
            (
                "user_publish_bytes_per_sec",
                self.user_publish_bytes_per_sec.0,
            ),
            ("subscribe_per_sec", u64::from(self.subscribe_per_sec)),
        ];
        if let Some((key, _)) = rates.iter().find(|(_, rate)| *rate > MAX_RATE) {
            return Err(format!(
                "limits.{key} must be at most {MAX_RATE} per second"
            ));
        }
        Ok(())
    }
}

/// A request was refused by a rate limit: reply `error {code: "rate_limited",
/// retry_after_ms}` and go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("over limits.{what}; retry after {retry_after_ms} ms")]
pub struct RateLimited {
    /// When the same request would pass, if nothing else spends the budget
    /// first; at least 1.
    pub retry_after_ms: u64,
    /// The `[limits]` key that refused it (`publish_per_sec`, …); bounded, so
    /// usable as a metric label.
    pub what: &'static str,
}

impl RateLimited {
    /// The `error` frame answering request `id`.
    pub fn error_frame(&self, id: Option<u64>) -> ErrorFrame {
        let mut frame = ErrorFrame::new(id, ErrorCode::RateLimited, self.to_string());
        frame.retry_after_ms = Some(self.retry_after_ms);
        frame
    }
}

/// Why a `subscribe` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The connection already has `max` subscriptions: not a rate limit,
    /// waiting does not help; unsubscribing does.
    #[error("at most {max} subscriptions per connection (limits.max_subscriptions)")]
    TooManySubscriptions {
        /// `limits.max_subscriptions`.
        max: usize,
    },
    /// Too many `subscribe` requests.
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
}

impl Denied {
    /// The `error` frame answering request `id`: `too_large` (a count over
    /// its limit) or `rate_limited` with `retry_after_ms`.
    pub fn error_frame(&self, id: Option<u64>) -> ErrorFrame {
        match self {
            Self::TooManySubscriptions { .. } => {
                ErrorFrame::new(id, ErrorCode::TooLarge, self.to_string())
            }
            Self::RateLimited(limited) => limited.error_frame(id),
        }
    }
}

/// Why a connection was not admitted: close it with 4008 (`close::POLICY`)
/// and this message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The user already has `max` open connections.
    #[error("this user already has {max} open connections (limits.max_connections_per_user)")]
    User {
        /// `limits.max_connections_per_user`.
        max: u32,
    },
    /// The address already has `max` open connections.
    #[error("this address already has {max} open connections (limits.max_connections_per_ip)")]
    Ip {
        /// `limits.max_connections_per_ip`.
        max: u32,
    },
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Keyed<C> =
    RateLimiter<Arc<str>, DashMapStateStore<Arc<str>>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The quotas, built once from a validated config.
#[derive(Debug, Clone, Copy)]
struct Quotas {
    publish: Quota,
    publish_bytes: Quota,
    user_publish: Quota,
    user_publish_bytes: Quota,
    subscribe: Quota,
}

/// `per_sec` cells a second, `burst` at once.
fn quota(key: &str, per_sec: u64, burst: u64) -> Result<Quota, String> {
    let nonzero = |value: u64| {
        u32::try_from(value)
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or_else(|| format!("limits.{key} must be between 1 and {}", u32::MAX))
    };
    Ok(Quota::per_second(nonzero(per_sec)?).allow_burst(nonzero(burst)?))
}

impl Quotas {
    fn new(config: &LimitsConfig, max_frame: u64) -> Result<Self, String> {
        config.validate()?;
        let bytes = |key, per_sec: u64| quota(key, per_sec, per_sec.max(max_frame));
        Ok(Self {
            publish: quota(
                "publish_per_sec",
                config.publish_per_sec.into(),
                config.publish_burst.into(),
            )?,
            publish_bytes: bytes("publish_bytes_per_sec", config.publish_bytes_per_sec.0)?,
            user_publish: quota(
                "user_publish_per_sec",
                config.user_publish_per_sec.into(),
                config.user_publish_per_sec.into(),
            )?,
            user_publish_bytes: bytes(
                "user_publish_bytes_per_sec",
                config.user_publish_bytes_per_sec.0,
            )?,
            subscribe: quota(
                "subscribe_per_sec",
                config.subscribe_per_sec.into(),
                config.subscribe_burst.into(),
            )?,
        })
    }
}

/// Open connections per user and per IP; entries leave at zero.
#[derive(Debug, Default)]
struct Counts {
    users: HashMap<Arc<str>, u32>,
    ips: HashMap<IpAddr, u32>,
}

fn lock(counts: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    // Every critical section is a few map operations that cannot leave the
    // counts half-updated, so a panic elsewhere does not make them wrong.
    counts.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The broker's limits: one per broker, shared in an `Arc`.
pub struct Limits<C: Clock = DefaultClock> {
    config: LimitsConfig,
    quotas: Quotas,
    /// Per-user publishes/s, shared by every connection of the user.
    user_publish: Arc<Keyed<C>>,
    /// Per-user published bytes/s.
    user_publish_bytes: Arc<Keyed<C>>,
    /// Open connections; [`Admission`] guards hold it to decrement on drop.
    counts: Arc<Mutex<Counts>>,
    clock: C,
}

impl Limits {
    /// Limits from a config (validated here too); `max_frame` is
    /// `server.max_frame`, the smallest a bytes bucket may be.
    pub fn new(config: &LimitsConfig, max_frame: u64) -> Result<Self, String> {
        Self::with_clock(config, max_frame, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limits<C> {
    /// As [`Limits::new`], on another clock (tests use
    /// [`governor::clock::FakeRelativeClock`]).
    pub fn with_clock(config: &LimitsConfig, max_frame: u64, clock: C) -> Result<Self, String> {
        let quotas = Quotas::new(config, max_frame)?;
        Ok(Self {
            config: config.clone(),
            quotas,
            user_publish: Arc::new(RateLimiter::dashmap_with_clock(
                quotas.user_publish,
                clock.clone(),
            )),
            user_publish_bytes: Arc::new(RateLimiter::dashmap_with_clock(
                quotas.user_publish_bytes,
                clock.clone(),
            )),
            counts: Arc::default(),
            clock,
        })
    }

    /// Counts a new connection of `user` (`None`: anonymous) from `ip`, or
    /// refuses it when the user or the address is at its cap. Keep the
    /// [`Admission`] as long as the connection lives.
    pub fn admit(&self, user: Option<&str>, ip: Option<IpAddr>) -> Result<Admission, Refused> {
        let ip = ip
            .map(|ip| ip.to_canonical())
            .filter(|ip| !ip.is_loopback());
        let mut counts = lock(&self.counts);
        if let Some(user) = user
            && counts.users.get(user).copied().unwrap_or(0) >= self.config.max_connections_per_user
        {
            return Err(Refused::User {
                max: self.config.max_connections_per_user,
            });
        }
        if let Some(ip) = ip
            && counts.ips.get(&ip).copied().unwrap_or(0) >= self.config.max_connections_per_ip
        {
            return Err(Refused::Ip {
                max: self.config.max_connections_per_ip,
            });
        }
        let user: Option<Arc<str>> = user.map(Arc::from);
        if let Some(user) = &user {
            *counts.users.entry(Arc::clone(user)).or_insert(0) += 1;
        }
        if let Some(ip) = ip {
            *counts.ips.entry(ip).or_insert(0) += 1;
        }
        Ok(Admission {
            counts: Arc::clone(&self.counts),
            user,
            ip,
        })
    }

    /// The per-connection state of a new connection of `user` (`None`:
    /// anonymous, limited per connection only).
    pub fn connection(&self, user: Option<&str>) -> ConnectionLimits<C> {
        let clock = &self.clock;
        ConnectionLimits {
            publish: RateLimiter::direct_with_clock(self.quotas.publish, clock.clone()),
            publish_bytes: RateLimiter::direct_with_clock(self.quotas.publish_bytes, clock.clone()),
            subscribe: RateLimiter::direct_with_clock(self.quotas.subscribe, clock.clone()),
            user: user.map(|user| UserLimits {
                key: Arc::from(user),
                publish: Arc::clone(&self.user_publish),
                publish_bytes: Arc::clone(&self.user_publish_bytes),
            }),
            quotas: self.quotas,
            max_subscriptions: self.config.max_subscriptions,
            abuse: Abuse {
                violations: usize::try_from(self.config.abuse_violations).unwrap_or(usize::MAX),
                window: self.config.abuse_window.0,
                recent: VecDeque::new(),
                abusive: false,
            },
            clock: clock.clone(),
        }
    }

    /// Forgets the per-user rate states that are back to full (idle for
    /// about a second at the defaults). Call it periodically, e.g. every
    /// minute: without it the keyed limiters keep every user ever seen.
    pub fn retain_recent(&self) {
        self.user_publish.retain_recent();
        self.user_publish_bytes.retain_recent();
    }
}

/// One admitted connection, counted against its user and its address until
/// dropped.
#[derive(Debug)]
#[must_use = "the connection is uncounted as soon as the admission is dropped"]
pub struct Admission {
    counts: Arc<Mutex<Counts>>,
    user: Option<Arc<str>>,
    ip: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(user) = &self.user
            && let Some(count) = counts.users.get_mut(user)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.users.remove(user);
            }
        }
        if let Some(ip) = &self.ip
            && let Some(count) = counts.ips.get_mut(ip)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.ips.remove(ip);
            }
        }
    }
}

/// A user's shared buckets, as seen from one of the user's connections.
struct UserLimits<C: Clock> {
    key: Arc<str>,
    publish: Arc<Keyed<C>>,
    publish_bytes: Arc<Keyed<C>>,
}

/// The recent refusals of one connection.
struct Abuse<I> {
    /// `limits.abuse_violations`.
    violations: usize,
    /// `limits.abuse_window`.
    window: Duration,
    /// When the last (at most `violations`) refusals happened, oldest first.
    recent: VecDeque<I>,
    /// Latched: once abusive, the connection is to be closed.
    abusive: bool,
}

impl<I: Reference> Abuse<I> {
    fn record(&mut self, now: I) {
        if self.recent.len() == self.violations {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if let Some(&oldest) = self.recent.front()
            && self.recent.len() == self.violations
            && Duration::from(now.duration_since(oldest)) <= self.window
        {
            self.abusive = true;
        }
    }
}

/// One connection's rate state, owned by its session.
pub struct ConnectionLimits<C: Clock = DefaultClock> {
    publish: Direct<C>,
    publish_bytes: Direct<C>,
    subscribe: Direct<C>,
    /// `None` for anonymous connections.
    user: Option<UserLimits<C>>,
    /// The bytes buckets' bursts, to charge an oversized publish a full bucket.
    quotas: Quotas,
    max_subscriptions: usize,
    abuse: Abuse<C::Instant>,
    clock: C,
}

/// How many cells `bytes` costs in a bucket of `burst`: a payload larger
/// than the whole bucket is charged the whole bucket, so it passes only when
/// the bucket is full (and empties it) instead of never. With the bucket at
/// least `server.max_frame` this only happens to a caller that passes more
/// than a frame's size.
fn cells(bytes: usize, burst: NonZeroU32) -> Option<NonZeroU32> {
    NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX).min(burst.get()))
}

/// The refusal for a request that would conform at `not_until`.
fn refusal<P: Reference>(not_until: &NotUntil<P>, now: P, what: &'static str) -> RateLimited {
    refusal_after(not_until.wait_time_from(now), what)
}

fn refusal_after(wait: Duration, what: &'static str) -> RateLimited {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    RateLimited {
        retry_after_ms: u64::try_from(ms).unwrap_or(u64::MAX).max(1),
        what,
    }
}

/// The verdict of a `check_n`/`check_key_n` of `quota`.
fn verdict_n<P: Reference>(
    result: Result<Result<(), NotUntil<P>>, InsufficientCapacity>,
    now: P,
    quota: Quota,
    what: &'static str,
) -> Result<(), RateLimited> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(refusal(&not_until, now, what)),
        // Unreachable: `cells` never asks for more than the burst.
        Err(InsufficientCapacity(_)) => Err(refusal_after(quota.burst_size_replenished_in(), what)),
    }
}

impl<C: Clock> ConnectionLimits<C> {
    /// Checks one publish of `bytes` payload bytes against the connection's
    /// messages/s and bytes/s, then its user's. Every refusal counts towards
    /// [`ConnectionLimits::abusive`].
    pub fn check_publish(&mut self, bytes: usize) -> Result<(), RateLimited> {
        let now = self.clock.now();
        let result = self.publish_verdict(bytes, now);
        if result.is_err() {
            self.abuse.record(now);
        }
        result
    }

    fn publish_verdict(&self, bytes: usize, now: C::Instant) -> Result<(), RateLimited> {
        let quotas = &self.quotas;
        self.publish
            .check()
            .map_err(|not_until| refusal(&not_until, now, "publish_per_sec"))?;
        if let Some(n) = cells(bytes, quotas.publish_bytes.burst_size()) {
            verdict_n(
                self.publish_bytes.check_n(n),
                now,
                quotas.publish_bytes,
                "publish_bytes_per_sec",
            )?;
        }
        let Some(user) = &self.user else {
            return Ok(());
        };
        user.publish
            .check_key(&user.key)
            .map_err(|not_until| refusal(&not_until, now, "user_publish_per_sec"))?;
        if let Some(n) = cells(bytes, quotas.user_publish_bytes.burst_size()) {
            verdict_n(
                user.publish_bytes.check_key_n(&user.key, n),
                now,
                quotas.user_publish_bytes,
                "user_publish_bytes_per_sec",
            )?;
        }
        Ok(())
    }

    /// Checks a `subscribe` on a connection that has `current_subscriptions`
    /// open: first the count (a distinct refusal, not a rate limit), then
    /// the rate. Every refusal counts towards [`ConnectionLimits::abusive`].
    pub fn check_subscribe(&mut self, current_subscriptions: usize) -> Result<(), Denied> {
        let now = self.clock.now();
        let result = if current_subscriptions >= self.max_subscriptions {
            Err(Denied::TooManySubscriptions {
                max: self.max_subscriptions,
            })
        } else {
            self.subscribe
                .check()
                .map_err(|not_until| refusal(&not_until, now, "subscribe_per_sec").into())
        };
        if result.is_err() {
            self.abuse.record(now);
        }
        result
    }

    /// True once `abuse_violations` refusals happened within `abuse_window`;
    /// stays true. The session should then close with 4008 (`close::POLICY`).
    pub fn abusive(&self) -> bool {
        self.abuse.abusive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unlimited_toml_is_the_unlimited_config() {
        let config = crate::config::Config::from_toml(
            LimitsConfig::UNLIMITED_TOML,
            std::path::Path::new("bench.toml"),
        )
        .unwrap();
        assert_eq!(config.limits, LimitsConfig::unlimited());
    }
    use governor::clock::FakeRelativeClock;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A frame size that does not widen the buckets of the tests' configs.
    const MAX_FRAME: u64 = 100;

    fn limits(config: &LimitsConfig) -> (Limits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limits = Limits::with_clock(config, MAX_FRAME, clock.clone()).unwrap();
        (limits, clock)
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    #[test]
    fn defaults_are_valid_and_build() {
        let config = LimitsConfig::default();
        config.validate().unwrap();
        Limits::new(&config, 1 << 20).unwrap();
        // A reconnect resubscribes everything at once.
        assert!(usize::try_from(config.subscribe_burst).unwrap() >= config.max_subscriptions);
    }

    #[test]
    fn zero_values_are_rejected_by_name() {
        type Zero = fn(&mut LimitsConfig);
        let zeroes: [(&str, Zero); 12] = [
            ("publish_per_sec", |c| c.publish_per_sec = 0),
            ("publish_burst", |c| c.publish_burst = 0),
            ("publish_bytes_per_sec", |c| {
                c.publish_bytes_per_sec = ByteSize(0)
            }),
            ("user_publish_per_sec", |c| c.user_publish_per_sec = 0),
            ("user_publish_bytes_per_sec", |c| {
                c.user_publish_bytes_per_sec = ByteSize(0);
            }),
            ("subscribe_per_sec", |c| c.subscribe_per_sec = 0),
            ("subscribe_burst", |c| c.subscribe_burst = 0),
            ("max_subscriptions", |c| c.max_subscriptions = 0),
            ("max_connections_per_user", |c| {
                c.max_connections_per_user = 0
            }),
            ("max_connections_per_ip", |c| c.max_connections_per_ip = 0),
            ("abuse_violations", |c| c.abuse_violations = 0),
            ("abuse_window", |c| {
                c.abuse_window = HumanDuration(Duration::ZERO)
            }),
        ];
        for (key, zero) in zeroes {
            let mut config = LimitsConfig::default();
            zero(&mut config);
            let err = config.validate().unwrap_err();
            assert!(err.contains(&format!("limits.{key} ")), "{key}: {err}");
            assert!(Limits::new(&config, 1 << 20).is_err(), "{key}");
        }
        let config = LimitsConfig {
            publish_bytes_per_sec: ByteSize(2_000_000_000),
            ..LimitsConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(err.contains("limits.publish_bytes_per_sec"), "{err}");
    }

    #[test]
    fn the_section_parses_sizes_and_durations_and_rejects_unknown_keys() {
        let config: LimitsConfig = toml::from_str(
            "publish_bytes_per_sec = \"2MiB\"\nabuse_window = \"30s\"\nmax_subscriptions = 5\n",
        )
        .unwrap();
        assert_eq!(config.publish_bytes_per_sec, ByteSize(2 << 20));
        assert_eq!(config.abuse_window, HumanDuration(Duration::from_secs(30)));
        assert_eq!(config.max_subscriptions, 5);
        assert_eq!(
            config.publish_per_sec,
            LimitsConfig::default().publish_per_sec
        );
        let err = toml::from_str::<LimitsConfig>("publish_rate = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("publish_rate"), "{err}");
    }

    #[test]
    fn the_publish_rate_is_hit_and_recovers() {
        let config = LimitsConfig {
            publish_per_sec: 10,
            publish_burst: 2,
            ..LimitsConfig::default()
        };
        let (limits, clock) = limits(&config);
        let mut connection = limits.connection(None);
        connection.check_publish(1).unwrap();
        connection.check_publish(1).unwrap();
        let limited = connection.check_publish(1).unwrap_err();
        assert_eq!(
            limited,
            RateLimited {
                retry_after_ms: 100,
                what: "publish_per_sec"
            }
        );
        let frame = limited.error_frame(Some(7));
        assert_eq!(frame.code, ErrorCode::RateLimited);
        assert_eq!(frame.retry_after_ms, Some(100));
        assert_eq!(frame.id, Some(7));
        clock.advance(Duration::from_millis(99));
        assert!(connection.check_publish(1).is_err());
        clock.advance(Duration::from_millis(1));
        connection.check_publish(1).unwrap();
    }

    #[test]
    fn the_bytes_rate_is_hit_and_recovers() {
        let config = LimitsConfig {
            publish_bytes_per_sec: ByteSize(1000),
            ..LimitsConfig::default()
        };
        let (limits, clock) = limits(&config);
        let mut connection = limits.connection(None);
        connection.check_publish(600).unwrap();
        let limited = connection.check_publish(600).unwrap_err();
        assert_eq!(limited.what, "publish_bytes_per_sec");
        assert_eq!(limited.retry_after_ms, 200);
        connection.check_publish(0).unwrap();
        clock.advance(Duration::from_millis(200));
        connection.check_publish(600).unwrap();
    }

    #[test]
    fn a_publish_larger_than_the_bucket_passes_when_the_bucket_is_full() {
        let config = LimitsConfig {
            publish_bytes_per_sec: ByteSize(1000),
            ..LimitsConfig::default()
        };
        let (limits, clock) = limits(&config);
        let mut connection = limits.connection(None);
        connection.check_publish(5000).unwrap();
        let limited = connection.check_publish(5000).unwrap_err();
        assert_eq!(limited.retry_after_ms, 1000, "it waits for a full bucket");
        assert!(connection.check_publish(1).is_err(), "the bucket is empty");
        clock.advance(Duration::from_secs(1));
        connection.check_publish(5000).unwrap();
    }

    #[test]
    fn the_bytes_bucket_holds_at_least_one_max_frame() {
        let config = LimitsConfig {
            publish_bytes_per_sec: ByteSize(1000),
            ..LimitsConfig::default()
        };
        let clock = FakeRelativeClock::default();
        let limits = Limits::with_clock(&config, 4000, clock.clone()).unwrap();
        let mut connection = limits.connection(None);
        connection.check_publish(4000).unwrap();
        let limited = connection.check_publish(1000).unwrap_err();
        assert_eq!(
            limited.retry_after_ms, 1000,
            "refilled at the configured rate"
        );
        clock.advance(Duration::from_secs(1));
        connection.check_publish(1000).unwrap();
    }

    #[test]
    fn user_limits_are_shared_by_the_users_connections() {
        let config = LimitsConfig {
            user_publish_per_sec: 3,
            user_publish_bytes_per_sec: ByteSize(1000),
            ..LimitsConfig::default()
        };
        let (limits, clock) = limits(&config);
        let mut first = limits.connection(Some("alice"));
        let mut second = limits.connection(Some("alice"));
        first.check_publish(1).unwrap();
        first.check_publish(1).unwrap();
        second.check_publish(1).unwrap();
        let limited = second.check_publish(1).unwrap_err();
        assert_eq!(limited.what, "user_publish_per_sec");
        assert_eq!(limited.retry_after_ms, 334);
        let mut bob = limits.connection(Some("bob"));
        bob.check_publish(1).unwrap();
        let mut anonymous = limits.connection(None);
        for _ in 0..10 {
            anonymous.check_publish(1).unwrap();
        }

        clock.advance(Duration::from_secs(1));
        first.check_publish(700).unwrap();
        let limited = second.check_publish(700).unwrap_err();
        assert_eq!(limited.what, "user_publish_bytes_per_sec");
    }

    #[test]
    fn retain_recent_forgets_idle_users() {
        let (limits, clock) = limits(&LimitsConfig::default());
        limits.connection(Some("alice")).check_publish(10).unwrap();
        limits.connection(Some("bob")).check_publish(10).unwrap();
        assert_eq!(limits.user_publish.len(), 2);
        limits.retain_recent();
        assert_eq!(limits.user_publish.len(), 2, "still recent");
        clock.advance(Duration::from_secs(2));
        limits.retain_recent();
        assert_eq!(limits.user_publish.len(), 0);
        assert_eq!(limits.user_publish_bytes.len(), 0);
    }

    #[test]
    fn the_per_ip_cap_is_released_on_drop() {
        let config = LimitsConfig {
            max_connections_per_ip: 2,
            ..LimitsConfig::default()
        };
        let (limits, _) = limits(&config);
        let first = limits.admit(None, ip(1)).unwrap();
        let _second = limits.admit(Some("alice"), ip(1)).unwrap();
        let refused = limits.admit(None, ip(1)).unwrap_err();
        assert_eq!(refused, Refused::Ip { max: 2 });
        assert!(refused.to_string().contains("max_connections_per_ip"));
        // The same address written as IPv4-mapped IPv6 is the same address.
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(limits.admit(None, Some(mapped)).is_err());
        let _other = limits.admit(None, ip(2)).unwrap();
        drop(first);
        let _third = limits.admit(None, ip(1)).unwrap();
        // Loopback is never capped per address.
        let local: Vec<_> = (0..5)
            .flat_map(|_| {
                [
                    limits.admit(None, Some(IpAddr::V4(Ipv4Addr::LOCALHOST))),
                    limits.admit(None, Some(IpAddr::V6(Ipv6Addr::LOCALHOST))),
                ]
            })
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(local.len(), 10);
    }

    #[test]
    fn the_per_user_cap_spans_addresses_and_skips_anonymous() {
        let config = LimitsConfig {
            max_connections_per_user: 2,
            ..LimitsConfig::default()
        };
        let (limits, _) = limits(&config);
        let first = limits.admit(Some("alice"), ip(1)).unwrap();
        let _second = limits.admit(Some("alice"), ip(2)).unwrap();
        assert_eq!(
            limits.admit(Some("alice"), ip(3)).unwrap_err(),
            Refused::User { max: 2 }
        );
        let _bob = limits.admit(Some("bob"), ip(3)).unwrap();
        let anonymous: Vec<_> = (0..5).map(|_| limits.admit(None, None).unwrap()).collect();
        assert_eq!(anonymous.len(), 5);
        drop(first);
        let _third = limits.admit(Some("alice"), None).unwrap();
        drop(_third);
        drop(_second);
        assert!(
            !lock(&limits.counts).users.contains_key("alice"),
            "entries leave at zero"
        );
    }

    #[test]
    fn subscriptions_are_capped_by_count_and_rate() {
        let config = LimitsConfig {
            max_subscriptions: 2,
            subscribe_per_sec: 1,
            subscribe_burst: 2,
            ..LimitsConfig::default()
        };
        let (limits, clock) = limits(&config);
        let mut connection = limits.connection(None);
        let denied = connection.check_subscribe(2).unwrap_err();
        assert_eq!(denied, Denied::TooManySubscriptions { max: 2 });
        assert_eq!(denied.error_frame(Some(1)).code, ErrorCode::TooLarge);
        assert_eq!(denied.error_frame(Some(1)).retry_after_ms, None);
        connection.check_subscribe(0).unwrap();
        connection.check_subscribe(1).unwrap();
        let Err(Denied::RateLimited(limited)) = connection.check_subscribe(1) else {
            panic!("a third subscribe within the burst must be rate limited");
        };
        assert_eq!(limited.what, "subscribe_per_sec");
        assert_eq!(limited.retry_after_ms, 1000);
        clock.advance(Duration::from_secs(1));
        connection.check_subscribe(1).unwrap();
    }

    #[test]
    fn enough_refusals_within_the_window_are_abuse() {
        let config = LimitsConfig {
            publish_per_sec: 1,
            publish_burst: 1,
            max_subscriptions: 1,
            abuse_violations: 3,
            abuse_window: HumanDuration(Duration::from_secs(1)),
            ..LimitsConfig::default()
        };
        let (limits, clock) = limits(&config);
        let mut connection = limits.connection(None);
        connection.check_publish(1).unwrap();
        assert!(connection.check_publish(1).is_err());
        assert!(
            connection.check_subscribe(1).is_err(),
            "count refusals count too"
        );
        assert!(!connection.abusive());
        clock.advance(Duration::from_millis(1500));
        assert!(connection.check_subscribe(1).is_err());
        assert!(!connection.abusive(), "three refusals, but over 1.5 s");
        assert!(connection.check_subscribe(1).is_err());
        assert!(!connection.abusive(), "the last three span 1.5 s");
        assert!(connection.check_subscribe(1).is_err());
        assert!(connection.abusive(), "the last three within the window");
        clock.advance(Duration::from_secs(60));
        assert!(connection.abusive(), "latched");
    }

    #[test]
    fn the_shared_parts_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Limits>();
        assert_send_sync::<ConnectionLimits>();
        assert_send_sync::<Admission>();
    }
}
