//! Presence across the nodes of a cluster: real `courier serve` processes
//! sharing one real `redis-server`. A presence query on any node lists the
//! users of every live node (connections summed), `join` / `leave` cross
//! nodes (and are not announced where the user is still present), a node
//! killed with SIGKILL takes its users out of presence within its lease
//! plus two beats, and one stopped gracefully announces its leaves.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::{ADMIN_TOKEN, node_config, start_nodes};
use common::{ChildBroker, Client, RedisServer, WAIT, sub};
use courier::auth::{Auth, claims_for};
use courier::broker::cluster::{NODE_BEAT, NODE_LEASE};
use courier::config::AuthConfig;
use courier::protocol::{ChannelRequest, ClientFrame, Codec, Connect, ServerFrame};
use tokio::time::Instant;

const SECRET: &str = "cluster-presence-secret-0123456789abcdef";

/// A node's config: HS256 tokens, and the `room` namespace with presence
/// and join/leave events.
fn config(redis: &RedisServer) -> String {
    node_config(
        redis,
        &format!(
            "[auth]\njwt_secret = \"{SECRET}\"\n\n\
             [namespaces.room]\npresence = true\njoin_leave = true\n"
        ),
    )
}

/// A connection of `user` to `node`, with a token minted from the secret.
async fn connect_as(node: &ChildBroker, user: &str, codec: Codec) -> Client {
    let auth = Auth::from_config(&AuthConfig {
        jwt_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let token = auth.mint(&claims_for(user, 600, None)).unwrap();
    let connect = Connect {
        token: Some(token),
        client: Some(format!("{user}-app")),
        ..Connect::default()
    };
    let (client, connected) = Client::connect_with(&node.url(), codec, connect).await;
    assert_eq!(connected.user.as_deref(), Some(user));
    client
}

/// `user → connections`, as a `presence` request answers.
async fn presence(client: &mut Client, channel: &str) -> BTreeMap<String, u32> {
    let id = client.id();
    client
        .send(&ClientFrame::Presence(ChannelRequest {
            id,
            channel: channel.into(),
        }))
        .await;
    client
        .wait_for(|f| match f {
            ServerFrame::Presence(p) if p.id == id => Some(
                p.members
                    .iter()
                    .map(|m| (m.user.clone(), m.connections))
                    .collect(),
            ),
            ServerFrame::Error(e) if e.id == Some(id) => panic!("presence failed: {e:?}"),
            _ => None,
        })
        .await
}

fn members(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
    list.iter().map(|(u, n)| ((*u).to_owned(), *n)).collect()
}

/// Asks `client` for presence until it is `expected` or `deadline` passes
/// (node presence is written to Redis within a debounce, not at once).
async fn presence_becomes(
    client: &mut Client,
    channel: &str,
    expected: &BTreeMap<String, u32>,
    deadline: Instant,
) {
    loop {
        let got = presence(client, channel).await;
        if &got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "presence of {channel} stayed {got:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `members` of the admin presence route, as `user → connections`.
fn admin_members(body: &serde_json::Value) -> BTreeMap<String, u32> {
    body["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {body}"))
        .iter()
        .map(|m| {
            let connections = m["connections"].as_u64().expect("connections");
            (
                m["user"].as_str().expect("user").to_owned(),
                u32::try_from(connections).expect("a small count"),
            )
        })
        .collect()
}

/// The user of the next `join` (`true`) or `leave` of `channel`, within
/// `deadline`.
async fn next_event(client: &mut Client, channel: &str, joined: bool, deadline: Instant) -> String {
    let wait = deadline.saturating_duration_since(Instant::now());
    let event = client.wait_for(|f| match f {
        ServerFrame::Join(e) if joined && e.channel == channel => Some(e.user.clone()),
        ServerFrame::Leave(e) if !joined && e.channel == channel => Some(e.user.clone()),
        _ => None,
    });
    tokio::time::timeout(wait, event).await.unwrap_or_else(|_| {
        panic!(
            "no {} on {channel} in time",
            if joined { "join" } else { "leave" }
        )
    })
}

/// Waits for `user`'s `join` (`true`) or `leave` of `channel`, within
/// `deadline`, keeping the other frames.
async fn expect_event(
    client: &mut Client,
    channel: &str,
    joined: bool,
    user: &str,
    deadline: Instant,
) {
    let wait = deadline.saturating_duration_since(Instant::now());
    let event = client.wait_for(|f| match f {
        ServerFrame::Join(e) if joined && e.channel == channel && e.user == user => Some(()),
        ServerFrame::Leave(e) if !joined && e.channel == channel && e.user == user => Some(()),
        _ => None,
    });
    tokio::time::timeout(wait, event).await.unwrap_or_else(|_| {
        panic!(
            "no {} of {user} on {channel} in time",
            if joined { "join" } else { "leave" }
        )
    });
}

/// The presence events (`join`/`leave`, user) `client` has received but no
/// one has read yet.
fn unread_events(client: &Client) -> Vec<(&'static str, String)> {
    client
        .backlog
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Join(e) => Some(("join", e.user.clone())),
            ServerFrame::Leave(e) => Some(("leave", e.user.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn users_on_three_nodes_appear_in_presence_on_every_node_and_in_the_admin_route() {
    const CHANNEL: &str = "room:lobby";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &config(&redis), 3).await;

    let mut alice = connect_as(&nodes[0], "alice", Codec::Json).await;
    let mut bob = connect_as(&nodes[1], "bob", Codec::MsgPack).await;
    let mut carol = connect_as(&nodes[2], "carol", Codec::Json).await;
    let mut alice_again = connect_as(&nodes[2], "alice", Codec::MsgPack).await;
    for client in [&mut alice, &mut bob, &mut carol, &mut alice_again] {
        client.subscribe(sub(CHANNEL)).await;
    }
    // A user who asks without being subscribed is not a member.
    let mut dave = connect_as(&nodes[1], "dave", Codec::Json).await;

    let expected = members(&[("alice", 2), ("bob", 1), ("carol", 1)]);
    let deadline = Instant::now() + WAIT;
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        presence_becomes(client, CHANNEL, &expected, deadline).await;
    }

    // The admin route merges the cluster's members; its connection list is
    // this node's.
    for (i, node) in nodes.iter().enumerate() {
        let body = node
            .admin(ADMIN_TOKEN)
            .get(&format!("/admin/channels/{CHANNEL}/presence"))
            .await;
        assert_eq!(admin_members(&body), expected, "node {i}: {body}");
        let clients = body["clients"].as_array().expect("clients").len();
        assert_eq!(clients, [1, 1, 2][i], "node {i}: {body}");
    }
    let body = nodes[1]
        .admin(ADMIN_TOKEN)
        .get(&format!("/admin/channels/{CHANNEL}/presence"))
        .await;
    assert_eq!(body["members"][1]["client"], "bob-app", "{body}");

    // An unsubscribe on one node reaches the queries on the others.
    let id = alice_again.id();
    alice_again
        .send(&ClientFrame::Unsubscribe(ChannelRequest {
            id,
            channel: CHANNEL.into(),
        }))
        .await;
    let expected = members(&[("alice", 1), ("bob", 1), ("carol", 1)]);
    presence_becomes(&mut bob, CHANNEL, &expected, Instant::now() + WAIT).await;
}

#[tokio::test]
async fn join_and_leave_cross_nodes_unless_the_user_is_present_there() {
    const CHANNEL: &str = "room:hall";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &config(&redis), 2).await;

    let mut observer = connect_as(&nodes[1], "observer", Codec::MsgPack).await;
    observer.subscribe(sub(CHANNEL)).await;

    // A join on node 1 reaches the subscriber on node 2.
    let mut alice = connect_as(&nodes[0], "alice", Codec::Json).await;
    alice.subscribe(sub(CHANNEL)).await;
    let joined = next_event(&mut observer, CHANNEL, true, Instant::now() + WAIT).await;
    assert_eq!(joined, "alice");

    // Bob is on node 2 first (a local join), then on node 1 as well: node 2
    // announces no second join, since bob is present there.
    let mut bob_here = connect_as(&nodes[1], "bob", Codec::Json).await;
    bob_here.subscribe(sub(CHANNEL)).await;
    let joined = next_event(&mut observer, CHANNEL, true, Instant::now() + WAIT).await;
    assert_eq!(joined, "bob");
    let mut bob_there = connect_as(&nodes[0], "bob", Codec::Json).await;
    bob_there.subscribe(sub(CHANNEL)).await;
    // Carol joins on node 1 after bob: node 1 publishes in order, so by her
    // join, any join of bob's from node 1 would have arrived.
    let mut carol = connect_as(&nodes[0], "carol", Codec::Json).await;
    carol.subscribe(sub(CHANNEL)).await;
    let joined = next_event(&mut observer, CHANNEL, true, Instant::now() + WAIT).await;
    assert_eq!(joined, "carol", "backlog: {:?}", observer.backlog);
    assert_eq!(unread_events(&observer), Vec::new());

    // The same for leaves: bob leaving node 1 is no leave on node 2.
    drop(bob_there);
    let id = carol.id();
    // Node 1 queues bob's leave event (if it made one) as it drops him from
    // its registry; once its presence shows him gone, carol's leave can
    // only be queued after his.
    let deadline = Instant::now() + WAIT;
    presence_becomes(
        &mut alice,
        CHANNEL,
        &members(&[("alice", 1), ("bob", 1), ("carol", 1), ("observer", 1)]),
        deadline,
    )
    .await;
    carol
        .send(&ClientFrame::Unsubscribe(ChannelRequest {
            id,
            channel: CHANNEL.into(),
        }))
        .await;
    let left = next_event(&mut observer, CHANNEL, false, Instant::now() + WAIT).await;
    assert_eq!(left, "carol", "backlog: {:?}", observer.backlog);
    assert_eq!(unread_events(&observer), Vec::new());

    // A leave on node 1 reaches the subscriber on node 2.
    drop(alice);
    let left = next_event(&mut observer, CHANNEL, false, Instant::now() + WAIT).await;
    assert_eq!(left, "alice");
    presence_becomes(
        &mut observer,
        CHANNEL,
        &members(&[("bob", 1), ("observer", 1)]),
        Instant::now() + WAIT,
    )
    .await;
}

#[tokio::test]
async fn a_killed_node_takes_its_users_out_of_presence_and_they_leave() {
    const CHANNEL: &str = "room:crash";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(dir.path(), &config(&redis), 3).await;

    let mut watch_1 = connect_as(&nodes[0], "watch-1", Codec::Json).await;
    let mut watch_2 = connect_as(&nodes[1], "watch-2", Codec::MsgPack).await;
    watch_1.subscribe(sub(CHANNEL)).await;
    watch_2.subscribe(sub(CHANNEL)).await;
    // Bob is on the doomed node and on a survivor; alice only on the doomed one.
    let mut bob_safe = connect_as(&nodes[1], "bob", Codec::Json).await;
    bob_safe.subscribe(sub(CHANNEL)).await;
    let mut doomed = Vec::new();
    for user in ["alice", "bob"] {
        let mut client = connect_as(&nodes[2], user, Codec::Json).await;
        client.subscribe(sub(CHANNEL)).await;
        doomed.push(client);
    }
    let before = members(&[("alice", 1), ("bob", 2), ("watch-1", 1), ("watch-2", 1)]);
    let deadline = Instant::now() + WAIT;
    presence_becomes(&mut watch_1, CHANNEL, &before, deadline).await;
    presence_becomes(&mut watch_2, CHANNEL, &before, deadline).await;
    // The joins cross (a subscriber may also hear of a user who was
    // there moments before it: events travel slower than the subscribe).
    for watcher in [&mut watch_1, &mut watch_2] {
        expect_event(watcher, CHANNEL, true, "alice", deadline).await;
        expect_event(watcher, CHANNEL, true, "bob", deadline).await;
    }
    expect_event(&mut watch_1, CHANNEL, true, "watch-2", deadline).await;
    // Joins are per node: node 1, where bob has no connection, hears of
    // him joining node 2 and node 3 (node 2, where he is, only once).
    expect_event(&mut watch_1, CHANNEL, true, "bob", deadline).await;
    watch_1.backlog.clear();
    watch_2.backlog.clear();

    let killed_at = Instant::now();
    nodes.remove(2).kill9();
    // Its last beat was at most one beat ago: the lease ends within
    // NODE_LEASE, a survivor's beat notices within one more beat.
    let limit = NODE_BEAT * 2 + NODE_LEASE + Duration::from_secs(1);
    let deadline = killed_at + limit;
    let after = members(&[("bob", 1), ("watch-1", 1), ("watch-2", 1)]);
    presence_becomes(&mut watch_1, CHANNEL, &after, deadline).await;
    presence_becomes(&mut watch_2, CHANNEL, &after, deadline).await;
    for watcher in [&mut watch_1, &mut watch_2] {
        assert_eq!(next_event(watcher, CHANNEL, false, deadline).await, "alice");
    }
    let elapsed = killed_at.elapsed();
    assert!(elapsed <= limit, "took {elapsed:?}");
    drop(doomed);

    // Bob, still on node 2, did not leave: carol's join (after the dead
    // node's leaves were published) comes with no leave before it.
    let mut carol = connect_as(&nodes[0], "carol", Codec::Json).await;
    carol.subscribe(sub(CHANNEL)).await;
    assert_eq!(
        next_event(&mut watch_2, CHANNEL, true, Instant::now() + WAIT).await,
        "carol"
    );
    assert_eq!(unread_events(&watch_2), Vec::new());

    let body = nodes[0]
        .admin(ADMIN_TOKEN)
        .get(&format!("/admin/channels/{CHANNEL}/presence"))
        .await;
    assert_eq!(
        admin_members(&body),
        members(&[("bob", 1), ("carol", 1), ("watch-1", 1), ("watch-2", 1)]),
        "{body}"
    );
}

#[tokio::test]
async fn a_node_stopped_gracefully_announces_its_leaves() {
    const CHANNEL: &str = "room:bye";
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &config(&redis), 2).await;

    let mut watcher = connect_as(&nodes[0], "watcher", Codec::Json).await;
    watcher.subscribe(sub(CHANNEL)).await;
    let mut alice = connect_as(&nodes[1], "alice", Codec::Json).await;
    alice.subscribe(sub(CHANNEL)).await;
    assert_eq!(
        next_event(&mut watcher, CHANNEL, true, Instant::now() + WAIT).await,
        "alice"
    );

    let stopped_at = Instant::now();
    let code = nodes[1].sigterm_and_close_code(&mut alice).await;
    assert_eq!(code, 4010);
    // No lease to wait for: the node leaves the membership at once and
    // publishes its leaves as its connections close.
    let deadline = stopped_at + NODE_BEAT * 2;
    assert_eq!(
        next_event(&mut watcher, CHANNEL, false, deadline).await,
        "alice"
    );
    presence_becomes(&mut watcher, CHANNEL, &members(&[("watcher", 1)]), deadline).await;
}
