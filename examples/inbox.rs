//! A notification inbox on the Rust SDK: bob's durable consumer of
//! `inbox:bob-…` keeps his place while he is offline; what alice sends in
//! the meantime waits there, and bob gets it when he comes back.
//!
//! Start a broker first (`cargo run -- serve`), then:
//!
//! ```text
//! cargo run --example inbox                          # ws://127.0.0.1:7070/ws
//! cargo run --example inbox -- ws://127.0.0.1:7171/ws
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier::client::Client;
use futures_util::StreamExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Longest wait for any one message.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:7070/ws".into());
    let inbox = format!("inbox:bob-{}", unique());

    // Bob's first visit creates his consumer, then he goes offline.
    let bob = Client::builder(&url)
        .name("inbox-example/bob")
        .connect()
        .await?;
    let first_visit = bob.subscribe(&inbox).consumer("bob").await?;
    println!(
        "bob subscribed to {inbox} (last seq {})",
        first_visit.last_seq()
    );
    bob.close().await;
    println!("bob went offline");

    // Meanwhile alice writes to him.
    let alice = Client::builder(&url)
        .name("inbox-example/alice")
        .connect()
        .await?;
    let notes = [
        "your order shipped",
        "see you at 5",
        "don't forget the keys",
    ];
    for note in notes {
        let seq = alice.publish(&inbox, note).await?;
        println!("alice sent #{seq}: {note}");
    }
    alice.close().await;

    // Bob comes back as the same consumer and gets what he missed.
    let bob = Client::builder(&url)
        .name("inbox-example/bob")
        .connect()
        .await?;
    let mut back = bob.subscribe(&inbox).consumer("bob").await?;
    println!("bob is back: the inbox now ends at #{}", back.last_seq());
    for _ in notes {
        let note = tokio::time::timeout(WAIT, back.next())
            .await?
            .ok_or("the subscription ended")?;
        println!(
            "bob reads #{}: {}",
            note.seq,
            String::from_utf8_lossy(&note.data)
        );
        note.ack().await?;
    }
    println!("bob read all {} notes he missed", notes.len());
    bob.close().await;
    Ok(())
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}
