//! Nodes of a cluster: `courier serve` processes sharing one `RedisServer`.

use std::path::Path;

use courier::protocol::{StartFrom, Subscribe};

use super::{ChildBroker, RedisServer, sub};

/// The admin token every test node shares.
pub const ADMIN_TOKEN: &str = "cluster-test-admin-token";

/// A node's config: storage (and so the retry queue) on `redis`, the shared
/// admin token, then `extra` (more TOML tables).
pub fn node_config(redis: &RedisServer, extra: &str) -> String {
    format!(
        "[storage]\nbackend = \"redis\"\nredis_url = \"{url}\"\nprefix = \"test\"\n\n\
         [admin]\ntoken = \"{ADMIN_TOKEN}\"\n\n{extra}",
        url = redis.url()
    )
}

/// `count` nodes with `config`, each in its own directory under `dir`,
/// ready (each hears the others' notifications).
pub async fn start_nodes(dir: &Path, config: &str, count: usize) -> Vec<ChildBroker> {
    let nodes: Vec<ChildBroker> = (0..count)
        .map(|i| {
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            ChildBroker::start(&node_dir, config)
        })
        .collect();
    for node in &nodes {
        node.wait_ready().await;
    }
    nodes
}

/// A durable `consumer` of `channel` from its first stored message.
pub fn from_first(channel: &str, consumer: &str) -> Subscribe {
    Subscribe {
        consumer: Some(consumer.into()),
        from: Some(StartFrom::First),
        ..sub(channel)
    }
}
