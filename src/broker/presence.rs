//! Presence across the nodes of a cluster (being written): each node keeps
//! the presence of its own connections in Redis, with a TTL its heartbeat
//! renews, and announces joins and leaves to the other nodes.

use super::Broker;

/// A presence event from another node (`payload` after `presence `).
pub(crate) fn on_event(_broker: &Broker, _payload: &str) {}

/// Node `id` left the cluster: its users leave the channels they were in.
pub(crate) fn node_gone(_broker: &Broker, _id: &str) {}
