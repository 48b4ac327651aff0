//! `courier admin …` as an operator runs it: the real binary against a
//! real broker's admin listener.

mod common;

use std::process::{Command, Output};

use common::admin::AdminBroker;
use common::*;
use courier::protocol::{ClientFrame, Codec, Connect, Term};
use serde_json::Value;

/// Runs `courier admin <args>` with the admin URL and token given as flags
/// (`None`: leave it out), never inheriting the caller's environment.
async fn admin(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
    command
        .arg("admin")
        .args(args)
        .args(["--url", url])
        .env_remove("COURIER_ADMIN_URL")
        .env_remove("COURIER_ADMIN_TOKEN")
        .env_remove("COURIER_DATA_DIR");
    if let Some(token) = token {
        command.args(["--token", token]);
    }
    tokio::task::spawn_blocking(move || command.output().expect("run courier admin"))
        .await
        .expect("courier admin finishes")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "courier admin failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

fn json(output: &Output) -> Value {
    serde_json::from_str(&stdout(output)).expect("--json prints JSON")
}

fn stderr(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failure");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

impl AdminBroker {
    async fn cli(&self, args: &[&str]) -> Output {
        admin(&self.admin_url, Some(&self.token), args).await
    }
}

#[tokio::test]
async fn channels_and_peek_show_what_was_published() {
    let broker = AdminBroker::start();
    let mut client = Client::connect(&broker.broker.url(), Codec::Json).await;
    // `/` must be percent-encoded in the path; `:` may stay.
    let channel = "cli:room/1";
    for text in ["one", "two", "three\u{1b}[31m"] {
        client.publish(channel, text.as_bytes()).await;
    }
    client.publish("other:x", b"x").await;

    let page = json(
        &broker
            .cli(&["channels", "--json", "--prefix", "cli:"])
            .await,
    );
    let channels = page["channels"].as_array().expect("channels");
    assert_eq!(channels.len(), 1, "{page}");
    assert_eq!(channels[0]["name"], channel);
    assert_eq!(
        (&channels[0]["first_seq"], &channels[0]["last_seq"]),
        (&Value::from(1), &Value::from(3))
    );
    assert_eq!(channels[0]["messages"], 3);

    let table = stdout(&broker.cli(&["channels"]).await);
    let header = table.lines().next().expect("a header line");
    assert!(
        header.starts_with("CHANNEL") && header.contains("DLQ"),
        "{table}"
    );
    assert!(
        table.contains(channel) && table.contains("other:x"),
        "{table}"
    );
    let none = stdout(&broker.cli(&["channels", "--prefix", "nothing:"]).await);
    assert_eq!(none.trim(), "no channels");

    let page = json(
        &broker
            .cli(&["peek", channel, "--from", "2", "--json"])
            .await,
    );
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(page["messages"][0]["data"], "two");

    let table = stdout(&broker.cli(&["peek", channel, "--limit", "3"]).await);
    assert!(table.contains("one") && table.contains("two"), "{table}");
    assert!(
        !table.contains('\u{1b}') && table.contains("three\\u{1b}[31m"),
        "control characters are escaped: {table:?}"
    );

    let detail = stdout(&broker.cli(&["channel", channel]).await);
    assert!(detail.contains("seqs         1..=3"), "{detail}");
}

#[tokio::test]
async fn dlq_requeue_delivers_again_and_a_repeat_finds_nothing() {
    let broker = AdminBroker::start();
    let channel = "jobs:cli";
    let mut client = Client::connect(&broker.broker.url(), Codec::Json).await;
    client.publish(channel, b"poison").await;
    let mut subscription = sub(channel);
    subscription.consumer = Some("w".into());
    subscription.since = Some(0);
    client.subscribe(subscription).await;
    let delivered = client.deliveries(1).await;
    assert_eq!(delivered[0].0, 1);
    client
        .send(&ClientFrame::Term(Term {
            id: None,
            channel: channel.into(),
            seq: 1,
            reason: Some("not a job".into()),
        }))
        .await;
    client.sync().await;

    let list = json(&broker.cli(&["dlq", "list", channel, "--json"]).await);
    let entries = list["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["seq"], 1);
    assert_eq!(entries[0]["consumer"], "c/w");
    assert_eq!(entries[0]["reason"], "term");
    assert_eq!(entries[0]["detail"], "not a job");
    let table = stdout(&broker.cli(&["dlq", "list", channel]).await);
    assert!(table.contains("c/w") && table.contains("poison"), "{table}");

    let first = stdout(&broker.cli(&["dlq", "requeue", channel, "--seq", "1"]).await);
    assert_eq!(first.trim(), "requeued 1 dead letter");
    let redelivered = client.deliveries(1).await;
    assert_eq!(
        (redelivered[0].0, redelivered[0].1.as_slice()),
        (1, &b"poison"[..])
    );

    let again = stdout(&broker.cli(&["dlq", "requeue", channel, "--seq", "1"]).await);
    assert!(again.starts_with("nothing to requeue"), "{again}");
    let again = json(
        &broker
            .cli(&["dlq", "requeue", channel, "--all", "--json"])
            .await,
    );
    assert_eq!(again["requeued"], 0);
    let list = json(&broker.cli(&["dlq", "list", channel, "--json"]).await);
    assert_eq!(list["entries"], Value::Array(vec![]));
    let purged = json(
        &broker
            .cli(&[
                "dlq", "purge", channel, "--from", "1", "--to", "9", "--json",
            ])
            .await,
    );
    assert_eq!(purged["purged"], 0);
}

#[tokio::test]
async fn kick_closes_the_connection_with_the_code_given() {
    let broker = AdminBroker::start();
    let (mut client, connected) =
        Client::connect_with(&broker.broker.url(), Codec::Json, Connect::default()).await;
    let id = connected.conn_id;

    let page = json(&broker.cli(&["connections", "--json"]).await);
    let ids: Vec<&str> = page["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let table = stdout(&broker.cli(&["connections"]).await);
    assert!(table.contains(&id) && table.contains("ws"), "{table}");

    let kicked = stdout(
        &broker
            .cli(&["kick", &id, "--code", "4009", "--reason", "maintenance"])
            .await,
    );
    assert_eq!(kicked.trim(), format!("kicked {id} with close code 4009"));
    assert_eq!(client.expect_close().await, 4009);

    let again = stderr(&broker.cli(&["kick", &id]).await);
    assert!(again.contains("not_found"), "{again}");
}

#[tokio::test]
async fn errors_name_the_fix() {
    let broker = AdminBroker::start();

    let wrong = stderr(
        &admin(
            &broker.admin_url,
            Some("not-the-token-at-all"),
            &["channels"],
        )
        .await,
    );
    assert!(
        wrong.contains("wrong admin token") && wrong.contains("COURIER_ADMIN_TOKEN"),
        "{wrong}"
    );

    let port = common::admin::free_port();
    let down = stderr(&admin(&format!("http://127.0.0.1:{port}"), Some("x"), &["info"]).await);
    assert!(
        down.contains("courier serve") && down.contains("--url"),
        "{down}"
    );

    let unconfirmed = stderr(&broker.cli(&["purge", "a:b"]).await);
    assert!(unconfirmed.contains("--yes"), "{unconfirmed}");

    let missing = stderr(&broker.cli(&["channel", "no:such-channel"]).await);
    assert!(missing.contains("not_found"), "{missing}");
}

#[tokio::test]
async fn without_a_token_the_cli_reads_the_one_the_broker_generated() {
    let broker = AdminBroker::start_with_token(None);
    let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
    command
        .args(["admin", "info", "--json", "--url", &broker.admin_url])
        .arg("--data-dir")
        .arg(&broker.data_dir)
        .env_remove("COURIER_ADMIN_URL")
        .env_remove("COURIER_ADMIN_TOKEN");
    let output = tokio::task::spawn_blocking(move || command.output().expect("run"))
        .await
        .expect("finishes");
    let info = json(&output);
    assert!(info["version"].is_string(), "{info}");
}

#[tokio::test]
async fn presence_lists_subscribers_and_delete_needs_yes() {
    let broker = AdminBroker::start();
    let mut client = Client::connect(&broker.broker.url(), Codec::Json).await;
    client.subscribe(sub("cli:gone")).await;
    client.publish("cli:gone", b"1").await;

    let presence = json(&broker.cli(&["presence", "cli:gone", "--json"]).await);
    assert_eq!(
        presence["clients"].as_array().map(Vec::len),
        Some(1),
        "{presence}"
    );
    let table = stdout(&broker.cli(&["presence", "cli:gone"]).await);
    assert!(
        table.contains("(anonymous)") && table.contains("ws"),
        "{table}"
    );

    let refused = broker.cli(&["delete", "cli:gone"]).await;
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("--yes"), "{}", stderr(&refused));
    let deleted = stdout(&broker.cli(&["delete", "cli:gone", "--yes"]).await);
    assert!(
        deleted.contains("deleted cli:gone (1 stored messages removed)"),
        "{deleted}"
    );
    let again = broker.cli(&["delete", "cli:gone", "--yes"]).await;
    assert!(!again.status.success(), "a repeat finds no channel");
    assert!(
        stderr(&again).contains("not_found") || stderr(&again).contains("no channel"),
        "{}",
        stderr(&again)
    );
}
