//! The admin API of a cluster: three real `courier serve` processes on one
//! real `redis-server`. Any node's API shows every node, every stored
//! channel with its consumers (acked and connected elsewhere), every node's
//! connections with the node holding each; a kick reaches the node that
//! has the connection; a killed node leaves the list and does not break it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::{ADMIN_TOKEN, from_first, node_config, start_nodes};
use common::{Admin, ChildBroker, Client, RedisServer, WAIT};
use courier::protocol::{Codec, Connect};
use serde_json::{Value, json};

/// Polls `check` (every 100 ms) until it returns `Some`, for at most
/// [`WAIT`]; `what` and the last value seen name the failure.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Result<T, Value>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match check().await {
            Ok(found) => return found,
            Err(last) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}; last seen: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node ids `/admin/info` lists.
fn node_ids(info: &Value) -> BTreeSet<String> {
    info["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["id"].as_str().expect("id").to_owned())
        .collect()
}

/// Each node's id, as its own `/admin/info` says, once every node lists all.
async fn wait_for_membership(admins: &[Admin]) -> Vec<String> {
    let mut ids = Vec::new();
    for admin in admins {
        ids.push(
            admin.get("/admin/info").await["node"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let all: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(all.len(), admins.len(), "node ids are distinct: {ids:?}");
    for admin in admins {
        eventually("every node lists all the nodes", async || {
            let info = admin.get("/admin/info").await;
            if node_ids(&info) == all {
                Ok(info)
            } else {
                Err(info)
            }
        })
        .await;
    }
    ids
}

/// `POST /admin/connections/{id}/kick` through `admin`: status and body.
async fn kick(admin: &Admin, id: &str) -> (u16, Value) {
    admin
        .call("POST", &format!("/admin/connections/{id}/kick"), None)
        .await
}

/// The entry of `/admin/info`'s `nodes` with this id.
fn listed_node<'a>(info: &'a Value, id: &str) -> &'a Value {
    info["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("node {id} in {info}"))
}

fn names(page: &Value, list: &str, field: &str) -> Vec<String> {
    page[list]
        .as_array()
        .unwrap_or_else(|| panic!("{list} in {page}"))
        .iter()
        .map(|item| item[field].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn any_node_shows_the_whole_cluster_and_kicks_anywhere() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &node_config(&redis, ""), 3).await;
    let admins: Vec<Admin> = nodes.iter().map(|n| n.admin(ADMIN_TOKEN)).collect();
    let ids = wait_for_membership(&admins).await;

    // Each node lists every node with the addresses it serves on.
    let info = admins[2].get("/admin/info").await;
    for (i, node) in nodes.iter().enumerate() {
        let listed = listed_node(&info, &ids[i]);
        assert_eq!(listed["listen"], node.addr.to_string(), "{info}");
        assert_eq!(
            format!("http://{}", listed["admin"].as_str().unwrap()),
            admins[i].base,
            "{info}"
        );
        assert!(listed["started_ms"].as_u64().unwrap() > 0, "{info}");
    }

    // A worker on node 2, messages published through node 1 only: node 3
    // never touches the channels.
    let (mut worker, worker_hello) =
        Client::connect_with(&nodes[1].url(), Codec::Json, Connect::default()).await;
    worker.subscribe(from_first("jobs:cluster", "w")).await;
    let mut publisher = Client::connect(&nodes[0].url(), Codec::MsgPack).await;
    for i in 1..=3u8 {
        publisher.publish("jobs:cluster", &[b'0' + i]).await;
    }
    publisher.publish("jobs:other", b"x").await;
    publisher.publish("jobs:other", b"y").await;
    let seqs: Vec<u64> = worker.deliveries(3).await.iter().map(|d| d.0).collect();
    assert_eq!(seqs, [1, 2, 3]);
    worker.ack("jobs:cluster", vec![1, 2, 3]).await;
    worker.sync().await;

    // Node 3 lists both channels, paged by name, with their stored numbers.
    let page = admins[2].get("/admin/channels?prefix=jobs:&limit=1").await;
    assert_eq!(names(&page, "channels", "name"), ["jobs:cluster"], "{page}");
    assert_eq!(page["channels"][0]["last_seq"], 3, "{page}");
    assert_eq!(page["channels"][0]["messages"], 3, "{page}");
    assert_eq!(page["next"], "jobs:cluster", "{page}");
    let rest = admins[2]
        .get("/admin/channels?prefix=jobs:&limit=1&after=jobs:cluster")
        .await;
    assert_eq!(names(&rest, "channels", "name"), ["jobs:other"], "{rest}");
    assert_eq!(rest["channels"][0]["last_seq"], 2, "{rest}");
    assert_eq!(rest["next"], Value::Null, "{rest}");

    // ...and the channel's page: the consumer acked on node 2, connected
    // there, and node 2's subscriber.
    let detail = eventually("node 3 sees node 2's consumer with its acks", async || {
        let detail = admins[2].get("/admin/channels/jobs:cluster").await;
        let w = detail["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "c/w")
            .cloned();
        match w {
            Some(w) if w["floor"] == 3 && w["connected"] == true => Ok(detail),
            _ => Err(detail),
        }
    })
    .await;
    let w = &detail["consumers"][0];
    assert_eq!(w["lag"], 0, "{detail}");
    assert_eq!(w["nodes"], json!([ids[1]]), "{detail}");
    assert_eq!(w["subscriptions"], 1, "{detail}");
    assert_eq!(detail["subscribers"], 1, "{detail}");
    assert_eq!(detail["last_seq"], 3, "{detail}");
    assert_eq!(detail["unreachable"], json!([]), "{detail}");
    let messages = admins[2].get("/admin/channels/jobs:cluster/messages").await;
    assert_eq!(
        names(&messages, "messages", "data"),
        ["1", "2", "3"],
        "{messages}"
    );
    let dlq = admins[2].get("/admin/channels/jobs:cluster/dlq").await;
    assert_eq!(dlq["entries"], json!([]), "{dlq}");
    let (status, body) = admins[2]
        .call("GET", "/admin/channels/jobs:none", None)
        .await;
    assert_eq!(status, 404, "a channel nobody used is not created: {body}");
    assert!(
        !names(&admins[2].get("/admin/channels").await, "channels", "name")
            .contains(&"jobs:none".to_owned())
    );

    // Purging a channel node 3 never used works from node 3.
    let purged = admins[2]
        .post("/admin/channels/jobs:other/purge", json!({}))
        .await;
    assert_eq!(purged["last_seq"], 0, "{purged}");
    let after_purge = admins[0].get("/admin/channels?prefix=jobs:other").await;
    assert_eq!(after_purge["channels"][0]["messages"], 0, "{after_purge}");

    // Node 1 lists the connection made to node 2, with node 2's id.
    let connections = admins[0].get("/admin/connections").await;
    let listed = connections["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == worker_hello.conn_id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{} in {connections}", worker_hello.conn_id));
    assert_eq!(listed["node"], ids[1], "{connections}");
    assert_eq!(listed["subscriptions"], json!(["jobs:cluster"]));
    assert_eq!(connections["unreachable"], json!([]), "{connections}");
    assert_eq!(
        names(&connections, "connections", "node")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        [ids[0].clone(), ids[1].clone()].into(),
        "{connections}"
    );

    // Paging one at a time crosses the nodes and finds each once.
    let mut extra = Client::connect(&nodes[2].url(), Codec::Json).await;
    extra.sync().await;
    let all = names(
        &admins[0].get("/admin/connections").await,
        "connections",
        "id",
    );
    assert_eq!(all.len(), 3, "{all:?}");
    let mut paged = Vec::new();
    let mut path = "/admin/connections?limit=1".to_owned();
    loop {
        let page = admins[0].get(&path).await;
        paged.extend(names(&page, "connections", "id"));
        match page["next"].as_str() {
            Some(next) => path = format!("/admin/connections?limit=1&after={next}"),
            None => break,
        }
        assert!(paged.len() <= 3, "paging goes round: {paged:?}");
    }
    assert_eq!(paged, all);
    let local = admins[0].get("/admin/connections?local=true").await;
    assert_eq!(names(&local, "connections", "node"), [ids[0].clone()]);

    // The CLI prints the node of each connection.
    let table = courier_admin(&admins[0], &["connections"]);
    assert!(
        table.lines().next().is_some_and(|h| h.contains("NODE")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(&worker_hello.conn_id) && l.contains(&ids[1])),
        "{table}"
    );

    // A kick through node 1 closes the connection on node 2.
    let kicked = admins[0]
        .post(
            &format!("/admin/connections/{}/kick", worker_hello.conn_id),
            json!({"code": 4009, "reason": "maintenance"}),
        )
        .await;
    assert_eq!(kicked["kicked"], worker_hello.conn_id.as_str());
    assert_eq!(worker.expect_close().await, 4009);
    let (status, again) = kick(&admins[0], &worker_hello.conn_id).await;
    assert_eq!(status, 404, "{again}");
    drop((publisher, extra));
}

/// `courier admin <args>` against `admin`; its stdout.
fn courier_admin(admin: &Admin, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("admin")
        .args(args)
        .args(["--url", &admin.base, "--token", &admin.token])
        .output()
        .expect("run courier admin");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test]
async fn a_killed_node_leaves_the_list_without_breaking_it() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(dir.path(), &node_config(&redis, ""), 3).await;
    let admins: Vec<Admin> = nodes.iter().map(|n| n.admin(ADMIN_TOKEN)).collect();
    let ids = wait_for_membership(&admins).await;
    let (mut doomed, doomed_hello) =
        Client::connect_with(&nodes[2].url(), Codec::Json, Connect::default()).await;
    doomed.subscribe(from_first("room:k", "k")).await;
    let mut survivor = Client::connect(&nodes[1].url(), Codec::Json).await;
    survivor.subscribe(from_first("room:k", "s")).await;
    let before = admins[0].get("/admin/connections").await;
    assert!(
        names(&before, "connections", "id").contains(&doomed_hello.conn_id),
        "{before}"
    );

    nodes.remove(2).kill9();

    // At once (its membership has not run out yet) and later: the list
    // answers, without the dead node's connections.
    let right_after = admins[0].get("/admin/connections").await;
    let detail = admins[0].get("/admin/channels/room:k").await;
    assert!(
        !names(&right_after, "connections", "id").contains(&doomed_hello.conn_id),
        "{right_after}"
    );
    // A dead node never comes back: still a member now means it was one
    // for both requests above, so both must name it.
    if node_ids(&admins[0].get("/admin/info").await).contains(&ids[2]) {
        assert_eq!(right_after["unreachable"], json!([ids[2]]), "{right_after}");
        assert_eq!(detail["unreachable"], json!([ids[2]]), "{detail}");
    }
    assert_eq!(
        names(&right_after, "connections", "node"),
        [ids[1].clone()],
        "{right_after}"
    );
    let (status, answer) = kick(&admins[0], &doomed_hello.conn_id).await;
    assert!(status == 404 || status == 503, "{status} {answer}");

    let left: BTreeSet<String> = [ids[0].clone(), ids[1].clone()].into();
    for admin in &admins[..2] {
        eventually("the killed node leaves the cluster", async || {
            let info = admin.get("/admin/info").await;
            if node_ids(&info) == left {
                Ok(())
            } else {
                Err(info)
            }
        })
        .await;
    }
    let after = admins[0].get("/admin/connections").await;
    assert_eq!(after["unreachable"], json!([]), "{after}");
    assert_eq!(
        names(&after, "connections", "node"),
        [ids[1].clone()],
        "{after}"
    );
    let (status, answer) = kick(&admins[0], &doomed_hello.conn_id).await;
    assert_eq!(status, 404, "{answer}");
    let detail = admins[0].get("/admin/channels/room:k").await;
    assert_eq!(detail["unreachable"], json!([]), "{detail}");
    let connected: Vec<&Value> = detail["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["connected"] == true)
        .collect();
    assert_eq!(
        connected.len(),
        1,
        "only node 2's consumer is live: {detail}"
    );
    assert_eq!(connected[0]["name"], "c/s", "{detail}");
    drop((doomed, survivor));
}

/// `[server] advertise_host` is the host the other nodes call: a node that
/// advertises a name its admin listener answers on is reached under that
/// name; one that advertises an address it does not listen on is reported
/// unreachable (so the advertised host, not the bound one, is what is used).
#[tokio::test]
async fn nodes_call_each_other_at_the_advertised_host() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for (i, host) in ["localhost", "127.0.0.3"].into_iter().enumerate() {
        let node_dir = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        let extra = format!("[server]\nadvertise_host = \"{host}\"\n");
        nodes.push(ChildBroker::start(&node_dir, &node_config(&redis, &extra)));
    }
    for node in &nodes {
        node.wait_ready().await;
    }
    let admins: Vec<Admin> = nodes.iter().map(|n| n.admin(ADMIN_TOKEN)).collect();
    let ids = wait_for_membership(&admins).await;

    let info = admins[0].get("/admin/info").await;
    for (i, host) in ["localhost", "127.0.0.3"].into_iter().enumerate() {
        let listed = listed_node(&info, &ids[i]);
        let port = |url: &str| url.rsplit(':').next().unwrap().to_owned();
        assert_eq!(
            listed["listen"],
            format!("{host}:{}", nodes[i].addr.port()),
            "{info}"
        );
        assert_eq!(
            listed["admin"],
            format!("{host}:{}", port(&admins[i].base)),
            "{info}"
        );
    }

    let (mut on_first, first_hello) =
        Client::connect_with(&nodes[0].url(), Codec::Json, Connect::default()).await;
    let (mut on_second, second_hello) =
        Client::connect_with(&nodes[1].url(), Codec::Json, Connect::default()).await;
    on_first.sync().await;
    on_second.sync().await;
    let ids_of = |page: &Value| -> BTreeSet<String> {
        names(page, "connections", "id").into_iter().collect()
    };

    // The second node reaches the first at localhost:<its admin port>.
    let from_second = admins[1].get("/admin/connections").await;
    assert_eq!(from_second["unreachable"], json!([]), "{from_second}");
    assert_eq!(
        ids_of(&from_second),
        [first_hello.conn_id.clone(), second_hello.conn_id.clone()].into(),
        "{from_second}"
    );
    // Nothing answers at 127.0.0.3: the first node reports the second
    // unreachable and lists what it can.
    let from_node_0 = admins[0].get("/admin/connections").await;
    assert_eq!(from_node_0["unreachable"], json!([ids[1]]), "{from_node_0}");
    assert_eq!(
        ids_of(&from_node_0),
        [first_hello.conn_id.clone()].into(),
        "{from_node_0}"
    );
}
