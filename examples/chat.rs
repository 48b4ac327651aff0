//! A chat room on the Rust SDK: two members, each reading the room through
//! their own durable consumer (fanout), so both see every message, their
//! own included, in the same order.
//!
//! Start a broker first (`cargo run -- serve`), then:
//!
//! ```text
//! cargo run --example chat                          # ws://127.0.0.1:7070/ws
//! cargo run --example chat -- ws://127.0.0.1:7171/ws
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier::client::{Client, Subscription};
use futures_util::StreamExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Longest wait for any one message: the broker answers in milliseconds.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:7070/ws".into());
    // A fresh room per run, so runs against one broker do not mix.
    let room = format!("chat:room-{}", unique());
    let alice = Client::builder(&url)
        .name("chat-example/alice")
        .connect()
        .await?;
    let bob = Client::builder(&url)
        .name("chat-example/bob")
        .connect()
        .await?;

    // Subscribe before anyone speaks: a new consumer starts at "new".
    let alice_screen = alice.subscribe(&room).consumer("alice").await?;
    let bob_screen = bob.subscribe(&room).consumer("bob").await?;
    println!("alice and bob joined {room}");

    let lines = [
        ("alice", "hi bob!"),
        ("bob", "hey alice"),
        ("alice", "lunch at noon?"),
        ("bob", "sure, see you there"),
    ];
    for (who, text) in lines {
        let client = if who == "alice" { &alice } else { &bob };
        let seq = client.publish(&room, format!("{who}: {text}")).await?;
        println!("{who} sent #{seq}");
    }

    let (seen_by_alice, seen_by_bob) = tokio::join!(
        read(alice_screen, "alice", lines.len()),
        read(bob_screen, "bob", lines.len()),
    );
    let (seen_by_alice, seen_by_bob) = (seen_by_alice?, seen_by_bob?);
    assert_eq!(seen_by_alice, seen_by_bob, "both saw the same conversation");
    println!(
        "both saw all {} messages, in the same order",
        seen_by_alice.len()
    );

    alice.close().await;
    bob.close().await;
    Ok(())
}

/// Shows `count` messages on `me`'s screen, acking each.
async fn read(mut screen: Subscription, me: &str, count: usize) -> Result<Vec<String>, Error> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let delivery = tokio::time::timeout(WAIT, screen.next())
            .await?
            .ok_or("the subscription ended")?;
        let line = String::from_utf8_lossy(&delivery.data).into_owned();
        println!("  [{me}'s screen] #{} {line}", delivery.seq);
        delivery.ack().await?;
        seen.push(line);
    }
    Ok(seen)
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}
