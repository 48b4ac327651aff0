//! `courier token`: mints a development token from the configured secret.

use std::path::PathBuf;

use anyhow::Context;
use courier::auth::{Auth, ChannelClaims, claims_for};
use courier::config::{Config, Overrides};

/// Arguments of `courier token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The user id (the `sub` claim).
    #[arg(long = "sub")]
    pub user: String,
    /// A channel pattern the token may publish to (`chat:*`); repeat it.
    /// Without --pub and --sub-channels the token has no `channels` claim
    /// and the namespace rules alone decide.
    #[arg(long = "pub", value_name = "PATTERN")]
    pub publish: Vec<String>,
    /// A channel pattern the token may subscribe to (`inbox:$sub`); repeat it.
    #[arg(long = "sub-channels", value_name = "PATTERN")]
    pub subscribe: Vec<String>,
    /// How long the token is valid (`30m`, `1h`, `7d`).
    #[arg(long, default_value = "1h")]
    pub ttl: humantime::Duration,
    /// The broker's config file, where `[auth] jwt_secret` (or
    /// `jwt_secret_file`) is.
    #[arg(long, env = "COURIER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Prints a signed token on stdout.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref(), &Overrides::default())?;
    if config.auth.jwt_public_key.is_some() {
        anyhow::bail!(
            "this config verifies tokens with a public key (auth.jwt_public_key); sign tokens with its private key, outside Courier"
        );
    }
    let auth = Auth::from_config(&config.auth)?;
    if !auth.enabled() {
        anyhow::bail!(
            "no secret to sign with: set [auth] jwt_secret (32+ bytes) or jwt_secret_file in the config file, and pass it with --config or COURIER_CONFIG"
        );
    }
    let channels =
        (!args.publish.is_empty() || !args.subscribe.is_empty()).then_some(ChannelClaims {
            publish: args.publish,
            subscribe: args.subscribe,
        });
    let ttl = args.ttl.as_secs().max(1);
    let mut claims = claims_for(&args.user, ttl, channels);
    claims.aud = config
        .auth
        .audience
        .clone()
        .map(courier::auth::Audience::One);
    claims.iss = config.auth.issuer.clone();
    let token = auth.mint(&claims).context("cannot sign the token")?;
    // The token must verify with the same config, or it is of no use.
    auth.verify(&token)
        .context("the minted token does not verify (check the sub: letters, digits, _ . @ = -)")?;
    println!("{token}");
    Ok(())
}
