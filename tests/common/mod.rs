//! Test harness: a real broker on 127.0.0.1:0 with a temp data dir
//! ([`TestBroker`], in-process; [`ChildBroker`], the real binary;
//! [`admin::AdminBroker`], the binary with its admin listener), and a real
//! WebSocket client speaking either codec ([`Client`]).
#![allow(dead_code)]

pub mod cluster;
pub mod http;
pub mod sdk;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub mod admin;

use courier::config::Config;
use courier::protocol::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Both codecs, for tests that run over each.
pub const CODECS: [Codec; 2] = [Codec::Json, Codec::MsgPack];

/// Headless Chromium's flags on a machine with loopback networking only
/// (the browser tests add a fresh `--user-data-dir`).
pub const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// A broker running in this process.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    server: Option<courier::server::Server>,
    config: Config,
}

impl TestBroker {
    /// Starts with default settings in a fresh temp dir.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with settings changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut config = Config::default();
        config.server.data_dir = temp.path().join("data");
        config.server.admin_listen = ([127, 0, 0, 1], 0).into();
        configure(&mut config);
        Self::launch(config, Some(temp)).await
    }

    async fn launch(config: Config, temp: Option<tempfile::TempDir>) -> Self {
        if let Ok(filter) = std::env::var("COURIER_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = courier::server::Server::start(config.clone(), listener)
            .await
            .expect("broker starts");
        Self {
            addr,
            dir: config.server.data_dir.clone(),
            _temp: temp,
            server: Some(server),
            config,
        }
    }

    /// The broker inside, for library-level calls (DLQ operations).
    pub fn broker(&self) -> &std::sync::Arc<courier::broker::Broker> {
        self.server.as_ref().expect("running").broker()
    }

    /// `ws://` URL of the broker.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// An admin API client with the right token.
    pub fn admin(&self) -> Admin {
        let server = self.server.as_ref().expect("running");
        Admin::new(
            format!("http://{}", server.admin_addr()),
            server.admin_token(),
        )
    }

    /// Shuts down gracefully and waits until the server has stopped.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            let result = tokio::time::timeout(WAIT, server.wait())
                .await
                .expect("server stops in time");
            result.expect("server exits cleanly");
        }
    }

    /// Stops and starts again on the same data dir (on a new port).
    pub async fn restart(mut self) -> Self {
        self.stop().await;
        let temp = self._temp.take();
        Self::launch(self.config.clone(), temp).await
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.shutdown();
        }
    }
}

/// The real `courier` binary as a child process.
pub struct ChildBroker {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything the broker wrote to stderr, for failure messages.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ChildBroker {
    /// Runs `courier serve` with `config_toml` written to `dir/courier.toml`,
    /// on a fresh port.
    pub fn start(dir: &Path, config_toml: &str) -> Self {
        Self::start_on(dir, config_toml, "127.0.0.1:0")
    }

    /// Like [`ChildBroker::start`], listening on `listen` (e.g. the address
    /// of a broker that was killed, to restart it where clients reconnect).
    pub fn start_on(dir: &Path, config_toml: &str, listen: &str) -> Self {
        let config = dir.join("courier.toml");
        std::fs::write(&config, config_toml).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["serve", "--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env(
                "RUST_LOG",
                std::env::var("COURIER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn courier");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line.clone());
                if !sent && let Some(rest) = line.split("addr=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let addr = rx.recv_timeout(WAIT).ok().and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            // Never leave a broker running behind a failed test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("courier did not print the address it listens on");
        };
        Self { child, addr, log }
    }

    /// The broker's stderr so far, one line each.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Waits until `GET /readyz` answers 200 (a cluster node: Redis
    /// answers and the node hears the others' notifications).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = http::get(self.addr, "/readyz").await.status;
            if status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "courier never became ready ({status}):\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An admin API client; `token` is the `[admin] token` of its config.
    pub fn admin(&self, token: &str) -> Admin {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let found = self.log.lock().unwrap().iter().find_map(|line| {
                let rest = line.split(" admin=").nth(1)?;
                rest.split_whitespace().next().map(str::to_owned)
            });
            if let Some(addr) = found {
                return Admin::new(format!("http://{addr}"), token);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "courier did not log its admin address:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: a graceful shutdown.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// SIGTERM, then the close code `client` receives; the broker's log is
    /// in the panic message when no close arrives.
    pub async fn sigterm_and_close_code(&self, client: &mut Client) -> u16 {
        self.sigterm();
        // Shorter than `expect_close`'s own limit, so the log gets printed.
        match tokio::time::timeout(WAIT / 2, client.expect_close()).await {
            Ok(code) => code,
            Err(_) => panic!("no close after SIGTERM; broker log:\n{}", self.log_text()),
        }
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking one codec.
pub struct Client {
    pub ws: Socket,
    pub codec: Codec,
    next_id: u64,
    /// Frames read while waiting for something else.
    pub backlog: std::collections::VecDeque<ServerFrame>,
}

/// Opens a WebSocket offering `codec`'s subprotocol (none for `None`).
pub async fn open(url: &str, codec: Option<Codec>) -> Socket {
    let mut request = url.into_client_request().expect("request");
    if let Some(codec) = codec {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            codec.subprotocol().parse().expect("header"),
        );
    }
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")
        .expect("websocket handshake");
    if let Some(codec) = codec {
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok());
        assert_eq!(chosen, Some(codec.subprotocol()));
    }
    ws
}

impl Client {
    /// Wraps an open socket that has not sent `connect`.
    pub fn raw(ws: Socket, codec: Codec) -> Self {
        Self {
            ws,
            codec,
            next_id: 1,
            backlog: Default::default(),
        }
    }

    /// Connects and completes the `connect`/`connected` exchange.
    pub async fn connect(url: &str, codec: Codec) -> Self {
        Self::connect_with(url, codec, Connect::default()).await.0
    }

    /// Connects with a given `connect` frame; returns the `connected` reply.
    pub async fn connect_with(url: &str, codec: Codec, connect: Connect) -> (Self, Connected) {
        let ws = open(url, Some(codec)).await;
        let mut client = Self {
            ws,
            codec,
            next_id: 1,
            backlog: Default::default(),
        };
        client.send(&ClientFrame::Connect(connect)).await;
        match client.recv().await {
            ServerFrame::Connected(connected) => (client, connected),
            other => panic!("expected connected, got {other:?}"),
        }
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        let bytes = encode_client(self.codec, frame).expect("encode");
        self.send_raw(bytes).await;
    }

    /// Sends bytes as the frame kind of this client's codec.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        let message = match self.codec {
            Codec::MsgPack => Message::Binary(bytes.into()),
            Codec::Json => Message::Text(String::from_utf8(bytes).expect("utf8").into()),
        };
        self.ws.send(message).await.expect("send");
    }

    /// The next server frame (from the backlog first).
    pub async fn recv(&mut self) -> ServerFrame {
        if let Some(frame) = self.backlog.pop_front() {
            return frame;
        }
        self.recv_socket().await
    }

    async fn recv_socket(&mut self) -> ServerFrame {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("socket ok");
            let bytes = match message {
                Message::Text(text) => text.as_bytes().to_vec(),
                Message::Binary(bytes) => bytes.to_vec(),
                Message::Close(frame) => panic!("closed by server: {frame:?}"),
                _ => continue,
            };
            return decode_server(self.codec, &bytes).expect("server frame decodes");
        }
    }

    /// Waits for the close frame; returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time");
            match message {
                Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => return code.into(),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return 1005,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Waits for a frame matching `pick`, keeping the others for later.
    pub async fn wait_for<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        if let Some(i) = self.backlog.iter().position(|f| pick(f).is_some()) {
            let frame = self.backlog.remove(i).expect("present");
            return pick(&frame).expect("matched");
        }
        loop {
            let frame = self.recv_socket().await;
            if let Some(found) = pick(&frame) {
                return found;
            }
            self.backlog.push_back(frame);
        }
    }

    /// Publishes and waits for the puback; returns the seq.
    pub async fn publish(&mut self, channel: &str, data: &[u8]) -> u64 {
        self.publish_with(channel, data, None).await
    }

    pub async fn publish_with(&mut self, channel: &str, data: &[u8], msg_id: Option<&str>) -> u64 {
        let id = self.id();
        self.send(&ClientFrame::Publish(Publish {
            id,
            channel: channel.into(),
            data: Some(Payload(data.to_vec().into())),
            msg_id: msg_id.map(str::to_owned),
            ..Publish::default()
        }))
        .await;
        self.wait_for(|f| match f {
            ServerFrame::Puback(p) if p.id == id => Some(p.seq),
            ServerFrame::Error(e) if e.id == Some(id) => panic!("publish failed: {e:?}"),
            _ => None,
        })
        .await
    }

    /// Subscribes and waits for `subscribed`.
    pub async fn subscribe(&mut self, mut subscribe: Subscribe) -> Subscribed {
        let id = self.id();
        subscribe.id = id;
        self.send(&ClientFrame::Subscribe(subscribe)).await;
        self.wait_for(|f| match f {
            ServerFrame::Subscribed(s) if s.id == id => Some(s.clone()),
            ServerFrame::Error(e) if e.id == Some(id) => panic!("subscribe failed: {e:?}"),
            _ => None,
        })
        .await
    }

    /// The next `n` deliveries (`msg` or `msgs` items) as `(seq, payload, attempt)`.
    pub async fn deliveries(&mut self, n: usize) -> Vec<(u64, Vec<u8>, u32)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let batch = self
                .wait_for(|f| match f {
                    ServerFrame::Msg(m) => Some(vec![(m.seq, m.payload().to_vec(), m.attempt)]),
                    ServerFrame::Msgs(m) => Some(
                        m.items
                            .iter()
                            .map(|i| (i.seq, i.payload().to_vec(), i.attempt))
                            .collect(),
                    ),
                    _ => None,
                })
                .await;
            out.extend(batch);
        }
        out
    }

    /// Asserts that no delivery arrives within `quiet`.
    pub async fn expect_no_delivery(&mut self, quiet: Duration) {
        let got = tokio::time::timeout(quiet, async {
            loop {
                let frame = self.recv_socket().await;
                if matches!(frame, ServerFrame::Msg(_) | ServerFrame::Msgs(_)) {
                    return frame;
                }
            }
        })
        .await;
        if let Ok(frame) = got {
            panic!("expected no delivery, got {frame:?}");
        }
    }

    pub async fn ack(&mut self, channel: &str, seqs: Vec<u64>) {
        self.send(&ClientFrame::Ack(Ack {
            id: None,
            channel: channel.into(),
            seqs: Some(seqs),
            upto: None,
        }))
        .await;
    }

    /// A ping round trip: everything sent before it was processed.
    pub async fn sync(&mut self) {
        let id = self.id();
        self.send(&ClientFrame::Ping(IdOnly { id })).await;
        self.wait_for(|f| matches!(f, ServerFrame::Pong(p) if p.id == id).then_some(()))
            .await;
    }

    /// The next `error` frame.
    pub async fn error(&mut self) -> ErrorFrame {
        self.wait_for(|f| match f {
            ServerFrame::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await
    }
}

/// A subscribe request for `channel` with everything else default.
pub fn sub(channel: &str) -> Subscribe {
    Subscribe {
        channel: channel.into(),
        ..Subscribe::default()
    }
}

/// A real `redis-server` on a free loopback port, stopped on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` (scripts/test.sh installs it when missing).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra arguments (e.g. `--appendonly yes`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr").port()
        };
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let child = Self::spawn(port, &dir, &extra);
        // Built first, so a failed start still stops the process (on drop).
        let server = Self {
            child,
            port,
            dir,
            extra,
        };
        server.wait_until_up();
        server
    }

    fn spawn(port: u16, dir: &tempfile::TempDir, extra: &[String]) -> Child {
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no"])
            .args(extra)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)")
    }

    fn wait_until_up(&self) {
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: Redis stops at once (what it keeps is what its AOF has).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and directory (after [`Self::kill9`]).
    pub fn start_again(&mut self) {
        self.child = Self::spawn(self.port, &self.dir, &self.extra);
        self.wait_until_up();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of the admin API.
#[derive(Clone)]
pub struct Admin {
    pub base: String,
    pub token: String,
    http: reqwest::Client,
}

impl Admin {
    pub fn new(base: String, token: &str) -> Self {
        Self {
            base,
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Sends a request with the admin token; returns the status and the
    /// body as JSON (`Value::String` when it is not JSON).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.call_as(Some(&self.token), method, path, body).await
    }

    /// Like [`Admin::call`] with another token (or none).
    pub async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("admin reply in time")
            .expect("admin request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("admin body");
        let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, reply) = self.call("POST", path, Some(body)).await;
        assert_eq!(status, 200, "POST {path}: {reply}");
        reply
    }
}
