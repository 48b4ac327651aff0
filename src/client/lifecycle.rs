//! The connection's life, as the driver sees it: connected, dropped,
//! reconnect scheduled, deadlines passed, shut down.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::Event;
use super::connection::{Conn, Socket, establish, ping_interval};
use super::driver::{CLOSE_GRACE, Driver, Request, SubState};
use super::error::{
    ConnectError, ConnectErrorKind, PublishErrorKind, RequestError, RequestErrorKind,
    SubscribeErrorKind,
};
use crate::protocol::{ClientFrame, Connected, IdOnly, close};

impl Driver {
    pub(super) fn on_timer(&mut self, now: Instant) {
        while self.outbox.front().is_some_and(|p| p.deadline <= now) {
            if let Some(publish) = self.outbox.pop_front() {
                let _ = publish.reply.send(Err(PublishErrorKind::TimedOut.into()));
            }
        }
        while let Some(&(id, forget_at)) = self.quiet.front()
            && forget_at <= now
        {
            self.quiet.pop_front();
            self.quiet_ids.remove(&id);
        }
        let expired: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline() <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.expire_request(id);
        }
        let expired: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.initial.as_ref().is_some_and(|(_, d)| *d <= now))
            .map(|(id, _)| *id)
            .collect();
        for sub_id in expired {
            self.fail_initial(sub_id, SubscribeErrorKind::TimedOut);
        }
        let stalled = self.stalled.is_some();
        let mut dead = false;
        if let Some(conn) = &mut self.conn
            && let Some(heartbeat) = conn.heartbeat()
        {
            if !stalled && now >= conn.last_rx + heartbeat * 2 {
                dead = true;
            } else if conn.next_ping.is_some_and(|t| t <= now) {
                conn.queue(Message::Ping(Default::default()));
                conn.next_ping = Some(now + ping_interval(&conn.connected));
            }
        }
        if dead {
            self.on_drop(Some("no traffic from the server for two heartbeats".into()));
        }
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.connecting = Some(establish(Arc::clone(&self.options), self.attempt));
        }
    }

    pub(super) fn expire_request(&mut self, id: u64) {
        let Some(request) = self.requests.remove(&id) else {
            return;
        };
        let timed_out = || RequestError::from(RequestErrorKind::TimedOut);
        match request {
            Request::Subscribe { sub_id, .. } => {
                let initial = self.subs.get(&sub_id).is_some_and(|s| s.initial.is_some());
                if initial {
                    self.fail_initial(sub_id, SubscribeErrorKind::TimedOut);
                } else {
                    // A server that does not answer a resubscribe is not
                    // serving us: start over on a new connection.
                    self.on_drop(Some("the server did not answer a resubscribe".into()));
                }
            }
            Request::Discard { .. } => {}
            Request::Unsubscribe { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(timed_out()));
                }
            }
            Request::Ping { reply, .. } => {
                let _ = reply.send(Err(timed_out()));
            }
        }
    }

    /// The first subscribe of `sub_id` failed: tell its caller, forget it.
    pub(super) fn fail_initial(&mut self, sub_id: u64, kind: SubscribeErrorKind) {
        let Some(mut sub) = self.remove_sub(sub_id) else {
            return;
        };
        if let Some(id) = sub.request {
            // If the server still subscribes it, undo that.
            let deadline = Instant::now() + self.options.request_timeout;
            let discard = Request::Discard {
                unsubscribe: true,
                deadline,
            };
            self.requests.insert(id, discard);
        }
        if let Some((reply, _)) = sub.initial.take() {
            let _ = reply.send(Err(kind.into()));
        }
    }

    /// Removes a subscription from every table; its stream ends once the
    /// application has read what is buffered.
    pub(super) fn remove_sub(&mut self, sub_id: u64) -> Option<SubState> {
        let sub = self.subs.remove(&sub_id)?;
        if self.channels.get(&sub.spec.channel) == Some(&sub_id) {
            self.channels.remove(&sub.spec.channel);
        }
        if let Some(id) = sub.request {
            self.requests.remove(&id);
        }
        self.parked.retain(|(id, _)| *id != sub_id);
        if self.stalled == Some(sub_id) {
            self.stalled = None;
        }
        Some(sub)
    }

    pub(super) fn on_connected(&mut self, socket: Socket, connected: Connected) {
        self.generation += 1;
        self.attempt = 0;
        self.limits = connected.limits.clone();
        let conn_id = connected.conn_id.clone();
        tracing::info!(%conn_id, "courier client connected");
        self.conn = Some(Conn::new(socket, connected));
        self.emit(Event::Connected { conn_id });
        let sub_ids: Vec<u64> = self.subs.keys().copied().collect();
        for sub_id in sub_ids {
            self.send_subscribe(sub_id);
        }
        let now = Instant::now();
        let mut pings = Vec::new();
        for (id, request) in &mut self.requests {
            if let Request::Ping { sent_at, .. } = request
                && sent_at.is_none()
            {
                *sent_at = Some(now);
                pings.push(*id);
            }
        }
        for id in pings {
            self.queue_frame(&ClientFrame::Ping(IdOnly { id }));
        }
        if let Some(conn) = &mut self.conn {
            for publish in &self.outbox {
                conn.queue(publish.message.clone());
            }
        }
    }

    pub(super) fn on_connect_failed(&mut self, error: ConnectError) {
        tracing::debug!(%error, attempt = self.attempt, "courier client reconnect failed");
        let code = match &error.kind {
            ConnectErrorKind::Closed { code } => {
                self.emit(Event::Disconnected {
                    code: *code,
                    reason: error.message.clone(),
                });
                *code
            }
            ConnectErrorKind::Rejected { code } => {
                self.emit(Event::ServerError {
                    code: *code,
                    message: error.message.clone(),
                });
                None
            }
            _ => None,
        };
        self.schedule_reconnect(code);
    }

    /// The connection ended (closed, failed, or found dead).
    pub(super) fn on_drop(&mut self, error: Option<String>) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let (code, reason) = match conn.close.clone() {
            Some((code, reason)) => (Some(code), reason),
            None => (None, error.unwrap_or_else(|| "connection closed".into())),
        };
        drop(conn);
        tracing::info!(?code, %reason, "courier client disconnected");
        self.emit(Event::Disconnected {
            code,
            reason: reason.clone(),
        });
        for (id, request) in std::mem::take(&mut self.requests) {
            match request {
                // Subscriptions are sent again on the next connection.
                Request::Subscribe { .. } | Request::Discard { .. } => {}
                // The server-side subscription died with the connection.
                Request::Unsubscribe { reply, .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                }
                Request::Ping {
                    reply, deadline, ..
                } => {
                    let ping = Request::Ping {
                        reply,
                        deadline,
                        sent_at: None,
                    };
                    self.requests.insert(id, ping);
                }
            }
        }
        for sub in self.subs.values_mut() {
            sub.live = false;
            sub.request = None;
        }
        if self.closing.is_some() && self.outbox.is_empty() {
            return;
        }
        self.schedule_reconnect(code);
    }

    pub(super) fn schedule_reconnect(&mut self, code: Option<u16>) {
        self.attempt = self.attempt.saturating_add(1);
        if let Some(max) = self.options.max_reconnects
            && self.attempt > max
        {
            tracing::warn!(max, "courier client gave up reconnecting");
            self.gave_up = true;
            return;
        }
        let backoff = self.options.reconnect;
        // Credentials will not fix themselves: do not hammer the server.
        let delay = if matches!(code, Some(close::UNAUTHORIZED | close::FORBIDDEN)) {
            backoff.max
        } else {
            backoff.delay(self.attempt, rand::random())
        };
        self.emit(Event::Reconnecting {
            attempt: self.attempt,
            delay,
        });
        self.retry_at = Some(Instant::now() + delay);
    }

    /// Fails what is still pending, ends every subscription, closes the socket.
    pub(super) async fn shutdown(&mut self) {
        for publish in self.outbox.drain(..) {
            let _ = publish.reply.send(Err(PublishErrorKind::Closed.into()));
        }
        for (_, request) in self.requests.drain() {
            let closed = || RequestError::from(RequestErrorKind::Closed);
            match request {
                Request::Unsubscribe {
                    reply: Some(reply), ..
                } => {
                    let _ = reply.send(Ok(()));
                }
                Request::Ping { reply, .. } => {
                    let _ = reply.send(Err(closed()));
                }
                _ => {}
            }
        }
        for (_, mut sub) in std::mem::take(&mut self.subs) {
            if let Some((reply, _)) = sub.initial.take() {
                let _ = reply.send(Err(SubscribeErrorKind::Closed.into()));
            }
        }
        self.channels.clear();
        self.parked.clear();
        self.commands.close();
        if let Some(conn) = self.conn.take() {
            conn.close(CLOSE_GRACE).await;
        }
        tracing::info!("courier client closed");
        self.emit(Event::Closed);
        for waiter in self.closing.take().unwrap_or_default() {
            let _ = waiter.send(());
        }
    }
}
