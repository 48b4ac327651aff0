//! `courier pub` and `courier sub`: the SDK from a shell, in the spirit of
//! `nats pub/sub` and `wscat`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use courier::client::{AckMode, Client, Delivery, PublishOptions};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

/// Where a CLI client connects.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// WebSocket URL of the broker.
    #[arg(long, env = "COURIER_URL", default_value = "ws://127.0.0.1:7070/ws")]
    url: String,
    /// Token for brokers that require one.
    #[arg(long, env = "COURIER_TOKEN")]
    token: Option<String>,
}

impl Connection {
    async fn connect(&self) -> anyhow::Result<Client> {
        let mut builder =
            Client::builder(&self.url).name(concat!("courier-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        builder.connect().await.with_context(|| {
            format!(
                "cannot connect to {}; is `courier serve` running there? (--url or COURIER_URL picks another)",
                self.url
            )
        })
    }
}

/// `courier pub` arguments.
#[derive(Debug, clap::Args)]
pub struct PubArgs {
    /// Channel to publish to.
    channel: String,
    /// The message; `-` or absent: each line of stdin is one message.
    data: Option<String>,
    /// Idempotency key (a single message only).
    #[arg(long)]
    msg_id: Option<String>,
    /// A header `name=value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Print one JSON object per puback.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connection: Connection,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not name=value"))
}

/// Publishes waiting for their puback at once when reading stdin.
const PIPELINE: usize = 256;

/// Runs `courier pub`.
pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let client = args.connection.connect().await?;
    let headers = (!args.headers.is_empty())
        .then(|| args.headers.iter().cloned().collect::<BTreeMap<_, _>>());
    let print = |seq: u64| {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"channel": args.channel, "seq": seq})
            );
        } else {
            println!("{seq}");
        }
    };
    match args.data.as_deref() {
        Some(data) if data != "-" => {
            let options = PublishOptions {
                headers,
                msg_id: args.msg_id.clone(),
            };
            let seq = client
                .publish_with(&args.channel, data.as_bytes().to_vec(), options)
                .await
                .with_context(|| format!("publish to {} failed", args.channel))?;
            print(seq);
        }
        _ => {
            if args.msg_id.is_some() {
                bail!("--msg-id names one message; with stdin each line gets its own");
            }
            let mut pending = FuturesOrdered::new();
            let mut lines = std::io::stdin().lock().lines();
            loop {
                let line = if pending.len() < PIPELINE {
                    lines.next()
                } else {
                    None
                };
                match line {
                    Some(line) => {
                        let line = line.context("reading stdin")?;
                        let (client, channel) = (client.clone(), args.channel.clone());
                        let options = PublishOptions {
                            headers: headers.clone(),
                            msg_id: None,
                        };
                        pending.push_back(async move {
                            client
                                .publish_with(&channel, line.into_bytes(), options)
                                .await
                        });
                    }
                    None => match pending.next().await {
                        Some(result) => print(
                            result
                                .with_context(|| format!("publish to {} failed", args.channel))?,
                        ),
                        None => break,
                    },
                }
            }
        }
    }
    client.close().await;
    Ok(())
}

/// How `courier sub` acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AckChoice {
    /// Ack each message after printing it.
    Manual,
    /// The broker counts a message acked once sent (at most once).
    Auto,
    /// Never ack (a peek: messages stay pending for the consumer).
    None,
}

/// `courier sub` arguments.
#[derive(Debug, clap::Args)]
pub struct SubArgs {
    /// Channel to subscribe to.
    channel: String,
    /// Durable consumer name (resume where it left off).
    #[arg(long)]
    consumer: Option<String>,
    /// Queue group: share the messages with other members.
    #[arg(long)]
    group: Option<String>,
    /// Start after this seq (`--since 0`: everything stored).
    #[arg(long, conflicts_with = "from_first")]
    since: Option<u64>,
    /// Start at the oldest stored message.
    #[arg(long)]
    from_first: bool,
    /// manual, auto or none.
    #[arg(long, value_enum, default_value = "manual")]
    ack: AckChoice,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Exit when nothing arrives for this many seconds.
    #[arg(long)]
    idle_exit: Option<u64>,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connection: Connection,
}

fn line_for(delivery: &Delivery, json: bool) -> String {
    if !json {
        return format!(
            "{} {}",
            delivery.seq,
            String::from_utf8_lossy(&delivery.data)
        );
    }
    let mut object = serde_json::json!({
        "channel": delivery.channel,
        "seq": delivery.seq,
        "ts": delivery.ts,
        "attempt": delivery.attempt,
    });
    match serde_json::from_slice::<serde_json::Value>(&delivery.data) {
        Ok(value) => object["data"] = value,
        Err(_) => {
            object["data_b64"] = base64::engine::general_purpose::STANDARD
                .encode(&delivery.data)
                .into()
        }
    }
    if !delivery.headers.is_empty() {
        object["headers"] = serde_json::json!(delivery.headers);
    }
    object.to_string()
}

/// Runs `courier sub` until `--count` messages, `--idle-exit`, or Ctrl-C.
pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let client = args.connection.connect().await?;
    let mut builder = client.subscribe(&args.channel);
    if let Some(consumer) = &args.consumer {
        builder = builder.consumer(consumer.clone());
    }
    if let Some(group) = &args.group {
        builder = builder.group(group.clone());
    }
    if let Some(since) = args.since {
        builder = builder.since(since);
    }
    if args.from_first {
        builder = builder.from_first();
    }
    if args.ack == AckChoice::Auto {
        builder = builder.ack_mode(AckMode::Auto);
    }
    let mut subscription = builder
        .await
        .with_context(|| format!("subscribe to {} failed", args.channel))?;
    if !subscription.recovered() {
        eprintln!(
            "note: retention dropped messages this consumer never saw; starting at the oldest stored"
        );
    }
    let mut seen = 0u64;
    let idle = args.idle_exit.map(Duration::from_secs);
    let mut stdout = std::io::stdout().lock();
    while args.count.is_none_or(|count| seen < count) {
        let next = tokio::select! {
            next = subscription.next() => next,
            _ = tokio::signal::ctrl_c() => break,
            () = async { match idle { Some(idle) => tokio::time::sleep(idle).await, None => std::future::pending().await } } => break,
        };
        let Some(delivery) = next else {
            bail!("the subscription ended");
        };
        writeln!(stdout, "{}", line_for(&delivery, args.json))?;
        stdout.flush()?;
        if args.ack == AckChoice::Manual {
            delivery.ack().await.context("ack failed")?;
        }
        seen += 1;
    }
    drop(stdout);
    client.close().await;
    Ok(())
}
