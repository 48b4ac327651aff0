//! `courier bench <workload>`: load over real WebSockets, the way users run
//! Courier, with MessagePack.
//!
//! Workloads:
//! - `durable`: P publishers, C subscribers (each its own durable consumer,
//!   manual acks), N messages of S bytes, each publisher pipelining up to W;
//! - `fanout`: the same with one publisher and C = 100 subscribers;
//! - `queue`: C subscribers share one group: each message is processed once;
//! - `redelivery`: `durable` where subscribers nack x % of first deliveries;
//! - `connections`: open N idle connections and report the broker's RSS per
//!   connection (when the broker is a local child process).
//!
//! Without `--url` the broker runs in this process (for `connections`: a
//! child `courier serve`, so its memory can be read) on a temp dir. Payloads
//! carry the send instant and the message number, so subscribers measure
//! publish → deliver latency and check every message arrives (no dups, none
//! missing). A progress bar shows on a terminal; `--json` ends with one JSON
//! line.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use courier::config::{Config, FsyncPolicy};
use courier::protocol::{
    Ack, AckMode, ClientFrame, Codec, Connect, Nack, Payload, Publish, ServerFrame, StartFrom,
    Subscribe, decode_server, encode_client,
};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bytes at the start of each payload: send instant (ns), message number.
const HEADER_LEN: usize = 16;
/// Most seqs in one `ack` frame.
const ACK_BATCH: usize = 256;
/// With no progress for this long the run stops and reports what it has.
const IDLE: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Durable,
    Fanout,
    Queue,
    Connections,
    Redelivery,
}

/// `courier bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// durable, fanout, queue, connections or redelivery.
    #[arg(value_enum)]
    workload: Workload,
    /// `ws://host:port/ws` of a running broker; without it one starts
    /// locally. Several, comma-separated, for the nodes of a cluster:
    /// publisher p connects to node p, subscriber i to node i + 1 (mod the
    /// number of nodes), so with two or more nodes every delivery crosses
    /// from one node to another.
    #[arg(long, value_delimiter = ',')]
    url: Vec<String>,
    /// Messages to publish (connections: connections to open).
    #[arg(short = 'n', long = "count")]
    count: Option<u64>,
    /// Payload bytes (at least 16).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Publishers.
    #[arg(short = 'p', long, default_value_t = 1)]
    publishers: usize,
    /// Subscribers (default: durable 1, fanout 100, queue 3, redelivery 1).
    #[arg(short = 'c', long)]
    subscribers: Option<usize>,
    /// Publishes one publisher keeps waiting for their puback.
    #[arg(short = 'w', long, default_value_t = 1000)]
    window: usize,
    /// Total publishes per second; unpaced when absent.
    #[arg(long)]
    rate: Option<u64>,
    /// fsync policy of the local broker.
    #[arg(long, default_value = "batch")]
    fsync: FsyncPolicy,
    /// redelivery: percent of first deliveries nacked.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    nack_percent: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Threads of the load generator (its Tokio runtime); default: one per
    /// core. With `--url`, `1` keeps the client's own work off the cores
    /// the broker needs (a quieter latency measurement on a small machine).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    client_threads: Option<u16>,
}

impl BenchArgs {
    /// The `--client-threads` asked for.
    pub fn client_threads(&self) -> Option<usize> {
        self.client_threads.map(usize::from)
    }
}

fn since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[allow(clippy::cast_precision_loss)]
fn float(n: u64) -> f64 {
    n as f64
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram")
}

/// A broker for the run: in this process, as a child process, or remote.
enum Target {
    Remote(Vec<String>),
    InProcess(courier::server::Server, tempfile::TempDir),
    Child(std::process::Child, String, tempfile::TempDir),
}

impl Target {
    async fn start(args: &BenchArgs) -> anyhow::Result<Self> {
        if !args.url.is_empty() {
            return Ok(Self::Remote(args.url.clone()));
        }
        let dir = tempfile::tempdir()?;
        if args.workload == Workload::Connections {
            return Self::child(dir, args).await;
        }
        let mut config = Config::default();
        config.server.data_dir = dir.path().join("data");
        config.server.fsync = args.fsync;
        config.server.admin_listen = ([127, 0, 0, 1], 0).into();
        config.limits = courier::limits::LimitsConfig::unlimited();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = courier::server::Server::start(config, listener).await?;
        Ok(Self::InProcess(server, dir))
    }

    /// `courier serve` as a child, so its memory is its own.
    async fn child(dir: tempfile::TempDir, args: &BenchArgs) -> anyhow::Result<Self> {
        use std::io::{BufRead, BufReader};
        let exe = std::env::current_exe()?;
        let config = dir.path().join("courier.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nfsync = \"{}\"\n{}",
                args.fsync,
                courier::limits::LimitsConfig::UNLIMITED_TOML
            ),
        )?;
        let mut child = std::process::Command::new(exe)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("child stderr")?;
        let addr = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let addr = lines.by_ref().map_while(Result::ok).find_map(|line| {
                line.split("addr=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next().map(str::to_owned))
            });
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            addr
        })
        .await?
        .context("the child broker did not report its address")?;
        Ok(Self::Child(child, format!("ws://{addr}/ws"), dir))
    }

    /// The URL of node `n` (wrapping round the nodes; one unless remote).
    fn url(&self, n: usize) -> String {
        match self {
            Self::Remote(urls) => urls[n % urls.len()].clone(),
            Self::Child(_, url, _) => url.clone(),
            Self::InProcess(server, _) => format!("ws://{}/ws", server.addr()),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Self::Child(child, _, _) => Some(child.id()),
            Self::InProcess(..) => Some(std::process::id()),
            Self::Remote(_) => None,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::Remote(_) => {}
            Self::InProcess(server, _dir) => {
                server.shutdown();
                server.wait().await?;
            }
            Self::Child(mut child, _, _dir) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        Ok(())
    }
}

/// Opens a MessagePack connection and completes `connect`/`connected`.
async fn connect(url: &str, batch: bool) -> anyhow::Result<Socket> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        Codec::MsgPack.subprotocol().parse()?,
    );
    let (mut ws, _) = tokio::time::timeout(IDLE, tokio_tungstenite::connect_async(request))
        .await
        .context("connect timed out")?
        .with_context(|| format!("cannot connect to {url}"))?;
    let hello = ClientFrame::Connect(Connect {
        client: Some("courier-bench".into()),
        batch: Some(batch),
        ..Connect::default()
    });
    send(&mut ws, &hello).await?;
    match recv(&mut ws).await? {
        ServerFrame::Connected(_) => Ok(ws),
        other => bail!("expected connected, got {other:?}"),
    }
}

async fn send(ws: &mut Socket, frame: &ClientFrame) -> anyhow::Result<()> {
    let bytes = encode_client(Codec::MsgPack, frame)?;
    tokio::time::timeout(IDLE, ws.send(Message::Binary(bytes.into())))
        .await
        .context("send timed out")??;
    Ok(())
}

fn decode(message: Message) -> anyhow::Result<Option<ServerFrame>> {
    match message {
        Message::Binary(bytes) => Ok(Some(decode_server(Codec::MsgPack, &bytes)?)),
        Message::Close(frame) => bail!("the broker closed the connection: {frame:?}"),
        _ => Ok(None),
    }
}

async fn recv(ws: &mut Socket) -> anyhow::Result<ServerFrame> {
    loop {
        let message = tokio::time::timeout(IDLE, ws.next())
            .await
            .context("no frame in time")?
            .ok_or_else(|| anyhow!("connection closed"))??;
        if let Some(frame) = decode(message)? {
            return Ok(frame);
        }
    }
}

/// What a subscriber (or a whole queue group) received.
struct Tally {
    seen: Vec<bool>,
    unique: u64,
    dups: u64,
    deliveries: u64,
    latency: Histogram<u64>,
    last_ns: u64,
}

impl Tally {
    fn new(count: u64) -> anyhow::Result<Self> {
        Ok(Self {
            seen: vec![false; usize::try_from(count)?],
            unique: 0,
            dups: 0,
            deliveries: 0,
            latency: histogram()?,
            last_ns: 0,
        })
    }

    fn record(&mut self, payload: &[u8], now: u64) {
        let read = |from: usize| {
            payload
                .get(from..from + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
        };
        let (Some(sent), Some(number)) = (read(0), read(8)) else {
            return;
        };
        let Some(slot) = usize::try_from(number)
            .ok()
            .and_then(|i| self.seen.get_mut(i))
        else {
            return;
        };
        self.deliveries += 1;
        if *slot {
            self.dups += 1;
            return;
        }
        *slot = true;
        self.unique += 1;
        self.last_ns = now;
        self.latency
            .saturating_record((now.saturating_sub(sent) / 1000).max(1));
    }
}

type SharedTally = Arc<Mutex<Tally>>;

fn lock(tally: &SharedTally) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(|e| e.into_inner())
}

/// Subscribes (waiting for `subscribed`, so no publish comes first).
async fn subscribe(url: &str, channel: &str, consumer: Subscribe) -> anyhow::Result<Socket> {
    let mut ws = connect(url, true).await?;
    let request = ClientFrame::Subscribe(Subscribe {
        id: 1,
        channel: channel.to_owned(),
        from: Some(StartFrom::New),
        ack: Some(AckMode::Manual),
        max_in_flight: Some(1000),
        ..consumer
    });
    send(&mut ws, &request).await?;
    match recv(&mut ws).await? {
        ServerFrame::Subscribed(_) => Ok(ws),
        other => bail!("expected subscribed, got {other:?}"),
    }
}

/// Reads deliveries until `tally` has all `count` messages; acks (or, for
/// the `nack_percent` share of first deliveries, nacks) what it reads.
async fn consume(
    mut ws: Socket,
    channel: String,
    count: u64,
    tally: SharedTally,
    nack_percent: u64,
    start: Instant,
) -> anyhow::Result<()> {
    let mut to_ack = Vec::with_capacity(ACK_BATCH);
    let mut to_nack = Vec::new();
    while lock(&tally).unique < count {
        let first = match tokio::time::timeout(IDLE, ws.next()).await {
            Err(_) => break,
            Ok(None) => bail!("the broker closed a subscriber's connection"),
            Ok(Some(message)) => message?,
        };
        let mut frames = vec![first];
        while frames.len() < ACK_BATCH {
            match ws.next().now_or_never() {
                Some(Some(message)) => frames.push(message?),
                _ => break,
            }
        }
        {
            let mut tally = lock(&tally);
            let now = since(start);
            for message in frames {
                let items: Vec<(u64, bytes::Bytes, u32)> = match decode(message)? {
                    Some(ServerFrame::Msg(m)) => vec![(m.seq, m.payload(), m.attempt)],
                    Some(ServerFrame::Msgs(batch)) => batch
                        .items
                        .iter()
                        .map(|i| (i.seq, i.payload(), i.attempt))
                        .collect(),
                    Some(ServerFrame::Gap(g)) => {
                        bail!("the broker lost seqs {}..={}", g.from, g.to)
                    }
                    _ => continue,
                };
                for (seq, payload, attempt) in items {
                    let number = payload
                        .get(8..HEADER_LEN)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(u64::from_be_bytes);
                    if attempt == 1 && number.is_some_and(|n| n % 100 < nack_percent) {
                        to_nack.push(seq);
                    } else {
                        to_ack.push(seq);
                        tally.record(&payload, now);
                    }
                }
            }
        }
        for seq in to_nack.drain(..) {
            let nack = ClientFrame::Nack(Nack {
                id: None,
                channel: channel.clone(),
                seq,
                delay_ms: Some(0),
            });
            send(&mut ws, &nack).await?;
        }
        if !to_ack.is_empty() {
            let ack = ClientFrame::Ack(Ack {
                id: None,
                channel: channel.clone(),
                seqs: Some(std::mem::take(&mut to_ack)),
                upto: None,
            });
            send(&mut ws, &ack).await?;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(())
}

/// One publisher: message numbers `first, first + step, …` below `count`,
/// at most `window` waiting for their puback, paced at `rate` when given.
/// Returns (pubacks, errors, first send ns).
#[allow(clippy::too_many_arguments)]
async fn publish(
    mut ws: Socket,
    channel: String,
    first: u64,
    step: u64,
    count: u64,
    args: PublishPlan,
    progress: ProgressBar,
    start: Instant,
) -> anyhow::Result<(u64, u64)> {
    let mine: Vec<u64> = (first..count).step_by(usize::try_from(step)?).collect();
    let total = u64::try_from(mine.len())?;
    let mut payload = vec![0u8; args.size];
    for (i, byte) in payload.iter_mut().enumerate().skip(HEADER_LEN) {
        *byte = u8::try_from(i % 251).unwrap_or(0);
    }
    let mut unanswered: VecDeque<u64> = VecDeque::with_capacity(args.window);
    let (mut next, mut acked, mut errors) = (0usize, 0u64, 0u64);
    let paced_from = Instant::now();
    let mut unflushed = false;
    while acked + errors < total {
        let may_send = next < mine.len() && unanswered.len() < args.window;
        let due = args.rate.filter(|_| may_send).map(|rate| {
            let offset = u128::try_from(next).unwrap_or(0) * 1_000_000_000 / u128::from(rate);
            paced_from + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
        });
        if may_send && due.is_none_or(|due| due <= Instant::now()) {
            let number = mine[next];
            payload[..8].copy_from_slice(&since(start).to_be_bytes());
            payload[8..HEADER_LEN].copy_from_slice(&number.to_be_bytes());
            let frame = ClientFrame::Publish(Publish {
                id: number,
                channel: channel.clone(),
                data: Some(Payload(payload.clone().into())),
                ..Publish::default()
            });
            let bytes = encode_client(Codec::MsgPack, &frame)?;
            tokio::time::timeout(IDLE, ws.feed(Message::Binary(bytes.into())))
                .await
                .context("send timed out")??;
            unanswered.push_back(number);
            next += 1;
            unflushed = true;
            continue;
        }
        if unflushed {
            tokio::time::timeout(IDLE, ws.flush())
                .await
                .context("flush timed out")??;
            unflushed = false;
        }
        let message = match due {
            Some(due) => tokio::select! {
                m = tokio::time::timeout(IDLE, ws.next()) => Some(m),
                () = tokio::time::sleep_until(due.into()) => None,
            },
            None => Some(tokio::time::timeout(IDLE, ws.next()).await),
        };
        let Some(message) = message else { continue };
        let mut messages = vec![
            message
                .context("no puback in time")?
                .ok_or_else(|| anyhow!("the broker closed a publisher's connection"))??,
        ];
        while let Some(Some(more)) = ws.next().now_or_never() {
            messages.push(more?);
        }
        for message in messages {
            match decode(message)? {
                Some(ServerFrame::Puback(p)) => {
                    unanswered.retain(|n| *n != p.id);
                    acked += 1;
                    progress.inc(1);
                }
                Some(ServerFrame::Error(e)) => {
                    eprintln!("publish error: {} {}", e.code.as_str(), e.message);
                    if let Some(id) = e.id {
                        unanswered.retain(|n| *n != id);
                    }
                    errors += 1;
                }
                _ => {}
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok((acked, errors))
}

#[derive(Debug, Clone, Copy)]
struct PublishPlan {
    size: usize,
    window: usize,
    /// Per publisher.
    rate: Option<u64>,
}

fn ms(h: &Histogram<u64>, quantile: f64) -> f64 {
    float(h.value_at_quantile(quantile)) / 1000.0
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} published {per_sec} {elapsed}")
    {
        bar.set_style(style);
    }
    bar
}

/// Runs `courier bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(
        args.size >= HEADER_LEN,
        "--size must be at least {HEADER_LEN} bytes"
    );
    ensure!(
        args.publishers > 0 && args.window > 0,
        "--publishers and --window must be at least 1"
    );
    ensure!(args.rate != Some(0), "--rate must be at least 1");
    let target = Target::start(&args).await?;
    let result = match args.workload {
        Workload::Connections => connections(&args, &target).await,
        _ => messages(&args, &target).await,
    };
    target.stop().await?;
    let summary = result?;
    if args.json {
        println!("{summary}");
    }
    Ok(())
}

async fn messages(args: &BenchArgs, target: &Target) -> anyhow::Result<serde_json::Value> {
    let count = args.count.unwrap_or(100_000);
    ensure!(count > 0, "-n must be at least 1");
    let subscribers = args.subscribers.unwrap_or(match args.workload {
        Workload::Fanout => 100,
        Workload::Queue => 3,
        _ => 1,
    });
    ensure!(subscribers > 0, "--subscribers must be at least 1");
    let nack_percent = if args.workload == Workload::Redelivery {
        args.nack_percent
    } else {
        0
    };
    let channel = format!(
        "bench:{:?}-{}-{}",
        args.workload,
        std::process::id(),
        since(Instant::now())
    )
    .to_lowercase();
    let start = Instant::now();

    // One tally per subscriber, or one for the whole group in `queue`.
    let group = args.workload == Workload::Queue;
    let shared = Arc::new(Mutex::new(Tally::new(count)?));
    let mut tallies = Vec::new();
    let mut consumers = Vec::new();
    for i in 0..subscribers {
        let consumer = if group {
            Subscribe {
                group: Some("bench".into()),
                ..Subscribe::default()
            }
        } else {
            Subscribe {
                consumer: Some(format!("bench-{i}")),
                ..Subscribe::default()
            }
        };
        let ws = subscribe(&target.url(i + 1), &channel, consumer).await?;
        let tally = if group {
            Arc::clone(&shared)
        } else {
            Arc::new(Mutex::new(Tally::new(count)?))
        };
        tallies.push(Arc::clone(&tally));
        consumers.push(tokio::spawn(consume(
            ws,
            channel.clone(),
            count,
            tally,
            nack_percent,
            start,
        )));
    }

    let progress = progress_bar(count);
    let plan = PublishPlan {
        size: args.size,
        window: args.window,
        rate: args
            .rate
            .map(|r| (r / u64::try_from(args.publishers).unwrap_or(1)).max(1)),
    };
    let first_send = since(start);
    let mut publishers = Vec::new();
    let step = u64::try_from(args.publishers)?;
    for p in 0..step {
        let ws = connect(&target.url(usize::try_from(p)?), false).await?;
        publishers.push(tokio::spawn(publish(
            ws,
            channel.clone(),
            p,
            step,
            count,
            plan,
            progress.clone(),
            start,
        )));
    }
    let (mut acked, mut errors) = (0, 0);
    for publisher in publishers {
        let (a, e) = publisher.await??;
        acked += a;
        errors += e;
    }
    progress.finish_and_clear();
    for consumer in consumers {
        consumer.await??;
    }

    let mut latency = histogram()?;
    let (mut unique_min, mut dups, mut deliveries, mut last_ns) = (u64::MAX, 0, 0, 0);
    let distinct: Vec<&SharedTally> = if group {
        vec![&shared]
    } else {
        tallies.iter().collect()
    };
    for tally in distinct {
        let t = lock(tally);
        latency.add(&t.latency)?;
        unique_min = unique_min.min(t.unique);
        dups += t.dups;
        deliveries += t.deliveries;
        last_ns = last_ns.max(t.last_ns);
    }
    let seconds = float(last_ns.saturating_sub(first_send)) / 1e9;
    let per_s = |n: u64| {
        if seconds > 0.0 {
            float(n) / seconds
        } else {
            0.0
        }
    };
    let missing = count - unique_min.min(count);
    let summary = serde_json::json!({
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "messages": count,
        "size": args.size,
        "publishers": args.publishers,
        "subscribers": subscribers,
        "window": args.window,
        "rate": args.rate,
        "nack_percent": nack_percent,
        "seconds": seconds,
        "msgs_per_s": per_s(count),
        "deliveries": deliveries,
        "deliveries_per_s": per_s(deliveries),
        "p50_ms": ms(&latency, 0.5),
        "p90_ms": ms(&latency, 0.9),
        "p99_ms": ms(&latency, 0.99),
        "p999_ms": ms(&latency, 0.999),
        "max_ms": float(latency.max()) / 1000.0,
        "dups": dups,
        "missing": missing,
        "publish_errors": errors,
        "pubacks": acked,
    });
    println!(
        "{} × {} B, {} publisher(s), {} subscriber(s){}: {:.0} msgs/s, {:.0} deliveries/s in {:.2} s",
        count,
        args.size,
        args.publishers,
        subscribers,
        if group { " in one group" } else { "" },
        per_s(count),
        per_s(deliveries),
        seconds
    );
    println!(
        "publish → deliver ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        ms(&latency, 0.5),
        ms(&latency, 0.9),
        ms(&latency, 0.99),
        ms(&latency, 0.999),
        float(latency.max()) / 1000.0
    );
    println!("dups {dups}, missing {missing}, publish errors {errors}");
    Ok(summary)
}

/// Resident memory of a process, bytes (Linux).
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

async fn connections(args: &BenchArgs, target: &Target) -> anyhow::Result<serde_json::Value> {
    let count = args.count.unwrap_or(1000);
    let url = target.url(0);
    let pid = target.pid();
    let before = pid.and_then(rss);
    let progress = progress_bar(count);
    let started = Instant::now();
    let mut open = Vec::with_capacity(usize::try_from(count)?);
    for _ in 0..count {
        match connect(&url, false).await {
            Ok(ws) => open.push(ws),
            Err(e) => {
                eprintln!("stopped at {} connections: {e:#}", open.len());
                break;
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    let opened = u64::try_from(open.len())?;
    let seconds = started.elapsed().as_secs_f64();
    // Let the broker settle, then read its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = pid.and_then(rss);
    let per_connection = match (before, after) {
        (Some(b), Some(a)) if opened > 0 => Some(float(a.saturating_sub(b)) / float(opened)),
        _ => None,
    };
    println!("{opened} idle connections opened in {seconds:.2} s");
    match (per_connection, &target) {
        (Some(per), Target::Child(..)) => println!(
            "broker RSS {:.1} MiB → {:.1} MiB: {:.2} KiB per connection",
            float(before.unwrap_or(0)) / 1_048_576.0,
            float(after.unwrap_or(0)) / 1_048_576.0,
            per / 1024.0
        ),
        (Some(per), _) => println!(
            "process RSS grew {:.2} KiB per connection (client and broker together)",
            per / 1024.0
        ),
        (None, _) => println!("broker RSS: not measured (remote broker)"),
    }
    for ws in &mut open {
        let _ = ws.close(None).now_or_never();
    }
    Ok(serde_json::json!({
        "workload": "connections",
        "connections": opened,
        "seconds": seconds,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_per_connection_bytes": per_connection,
    }))
}
