//! `courier admin …`: the admin API (`proto/admin.openapi.yaml`) from a
//! shell. One HTTP/1 request per run, the token as a bearer header; tables
//! for people, `--json` for scripts (the API's own JSON, unchanged).
//!
//! Every failure names its fix: a refused connection points at
//! `courier serve` and `--url`, a 401 at `--token`. Payloads and channel
//! names come from clients, so control characters are escaped before they
//! reach the terminal.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use url::Url;

use courier::admin::ConnectionPage;
use courier::broker::cluster::NodeInfo;

/// How long connecting and each whole request may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// The longest payload excerpt a table shows.
const EXCERPT_CHARS: usize = 60;

/// `courier admin` arguments.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
    #[command(flatten)]
    target: Target,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// Where the admin API is and how to get in.
#[derive(Debug, clap::Args)]
struct Target {
    /// URL of the broker's admin listener.
    #[arg(
        long,
        global = true,
        env = "COURIER_ADMIN_URL",
        default_value = "http://127.0.0.1:7071"
    )]
    url: String,
    /// The admin token (default: the one in `<data dir>/admin.token`).
    #[arg(
        long,
        global = true,
        env = "COURIER_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// The broker's data dir, where `admin.token` is read from when no
    /// token is given.
    #[arg(
        long,
        global = true,
        env = "COURIER_DATA_DIR",
        default_value = "courier-data"
    )]
    data_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum AdminCommand {
    /// List channels with their seq range, size, rate and dead letters.
    Channels {
        /// Only channels whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Page size (1–1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this name (the `next` a previous page printed).
        #[arg(long)]
        after: Option<String>,
    },
    /// One channel: its policy and its consumers.
    Channel {
        /// The channel name, e.g. `chat:room-1`.
        name: String,
    },
    /// Show stored messages by seq, oldest first.
    Peek {
        /// The channel name.
        channel: String,
        /// First seq (default: the oldest stored).
        #[arg(long)]
        from: Option<u64>,
        /// Last seq (default: the newest).
        #[arg(long)]
        to: Option<u64>,
        /// At most this many (1–1000).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// The dead-letter queue of a channel.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Drop every message of a channel; it gets a new epoch.
    Purge {
        /// The channel name.
        channel: String,
        /// Confirm: the messages, consumers and dead letters are gone for good.
        #[arg(long)]
        yes: bool,
    },
    /// Delete a channel with its messages, consumers and dead letters.
    Delete {
        /// The channel name.
        channel: String,
        /// Confirm: everything of the channel is gone for good.
        #[arg(long)]
        yes: bool,
    },
    /// Who is subscribed to a channel on this node.
    Presence {
        /// The channel name.
        channel: String,
    },
    /// Move a consumer's floor to SEQ: everything after it is delivered again.
    Reset {
        /// The channel name.
        channel: String,
        /// The consumer's name as `courier admin channel` lists it (`c/…`, `g/…`, `u/…`).
        consumer: String,
        /// The new floor (0 replays the whole channel).
        seq: u64,
    },
    /// List open client connections (in a cluster, every node's), by node,
    /// then oldest first.
    Connections {
        /// Page size (1–1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this connection id (the `next` a previous page printed).
        #[arg(long)]
        after: Option<String>,
    },
    /// Close a client connection (it reconnects with backoff).
    Kick {
        /// The connection id as `courier admin connections` lists it.
        id: String,
        /// WebSocket close code, 4000–4999 (the broker's default: 4008).
        #[arg(long)]
        code: Option<u16>,
        /// Close reason sent to the client (at most 120 bytes).
        #[arg(long)]
        reason: Option<String>,
    },
    /// The broker's version, uptime and totals, and the nodes of its cluster.
    Info,
}

#[derive(Debug, clap::Subcommand)]
enum DlqCommand {
    /// List dead letters, by seq then consumer.
    List {
        /// The channel name.
        channel: String,
        /// Page size (1–1000).
        #[arg(long)]
        limit: Option<u32>,
        /// The `next` a previous page printed.
        #[arg(long)]
        after: Option<String>,
    },
    /// Send dead letters back to their consumers (attempt count reset).
    Requeue {
        /// The channel name.
        channel: String,
        #[command(flatten)]
        selection: Selection,
    },
    /// Delete dead letters for good.
    Purge {
        /// The channel name.
        channel: String,
        #[command(flatten)]
        selection: Selection,
    },
}

/// Which dead letters: exactly one of `--seq`, `--from`/`--to`, `--all`.
#[derive(Debug, clap::Args)]
struct Selection {
    #[command(flatten)]
    which: Which,
    /// Last seq of the range (with --from).
    #[arg(long, requires = "from")]
    to: Option<u64>,
    /// Only this consumer's dead letters (`c/…`, `g/…`, `u/…`).
    #[arg(long)]
    consumer: Option<String>,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// One seq.
    #[arg(long)]
    seq: Option<u64>,
    /// First seq of a range (with --to).
    #[arg(long, requires = "to")]
    from: Option<u64>,
    /// Every dead letter of the channel.
    #[arg(long)]
    all: bool,
}

impl Selection {
    /// The API's `DeadLetterSelection`.
    fn body(&self) -> Value {
        let mut body = match (self.which.seq, self.which.from, self.to) {
            (Some(seq), _, _) => json!({ "seq": seq }),
            (None, Some(from), Some(to)) => json!({ "from": from, "to": to }),
            _ => json!({ "all": true }),
        };
        if let Some(consumer) = &self.consumer {
            body["consumer"] = consumer.clone().into();
        }
        body
    }
}

/// Runs `courier admin …`.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    if let AdminCommand::Purge {
        channel,
        yes: false,
    } = &args.command
    {
        bail!(
            "purging drops every message, consumer and dead letter of {}; pass --yes to confirm",
            terminal_safe(channel)
        );
    }
    if let AdminCommand::Delete {
        channel,
        yes: false,
    } = &args.command
    {
        bail!(
            "deleting removes {} with every message, consumer and dead letter; pass --yes to confirm",
            terminal_safe(channel)
        );
    }
    let api = Api::new(&args.target)?;
    let json_out = args.json;
    match args.command {
        AdminCommand::Channels {
            prefix,
            limit,
            after,
        } => {
            let mut query = Vec::new();
            push(&mut query, "prefix", prefix);
            push(&mut query, "after", after);
            push(&mut query, "limit", limit);
            let page = api.get(&["channels"], &query).await?;
            print(json_out, &page, print_channels)
        }
        AdminCommand::Channel { name } => {
            let detail = api.get(&["channels", &name], &[]).await?;
            print(json_out, &detail, print_channel)
        }
        AdminCommand::Peek {
            channel,
            from,
            to,
            limit,
        } => {
            let mut query = Vec::new();
            push(&mut query, "from", from);
            push(&mut query, "to", to);
            push(&mut query, "limit", limit);
            let page = api.get(&["channels", &channel, "messages"], &query).await?;
            print(json_out, &page, print_messages)
        }
        AdminCommand::Dlq { command } => dlq(&api, json_out, command).await,
        AdminCommand::Purge { channel, .. } => {
            let summary = api
                .post(&["channels", &channel, "purge"], Value::Null)
                .await?;
            print(json_out, &summary, |summary: ChannelSummary| {
                println!(
                    "purged {}: epoch {}, seqs start again at {}",
                    terminal_safe(&summary.name),
                    terminal_safe(&summary.epoch),
                    summary.first_seq
                );
                Ok(())
            })
        }
        AdminCommand::Reset {
            channel,
            consumer,
            seq,
        } => {
            let info = api
                .post(
                    &["channels", &channel, "consumers", &consumer, "reset"],
                    json!({ "seq": seq }),
                )
                .await?;
            print(json_out, &info, |consumer: ConsumerInfo| {
                println!(
                    "consumer {} of {}: floor {}, lag {}",
                    terminal_safe(&consumer.name),
                    terminal_safe(&channel),
                    consumer.floor,
                    consumer.lag
                );
                Ok(())
            })
        }
        AdminCommand::Connections { limit, after } => {
            let mut query = Vec::new();
            push(&mut query, "after", after);
            push(&mut query, "limit", limit);
            let page = api.get(&["connections"], &query).await?;
            print(json_out, &page, print_connections)
        }
        AdminCommand::Kick { id, code, reason } => {
            let mut body = json!({});
            if let Some(code) = code {
                body["code"] = code.into();
            }
            if let Some(reason) = reason {
                body["reason"] = reason.into();
            }
            let kicked = api.post(&["connections", &id, "kick"], body).await?;
            print(json_out, &kicked, |kicked: Kicked| {
                println!(
                    "kicked {} with close code {}",
                    terminal_safe(&kicked.kicked),
                    kicked.code
                );
                Ok(())
            })
        }
        AdminCommand::Info => {
            let info = api.get(&["info"], &[]).await?;
            print(json_out, &info, print_info)
        }
        AdminCommand::Delete { channel, .. } => {
            let deleted = api.delete(&["channels", &channel]).await?;
            print(json_out, &deleted, |deleted: Value| {
                println!(
                    "deleted {} ({} stored messages removed)",
                    terminal_safe(deleted["deleted"].as_str().unwrap_or("")),
                    deleted["messages_removed"].as_u64().unwrap_or(0)
                );
                Ok(())
            })
        }
        AdminCommand::Presence { channel } => {
            let presence = api.get(&["channels", &channel, "presence"], &[]).await?;
            print(json_out, &presence, |presence: Value| {
                let clients = presence["clients"].as_array().cloned().unwrap_or_default();
                if clients.is_empty() {
                    println!("nobody is subscribed to {}", terminal_safe(&channel));
                }
                for client in clients {
                    println!(
                        "{}  {}  {}",
                        terminal_safe(client["conn_id"].as_str().unwrap_or("")),
                        terminal_safe(client["user"].as_str().unwrap_or("(anonymous)")),
                        terminal_safe(client["transport"].as_str().unwrap_or(""))
                    );
                }
                Ok(())
            })
        }
    }
}

async fn dlq(api: &Api, json_out: bool, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            channel,
            limit,
            after,
        } => {
            let mut query = Vec::new();
            push(&mut query, "after", after);
            push(&mut query, "limit", limit);
            let page = api.get(&["channels", &channel, "dlq"], &query).await?;
            print(json_out, &page, print_dead_letters)
        }
        DlqCommand::Requeue { channel, selection } => {
            let counts = api
                .post(&["channels", &channel, "dlq", "requeue"], selection.body())
                .await?;
            print(json_out, &counts, |counts: Requeued| {
                match counts.requeued {
                    0 => println!("nothing to requeue (already requeued or purged?)"),
                    1 => println!("requeued 1 dead letter"),
                    n => println!("requeued {n} dead letters"),
                }
                Ok(())
            })
        }
        DlqCommand::Purge { channel, selection } => {
            let counts = api
                .post(&["channels", &channel, "dlq", "purge"], selection.body())
                .await?;
            print(json_out, &counts, |counts: Purged| {
                match counts.purged {
                    0 => println!("nothing to purge (already requeued or purged?)"),
                    1 => println!("purged 1 dead letter"),
                    n => println!("purged {n} dead letters"),
                }
                Ok(())
            })
        }
    }
}

fn push(query: &mut Vec<(&'static str, String)>, name: &'static str, value: Option<impl ToString>) {
    if let Some(value) = value {
        query.push((name, value.to_string()));
    }
}

/// Prints `value` as JSON, or through `human` after reading it as `T`.
fn print<T: DeserializeOwned>(
    json_out: bool,
    value: &Value,
    human: impl FnOnce(T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(value)?);
        return Ok(());
    }
    let parsed = serde_path_to_error::deserialize(value).context(
        "the admin API answered with JSON this courier does not understand (a different version?); --json prints it as it is",
    )?;
    human(parsed)
}

/// The admin API over plain HTTP/1 (the admin listener speaks no TLS).
struct Api {
    base: Url,
    token: String,
    /// Where the token came from, for the 401 message.
    token_origin: String,
}

impl Api {
    fn new(target: &Target) -> anyhow::Result<Self> {
        let base = Url::parse(&target.url)
            .with_context(|| format!("--url {:?} is not a URL", target.url))?;
        if base.scheme() != "http" {
            bail!(
                "--url {} : the admin listener speaks plain HTTP; use an http:// URL (or COURIER_ADMIN_URL)",
                target.url
            );
        }
        if base.host_str().is_none() {
            bail!("--url {} has no host", target.url);
        }
        let (token, token_origin) = match &target.token {
            Some(token) => (token.clone(), "--token or COURIER_ADMIN_TOKEN".to_owned()),
            None => {
                let path = target.data_dir.join("admin.token");
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no admin token: pass --token or set COURIER_ADMIN_TOKEN (or --data-dir to where the broker keeps admin.token; {} cannot be read)",
                        path.display()
                    )
                })?;
                (text.trim().to_owned(), path.display().to_string())
            }
        };
        Ok(Self {
            base,
            token,
            token_origin,
        })
    }

    /// `base` + `/admin/<segments…>?<query>`, each segment percent-encoded.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<Url> {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        url.path_segments_mut()
            .map_err(|()| anyhow!("--url {} cannot take a path", self.base))?
            .pop_if_empty()
            .push("admin")
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<Value> {
        let url = self.url(segments, query)?;
        self.request(Method::GET, url, None).await
    }

    async fn delete(&self, segments: &[&str]) -> anyhow::Result<Value> {
        let url = self.url(segments, &[])?;
        self.request(Method::DELETE, url, None).await
    }

    /// POSTs `body` (none when it is `null`).
    async fn post(&self, segments: &[&str], body: Value) -> anyhow::Result<Value> {
        let url = self.url(segments, &[])?;
        let body = (!body.is_null()).then_some(body);
        self.request(Method::POST, url, body).await
    }

    async fn request(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, bytes) = tokio::time::timeout(TIMEOUT, self.exchange(method, &url, body))
            .await
            .map_err(|_| {
                anyhow!(
                    "the admin API at {} did not answer within {}s",
                    self.base,
                    TIMEOUT.as_secs()
                )
            })??;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .with_context(|| format!("{url} answered {status} without JSON"));
        }
        Err(self.failure(status, &bytes, &url))
    }

    async fn exchange(
        &self,
        method: Method,
        url: &Url,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let host = url.host_str().unwrap_or("127.0.0.1");
        let port = url.port_or_known_default().unwrap_or(80);
        let unreachable = || {
            format!(
                "cannot reach the admin API at {}; is `courier serve` running with its admin listener there? (--url or COURIER_ADMIN_URL picks another)",
                self.base
            )
        };
        let host_for_connect = host.trim_start_matches('[').trim_end_matches(']');
        let stream = tokio::net::TcpStream::connect((host_for_connect, port))
            .await
            .with_context(unreachable)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .with_context(unreachable)?;
        // The connection task ends with the response: one request per run.
        let connection = tokio::spawn(connection);
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let path_and_query = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(
                hyper::header::USER_AGENT,
                concat!("courier-cli/", env!("CARGO_PKG_VERSION")),
            );
        let body = match body {
            Some(body) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&body)?)
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(body))
            .context("building the request")?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("the admin API at {} closed the connection", self.base))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("reading the admin API's answer")?
            .to_bytes();
        connection.abort();
        Ok((status, bytes))
    }

    /// The error for a non-2xx answer, naming the fix where there is one.
    fn failure(&self, status: StatusCode, bytes: &[u8], url: &Url) -> anyhow::Error {
        let error = serde_json::from_slice::<ApiError>(bytes).ok();
        if status == StatusCode::UNAUTHORIZED {
            return anyhow!(
                "wrong admin token (from {}): pass --token or set COURIER_ADMIN_TOKEN; the broker keeps its token in <data dir>/admin.token",
                self.token_origin
            );
        }
        match error {
            Some(error) => anyhow!(
                "{}: {}",
                terminal_safe(&error.code),
                terminal_safe(&error.message)
            ),
            None if status == StatusCode::NOT_FOUND => anyhow!(
                "{url} is not an admin API route (404); does --url point at the admin listener (`[server] admin_listen`)?"
            ),
            None => {
                let text = String::from_utf8_lossy(bytes);
                anyhow!("{url} answered {status}: {}", excerpt(&text))
            }
        }
    }
}

// The API's JSON, as far as the tables need it (unknown fields are
// ignored so a newer broker still prints).

#[derive(Debug, Deserialize)]
struct ApiError {
    code: String,
    message: String,
}

#[derive(Debug, Deserialize)]
struct ChannelPage {
    channels: Vec<ChannelSummary>,
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChannelSummary {
    name: String,
    epoch: String,
    first_seq: u64,
    last_seq: u64,
    messages: u64,
    bytes: u64,
    publish_rate: f64,
    subscribers: u64,
    dead_letters: u64,
}

#[derive(Debug, Deserialize)]
struct ChannelDetail {
    #[serde(flatten)]
    summary: ChannelSummary,
    namespace: String,
    durable: bool,
    policy: Value,
    consumers: Vec<ConsumerInfo>,
    /// Cluster nodes that did not answer.
    #[serde(default)]
    unreachable: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ConsumerInfo {
    name: String,
    kind: String,
    floor: u64,
    lag: u64,
    in_flight: u64,
    scheduled: u64,
    oldest_unacked_age_ms: Option<u64>,
    redeliveries: u64,
    connected: bool,
    subscriptions: u64,
    /// The nodes where it has live subscriptions.
    #[serde(default)]
    nodes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct StoredMessage {
    seq: u64,
    ts: u64,
    msg_id: Option<String>,
    data: Option<String>,
    data_b64: Option<String>,
}

impl StoredMessage {
    fn excerpt(&self) -> String {
        match (&self.data, &self.data_b64) {
            (Some(text), _) => excerpt(text),
            (None, Some(b64)) => format!("base64:{}", excerpt(b64)),
            (None, None) => String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct MessagePage {
    messages: Vec<StoredMessage>,
    next: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct DeadLetter {
    seq: u64,
    consumer: String,
    reason: String,
    detail: Option<String>,
    attempts: u64,
    dead_ms: u64,
    message: Option<StoredMessage>,
}

#[derive(Debug, Deserialize)]
struct DeadLetterPage {
    entries: Vec<DeadLetter>,
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Info {
    version: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    nodes: Vec<NodeInfo>,
    started_ms: u64,
    uptime_s: u64,
    connections: u64,
    channels: u64,
    data_dir: String,
    fsync: String,
}

#[derive(Debug, Deserialize)]
struct Requeued {
    requeued: u64,
}

#[derive(Debug, Deserialize)]
struct Purged {
    purged: u64,
}

#[derive(Debug, Deserialize)]
struct Kicked {
    kicked: String,
    code: u16,
}

fn print_channels(page: ChannelPage) -> anyhow::Result<()> {
    if page.channels.is_empty() {
        println!("no channels");
    } else {
        let rows = page
            .channels
            .iter()
            .map(|c| {
                vec![
                    terminal_safe(&c.name),
                    terminal_safe(&c.epoch),
                    c.first_seq.to_string(),
                    c.last_seq.to_string(),
                    c.messages.to_string(),
                    human_bytes(c.bytes),
                    format!("{:.1}", c.publish_rate),
                    c.subscribers.to_string(),
                    c.dead_letters.to_string(),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "CHANNEL", "EPOCH", "FIRST", "LAST", "MESSAGES", "BYTES", "RATE/S", "SUBS",
                    "DLQ",
                ],
                rows
            )
        );
    }
    if let Some(next) = page.next {
        eprintln!("more: --after {}", terminal_safe(&next));
    }
    Ok(())
}

fn print_channel(detail: ChannelDetail) -> anyhow::Result<()> {
    let c = &detail.summary;
    println!("channel      {}", terminal_safe(&c.name));
    println!("namespace    {}", terminal_safe(&detail.namespace));
    println!("durable      {}", detail.durable);
    println!("epoch        {}", terminal_safe(&c.epoch));
    println!("seqs         {}..={}", c.first_seq, c.last_seq);
    println!("messages     {} ({})", c.messages, human_bytes(c.bytes));
    println!("publish rate {:.1}/s", c.publish_rate);
    println!("subscribers  {}", c.subscribers);
    println!("dead letters {}", c.dead_letters);
    if let Value::Object(policy) = &detail.policy {
        let line = policy
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!("policy       {}", terminal_safe(&line));
    }
    println!();
    if detail.consumers.is_empty() {
        println!("no consumers");
        return Ok(());
    }
    let rows = detail
        .consumers
        .iter()
        .map(|consumer| {
            vec![
                terminal_safe(&consumer.name),
                terminal_safe(&consumer.kind),
                consumer.floor.to_string(),
                consumer.lag.to_string(),
                consumer.in_flight.to_string(),
                consumer.scheduled.to_string(),
                consumer
                    .oldest_unacked_age_ms
                    .map_or_else(|| "-".to_owned(), age),
                consumer.redeliveries.to_string(),
                if consumer.connected { "yes" } else { "no" }.to_owned(),
                consumer.subscriptions.to_string(),
                list_or_dash(&consumer.nodes),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "CONSUMER",
                "KIND",
                "FLOOR",
                "LAG",
                "IN-FLIGHT",
                "SCHEDULED",
                "OLDEST",
                "REDELIVERIES",
                "CONNECTED",
                "SUBS",
                "NODES",
            ],
            rows
        )
    );
    warn_unreachable(&detail.unreachable, "subscribers and live consumers");
    Ok(())
}

/// `items` joined with commas (escaped), or `-` when there is none.
fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        terminal_safe(&items.join(","))
    }
}

/// Says on stderr which cluster nodes did not answer, and what is missing.
fn warn_unreachable(nodes: &[String], missing: &str) {
    if !nodes.is_empty() {
        eprintln!(
            "nodes that did not answer (their {missing} are missing): {}",
            terminal_safe(&nodes.join(", "))
        );
    }
}

fn print_messages(page: MessagePage) -> anyhow::Result<()> {
    if page.messages.is_empty() {
        println!("no messages in that range");
    } else {
        let rows = page
            .messages
            .iter()
            .map(|m| {
                vec![
                    m.seq.to_string(),
                    timestamp(m.ts),
                    m.msg_id
                        .as_deref()
                        .map_or_else(|| "-".into(), terminal_safe),
                    m.excerpt(),
                ]
            })
            .collect();
        print!("{}", table(&["SEQ", "PUBLISHED", "MSG_ID", "DATA"], rows));
    }
    if let Some(next) = page.next {
        eprintln!("more: --from {next}");
    }
    Ok(())
}

fn print_dead_letters(page: DeadLetterPage) -> anyhow::Result<()> {
    if page.entries.is_empty() {
        println!("no dead letters");
    } else {
        let rows = page
            .entries
            .iter()
            .map(|d| {
                vec![
                    d.seq.to_string(),
                    terminal_safe(&d.consumer),
                    terminal_safe(&d.reason),
                    d.detail.as_deref().map_or_else(|| "-".into(), excerpt),
                    d.attempts.to_string(),
                    ago(d.dead_ms),
                    d.message
                        .as_ref()
                        .map_or_else(|| "(gone from the log)".into(), StoredMessage::excerpt),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "SEQ", "CONSUMER", "REASON", "DETAIL", "ATTEMPTS", "DEAD", "DATA"
                ],
                rows
            )
        );
    }
    if let Some(next) = page.next {
        eprintln!("more: --after {}", terminal_safe(&next));
    }
    Ok(())
}

fn print_connections(page: ConnectionPage) -> anyhow::Result<()> {
    if page.connections.is_empty() {
        println!("no connections");
    } else {
        let rows = page
            .connections
            .iter()
            .map(|c| {
                vec![
                    terminal_safe(&c.id),
                    if c.node.is_empty() {
                        "-".into()
                    } else {
                        terminal_safe(&c.node)
                    },
                    c.user.as_deref().map_or_else(|| "-".into(), terminal_safe),
                    c.remote
                        .as_deref()
                        .map_or_else(|| "-".into(), terminal_safe),
                    terminal_safe(&c.transport),
                    if c.subscriptions.is_empty() {
                        "-".into()
                    } else {
                        terminal_safe(&c.subscriptions.join(","))
                    },
                    ago(c.connected_ms),
                    c.msgs_in.to_string(),
                    c.msgs_out.to_string(),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "ID",
                    "NODE",
                    "USER",
                    "REMOTE",
                    "TRANSPORT",
                    "SUBSCRIPTIONS",
                    "CONNECTED",
                    "IN",
                    "OUT",
                ],
                rows
            )
        );
    }
    if let Some(next) = page.next {
        eprintln!("more: --after {}", terminal_safe(&next));
    }
    warn_unreachable(&page.unreachable, "connections");
    Ok(())
}

fn print_info(info: Info) -> anyhow::Result<()> {
    println!("version      {}", terminal_safe(&info.version));
    if !info.node.is_empty() {
        println!("node         {}", terminal_safe(&info.node));
    }
    println!(
        "started      {} (up {})",
        timestamp(info.started_ms),
        humantime::format_duration(Duration::from_secs(info.uptime_s))
    );
    println!("connections  {}", info.connections);
    println!("channels     {}", info.channels);
    println!("data dir     {}", terminal_safe(&info.data_dir));
    println!("fsync        {}", terminal_safe(&info.fsync));
    if !info.nodes.is_empty() {
        println!();
        let rows = info
            .nodes
            .iter()
            .map(|n| {
                vec![
                    terminal_safe(&n.id),
                    terminal_safe(&n.listen),
                    terminal_safe(&n.admin),
                    timestamp(n.started_ms),
                ]
            })
            .collect();
        print!("{}", table(&["NODE", "LISTEN", "ADMIN", "STARTED"], rows));
    }
    Ok(())
}

/// Left-aligned columns two spaces apart, one line per row.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headers = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(headers).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = width - cell.chars().count() + 2;
                out.push_str(cell);
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

/// `text` with control characters escaped, so a client-chosen name or
/// payload cannot move the cursor or recolour the terminal.
fn terminal_safe(text: &str) -> String {
    let mut safe = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            safe.extend(c.escape_default());
        } else {
            safe.push(c);
        }
    }
    safe
}

/// The first [`EXCERPT_CHARS`] characters of `text`, terminal-safe.
fn excerpt(text: &str) -> String {
    let mut short: String = text.chars().take(EXCERPT_CHARS).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    terminal_safe(&short)
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A time in ms since the Unix epoch, as RFC 3339 in UTC.
fn timestamp(ms: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// How long ago a time in ms since the Unix epoch was.
fn ago(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    format!("{} ago", age(now.saturating_sub(ms)))
}

/// A duration in ms, rounded to seconds past a minute.
fn age(ms: u64) -> String {
    let rounded = if ms >= 60_000 { ms / 1000 * 1000 } else { ms };
    humantime::format_duration(Duration::from_millis(rounded)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(url: &str) -> Api {
        Api {
            base: Url::parse(url).unwrap(),
            token: "t".into(),
            token_origin: "test".into(),
        }
    }

    #[test]
    fn channel_names_are_percent_encoded_in_paths_but_colons_stay() {
        let url = api("http://127.0.0.1:7071")
            .url(&["channels", "chat:room 1/x?y", "dlq"], &[])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:7071/admin/channels/chat:room%201%2Fx%3Fy/dlq"
        );
        let url = api("http://h:1/prefix/")
            .url(&["channels"], &[("prefix", "a&b".into())])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://h:1/prefix/admin/channels?prefix=a%26b"
        );
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(terminal_safe("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\n");
        assert_eq!(terminal_safe("plain ü"), "plain ü");
    }

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["A", "BB"],
            vec![
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(text, "A    BB\nxyz  1\nq    22\n");
    }

    #[test]
    fn sizes_and_ages_read_like_a_person_wrote_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(age(1500), "1s 500ms");
        assert_eq!(age(61_500), "1m 1s");
    }
}
