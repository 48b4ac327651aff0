//! What the driver does with each frame from the server: replies resolve
//! their requests, deliveries go to their subscription, the rest becomes
//! events.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::Event;
use super::command::{Attached, Start};
use super::connection::decode;
use super::driver::{Driver, OutPublish, Request};
use super::error::RequestErrorKind;
use super::outgoing::{rejected, subscribe_rejected};
use super::subscription::{RawDelivery, SubscriptionInfo};
use crate::protocol::{self, ClientFrame, ErrorCode, ErrorFrame, Headers, ServerFrame, Subscribed};

/// One delivery as read from `msg` or a `msgs` item.
struct Item {
    seq: u64,
    data: Bytes,
    headers: Option<Headers>,
    ts: u64,
    attempt: u32,
}

impl Driver {
    pub(super) fn on_message(&mut self, message: Message) {
        let Some(conn) = &mut self.conn else {
            return;
        };
        conn.last_rx = Instant::now();
        if let Message::Close(frame) = &message {
            conn.close = frame
                .as_ref()
                .map(|f| (u16::from(f.code), f.reason.to_string()));
            return;
        }
        match decode(self.options.codec, &message) {
            None => {}
            Some(Ok(frame)) => self.on_frame(frame),
            Some(Err(error)) => tracing::warn!(%error, "cannot decode a server frame"),
        }
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Puback(puback) => {
                if let Some(publish) = self.take_publish(puback.id) {
                    let _ = publish.reply.send(Ok(puback.seq));
                }
            }
            ServerFrame::Subscribed(subscribed) => self.on_subscribed(subscribed),
            ServerFrame::Unsubscribed(unsubscribed) if unsubscribed.id == 0 => {
                self.on_ended(&unsubscribed.channel);
            }
            ServerFrame::Unsubscribed(unsubscribed) => {
                if let Some(Request::Unsubscribe { reply, .. }) =
                    self.requests.remove(&unsubscribed.id)
                    && let Some(reply) = reply
                {
                    let _ = reply.send(Ok(()));
                }
            }
            ServerFrame::Msg(msg) => {
                let item = Item {
                    seq: msg.seq,
                    data: msg.payload(),
                    headers: msg.headers,
                    ts: msg.ts,
                    attempt: msg.attempt,
                };
                self.on_deliveries(&msg.channel, vec![item]);
            }
            ServerFrame::Msgs(msgs) => {
                let items = msgs
                    .items
                    .into_iter()
                    .map(|i| Item {
                        seq: i.seq,
                        data: i.payload(),
                        headers: i.headers,
                        ts: i.ts,
                        attempt: i.attempt,
                    })
                    .collect();
                self.on_deliveries(&msgs.channel, items);
            }
            ServerFrame::Gap(gap) => {
                if let Some(sub) = self
                    .channels
                    .get(&gap.channel)
                    .and_then(|id| self.subs.get_mut(id))
                {
                    sub.position = Some(sub.position.map_or(gap.to, |p| p.max(gap.to)));
                }
                tracing::warn!(channel = %gap.channel, from = gap.from, to = gap.to, "gap");
                self.emit(Event::Gap {
                    channel: gap.channel,
                    from: gap.from,
                    to: gap.to,
                });
            }
            ServerFrame::Pong(pong) => {
                if let Some(Request::Ping { reply, sent_at, .. }) = self.requests.remove(&pong.id) {
                    let rtt = sent_at.map(|t| t.elapsed()).unwrap_or_default();
                    let _ = reply.send(Ok(rtt));
                }
            }
            ServerFrame::Error(error) => self.on_error(error),
            ServerFrame::Connected(_)
            | ServerFrame::Presence(_)
            | ServerFrame::Join(_)
            | ServerFrame::Leave(_) => {
                tracing::debug!(kind = frame.kind(), "ignored server frame");
            }
        }
    }

    /// Removes the publish `id` from the outbox (usually its front).
    fn take_publish(&mut self, id: u64) -> Option<OutPublish> {
        let index = self.outbox.iter().position(|p| p.id == id)?;
        self.outbox.remove(index)
    }

    fn on_subscribed(&mut self, subscribed: Subscribed) {
        let sub_id = match self.requests.remove(&subscribed.id) {
            Some(Request::Subscribe { sub_id, .. }) => sub_id,
            Some(Request::Discard { unsubscribe, .. }) => {
                if unsubscribe && !self.channels.contains_key(&subscribed.channel) {
                    let id = self.next_request_id();
                    let deadline = Instant::now() + self.options.request_timeout;
                    let discard = Request::Unsubscribe {
                        reply: None,
                        deadline,
                    };
                    self.requests.insert(id, discard);
                    let frame = ClientFrame::Unsubscribe(protocol::ChannelRequest {
                        id,
                        channel: subscribed.channel,
                    });
                    self.queue_frame(&frame);
                }
                return;
            }
            Some(other) => {
                self.requests.insert(subscribed.id, other);
                return;
            }
            None => return,
        };
        let generation = self.generation;
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            return;
        };
        sub.live = true;
        sub.request = None;
        sub.generation = generation;
        sub.info.send_replace(SubscriptionInfo {
            epoch: subscribed.epoch.clone(),
            first_seq: subscribed.first_seq,
            last_seq: subscribed.last_seq,
            recovered: subscribed.recovered,
        });
        let previous_epoch = sub.epoch.replace(subscribed.epoch.clone());
        let mut abandoned = false;
        if let Some((reply, _)) = sub.initial.take() {
            sub.position = Some(match sub.spec.start {
                Start::Since(seq) => seq.min(subscribed.last_seq),
                Start::First => subscribed.first_seq.saturating_sub(1),
                Start::Default => subscribed.last_seq,
            });
            if let Some(deliveries) = sub.rx.take() {
                let attached = Attached {
                    sub_id,
                    deliveries,
                    info: sub.info.subscribe(),
                };
                abandoned = reply.send(Ok(attached)).is_err();
            }
        } else {
            let epoch_changed = previous_epoch.is_some_and(|e| e != subscribed.epoch);
            let channel = sub.spec.channel.clone();
            tracing::info!(%channel, recovered = subscribed.recovered, epoch_changed, "resubscribed");
            self.emit(Event::Resumed {
                channel,
                recovered: subscribed.recovered,
                epoch_changed,
            });
        }
        if abandoned {
            self.drop_subscription(sub_id);
            return;
        }
        self.flush_parked(sub_id);
    }

    /// The server ended a subscription (an operator purged or deleted its
    /// channel): subscribe again at once. The `subscribed` that answers
    /// reports the new epoch as [`Event::Resumed`] with `epoch_changed`.
    fn on_ended(&mut self, channel: &str) {
        let Some(sub_id) = self
            .subs
            .iter()
            .find(|(_, s)| s.live && s.spec.channel == channel)
            .map(|(id, _)| *id)
        else {
            return;
        };
        if let Some(sub) = self.subs.get_mut(&sub_id) {
            sub.live = false;
        }
        tracing::info!(%channel, "the server ended the subscription; subscribing again");
        self.send_subscribe(sub_id);
    }

    /// Sends the controls parked for `sub_id` while it was not subscribed.
    fn flush_parked(&mut self, sub_id: u64) {
        if self.parked.is_empty() {
            return;
        }
        let Some(channel) = self.subs.get(&sub_id).map(|s| s.spec.channel.clone()) else {
            return;
        };
        let (mine, others): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(id, _)| *id == sub_id);
        self.parked = others;
        for (_, control) in mine {
            self.send_control(&channel, control, true);
        }
    }

    fn on_error(&mut self, error: ErrorFrame) {
        let Some(id) = error.id else {
            return self.server_error(error);
        };
        if self.quiet_ids.remove(&id) {
            tracing::debug!(code = error.code.as_str(), message = %error.message, "ack of an earlier connection refused");
            return;
        }
        if let Some(publish) = self.take_publish(id) {
            let kind = rejected(error.code, error.message);
            let _ = publish.reply.send(Err(kind.into()));
            return;
        }
        match self.requests.remove(&id) {
            Some(Request::Subscribe { sub_id, .. }) => {
                let initial = self.subs.get(&sub_id).is_some_and(|s| s.initial.is_some());
                if initial {
                    if let Some(sub) = self.subs.get_mut(&sub_id) {
                        // Answered: nothing to undo later.
                        sub.request = None;
                    }
                    let kind = subscribe_rejected(error.code, error.message);
                    self.fail_initial(sub_id, kind);
                } else if error.code == ErrorCode::Unavailable {
                    // A passing trouble of this server (in a cluster: the
                    // node that served the consumer just died). Start over
                    // on a new connection, which may reach another server.
                    tracing::info!(message = %error.message, "resubscribe refused as unavailable; reconnecting");
                    self.on_drop(Some(format!(
                        "resubscribe refused as unavailable: {}",
                        error.message
                    )));
                } else {
                    // The server refuses to resubscribe: end the stream, loudly.
                    self.remove_sub(sub_id);
                    self.server_error(error);
                }
            }
            Some(Request::Discard { .. }) => {}
            Some(Request::Unsubscribe { reply, .. }) => {
                let result = match error.code {
                    // Not subscribed on the server: the goal is reached.
                    ErrorCode::NotFound => Ok(()),
                    code => Err(RequestErrorKind::Rejected {
                        code,
                        message: error.message,
                    }
                    .into()),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Some(Request::Ping { reply, .. }) => {
                let kind = RequestErrorKind::Rejected {
                    code: error.code,
                    message: error.message,
                };
                let _ = reply.send(Err(kind.into()));
            }
            None => self.server_error(error),
        }
    }

    fn server_error(&self, error: ErrorFrame) {
        tracing::warn!(code = error.code.as_str(), message = %error.message, "server error");
        self.emit(Event::ServerError {
            code: error.code,
            message: error.message,
        });
    }

    /// Hands deliveries to their subscription; what its buffer cannot take
    /// waits in the overflow, and the socket is not read until it drains.
    fn on_deliveries(&mut self, channel: &str, items: Vec<Item>) {
        let Some(&sub_id) = self.channels.get(channel) else {
            return;
        };
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            return;
        };
        let mut closed = false;
        for item in items {
            sub.position = Some(sub.position.map_or(item.seq, |p| p.max(item.seq)));
            let raw = RawDelivery {
                seq: item.seq,
                data: item.data,
                headers: item.headers.unwrap_or_default(),
                ts: item.ts,
                attempt: item.attempt,
                generation: sub.generation,
            };
            if !sub.overflow.is_empty() {
                sub.overflow.push_back(raw);
                continue;
            }
            match sub.tx.try_send(raw) {
                Ok(()) => {}
                Err(TrySendError::Full(raw)) => sub.overflow.push_back(raw),
                Err(TrySendError::Closed(_)) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            self.drop_subscription(sub_id);
        } else if !sub.overflow.is_empty() {
            self.stalled = Some(sub_id);
        }
    }
}
