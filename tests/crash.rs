//! The real binary: kill -9 in the middle of a pipelined publish stream,
//! restart on the same data dir, and check that every pubacked message is
//! there, unchanged, with no seq reused. Also SIGTERM, config errors and
//! the process' own settings.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use courier::protocol::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = "[server]\nfsync = \"batch\"\n";

/// Publishes `count` messages pipelined (up to `window` without a puback)
/// and returns the pubacks received before the connection died, as
/// seq → payload. Kills the broker after `kill_after` pubacks.
async fn publish_until_killed(
    broker: ChildBroker,
    cycle: u32,
    count: u64,
    kill_after: usize,
) -> BTreeMap<u64, Vec<u8>> {
    let ws = open(&broker.url(), Some(Codec::MsgPack)).await;
    let (mut sink, mut stream) = ws.split();
    let connect = encode_client(Codec::MsgPack, &ClientFrame::Connect(Connect::default())).unwrap();
    sink.send(Message::Binary(connect.into())).await.unwrap();
    let payload = move |i: u64| format!("cycle {cycle} message {i}").into_bytes();
    let sender = tokio::spawn(async move {
        for i in 0..count {
            let frame = ClientFrame::Publish(Publish {
                id: i,
                channel: "crash:log".into(),
                data: Some(Payload(payload(i).into())),
                ..Publish::default()
            });
            let bytes = encode_client(Codec::MsgPack, &frame).unwrap();
            if sink.send(Message::Binary(bytes.into())).await.is_err() {
                break;
            }
        }
    });
    let mut acked = BTreeMap::new();
    let mut broker = Some(broker);
    while let Ok(Some(Ok(message))) = tokio::time::timeout(WAIT, stream.next()).await {
        let Message::Binary(bytes) = message else {
            continue;
        };
        match decode_server(Codec::MsgPack, &bytes).unwrap() {
            ServerFrame::Puback(p) => {
                assert!(
                    acked.insert(p.seq, payload(p.id)).is_none(),
                    "seq {} pubacked twice",
                    p.seq
                );
                if acked.len() == kill_after
                    && let Some(broker) = broker.take()
                {
                    broker.kill9();
                }
            }
            ServerFrame::Error(e) => panic!("publish failed: {e:?}"),
            _ => {}
        }
    }
    assert!(broker.is_none(), "the broker was killed mid-stream");
    sender.abort();
    acked
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_pubacked_and_never_reuses_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let mut all_acked: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for cycle in 0..4u32 {
        let broker = ChildBroker::start(dir.path(), CONFIG);
        let kill_after = 1500 + usize::try_from(cycle).unwrap() * 700;
        let acked = publish_until_killed(broker, cycle, 20_000, kill_after).await;
        assert!(
            acked.len() >= kill_after,
            "cycle {cycle}: {} pubacks",
            acked.len()
        );
        for (seq, payload) in acked {
            assert!(
                all_acked.insert(seq, payload).is_none(),
                "cycle {cycle}: seq {seq} reused"
            );
        }

        let broker = ChildBroker::start(dir.path(), CONFIG);
        let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
        let subscribed = client
            .subscribe(Subscribe {
                from: Some(StartFrom::First),
                ack: Some(AckMode::Auto),
                ..sub("crash:log")
            })
            .await;
        let max_acked = *all_acked.keys().last().unwrap();
        assert!(
            subscribed.last_seq >= max_acked,
            "cycle {cycle}: last seq {} < pubacked {max_acked}",
            subscribed.last_seq
        );
        let stored = client
            .deliveries(usize::try_from(subscribed.last_seq).unwrap())
            .await;
        for (i, (seq, _, _)) in stored.iter().enumerate() {
            assert_eq!(
                *seq,
                u64::try_from(i).unwrap() + 1,
                "cycle {cycle}: no gaps"
            );
        }
        for (seq, payload) in &all_acked {
            let (_, data, _) = &stored[usize::try_from(*seq - 1).unwrap()];
            assert_eq!(
                data, payload,
                "cycle {cycle}: seq {seq} holds what was pubacked"
            );
        }
        // Stored but unacknowledged messages stay, and count as published:
        // fold them in so the next cycle checks their seqs are not reused.
        for (seq, data, _) in stored {
            all_acked.entry(seq).or_insert(data);
        }
        let next = client.publish("crash:log", b"probe").await;
        assert_eq!(
            next,
            subscribed.last_seq + 1,
            "cycle {cycle}: the next seq follows the last stored"
        );
        all_acked.insert(next, b"probe".to_vec());
        broker.kill9();
    }
}

#[tokio::test]
async fn interval_fsync_resets_the_epoch_after_a_crash_but_not_after_a_clean_stop() {
    const INTERVAL: &str = "[server]\nfsync = \"interval\"\nfsync_interval = \"50ms\"\n";
    let dir = tempfile::tempdir().unwrap();
    let broker = ChildBroker::start(dir.path(), INTERVAL);
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    client.publish("iv:log", b"1").await;
    let first = client.subscribe(sub("iv:log")).await.epoch;
    broker.kill9();

    // Restarted under another policy: what counts is how the crashed run acked.
    let mut broker = ChildBroker::start(dir.path(), CONFIG);
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    let after_crash = client.subscribe(sub("iv:log")).await.epoch;
    assert_ne!(
        after_crash, first,
        "seqs of the loss window may repeat: the epoch says so"
    );
    assert_eq!(
        broker.sigterm_and_close_code(&mut client).await,
        close::RESTARTING
    );
    let _ = broker.child.wait();

    let broker = ChildBroker::start(dir.path(), INTERVAL);
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    assert_eq!(
        client.subscribe(sub("iv:log")).await.epoch,
        after_crash,
        "a clean stop keeps the epoch"
    );
}

/// A huge-page fault stalls the thread that touches new heap for
/// milliseconds (see `disable_transparent_huge_pages` in `main.rs`), so the
/// broker runs without them whatever the machine's setting.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = ChildBroker::start(dir.path(), CONFIG);
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.child.id())).unwrap();
    let _ = broker.child.kill();
    let _ = broker.child.wait();
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("the kernel reports THP_enabled (Linux 5.0 and later)");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}

#[tokio::test]
async fn sigterm_closes_clients_with_4010_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = ChildBroker::start(dir.path(), CONFIG);
    let mut client = Client::connect(&broker.url(), Codec::Json).await;
    client.publish("term:x", b"1").await;
    assert_eq!(
        broker.sigterm_and_close_code(&mut client).await,
        close::RESTARTING
    );
    let exit = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = broker.child.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() > Duration::from_secs(15) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(exit.expect("exits in time").success());
}

#[test]
fn bad_config_stops_start_up_naming_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nlisten_on = \"127.0.0.1:1\"\n", "listen_on"),
        ("[server]\nmax_frame = \"big\"\n", "max_frame"),
        ("[namespaces.chat]\nack_wait = \"soon\"\n", "ack_wait"),
        ("[server\n", "courier.toml"),
    ];
    for (text, needle) in cases {
        let path = dir.path().join("courier.toml");
        std::fs::write(&path, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{text}: {stderr}");
        assert!(
            stderr.contains("courier.toml"),
            "{text}: names the file: {stderr}"
        );
    }
    let output = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--config", "does-not-exist.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does-not-exist.toml"));
}

#[test]
fn env_overrides_the_file_and_flags_override_env() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    std::fs::write(
        dir.path().join("c.toml"),
        "[server]\nlisten = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--config"])
        .arg(dir.path().join("c.toml"))
        .env("COURIER_LISTEN", &busy_addr)
        .env("COURIER_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&busy_addr), "env beat the file: {stderr}");
    assert!(
        stderr.contains("--listen"),
        "the message names the fix: {stderr}"
    );
}
