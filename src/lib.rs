//! Courier: a reliable real-time message broker.
//!
//! Module map (dependencies point up this list, never down):
//!
//! | module | owns |
//! |---|---|
//! | [`protocol`] | frames, the JSON and MessagePack codecs, error and close codes; pure |
//! | [`config`] | every setting: file, env, flags |
//! | [`backoff`] | the pure exponential backoff shared by retries and the SDK |
//! | [`storage`] | sled: channel logs, heads, consumer state; nothing else imports sled |
//! | [`delivery`] | consumers: floor, acked set, windows, redelivery order (sans I/O) |
//! | [`broker`] | channels, the one writer that assigns seqs, group commit, retention |
//! | [`limits`] | rate limits and connection caps per connection, user and IP (`governor`) |
//! | [`session`] | one connection's protocol state machine, over frames in and out |
//! | [`transport`] | WebSocket (and HTTP health) listeners; how frames travel |
//! | [`server`] | wiring: start, background tasks, graceful shutdown |
//! | [`metrics`] | every Prometheus metric |
//! | [`client`] | the Rust SDK: reconnecting client, subscriptions, acks; builds without the server |

pub mod backoff;
pub mod protocol;

#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod broker;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod delivery;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod session;
#[cfg(feature = "server")]
pub mod storage;
#[cfg(feature = "server")]
pub mod transport;
