//! What the driver does with each command from the handles (publish,
//! subscribe, acks, ping). Sans I/O: everything here only changes the
//! driver's tables and queues frames on the live connection.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::command::{Attached, Command, Control, Start, SubscribeSpec};
use super::connection::encode;
use super::driver::{Driver, MAX_PARKED, MAX_QUIET, OutPublish, Request, SubState};
use super::error::{
    PublishError, PublishErrorKind, RequestError, RequestErrorKind, SubscribeError,
    SubscribeErrorKind,
};
use super::subscription::SubscriptionInfo;
use crate::protocol::{
    self, ChannelName, ClientFrame, ErrorCode, Headers, IdOnly, Payload, Publish, StartFrom,
    Subscribe,
};

/// Largest delivery buffer of one subscription, whatever its window.
const MAX_SUBSCRIPTION_BUFFER: u32 = 10_000;

impl Driver {
    pub(super) fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish {
                channel,
                data,
                headers,
                msg_id,
                reply,
            } => self.on_publish(channel, data, headers, msg_id, reply),
            Command::Subscribe { spec, reply } => self.on_subscribe(spec, reply),
            Command::Unsubscribe { sub_id, reply } => self.unsubscribe(sub_id, reply),
            Command::Control {
                sub_id,
                generation,
                control,
            } => self.on_control(sub_id, generation, control),
            Command::Ping { reply } => self.on_ping(reply, None),
            Command::Refresh { token, reply } => {
                std::sync::Arc::make_mut(&mut self.options).token = Some(token.clone());
                self.on_ping(reply, Some(token));
            }
            Command::Close { reply } => self.closing.get_or_insert_with(Vec::new).push(reply),
        }
    }

    pub(super) fn on_publish(
        &mut self,
        channel: String,
        data: Bytes,
        headers: Option<Headers>,
        msg_id: Option<String>,
        reply: oneshot::Sender<Result<u64, PublishError>>,
    ) {
        let id = self.next_request_id();
        let message = match self.publish_message(id, channel, data, headers, msg_id) {
            Ok(message) => message,
            Err(kind) => {
                let _ = reply.send(Err(kind.into()));
                return;
            }
        };
        if let Some(conn) = &mut self.conn {
            conn.queue(message.clone());
        }
        self.outbox.push_back(OutPublish {
            id,
            message,
            deadline: Instant::now() + self.options.request_timeout,
            reply,
        });
    }

    /// Checks a publish and encodes its frame.
    pub(super) fn publish_message(
        &mut self,
        id: u64,
        channel: String,
        data: Bytes,
        headers: Option<Headers>,
        msg_id: Option<String>,
    ) -> Result<Message, PublishErrorKind> {
        if self.closing.is_some() {
            return Err(PublishErrorKind::Closed);
        }
        if let Err(e) = ChannelName::new(&channel) {
            return Err(rejected(ErrorCode::BadRequest, e.to_string()));
        }
        if self.outbox.len() >= self.options.publish_buffer {
            return Err(PublishErrorKind::BufferFull);
        }
        let msg_id = msg_id.unwrap_or_else(|| self.next_msg_id());
        let frame = ClientFrame::Publish(Publish {
            id,
            channel,
            data: Some(Payload(data)),
            data_b64: None,
            headers,
            msg_id: Some(msg_id),
        });
        let message =
            encode(self.options.codec, &frame).map_err(|e| rejected(ErrorCode::BadRequest, e))?;
        let size = u64::try_from(message.len()).unwrap_or(u64::MAX);
        if self.limits.max_frame > 0 && size > self.limits.max_frame {
            let message = format!(
                "the publish frame is {size} bytes; the server's max_frame is {}",
                self.limits.max_frame
            );
            return Err(rejected(ErrorCode::TooLarge, message));
        }
        Ok(message)
    }

    pub(super) fn on_subscribe(
        &mut self,
        spec: SubscribeSpec,
        reply: oneshot::Sender<Result<Attached, SubscribeError>>,
    ) {
        if let Err(kind) = self.check_subscribe(&spec) {
            let _ = reply.send(Err(kind.into()));
            return;
        }
        // The window bounds what the server sends unacked; the overflow
        // queue and the stall cover the rest (auto acks, a reconnect).
        let window = spec
            .max_in_flight
            .unwrap_or(self.limits.max_in_flight)
            .clamp(1, MAX_SUBSCRIPTION_BUFFER);
        let capacity = usize::try_from(window).unwrap_or(1);
        let (tx, rx) = mpsc::channel(capacity);
        let (info, _) = watch::channel(SubscriptionInfo::default());
        let sub_id = self.next_sub_id();
        let deadline = Instant::now() + self.options.request_timeout;
        self.channels.insert(spec.channel.clone(), sub_id);
        let sub = SubState {
            spec,
            tx,
            rx: Some(rx),
            info,
            initial: Some((reply, deadline)),
            epoch: None,
            position: None,
            generation: self.generation,
            live: false,
            request: None,
            overflow: VecDeque::new(),
        };
        self.subs.insert(sub_id, sub);
        if self.conn.is_some() {
            self.send_subscribe(sub_id);
        }
    }

    /// The checks the server would make, made before anything is sent.
    pub(super) fn check_subscribe(&self, spec: &SubscribeSpec) -> Result<(), SubscribeErrorKind> {
        if self.closing.is_some() {
            return Err(SubscribeErrorKind::Closed);
        }
        let names = [
            Some(&spec.channel),
            spec.consumer.as_ref(),
            spec.group.as_ref(),
        ];
        for name in names.into_iter().flatten() {
            if let Err(e) = ChannelName::new(name) {
                let message = format!("{name:?}: {e}");
                return Err(subscribe_rejected(ErrorCode::BadRequest, message));
            }
        }
        if spec.max_in_flight == Some(0) {
            let message = "max_in_flight must be at least 1".to_owned();
            return Err(subscribe_rejected(ErrorCode::BadRequest, message));
        }
        if self.channels.contains_key(&spec.channel) {
            let message = format!("this client is already subscribed to {}", spec.channel);
            return Err(subscribe_rejected(ErrorCode::Conflict, message));
        }
        Ok(())
    }

    /// Sends the subscribe of `sub_id` on the live connection: as the
    /// application asked the first time; after a reconnect, a named consumer
    /// resumes from the server's state and an anonymous one after the last
    /// seq it delivered.
    pub(super) fn send_subscribe(&mut self, sub_id: u64) {
        if self.conn.is_none() {
            return;
        }
        let id = self.next_request_id();
        let timeout = self.options.request_timeout;
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            return;
        };
        let spec = &sub.spec;
        let (since, from) = match (&sub.initial, spec.is_named(), sub.position) {
            (None, true, _) => (None, None),
            (None, false, Some(position)) => (Some(position), None),
            _ => match spec.start {
                Start::Default => (None, None),
                Start::Since(seq) => (Some(seq), None),
                Start::First => (None, Some(StartFrom::First)),
            },
        };
        let frame = ClientFrame::Subscribe(Subscribe {
            id,
            channel: spec.channel.clone(),
            consumer: spec.consumer.clone(),
            group: spec.group.clone(),
            since,
            from,
            max_in_flight: spec.max_in_flight,
            ack: Some(spec.ack),
        });
        let deadline = match &sub.initial {
            Some((_, deadline)) => *deadline,
            None => Instant::now() + timeout,
        };
        sub.request = Some(id);
        self.requests
            .insert(id, Request::Subscribe { sub_id, deadline });
        self.queue_frame(&frame);
    }

    pub(super) fn on_control(&mut self, sub_id: u64, generation: Option<u64>, control: Control) {
        let Some(sub) = self.subs.get(&sub_id) else {
            // Unsubscribed: the server takes back what was not acked.
            return;
        };
        let named = sub.spec.is_named();
        let earlier = generation.is_some_and(|g| g != sub.generation);
        if !named && earlier {
            // The anonymous consumer it came from ended with its connection.
            return;
        }
        if sub.live && self.conn.is_some() {
            let channel = sub.spec.channel.clone();
            self.send_control(&channel, control, earlier);
        } else if named && self.parked.len() < MAX_PARKED {
            self.parked.push_back((sub_id, control));
        } else if named {
            tracing::warn!(
                channel = %sub.spec.channel,
                "too many acks waiting for a reconnect; the server will redeliver"
            );
        }
    }

    /// Queues a control frame. One about a delivery of an earlier connection
    /// gets an id whose error is only logged (see `Driver::quiet`).
    pub(super) fn send_control(&mut self, channel: &str, control: Control, earlier: bool) {
        let id = (earlier && self.quiet.len() < MAX_QUIET).then(|| {
            let id = self.next_request_id();
            let forget_at = Instant::now() + self.options.request_timeout;
            self.quiet.push_back((id, forget_at));
            self.quiet_ids.insert(id);
            id
        });
        self.queue_frame(&control_frame(id, channel, control));
    }

    /// A ping, or with `refresh` a `refresh` frame, which the server also
    /// answers with `pong`. Unsent when disconnected: the next connection
    /// pings instead (it connects with the new token already).
    pub(super) fn on_ping(
        &mut self,
        reply: oneshot::Sender<Result<Duration, RequestError>>,
        refresh: Option<String>,
    ) {
        if self.closing.is_some() {
            let _ = reply.send(Err(RequestErrorKind::Closed.into()));
            return;
        }
        let id = self.next_request_id();
        let now = Instant::now();
        let sent_at = self.conn.is_some().then_some(now);
        let deadline = now + self.options.request_timeout;
        let ping = Request::Ping {
            reply,
            deadline,
            sent_at,
        };
        self.requests.insert(id, ping);
        if self.conn.is_none() {
            return;
        }
        match refresh {
            Some(token) => self.queue_frame(&ClientFrame::Refresh(crate::protocol::Refresh {
                id,
                token,
            })),
            None => self.queue_frame(&ClientFrame::Ping(IdOnly { id })),
        }
    }
}

pub(super) fn rejected(code: ErrorCode, message: String) -> PublishErrorKind {
    PublishErrorKind::Rejected { code, message }
}

pub(super) fn subscribe_rejected(code: ErrorCode, message: String) -> SubscribeErrorKind {
    SubscribeErrorKind::Rejected { code, message }
}

/// The frame a control stands for.
fn control_frame(id: Option<u64>, channel: &str, control: Control) -> ClientFrame {
    let channel = channel.to_owned();
    match control {
        Control::Ack(seq) => ClientFrame::Ack(protocol::Ack {
            id,
            channel,
            seqs: Some(vec![seq]),
            upto: None,
        }),
        Control::AckUpto(upto) => ClientFrame::Ack(protocol::Ack {
            id,
            channel,
            seqs: None,
            upto: Some(upto),
        }),
        Control::Nack(seq, delay) => ClientFrame::Nack(protocol::Nack {
            id,
            channel,
            seq,
            delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }),
        Control::Progress(seq) => ClientFrame::Progress(protocol::Progress {
            id,
            channel,
            seqs: vec![seq],
        }),
        Control::Term(seq, reason) => ClientFrame::Term(protocol::Term {
            id,
            channel,
            seq,
            reason,
        }),
    }
}
