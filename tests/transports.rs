//! One scenario suite run over every transport (WebSocket, SSE, long
//! polling): publish, subscribe from first, resume after a disconnect,
//! ack/nack/redelivery, bad input. Then what only SSE or polling has:
//! Last-Event-ID resume, cursor acks, replay of a lost poll response.

mod common;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::net::SocketAddr;

use common::http::{self, SseStream};
use common::*;
use courier::protocol::*;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Ws,
    Sse,
    Poll,
}

const TRANSPORTS: [Transport; 3] = [Transport::Ws, Transport::Sse, Transport::Poll];

/// What a subscriber asks for.
#[derive(Debug, Clone, Default)]
struct Opts {
    channel: String,
    consumer: Option<String>,
    from_first: bool,
}

impl Opts {
    fn new(channel: &str) -> Self {
        Self {
            channel: channel.to_owned(),
            ..Self::default()
        }
    }

    fn consumer(mut self, name: &str) -> Self {
        self.consumer = Some(name.to_owned());
        self
    }

    fn first(mut self) -> Self {
        self.from_first = true;
        self
    }

    fn query(&self) -> String {
        let mut query = format!("channels={}", self.channel.replace(' ', "%20"));
        if let Some(consumer) = &self.consumer {
            query.push_str(&format!("&consumer={consumer}"));
        }
        if self.from_first {
            query.push_str("&from=first");
        }
        query
    }
}

/// A delivery: (seq, payload, attempt).
type Delivery = (u64, Vec<u8>, u32);

/// A subscriber (and publisher) over one transport.
enum Sub {
    Ws(Client),
    Sse {
        addr: SocketAddr,
        stream: SseStream,
        session: String,
    },
    Poll(PollClient),
}

/// A long-polling client that acks only what the test acks: it polls with
/// its last committed cursor while deliveries it returned are unresolved
/// (the server replays them; the client skips what it has seen), and moves
/// the cursor on once every one was acked or nacked explicitly.
struct PollClient {
    addr: SocketAddr,
    session: String,
    latest: String,
    committed: String,
    unresolved: BTreeSet<u64>,
    seen: HashSet<(u64, u32)>,
    backlog: VecDeque<Value>,
}

impl PollClient {
    async fn open(addr: SocketAddr, query: &str) -> Result<(Self, Vec<Value>), http::Reply> {
        let reply = http::get(addr, &format!("/poll?{query}&wait=0")).await;
        if reply.status != 200 {
            return Err(reply);
        }
        let body = reply.json();
        let cursor = body["cursor"].as_str().expect("cursor").to_owned();
        let mut client = Self {
            addr,
            session: body["session"].as_str().expect("session").to_owned(),
            latest: cursor.clone(),
            committed: cursor,
            unresolved: BTreeSet::new(),
            seen: HashSet::new(),
            backlog: VecDeque::new(),
        };
        let frames = client.take(&body);
        Ok((client, frames))
    }

    /// New frames of a response (replayed deliveries skipped).
    fn take(&mut self, body: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        for frame in body["frames"].as_array().expect("frames") {
            if frame["type"] == "msg" {
                let key = (
                    frame["seq"].as_u64().expect("seq"),
                    u32::try_from(frame["attempt"].as_u64().expect("attempt")).unwrap(),
                );
                if !self.seen.insert(key) {
                    continue;
                }
                self.unresolved.insert(key.0);
            }
            out.push(frame.clone());
        }
        out
    }

    async fn poll(&mut self) -> Vec<Value> {
        let cursor = if self.unresolved.is_empty() {
            self.latest.clone()
        } else {
            self.committed.clone()
        };
        let wait = if self.unresolved.is_empty() {
            "5s"
        } else {
            "0"
        };
        let reply = http::get(self.addr, &format!("/poll?cursor={cursor}&wait={wait}")).await;
        assert_eq!(
            reply.status,
            200,
            "poll: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let body = reply.json();
        self.committed = cursor;
        self.latest = body["cursor"].as_str().expect("cursor").to_owned();
        self.take(&body)
    }

    async fn next_frame(&mut self) -> Value {
        loop {
            if let Some(frame) = self.backlog.pop_front() {
                return frame;
            }
            let frames = self.poll().await;
            self.backlog.extend(frames);
        }
    }

    async fn send(&mut self, path: &str, mut body: Value) -> http::Reply {
        body["session"] = json!(self.session);
        http::post_json(self.addr, path, &body).await
    }
}

fn delivery_of(frame: &Value) -> Option<Delivery> {
    let text = frame.to_string();
    match decode_server(Codec::Json, text.as_bytes()).expect("frame decodes") {
        ServerFrame::Msg(m) => Some((m.seq, m.payload().to_vec(), m.attempt)),
        _ => None,
    }
}

fn json_ack(channel: &str, seqs: &[u64]) -> Value {
    json!({"type": "ack", "channel": channel, "seqs": seqs})
}

/// An error from opening a subscription: (HTTP status or 0 for ws, code).
type OpenError = (u16, String);

impl Sub {
    async fn try_open(
        broker: &TestBroker,
        transport: Transport,
        opts: &Opts,
    ) -> Result<Self, OpenError> {
        match transport {
            Transport::Ws => {
                let mut client = Client::connect(&broker.url(), Codec::Json).await;
                let id = client.id();
                client
                    .send(&ClientFrame::Subscribe(Subscribe {
                        id,
                        consumer: opts.consumer.clone(),
                        from: opts.from_first.then_some(StartFrom::First),
                        ..sub(&opts.channel)
                    }))
                    .await;
                let result = client
                    .wait_for(|f| match f {
                        ServerFrame::Subscribed(s) if s.id == id => Some(Ok(())),
                        ServerFrame::Error(e) if e.id == Some(id) => {
                            Some(Err((0, e.code.as_str().to_owned())))
                        }
                        _ => None,
                    })
                    .await;
                result.map(|()| Sub::Ws(client))
            }
            Transport::Sse => {
                let path = format!("/sse?{}", opts.query());
                let mut stream = SseStream::open(broker.addr, &path, None)
                    .await
                    .map_err(|reply| (reply.status, reply.code()))?;
                let connected = stream.next_of("connected").await;
                let connected: Value = serde_json::from_str(&connected.data).unwrap();
                let session = connected["session"].as_str().expect("session").to_owned();
                stream.next_of("subscribed").await;
                Ok(Sub::Sse {
                    addr: broker.addr,
                    stream,
                    session,
                })
            }
            Transport::Poll => {
                let (mut client, frames) = PollClient::open(broker.addr, &opts.query())
                    .await
                    .map_err(|reply| (reply.status, reply.code()))?;
                let kinds: Vec<&str> = frames.iter().filter_map(|f| f["type"].as_str()).collect();
                assert!(
                    kinds.contains(&"connected") && kinds.contains(&"subscribed"),
                    "{kinds:?}"
                );
                client
                    .backlog
                    .extend(frames.into_iter().filter(|f| f["type"] == "msg"));
                Ok(Sub::Poll(client))
            }
        }
    }

    async fn open(broker: &TestBroker, transport: Transport, opts: &Opts) -> Self {
        Self::try_open(broker, transport, opts)
            .await
            .unwrap_or_else(|e| panic!("{transport:?}: subscribe failed: {e:?}"))
    }

    /// Publishes (ws: a frame; SSE: the HTTP publish API; poll: /poll/publish).
    async fn publish(&mut self, broker: &TestBroker, channel: &str, data: &[u8]) -> u64 {
        let body = match std::str::from_utf8(data) {
            Ok(text) if is_json(data) => {
                json!({"channel": channel, "data": serde_json::from_str::<Value>(text).unwrap()})
            }
            _ => {
                use base64::Engine;
                json!({"channel": channel, "data_b64": base64::engine::general_purpose::STANDARD.encode(data)})
            }
        };
        let reply = match self {
            Sub::Ws(client) => return client.publish(channel, data).await,
            Sub::Sse { .. } => http::post_json(broker.addr, "/api/publish", &body).await,
            Sub::Poll(client) => client.send("/poll/publish", body).await,
        };
        assert_eq!(
            reply.status,
            200,
            "publish: {}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()["seq"].as_u64().expect("seq")
    }

    /// The next `n` deliveries.
    async fn deliveries(&mut self, n: usize) -> Vec<Delivery> {
        let mut out = Vec::new();
        while out.len() < n {
            match self {
                Sub::Ws(client) => out.extend(client.deliveries(n - out.len()).await),
                Sub::Sse { stream, .. } => {
                    let event = stream.next_event().await.expect("stream open");
                    if event.event == "msg" {
                        let frame: Value = serde_json::from_str(&event.data).unwrap();
                        out.extend(delivery_of(&frame));
                    }
                }
                Sub::Poll(client) => {
                    let frame = client.next_frame().await;
                    out.extend(delivery_of(&frame));
                }
            }
        }
        out
    }

    /// Sends an ack/nack/term frame (as JSON); the error code, if refused.
    async fn control(&mut self, frame: Value) -> Option<String> {
        let (reply, channel_seqs) = match self {
            Sub::Ws(client) => {
                let mut frame = frame;
                let id = client.id();
                frame["id"] = json!(id);
                client.send_raw(frame.to_string().into_bytes()).await;
                let ping = client.id();
                client.send(&ClientFrame::Ping(IdOnly { id: ping })).await;
                return client
                    .wait_for(|f| match f {
                        ServerFrame::Error(e) if e.id == Some(id) => {
                            Some(Some(e.code.as_str().to_owned()))
                        }
                        ServerFrame::Pong(p) if p.id == ping => Some(None),
                        _ => None,
                    })
                    .await;
            }
            Sub::Sse { addr, session, .. } => {
                let mut frame = frame;
                frame["session"] = json!(session);
                (http::post_json(*addr, "/sse/ack", &frame).await, None)
            }
            Sub::Poll(client) => {
                let seqs: Vec<u64> = match frame["type"].as_str() {
                    Some("ack") => frame["seqs"]
                        .as_array()
                        .map(|s| s.iter().filter_map(Value::as_u64).collect())
                        .unwrap_or_default(),
                    _ => frame["seq"].as_u64().into_iter().collect(),
                };
                (client.send("/poll/ack", frame).await, Some(seqs))
            }
        };
        if reply.status == 204 {
            if let (Sub::Poll(client), Some(seqs)) = (self, channel_seqs) {
                for seq in seqs {
                    client.unresolved.remove(&seq);
                }
            }
            return None;
        }
        Some(reply.code())
    }

    async fn ack(&mut self, channel: &str, seqs: &[u64]) {
        let refused = self.control(json_ack(channel, seqs)).await;
        assert_eq!(refused, None, "ack {seqs:?}");
    }

    /// Leaves (closes the socket, the stream, the poll session).
    async fn disconnect(self) {
        match self {
            Sub::Ws(client) => drop(client),
            Sub::Sse { stream, .. } => drop(stream),
            Sub::Poll(client) => {
                let reply = http::post_json(
                    client.addr,
                    "/poll/close",
                    &json!({"session": client.session}),
                )
                .await;
                assert_eq!(reply.status, 204);
            }
        }
    }
}

/// Waits until the broker has no SSE or poll session left (an SSE stream
/// ends on the server a moment after the client drops it).
async fn sessions_gone(broker: &TestBroker, consumer_channel: &str, consumer: &str) {
    tokio::time::timeout(WAIT, async {
        loop {
            let attached = broker
                .broker()
                .loaded_consumer(consumer_channel, &format!("c/{consumer}"))
                .is_some_and(|c| c.lock().subscriptions() > 0);
            if !attached {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the old subscription ends");
}

#[tokio::test]
async fn publish_then_subscribe_from_first() {
    for transport in TRANSPORTS {
        let broker = TestBroker::start().await;
        let mut publisher = Sub::open(&broker, transport, &Opts::new("ctl:x")).await;
        let payloads: Vec<Vec<u8>> = vec![
            br#"{"n":1}"#.to_vec(),
            vec![0, 255, 254, 128],
            b"plain text".to_vec(),
            br#""two""#.to_vec(),
            b"[5]".to_vec(),
        ];
        for (i, payload) in payloads.iter().enumerate() {
            let seq = publisher.publish(&broker, "chat:first", payload).await;
            assert_eq!(seq, u64::try_from(i).unwrap() + 1, "{transport:?}");
        }
        let opts = Opts::new("chat:first").consumer("reader").first();
        let mut reader = Sub::open(&broker, transport, &opts).await;
        let got = reader.deliveries(5).await;
        let expected: Vec<Delivery> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| (u64::try_from(i).unwrap() + 1, p.clone(), 1))
            .collect();
        assert_eq!(
            got, expected,
            "{transport:?}: in order, intact, first attempt"
        );
    }
}

#[tokio::test]
async fn resume_after_disconnect() {
    for transport in TRANSPORTS {
        let broker = TestBroker::start().await;
        let opts = Opts::new("jobs:resume").consumer("r").first();
        let mut reader = Sub::open(&broker, transport, &opts).await;
        for i in 1..=4u8 {
            reader.publish(&broker, "jobs:resume", &[i]).await;
        }
        let got: Vec<u64> = reader.deliveries(4).await.iter().map(|d| d.0).collect();
        assert_eq!(got, vec![1, 2, 3, 4], "{transport:?}");
        reader.ack("jobs:resume", &[1, 2]).await;
        reader.disconnect().await;
        sessions_gone(&broker, "jobs:resume", "r").await;

        let mut publisher = Sub::open(&broker, transport, &Opts::new("ctl:y")).await;
        publisher.publish(&broker, "jobs:resume", &[5]).await;
        let mut again =
            Sub::open(&broker, transport, &Opts::new("jobs:resume").consumer("r")).await;
        let got = again.deliveries(3).await;
        assert_eq!(
            got,
            vec![(3, vec![3], 2), (4, vec![4], 2), (5, vec![5], 1)],
            "{transport:?}: the unacked two again, then the new one"
        );
    }
}

#[tokio::test]
async fn nack_redelivers_and_acks_settle() {
    for transport in TRANSPORTS {
        let broker = TestBroker::start().await;
        let opts = Opts::new("jobs:nack").consumer("w");
        let mut worker = Sub::open(&broker, transport, &opts).await;
        for i in 1..=3u8 {
            worker.publish(&broker, "jobs:nack", &[i]).await;
        }
        let got: Vec<u64> = worker.deliveries(3).await.iter().map(|d| d.0).collect();
        assert_eq!(got, vec![1, 2, 3], "{transport:?}");
        worker.ack("jobs:nack", &[1, 3]).await;
        let refused = worker
            .control(json!({"type": "nack", "channel": "jobs:nack", "seq": 2, "delay_ms": 0}))
            .await;
        assert_eq!(refused, None, "{transport:?}: nack");
        assert_eq!(
            worker.deliveries(1).await,
            vec![(2, vec![2], 2)],
            "{transport:?}: redelivered, attempt 2"
        );
        worker.ack("jobs:nack", &[2]).await;
        worker.publish(&broker, "jobs:nack", &[4]).await;
        assert_eq!(
            worker.deliveries(1).await,
            vec![(4, vec![4], 1)],
            "{transport:?}: nothing comes back once acked"
        );
    }
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    for transport in TRANSPORTS {
        let broker = TestBroker::start().await;
        let Err((status, code)) =
            Sub::try_open(&broker, transport, &Opts::new("bad channel!")).await
        else {
            panic!("{transport:?}: a bad channel name was accepted");
        };
        assert_eq!(code, "bad_request", "{transport:?}");
        assert!(status == 0 || status == 400, "{transport:?}: {status}");

        let mut reader = Sub::open(&broker, transport, &Opts::new("jobs:bad").consumer("b")).await;
        let refused = reader.control(json_ack("jobs:bad", &[99])).await;
        assert_eq!(
            refused.as_deref(),
            Some("bad_request"),
            "{transport:?}: ack of a seq never delivered"
        );
        let refused = reader.control(json_ack("jobs:other", &[1])).await;
        assert_eq!(
            refused.as_deref(),
            Some("not_found"),
            "{transport:?}: ack on a channel not subscribed"
        );
        let refused = reader
            .control(json!({"type": "nack", "channel": "jobs:bad", "seq": 7}))
            .await;
        assert_eq!(
            refused.as_deref(),
            Some("bad_request"),
            "{transport:?}: nack of a seq not in flight"
        );
        // The session goes on after request errors.
        reader.publish(&broker, "jobs:bad", b"{}").await;
        assert_eq!(reader.deliveries(1).await[0].0, 1, "{transport:?}");
    }
}

#[tokio::test]
async fn http_bad_input() {
    let broker = TestBroker::start().await;
    let addr = broker.addr;
    for (path, why) in [
        ("/sse", "no channels"),
        ("/sse?channels=a,a", "a channel twice"),
        ("/sse?channels=a&since=1&from=first", "since and from"),
        ("/sse?channels=a&max_in_flight=0", "max_in_flight 0"),
        ("/sse?channels=a&ack=maybe", "bad ack mode"),
        ("/poll?channels=a&ack=auto", "ack=auto on a poll"),
        ("/poll?channels=a&wait=soon", "bad wait"),
        ("/poll?cursor=nonsense", "malformed cursor"),
    ] {
        let reply = http::get(addr, path).await;
        assert_eq!(
            (reply.status, reply.code().as_str()),
            (400, "bad_request"),
            "{why}: {path}"
        );
    }
    let reply = http::get(addr, "/poll?cursor=0123456789abcdef0123456789abcdef.1").await;
    assert_eq!((reply.status, reply.code().as_str()), (404, "not_found"));
    let reply = SseStream::open(addr, "/sse?channels=a", Some("garbage"))
        .await
        .err()
        .expect("a bad Last-Event-ID is refused");
    assert_eq!((reply.status, reply.code().as_str()), (400, "bad_request"));
    for (path, body, code, status) in [
        (
            "/sse/ack",
            json!({"type": "ack", "channel": "a", "seqs": [1]}),
            "bad_request",
            400,
        ),
        (
            "/sse/ack",
            json!({"session": "nope", "type": "ack", "channel": "a", "seqs": [1]}),
            "not_found",
            404,
        ),
        (
            "/sse/ack",
            json!({"session": "nope", "type": "publish", "id": 1, "channel": "a", "data": 1}),
            "bad_request",
            400,
        ),
        (
            "/poll/ack",
            json!({"session": "nope", "type": "ack", "channel": "a"}),
            "not_found",
            404,
        ),
        (
            "/poll/ack",
            json!({"session": "nope", "type": "ack", "channel": 5}),
            "bad_request",
            400,
        ),
        (
            "/poll/publish",
            json!({"channel": "a", "data": 1}),
            "bad_request",
            400,
        ),
    ] {
        let reply = http::post_json(addr, path, &body).await;
        assert_eq!(
            (reply.status, reply.code().as_str()),
            (status, code),
            "{path} {body}"
        );
    }
    let reply = http::request(addr, "POST", "/sse/ack", &[], b"{not json".to_vec()).await;
    assert_eq!((reply.status, reply.code().as_str()), (400, "bad_request"));
}

#[tokio::test]
async fn sse_stream_format_and_last_event_id_resume() {
    let broker = TestBroker::start().await;
    let addr = broker.addr;
    let mut stream = SseStream::open(addr, "/sse?channels=feed:a,feed:b&ack=auto", None)
        .await
        .expect("stream opens");
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    let connected = stream.next_of("connected").await;
    assert!(stream.retry.is_some(), "a retry: hint comes first");
    let connected: Value = serde_json::from_str(&connected.data).unwrap();
    assert_eq!(connected["type"], "connected");
    stream.next_of("subscribed").await;
    stream.next_of("subscribed").await;
    for (channel, n) in [("feed:a", 1), ("feed:b", 2), ("feed:a", 3)] {
        let reply = http::post_json(
            addr,
            "/api/publish",
            &json!({"channel": channel, "data": {"n": n}}),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let event = stream.next_of("msg").await;
        ids.push(event.id.expect("msg events carry an id"));
    }
    assert_eq!(ids, ["feed:a:1", "feed:a:1,feed:b:1", "feed:a:2,feed:b:1"]);
    drop(stream);
    // Published while away: one per channel.
    for channel in ["feed:a", "feed:b"] {
        http::post_json(
            addr,
            "/api/publish",
            &json!({"channel": channel, "data": "late"}),
        )
        .await;
    }
    // The browser reconnects with the id of the second event: the third
    // comes again, then what was published while away, nothing twice.
    let mut stream = SseStream::open(addr, "/sse?channels=feed:a,feed:b&ack=auto", Some(&ids[1]))
        .await
        .expect("stream reopens");
    let mut got = Vec::new();
    while got.len() < 3 {
        let event = stream.next_of("msg").await;
        let frame: Value = serde_json::from_str(&event.data).unwrap();
        got.push((
            frame["channel"].as_str().unwrap().to_owned(),
            frame["seq"].as_u64().unwrap(),
        ));
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("feed:a".to_owned(), 2),
            ("feed:a".to_owned(), 3),
            ("feed:b".to_owned(), 2)
        ]
    );
}

#[tokio::test]
async fn poll_cursor_acks_and_a_lost_response_is_replayed() {
    let broker = TestBroker::start().await;
    let addr = broker.addr;
    for i in 1..=3 {
        http::post_json(addr, "/api/publish", &json!({"channel": "q:c", "data": i})).await;
    }
    let first = http::get(addr, "/poll?channels=q:c&consumer=p&from=first&wait=0").await;
    assert_eq!(first.status, 200);
    let first = first.json();
    let session = first["session"].as_str().unwrap().to_owned();
    let mut cursor = first["cursor"].as_str().unwrap().to_owned();
    let mut seqs: Vec<u64> = Vec::new();
    let collect = |body: &Value, seqs: &mut Vec<u64>| {
        for frame in body["frames"].as_array().unwrap() {
            if frame["type"] == "msg" {
                seqs.push(frame["seq"].as_u64().unwrap());
            }
        }
    };
    collect(&first, &mut seqs);
    let mut lost = String::new();
    while seqs.len() < 3 {
        let reply = http::get(addr, &format!("/poll?cursor={cursor}&wait=5s"))
            .await
            .json();
        collect(&reply, &mut seqs);
        lost = cursor.clone();
        cursor = reply["cursor"].as_str().unwrap().to_owned();
    }
    assert_eq!(seqs, [1, 2, 3]);
    // Poll again with the cursor before the last response, as if it was
    // lost: what it carried comes again.
    let again = http::get(addr, &format!("/poll?cursor={lost}&wait=0"))
        .await
        .json();
    let mut replayed = Vec::new();
    collect(&again, &mut replayed);
    assert!(
        !replayed.is_empty() && replayed.iter().all(|s| seqs.contains(s)),
        "{again}"
    );
    // The latest cursor acks everything; closing then leaves nothing unacked.
    let cursor = again["cursor"].as_str().unwrap().to_owned();
    let reply = http::post_json(addr, "/poll/close", &json!({"cursor": cursor})).await;
    assert_eq!(reply.status, 204);
    let reply = http::get(addr, &format!("/poll?cursor={cursor}")).await;
    assert_eq!(reply.status, 404, "a closed session is gone");
    assert_eq!(again["session"], json!(session));
    // The consumer resumes with nothing left over.
    let reply = http::get(addr, "/poll?channels=q:c&consumer=p&wait=0")
        .await
        .json();
    let mut leftover = Vec::new();
    collect(&reply, &mut leftover);
    assert!(leftover.is_empty(), "{reply}");
    http::post_json(addr, "/api/publish", &json!({"channel": "q:c", "data": 4})).await;
    let cursor = reply["cursor"].as_str().unwrap();
    let reply = http::get(addr, &format!("/poll?cursor={cursor}&wait=5s"))
        .await
        .json();
    let mut next = Vec::new();
    collect(&reply, &mut next);
    assert_eq!(next, [4]);
}

#[tokio::test]
async fn an_empty_poll_returns_at_the_timeout_with_the_same_cursor() {
    let broker = TestBroker::start().await;
    let first = http::get(broker.addr, "/poll?channels=idle:x&wait=0")
        .await
        .json();
    let cursor = first["cursor"].as_str().unwrap().to_owned();
    let reply = http::get(broker.addr, &format!("/poll?cursor={cursor}&wait=200ms")).await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["frames"], json!([]));
    assert_eq!(body["cursor"], json!(cursor));
}

#[tokio::test]
async fn cors_only_for_configured_origins() {
    let broker = TestBroker::start_with(|config| {
        config.http.cors_allow_origins = vec!["http://app.example".into()];
    })
    .await;
    let origin = [("origin", "http://app.example")];
    let reply = http::request(broker.addr, "OPTIONS", "/sse/ack", &origin, Vec::new()).await;
    assert_eq!(reply.status, 204);
    assert_eq!(
        reply.headers["access-control-allow-origin"],
        "http://app.example"
    );
    assert!(
        reply.headers["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("last-event-id")
    );
    let reply = http::request(
        broker.addr,
        "GET",
        "/poll?channels=x:1&wait=0",
        &origin,
        Vec::new(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers["access-control-allow-origin"],
        "http://app.example"
    );
    let other = [("origin", "http://evil.example")];
    let reply = http::request(
        broker.addr,
        "GET",
        "/poll?channels=x:1&wait=0",
        &other,
        Vec::new(),
    )
    .await;
    assert!(!reply.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn a_rate_limited_poll_publish_says_when_to_retry() {
    let broker = TestBroker::start_with(|c| {
        c.limits.publish_per_sec = 1;
        c.limits.publish_burst = 2;
    })
    .await;
    let addr = broker.addr;
    let opened = http::get(addr, "/poll?channels=rl:a&wait=0").await.json();
    let session = opened["session"].as_str().unwrap().to_owned();
    let publish = json!({"session": session, "channel": "rl:a", "data": 1});
    for _ in 0..2 {
        let ok = http::post_json(addr, "/poll/publish", &publish).await;
        assert_eq!(ok.status, 200, "{}", ok.json());
    }
    let limited = http::post_json(addr, "/poll/publish", &publish).await;
    assert_eq!(
        (limited.status, limited.code().as_str()),
        (429, "rate_limited")
    );
    let wait = limited.json()["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms");
    assert!((1..=1000).contains(&wait), "{wait}");
    assert_eq!(
        limited
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    let again = http::post_json(addr, "/poll/publish", &publish).await;
    assert_eq!(again.status, 200, "after the wait: {}", again.json());
}

#[tokio::test]
async fn an_sse_client_that_reads_nothing_is_cut_as_a_slow_consumer() {
    let broker = TestBroker::start_with(|c| {
        c.server.slow_consumer_timeout = std::time::Duration::from_secs(1);
        // A short queue fills with fewer messages than the socket buffers hold.
        c.server.outbound_buffer = 16;
        c.limits = courier::limits::LimitsConfig::unlimited();
    })
    .await;
    let addr = broker.addr;
    let stalled = http::SseStream::open(addr, "/sse?channels=big:s", None)
        .await
        .expect("stream opens");
    let admin = broker.admin();
    let count = || async {
        admin.get("/admin/connections").await["connections"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(count().await, 1);
    use base64::Engine;
    let payload = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 64 * 1024]);
    for _ in 0..300 {
        let body = json!({"channel": "big:s", "data_b64": payload});
        assert_eq!(
            http::post_json(addr, "/api/publish", &body).await.status,
            200
        );
    }
    let mut left = 1;
    for _ in 0..200 {
        left = count().await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "the stalled SSE session was ended");
    let metrics = admin.get("/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("courier_connections_closed_total{code=\"4009\"} 1"),
        "counted as a 4009 close"
    );
    drop(stalled);
}
