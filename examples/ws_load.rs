//! An end-to-end WebSocket load client: one publisher, one subscriber, one
//! channel, MessagePack (`courier.v1.msgpack`).
//!
//! ```text
//! cargo run --release --example ws_load -- [url] [-n count] [--size bytes] [--window W] [--rate msgs_per_s]
//! ```
//!
//! Without a `url` it starts a broker in this process on `127.0.0.1:0` in a
//! temp dir with `fsync = "batch"`. The subscriber (consumer `bench`, from
//! new, manual ack, `max_in_flight` 1000) subscribes before the first
//! publish. The publisher pipelines `count` publishes of `size` bytes with at
//! most `window` waiting for their puback, paced at `rate` when given. Each
//! payload starts with the send instant (ns since a start shared by both
//! connections) and the message's number, so the subscriber measures
//! publish → delivery latency and checks that every message came exactly
//! once. The subscriber acks in batches: one `ack` frame per burst of
//! deliveries it has read (everything already buffered, at most
//! [`ACK_BATCH`] seqs). Each connection is owned by one task, which reads
//! whenever it is not sending, so pubacks and deliveries are timed when they
//! arrive.
//!
//! Prints the results, then the same as one JSON line. Broker errors go to
//! stderr (`RUST_LOG` raises the level). See `docs/benchmarks.md`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail, ensure};
use clap::Parser;
use courier::config::{Config, FsyncPolicy};
use courier::protocol::{
    Ack, AckMode, ClientFrame, Codec, Connect, Nack, Payload, Publish, ServerFrame, StartFrom,
    Subscribe, decode_server, encode_client,
};
use futures_util::stream::Stream;
use futures_util::{FutureExt, Sink, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Most seqs in one `ack` frame.
const ACK_BATCH: usize = 256;

/// Longest wait for any single thing from the broker; after this with no
/// progress the run stops and reports what it has (missing messages).
const IDLE: Duration = Duration::from_secs(10);

/// Bytes at the start of each payload: send instant (ns), message number.
const HEADER_LEN: usize = 16;

/// The subscription's window.
const MAX_IN_FLIGHT: u32 = 1000;

/// Latencies are recorded in microseconds, up to this (10 minutes).
const MAX_LATENCY_US: u64 = 600_000_000;

#[derive(Debug, Parser)]
#[command(about = "End-to-end WebSocket load: one publisher, one subscriber, MessagePack")]
struct Args {
    /// `ws://host:port/ws` of a running broker; without it a broker starts in this process.
    url: Option<String>,
    /// Messages to publish.
    #[arg(short = 'n', long = "count", default_value_t = 100_000)]
    count: u64,
    /// Payload bytes per message (at least 16).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Publishes waiting for their puback at most.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Publishes per second; unpaced when absent.
    #[arg(long)]
    rate: Option<u64>,
    /// Percent of messages the subscriber nacks once (each comes back as a
    /// retry, attempt 2, and is acked then): the cost of the retry path.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100))]
    nack_percent: u64,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Nanoseconds since the run's shared start.
fn since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A count or a duration in µs as `f64`, for rates and milliseconds.
/// Exact: every value here is far below 2^53.
#[allow(clippy::cast_precision_loss)]
fn float(n: u64) -> f64 {
    n as f64
}

fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("histogram bounds")
}

/// A broker running in this process, for runs without a URL.
struct LocalBroker {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), courier::server::ServerError>>,
    _dir: tempfile::TempDir,
}

impl LocalBroker {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("temp dir")?;
        let mut config = Config::default();
        config.server.data_dir = dir.path().join("data");
        config.server.fsync = FsyncPolicy::Batch;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(courier::server::run(config, listener, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            stop,
            task,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("broker did not stop in 30 s")?
            .context("broker task")?
            .context("broker")?;
        Ok(())
    }
}

/// Opens a MessagePack connection and completes `connect`/`connected`.
async fn connect(url: &str, size: usize) -> anyhow::Result<Socket> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        Codec::MsgPack.subprotocol().parse()?,
    );
    let limit = size
        .saturating_mul(2)
        .saturating_add(64 * 1024)
        .max(1 << 20);
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    // Nagle off: a load client must not add its own delay to small frames.
    let (mut ws, response) = tokio::time::timeout(
        IDLE,
        tokio_tungstenite::connect_async_with_config(request, Some(config), true),
    )
    .await
    .context("websocket handshake timed out")??;
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    ensure!(
        chosen == Some(Codec::MsgPack.subprotocol()),
        "the server chose subprotocol {chosen:?}"
    );
    let hello = ClientFrame::Connect(Connect {
        client: Some("ws_load".to_owned()),
        ..Connect::default()
    });
    send(&mut ws, &hello).await?;
    match recv(&mut ws).await? {
        ServerFrame::Connected(_) => Ok(ws),
        other => bail!("expected connected, got {other:?}"),
    }
}

async fn send<S>(ws: &mut S, frame: &ClientFrame) -> anyhow::Result<()>
where
    S: Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let bytes = encode_client(Codec::MsgPack, frame)?;
    tokio::time::timeout(IDLE, ws.send(Message::Binary(bytes.into())))
        .await
        .context("send timed out")??;
    Ok(())
}

/// Decodes one WebSocket message; `None` for control frames.
fn decode(message: Message) -> anyhow::Result<Option<ServerFrame>> {
    match message {
        Message::Binary(bytes) => Ok(Some(decode_server(Codec::MsgPack, &bytes)?)),
        Message::Close(frame) => bail!("closed by the server: {frame:?}"),
        Message::Text(_) => bail!("a text frame on a MessagePack connection"),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(None),
    }
}

/// The next server frame, waiting at most [`IDLE`].
async fn recv<S>(ws: &mut S) -> anyhow::Result<ServerFrame>
where
    S: Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let message = tokio::time::timeout(IDLE, ws.next())
            .await
            .context("no frame from the broker in time")?
            .ok_or_else(|| anyhow!("the broker closed the connection"))??;
        if let Some(frame) = decode(message)? {
            return Ok(frame);
        }
    }
}

/// What the subscriber saw.
struct Received {
    latency: Histogram<u64>,
    /// Which message numbers arrived.
    seen: Vec<bool>,
    /// Distinct messages of this run.
    unique: u64,
    duplicates: u64,
    /// Deliveries whose payload was not one of ours.
    foreign: u64,
    /// Seqs the broker reported lost in `gap` frames.
    gapped: u64,
    /// When the last new message arrived, ns since start.
    last_ns: u64,
    /// Percent of messages to nack on their first delivery.
    nack_percent: u64,
    /// Deliveries with attempt > 1.
    retried: u64,
}

impl Received {
    fn new(count: u64, nack_percent: u64) -> anyhow::Result<Self> {
        Ok(Self {
            nack_percent,
            retried: 0,
            latency: latency_histogram()?,
            seen: vec![false; usize::try_from(count)?],
            unique: 0,
            duplicates: 0,
            foreign: 0,
            gapped: 0,
            last_ns: 0,
        })
    }

    /// Tallies one frame; the seqs it delivered go to `to_ack`, or to
    /// `to_nack` for first deliveries of the `nack_percent` share.
    fn on_frame(
        &mut self,
        frame: ServerFrame,
        now: u64,
        to_ack: &mut Vec<u64>,
        to_nack: &mut Vec<u64>,
    ) {
        match frame {
            ServerFrame::Msg(m) => {
                self.on_one(m.seq, &m.payload(), m.attempt, now, to_ack, to_nack);
            }
            ServerFrame::Msgs(batch) => {
                for item in batch.items {
                    self.on_one(
                        item.seq,
                        &item.payload(),
                        item.attempt,
                        now,
                        to_ack,
                        to_nack,
                    );
                }
            }
            ServerFrame::Gap(gap) => {
                eprintln!("gap: seqs {}..={} were lost", gap.from, gap.to);
                self.gapped += gap.to - gap.from + 1;
            }
            ServerFrame::Error(e) => eprintln!("subscriber got an error: {e:?}"),
            _ => {}
        }
    }

    fn on_one(
        &mut self,
        seq: u64,
        payload: &[u8],
        attempt: u32,
        now: u64,
        to_ack: &mut Vec<u64>,
        to_nack: &mut Vec<u64>,
    ) {
        let number = payload
            .get(8..HEADER_LEN)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        if attempt == 1 && number.is_some_and(|n| n % 100 < self.nack_percent) {
            to_nack.push(seq);
            return;
        }
        if attempt > 1 {
            self.retried += 1;
        }
        to_ack.push(seq);
        self.on_delivery(payload, now);
    }

    fn on_delivery(&mut self, payload: &[u8], now: u64) {
        let read = |range: std::ops::Range<usize>| {
            payload
                .get(range)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
        };
        let (Some(sent), Some(number)) = (read(0..8), read(8..HEADER_LEN)) else {
            self.foreign += 1;
            return;
        };
        let Some(slot) = usize::try_from(number)
            .ok()
            .and_then(|i| self.seen.get_mut(i))
        else {
            self.foreign += 1;
            return;
        };
        if *slot {
            self.duplicates += 1;
            return;
        }
        *slot = true;
        self.unique += 1;
        self.last_ns = now;
        self.latency
            .saturating_record((now.saturating_sub(sent) / 1000).max(1));
    }
}

/// Subscribes and waits for `subscribed`, so no publish can come first.
async fn subscribe(url: &str, channel: &str, size: usize) -> anyhow::Result<Socket> {
    let mut ws = connect(url, size).await?;
    let request = ClientFrame::Subscribe(Subscribe {
        id: 1,
        channel: channel.to_owned(),
        consumer: Some("bench".to_owned()),
        from: Some(StartFrom::New),
        max_in_flight: Some(MAX_IN_FLIGHT),
        ack: Some(AckMode::Manual),
        ..Subscribe::default()
    });
    send(&mut ws, &request).await?;
    match recv(&mut ws).await? {
        ServerFrame::Subscribed(_) => Ok(ws),
        other => bail!("expected subscribed, got {other:?}"),
    }
}

/// Reads deliveries until all `count` arrived or nothing came for [`IDLE`];
/// acks every delivery.
async fn consume(
    mut ws: Socket,
    channel: String,
    count: u64,
    start: Instant,
    nack_percent: u64,
) -> anyhow::Result<Received> {
    let mut received = Received::new(count, nack_percent)?;
    let mut to_ack: Vec<u64> = Vec::with_capacity(ACK_BATCH);
    let mut to_nack: Vec<u64> = Vec::new();
    while received.unique + received.gapped < count {
        let first = match tokio::time::timeout(IDLE, ws.next()).await {
            Err(_) => {
                eprintln!("no delivery for {IDLE:?}; reporting what arrived");
                break;
            }
            Ok(None) => bail!("the broker closed the subscriber's connection"),
            Ok(Some(message)) => message?,
        };
        if let Some(frame) = decode(first)? {
            received.on_frame(frame, since(start), &mut to_ack, &mut to_nack);
        }
        // Take what is already buffered, then ack it all in one frame.
        while to_ack.len() < ACK_BATCH {
            let Some(Some(message)) = ws.next().now_or_never() else {
                break;
            };
            if let Some(frame) = decode(message?)? {
                received.on_frame(frame, since(start), &mut to_ack, &mut to_nack);
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
    Ok(received)
}

/// What the publisher saw.
struct Published {
    /// publish → puback latency.
    puback: Histogram<u64>,
    acked: u64,
    errors: u64,
    /// Answers whose id was not the oldest unanswered publish.
    out_of_order: u64,
    /// When the first publish was sent, ns since start.
    first_ns: u64,
    /// `(id, sent ns)` of the publishes waiting for an answer, oldest first
    /// (pubacks come in publish order).
    unanswered: VecDeque<(u64, u64)>,
}

impl Published {
    fn on_message(&mut self, message: Message, start: Instant) -> anyhow::Result<()> {
        let (id, ok) = match decode(message)? {
            Some(ServerFrame::Puback(ack)) => (ack.id, true),
            Some(ServerFrame::Error(e)) => {
                eprintln!("publish error: {e:?}");
                let Some(id) = e.id else { return Ok(()) };
                (id, false)
            }
            _ => return Ok(()),
        };
        let now = since(start);
        match self.unanswered.front() {
            Some(&(oldest, sent)) if oldest == id => {
                self.unanswered.pop_front();
                self.puback
                    .saturating_record((now.saturating_sub(sent) / 1000).max(1));
            }
            _ => {
                self.out_of_order += 1;
                self.unanswered.retain(|(pending, _)| *pending != id);
            }
        }
        if ok {
            self.acked += 1;
        } else {
            self.errors += 1;
        }
        Ok(())
    }
}

/// Pipelines `count` publishes, at most `window` unanswered, and reads
/// their pubacks. One task owns the socket: it sends while the window and
/// the pace allow, and otherwise waits for the next frame (or the next
/// send time), so a puback is read as soon as it arrives.
async fn publish(
    mut ws: Socket,
    channel: &str,
    args: &Args,
    start: Instant,
) -> anyhow::Result<Published> {
    let mut published = Published {
        puback: latency_histogram()?,
        acked: 0,
        errors: 0,
        out_of_order: 0,
        first_ns: since(start),
        unanswered: VecDeque::with_capacity(args.window),
    };
    let paced_from = Instant::now();
    let mut payload = vec![0u8; args.size];
    for (i, byte) in payload.iter_mut().enumerate().skip(HEADER_LEN) {
        *byte = u8::try_from(i % 251).unwrap_or(0);
    }
    let mut number = 0;
    let mut unflushed = false;
    while published.acked + published.errors < args.count {
        let may_send = number < args.count && published.unanswered.len() < args.window;
        let due = match args.rate {
            Some(rate) if may_send => {
                let offset = u128::from(number) * 1_000_000_000 / u128::from(rate);
                Some(paced_from + Duration::from_nanos(u64::try_from(offset)?))
            }
            _ => None,
        };
        if may_send && due.is_none_or(|due| due <= Instant::now()) {
            let id = number + 1;
            let sent = since(start);
            payload[..8].copy_from_slice(&sent.to_be_bytes());
            payload[8..HEADER_LEN].copy_from_slice(&number.to_be_bytes());
            let frame = ClientFrame::Publish(Publish {
                id,
                channel: channel.to_owned(),
                data: Some(Payload(payload.clone().into())),
                ..Publish::default()
            });
            let bytes = encode_client(Codec::MsgPack, &frame)?;
            tokio::time::timeout(IDLE, ws.feed(Message::Binary(bytes.into())))
                .await
                .context("send timed out")??;
            published.unanswered.push_back((id, sent));
            number += 1;
            unflushed = true;
            continue;
        }
        if unflushed {
            tokio::time::timeout(IDLE, ws.flush())
                .await
                .context("flush timed out")??;
            unflushed = false;
        }
        let next = match due {
            Some(due) if may_send => tokio::select! {
                next = tokio::time::timeout(IDLE, ws.next()) => Some(next),
                () = tokio::time::sleep_until(due.into()) => None,
            },
            _ => Some(tokio::time::timeout(IDLE, ws.next()).await),
        };
        let Some(next) = next else { continue };
        let message = next
            .context("no puback in time")?
            .ok_or_else(|| anyhow!("the broker closed the publisher's connection"))??;
        published.on_message(message, start)?;
        // Read what else is buffered before sending more.
        while let Some(Some(message)) = ws.next().now_or_never() {
            published.on_message(message?, start)?;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(published)
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    float(histogram.value_at_quantile(quantile)) / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    ensure!(args.count > 0, "-n must be at least 1");
    ensure!(
        args.size >= HEADER_LEN,
        "--size must be at least {HEADER_LEN} (send instant and message number)"
    );
    ensure!(args.window > 0, "--window must be at least 1");
    ensure!(args.rate != Some(0), "--rate must be at least 1");

    let (url, local) = match &args.url {
        Some(url) => (url.clone(), None),
        None => {
            let broker = LocalBroker::start().await?;
            (broker.url(), Some(broker))
        }
    };
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let channel = format!("bench:load-{}-{unix_ms}", std::process::id());

    let start = Instant::now();
    let subscriber = subscribe(&url, &channel, args.size).await?;
    let consumer = tokio::spawn(consume(
        subscriber,
        channel.clone(),
        args.count,
        start,
        args.nack_percent,
    ));
    let publisher = connect(&url, args.size).await?;
    let published = publish(publisher, &channel, &args, start).await?;
    let received = consumer.await??;
    if let Some(broker) = local {
        broker.stop().await?;
    }

    let elapsed_ns = received.last_ns.saturating_sub(published.first_ns);
    let seconds = float(elapsed_ns) / 1e9;
    let rate = if seconds > 0.0 {
        float(received.unique) / seconds
    } else {
        0.0
    };
    let missing = args.count.saturating_sub(received.unique);
    let latency = &received.latency;
    let (p50, p90, p99, p999) = (
        ms(latency, 0.5),
        ms(latency, 0.9),
        ms(latency, 0.99),
        ms(latency, 0.999),
    );
    let max = float(latency.max()) / 1000.0;
    let paced = args
        .rate
        .map_or_else(|| "unpaced".to_owned(), |r| format!("{r} msgs/s"));
    println!(
        "messages   {} of {} B (window {}, {paced})",
        args.count, args.size, args.window
    );
    println!("seconds    {seconds:.3}");
    println!("msgs/s     {rate:.0} end to end");
    println!("latency ms p50 {p50:.3}  p90 {p90:.3}  p99 {p99:.3}  p99.9 {p999:.3}  max {max:.3}");
    println!(
        "puback ms  p50 {:.3}  p99 {:.3}  max {:.3}",
        ms(&published.puback, 0.5),
        ms(&published.puback, 0.99),
        float(published.puback.max()) / 1000.0
    );
    println!("dups       {}\nmissing    {missing}", received.duplicates);
    if published.errors + published.out_of_order + received.foreign + received.gapped > 0 {
        println!(
            "anomalies  publish errors {}, pubacks out of order {}, foreign deliveries {}, gapped seqs {}",
            published.errors, published.out_of_order, received.foreign, received.gapped
        );
    }
    let summary = serde_json::json!({
        "messages": args.count,
        "size": args.size,
        "window": args.window,
        "rate": args.rate,
        "seconds": seconds,
        "msgs_per_s": rate,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "p999_ms": p999,
        "max_ms": max,
        "puback_p50_ms": ms(&published.puback, 0.5),
        "puback_p99_ms": ms(&published.puback, 0.99),
        "dups": received.duplicates,
        "missing": missing,
        "publish_errors": published.errors,
    });
    println!("{summary}");
    Ok(())
}
