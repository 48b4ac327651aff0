//! A one-minute tour of Courier: one WebSocket client speaking JSON frames.
//!
//! It connects, subscribes to a fresh channel from its first message,
//! publishes two messages, acks only the first, disconnects, reconnects as
//! the same consumer and gets the unacked message again (`attempt: 2`).
//! Every frame sent (`->`) and received (`<-`) is printed as it travels.
//!
//! Start a broker first (`cargo run --release -- serve`), then:
//!
//! ```text
//! cargo run --example tour                          # ws://127.0.0.1:7070/ws
//! cargo run --example tour -- ws://127.0.0.1:7171/ws
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Error = Box<dyn std::error::Error>;

/// Longest wait for any one frame: the broker answers in milliseconds.
const WAIT: Duration = Duration::from_secs(10);

/// The durable consumer the tour reads as; the broker keeps its position.
const CONSUMER: &str = "tour-reader";

#[tokio::main]
async fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:7070/ws".to_owned());
    if let Err(e) = tour(&url).await {
        eprintln!("tour failed: {e}");
        eprintln!("is the broker running? `cargo run --release -- serve`");
        std::process::exit(1);
    }
}

async fn tour(url: &str) -> Result<(), Error> {
    // A channel of its own per run, so seqs start at 1 every time.
    let millis = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let channel = format!("tour:{millis}");

    println!("# 1. connect to {url} (subprotocol courier.v1.json)");
    let mut ws = open(url).await?;

    println!("\n# 2. subscribe as consumer {CONSUMER:?}, from the first message");
    send(
        &mut ws,
        &format!(
            r#"{{"type":"subscribe","id":1,"channel":"{channel}","consumer":"{CONSUMER}","from":"first"}}"#
        ),
    )
    .await?;
    expect(&mut ws, "subscribed").await?;

    println!(
        "\n# 3. publish two messages: a puback when each is on disk, a msg for the subscription"
    );
    send(
        &mut ws,
        &format!(r#"{{"type":"publish","id":2,"channel":"{channel}","data":{{"text":"hello"}}}}"#),
    )
    .await?;
    send(
        &mut ws,
        &format!(r#"{{"type":"publish","id":3,"channel":"{channel}","data":{{"text":"world"}}}}"#),
    )
    .await?;
    let mut pubacks = BTreeSet::new();
    let mut delivered = BTreeSet::new();
    while pubacks.len() < 2 || delivered.len() < 2 {
        let frame = recv(&mut ws).await?;
        match kind(&frame) {
            "puback" => pubacks.extend(frame["seq"].as_u64()),
            "msg" => delivered.extend(frame["seq"].as_u64()),
            "error" => return Err(format!("the broker refused a request: {frame}").into()),
            _ => {}
        }
    }
    let first = *delivered.first().ok_or("no delivery")?;

    println!(
        "\n# 4. ack only seq {first} (acks get no reply; the ping round trip shows it was read)"
    );
    send(
        &mut ws,
        &format!(r#"{{"type":"ack","channel":"{channel}","seqs":[{first}]}}"#),
    )
    .await?;
    send(&mut ws, r#"{"type":"ping","id":4}"#).await?;
    expect(&mut ws, "pong").await?;

    println!("\n# 5. disconnect, reconnect as the same consumer: the unacked message comes back");
    ws.close(None).await?;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    let mut ws = open(url).await?;
    send(
        &mut ws,
        &format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}","consumer":"{CONSUMER}"}}"#),
    )
    .await?;
    expect(&mut ws, "subscribed").await?;
    let again = expect(&mut ws, "msg").await?;
    let seq = again["seq"].as_u64().ok_or("msg without seq")?;
    send(
        &mut ws,
        &format!(r#"{{"type":"ack","channel":"{channel}","seqs":[{seq}]}}"#),
    )
    .await?;
    send(&mut ws, r#"{"type":"ping","id":5}"#).await?;
    expect(&mut ws, "pong").await?;
    ws.close(None).await?;

    println!(
        "\n# done: seq {seq} came back with attempt {}",
        again["attempt"]
    );
    Ok(())
}

/// Opens the WebSocket and does the `connect` / `connected` exchange.
async fn open(url: &str) -> Result<Socket, Error> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "courier.v1.json".parse()?);
    let (mut ws, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request)).await??;
    send(&mut ws, r#"{"type":"connect","client":"courier-tour"}"#).await?;
    expect(&mut ws, "connected").await?;
    Ok(ws)
}

async fn send(ws: &mut Socket, frame: &str) -> Result<(), Error> {
    println!("-> {frame}");
    ws.send(Message::Text(frame.into())).await?;
    Ok(())
}

/// The next frame from the broker (WebSocket pings are answered by tungstenite).
async fn recv(ws: &mut Socket) -> Result<Value, Error> {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await?
            .ok_or("the broker closed the connection")??;
        match message {
            Message::Text(text) => {
                println!("<- {text}");
                return Ok(serde_json::from_str(&text)?);
            }
            Message::Close(frame) => return Err(format!("closed by the broker: {frame:?}").into()),
            _ => {}
        }
    }
}

/// Reads frames until one of type `want` arrives; an `error` frame ends the tour.
async fn expect(ws: &mut Socket, want: &str) -> Result<Value, Error> {
    loop {
        let frame = recv(ws).await?;
        match kind(&frame) {
            k if k == want => return Ok(frame),
            "error" => return Err(format!("the broker refused a request: {frame}").into()),
            _ => {}
        }
    }
}

fn kind(frame: &Value) -> &str {
    frame["type"].as_str().unwrap_or("")
}
