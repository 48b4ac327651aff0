//! The `courier` subcommands besides `serve`: thin layers over the library
//! and the SDK (anyhow is fine here).

pub mod admin;
pub mod bench;
pub mod pubsub;
pub mod token;
