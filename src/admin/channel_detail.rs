//! A channel's page over the whole cluster: the broker reads the channel
//! and its stored consumers from the shared store; every other live node
//! adds what its memory has (subscribers, the consumers it serves live).

use serde::Deserialize;

use super::peers::{self, live_nodes};
use super::{ApiError, Shared};
use crate::broker::admin::{ChannelDetail, ConsumerInfo};
use crate::protocol::ChannelName;

/// A channel as another node's memory has it (`?local=true`).
#[derive(Deserialize)]
struct PeerChannel {
    subscribers: usize,
    publish_rate: f64,
    consumers: Vec<PeerConsumer>,
}

/// A consumer another node has in memory.
#[derive(Deserialize)]
struct PeerConsumer {
    name: String,
    kind: String,
    floor: u64,
    in_flight: usize,
    scheduled: usize,
    oldest_unacked_age_ms: Option<u64>,
    redeliveries: u64,
    connected: bool,
    subscriptions: usize,
}

/// A channel's detail over the cluster.
#[derive(serde::Serialize)]
pub(super) struct ClusterDetail {
    #[serde(flatten)]
    pub detail: ChannelDetail,
    /// Live nodes that did not answer: their subscribers and live
    /// consumers are missing.
    pub unreachable: Vec<String>,
}

/// Channel `name` with its consumers, completed with what every other
/// live node has in memory (asked all at once).
pub(super) async fn channel_detail(
    state: &Shared,
    name: &ChannelName,
) -> Result<ClusterDetail, ApiError> {
    let broker = &state.broker;
    let mut detail = broker.channel_detail(name, false).await?;
    let mut unreachable = Vec::new();
    if broker.clustered() {
        let this = broker.node().id();
        let nodes = live_nodes(broker).await?;
        let path = format!(
            "/admin/channels/{}?local=true",
            peers::segment(name.as_str())
        );
        let asks = nodes.iter().filter(|n| n.id != this).map(|node| {
            let path = &path;
            async move {
                let reply = peers::get_json::<PeerChannel>(node, &state.token, path).await;
                (node, reply)
            }
        });
        for (node, reply) in futures_util::future::join_all(asks).await {
            match reply {
                Ok(Some(peer)) => merge(&mut detail, &node.id, peer),
                Ok(None) => {}
                Err(e) => {
                    peers::log_unreachable(&e);
                    unreachable.push(node.id.clone());
                }
            }
        }
    }
    Ok(ClusterDetail {
        detail,
        unreachable,
    })
}

/// Adds another node's view of a channel to `detail`.
fn merge(detail: &mut ChannelDetail, node: &str, peer: PeerChannel) {
    let summary = &mut detail.summary;
    summary.subscribers += peer.subscribers;
    // Each node that has the channel in memory follows every append, so
    // each measures the whole channel's rate.
    summary.publish_rate = summary.publish_rate.max(peer.publish_rate);
    let last_seq = summary.last_seq;
    for theirs in peer.consumers {
        let nodes = if theirs.connected {
            vec![node.to_owned()]
        } else {
            Vec::new()
        };
        match detail.consumers.iter_mut().find(|c| c.name == theirs.name) {
            Some(ours) => {
                ours.floor = ours.floor.max(theirs.floor);
                ours.lag = last_seq.saturating_sub(ours.floor);
                ours.in_flight += theirs.in_flight;
                ours.scheduled = ours.scheduled.max(theirs.scheduled);
                ours.oldest_unacked_age_ms =
                    match (ours.oldest_unacked_age_ms, theirs.oldest_unacked_age_ms) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                ours.redeliveries += theirs.redeliveries;
                ours.subscriptions += theirs.subscriptions;
                ours.connected |= theirs.connected;
                ours.nodes.extend(nodes);
                ours.nodes.sort();
            }
            None => detail.consumers.push(ConsumerInfo {
                kind: if theirs.kind == "queue" {
                    "queue"
                } else {
                    "fanout"
                },
                lag: last_seq.saturating_sub(theirs.floor),
                name: theirs.name,
                floor: theirs.floor,
                in_flight: theirs.in_flight,
                scheduled: theirs.scheduled,
                oldest_unacked_age_ms: theirs.oldest_unacked_age_ms,
                redeliveries: theirs.redeliveries,
                connected: theirs.connected,
                subscriptions: theirs.subscriptions,
                nodes,
            }),
        }
    }
    detail.consumers.sort_by(|a, b| a.name.cmp(&b.name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::admin::{ChannelSummary, PolicyView};

    fn consumer(name: &str, floor: u64, connected: bool, node: &str) -> ConsumerInfo {
        ConsumerInfo {
            name: name.into(),
            kind: "fanout",
            floor,
            lag: 10 - floor,
            in_flight: 1,
            scheduled: 0,
            oldest_unacked_age_ms: None,
            redeliveries: 0,
            connected,
            subscriptions: usize::from(connected),
            nodes: if connected { vec![node.into()] } else { vec![] },
        }
    }

    fn detail(consumers: Vec<ConsumerInfo>) -> ChannelDetail {
        ChannelDetail {
            summary: ChannelSummary {
                name: "chat:a".into(),
                namespace: "chat".into(),
                durable: true,
                epoch: "e".into(),
                first_seq: 1,
                last_seq: 10,
                messages: 10,
                bytes: 100,
                publish_rate: 1.0,
                subscribers: 1,
                dead_letters: 0,
            },
            policy: PolicyView::from(&crate::config::NamespacePolicy::default()),
            consumers,
        }
    }

    fn peer(name: &str, floor: u64, connected: bool) -> PeerConsumer {
        PeerConsumer {
            name: name.into(),
            kind: "queue".into(),
            floor,
            in_flight: 2,
            scheduled: 0,
            oldest_unacked_age_ms: Some(5),
            redeliveries: 1,
            connected,
            subscriptions: usize::from(connected),
        }
    }

    #[test]
    fn another_nodes_view_adds_up_with_this_ones() {
        let mut ours = detail(vec![
            consumer("c/a", 4, true, "n1"),
            consumer("c/b", 2, false, "n1"),
        ]);
        merge(
            &mut ours,
            "n2",
            PeerChannel {
                subscribers: 2,
                publish_rate: 0.5,
                consumers: vec![peer("c/b", 7, true), peer("g/w", 3, true)],
            },
        );
        assert_eq!(ours.summary.subscribers, 3);
        assert!((ours.summary.publish_rate - 1.0).abs() < f64::EPSILON);
        let names: Vec<&str> = ours.consumers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["c/a", "c/b", "g/w"]);
        let b = &ours.consumers[1];
        assert!(b.connected);
        assert_eq!((b.floor, b.lag, b.in_flight), (7, 3, 3));
        assert_eq!(b.nodes, ["n2"]);
        let w = &ours.consumers[2];
        assert_eq!(
            (w.kind, w.lag, w.nodes.as_slice()),
            ("queue", 7, &["n2".to_owned()][..])
        );
        assert_eq!(ours.consumers[0].nodes, ["n1"]);
    }
}
