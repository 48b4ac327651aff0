//! The `courier` CLI as a user runs it: `pub`, `sub`, `bench`.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;
use courier::protocol::*;

fn courier(args: &[&str], url: &str, stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .env("COURIER_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run courier");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("courier finishes")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test]
async fn pub_then_sub_since_zero_prints_what_was_published() {
    let broker = TestBroker::start().await;
    let url = broker.url();
    let url2 = url.clone();
    let (single, piped) = tokio::task::spawn_blocking(move || {
        let single = stdout(&courier(
            &["pub", "cli:room", r#"{"text":"hello"}"#],
            &url,
            None,
        ));
        let piped = stdout(&courier(
            &["pub", "cli:room", "-", "--json"],
            &url,
            Some("one\ntwo\n"),
        ));
        (single, piped)
    })
    .await
    .unwrap();
    assert_eq!(single.trim(), "1");
    let acks: Vec<serde_json::Value> = piped
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        acks.iter()
            .map(|a| a["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![2, 3]
    );

    let printed = tokio::task::spawn_blocking(move || {
        stdout(&courier(
            &["sub", "cli:room", "--since", "0", "--count", "3", "--json"],
            &url2,
            None,
        ))
    })
    .await
    .unwrap();
    let lines: Vec<serde_json::Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["data"]["text"], "hello");
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(
        lines[1]["data_b64"], "b25l",
        "\"one\" is not JSON, so it comes as base64"
    );
    assert_eq!(lines[2]["seq"], 3);
}

#[tokio::test]
async fn sub_with_a_consumer_resumes_where_it_left_off() {
    let broker = TestBroker::start().await;
    let mut client = Client::connect(&broker.url(), courier::protocol::Codec::Json).await;
    for i in 1..=4u8 {
        client
            .publish("cli:jobs", format!("job{i}").as_bytes())
            .await;
    }
    let url = broker.url();
    let (first, second) = tokio::task::spawn_blocking(move || {
        let first = stdout(&courier(
            &[
                "sub",
                "cli:jobs",
                "--consumer",
                "w",
                "--from-first",
                "--count",
                "2",
            ],
            &url,
            None,
        ));
        let second = stdout(&courier(
            &["sub", "cli:jobs", "--consumer", "w", "--count", "2"],
            &url,
            None,
        ));
        (first, second)
    })
    .await
    .unwrap();
    assert_eq!(first, "1 job1\n2 job2\n");
    assert_eq!(
        second, "3 job3\n4 job4\n",
        "acked messages do not come back"
    );
}

#[tokio::test]
async fn errors_name_the_problem_and_the_fix() {
    let broker = TestBroker::start().await;
    let url = broker.url();
    let (bad_channel, no_broker) = tokio::task::spawn_blocking(move || {
        (
            courier(&["pub", "bad name!", "x"], &url, None),
            courier(&["pub", "a", "b"], "ws://127.0.0.1:1/ws", None),
        )
    })
    .await
    .unwrap();
    assert!(!bad_channel.status.success());
    assert!(String::from_utf8_lossy(&bad_channel.stderr).contains("bad_request"));
    assert!(!no_broker.status.success());
    let stderr = String::from_utf8_lossy(&no_broker.stderr);
    assert!(
        stderr.contains("COURIER_URL") && stderr.contains("courier serve"),
        "{stderr}"
    );
}

#[test]
fn bench_durable_prints_a_parseable_json_line() {
    let output = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["bench", "durable", "-n", "2000", "--json"])
        .output()
        .expect("run courier bench");
    let text = stdout(&output);
    let last = text.lines().last().expect("output");
    let summary: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    for key in [
        "workload",
        "messages",
        "msgs_per_s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "dups",
        "missing",
    ] {
        assert!(summary.get(key).is_some(), "{key} in {summary}");
    }
    assert_eq!(summary["workload"], "durable");
    assert_eq!(summary["messages"], 2000);
    assert_eq!(
        (summary["dups"].as_u64(), summary["missing"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(summary["msgs_per_s"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn courier_token_mints_a_token_the_broker_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[auth]\njwt_secret = \"a-development-secret-of-32-bytes!!\"\n";
    let path = dir.path().join("courier.toml");
    std::fs::write(&path, config).unwrap();
    let path_text = path.to_str().unwrap();
    let minted = courier(
        &[
            "token",
            "--sub",
            "alice",
            "--pub",
            "chat:*",
            "--sub-channels",
            "chat:*",
            "--ttl",
            "10m",
            "--config",
            path_text,
        ],
        "",
        None,
    );
    let token = stdout(&minted).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let broker = ChildBroker::start(dir.path(), config);
    let connect = Connect {
        token: Some(token),
        ..Connect::default()
    };
    let (mut client, connected) = Client::connect_with(&broker.url(), Codec::Json, connect).await;
    assert_eq!(connected.user.as_deref(), Some("alice"));
    assert_eq!(client.publish("chat:lobby", b"1").await, 1);
    client
        .send(&ClientFrame::Publish(Publish {
            id: 77,
            channel: "news:today".into(),
            data: Some(courier::protocol::Payload(bytes::Bytes::from_static(b"1"))),
            ..Publish::default()
        }))
        .await;
    let denied = client.error().await;
    assert_eq!((denied.id, denied.code), (Some(77), ErrorCode::Forbidden));

    // Without a secret the command says what to set.
    std::fs::write(&path, "").unwrap();
    let refused = courier(
        &["token", "--sub", "alice", "--config", path_text],
        "",
        None,
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("jwt_secret"), "{stderr}");
}
