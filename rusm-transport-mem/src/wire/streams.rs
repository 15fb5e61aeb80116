//! Streams of an in-memory connection, as QUIC has them: ids as in RFC 9000, flow control by
//! absolute limits per stream and per connection (granted again by the reader once it consumed
//! half a window, as quinn does, and applied with `max`), a limit on concurrently open
//! uni-streams (granted again as streams end), a peer stream visible to `accept` with its first
//! event, `STOP_SENDING` answered by an automatic reset, a dropped send stream finished and a
//! dropped receive stream not read to its end stopped with code 0 (as quinn does).

use std::task::{Context, Poll};

use bytes::Bytes;
use rusm_cluster_core::transport::TransportError;

use super::{lost, peer_of, wake, Event, Half, Wire};

impl Wire {
    // ----- Opening and accepting streams -----

    /// Opens a uni-stream once the peer's stream limit allows; its id.
    pub(crate) fn poll_open_uni(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<u64, TransportError>> {
        self.check(side)?;
        let window = self.sides[peer_of(side)].limits.stream_window;
        let s = &mut self.sides[side];
        if s.uni_opened >= s.uni_max {
            s.open_uni_waiters.register(cx.waker());
            return Poll::Pending;
        }
        let id = (s.uni_opened << 2) | 0b10 | side as u64;
        s.uni_opened += 1;
        self.halves.insert((id, side), Half::new(true, window));
        Poll::Ready(Ok(id))
    }

    /// Opens a bidirectional stream; its id.
    pub(crate) fn open_bi(&mut self, side: usize) -> Result<u64, TransportError> {
        self.check(side)?;
        let peer_window = self.sides[peer_of(side)].limits.stream_window;
        let own_window = self.sides[side].limits.stream_window;
        let s = &mut self.sides[side];
        let id = (s.bi_opened << 2) | side as u64;
        s.bi_opened += 1;
        self.halves
            .insert((id, side), Half::new(false, peer_window));
        self.halves
            .insert((id, peer_of(side)), Half::new(false, own_window));
        Ok(id)
    }

    /// The next uni-stream the peer opened; `None` when the connection closed gracefully.
    pub(crate) fn poll_accept_uni(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<u64>, TransportError>> {
        let s = &mut self.sides[side];
        match &s.error {
            // A graceful close is "no more streams", as the QUIC backends report it.
            Some(TransportError::ClosedByPeer { code: 0, .. })
            | Some(TransportError::ClosedLocally) => return Poll::Ready(Ok(None)),
            Some(e) => return Poll::Ready(Err(e.clone())),
            None => {}
        }
        match s.incoming_uni.pop_front() {
            Some(id) => Poll::Ready(Ok(Some(id))),
            None => {
                s.accept_uni_waiters.register(cx.waker());
                Poll::Pending
            }
        }
    }

    /// The next bidirectional stream the peer opened.
    pub(crate) fn poll_accept_bi(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<u64, TransportError>> {
        self.check(side)?;
        let s = &mut self.sides[side];
        match s.incoming_bi.pop_front() {
            Some(id) => Poll::Ready(Ok(id)),
            None => {
                s.accept_bi_waiters.register(cx.waker());
                Poll::Pending
            }
        }
    }

    // ----- Sending -----

    /// Writes as much of `data` as credit allows; ready once all of it is written.
    pub(crate) fn poll_write(
        &mut self,
        side: usize,
        id: u64,
        data: &mut Bytes,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        self.check(side)?;
        while !data.is_empty() {
            let s = &mut self.sides[side];
            let Some(h) = self.halves.get_mut(&(id, side)) else {
                return Poll::Ready(Err(lost("unknown stream")));
            };
            if let Some(code) = h.stopped {
                return Poll::Ready(Err(TransportError::StreamStopped { code }));
            }
            if h.fin || h.reset {
                return Poll::Ready(Err(lost("write on a finished or reset stream")));
            }
            let stream_credit = h.max - h.written;
            let conn_credit = s.conn_max - s.conn_sent;
            let credit = stream_credit.min(conn_credit);
            if credit == 0 {
                h.send_waker = Some(cx.waker().clone());
                if conn_credit == 0 {
                    s.conn_credit_waiters.insert(id, cx.waker().clone());
                }
                return Poll::Pending;
            }
            let n = usize::try_from(credit)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let chunk = if n == data.len() {
                std::mem::take(data)
            } else {
                data.split_to(n)
            };
            h.written += n as u64;
            s.conn_sent += n as u64;
            s.conn_credit_waiters.remove(&id);
            self.send(side, Event::Data { id, chunk });
        }
        Poll::Ready(Ok(()))
    }

    /// Ends the stream: the reader gets end of stream after the data.
    pub(crate) fn finish(&mut self, side: usize, id: u64) -> Result<(), TransportError> {
        self.check(side)?;
        let Some(h) = self.halves.get_mut(&(id, side)) else {
            return Err(lost("unknown stream"));
        };
        if h.stopped.is_some() {
            // Harmless, as on quinn: `delivered` tells of the stop.
            return Ok(());
        }
        if h.fin || h.reset {
            return Err(lost("stream already finished or reset"));
        }
        h.fin = true;
        self.send(side, Event::Fin { id });
        Ok(())
    }

    /// Abandons the stream with `code`.
    pub(crate) fn reset(&mut self, side: usize, id: u64, code: u64) {
        if self.check(side).is_err() {
            return;
        }
        let Some(h) = self.halves.get_mut(&(id, side)) else {
            return;
        };
        if h.reset || h.acked || h.stopped.is_some() {
            return;
        }
        h.reset = true;
        let final_size = h.written;
        self.send_reset(side, id, code, final_size);
    }

    /// Sends RESET_STREAM for a half just marked reset; data not yet sent is not sent.
    fn send_reset(&mut self, side: usize, id: u64, code: u64, final_size: u64) {
        self.pacers[side].purge(id);
        self.send(
            side,
            Event::Reset {
                id,
                code,
                final_size,
            },
        );
    }

    /// Waits until the reader has read everything, end of stream included.
    pub(crate) fn poll_delivered(
        &mut self,
        side: usize,
        id: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        let Some(h) = self.halves.get_mut(&(id, side)) else {
            self.check(side)?;
            return Poll::Ready(Err(lost("unknown stream")));
        };
        if h.acked {
            return Poll::Ready(Ok(()));
        }
        if let Some(code) = h.stopped {
            return Poll::Ready(Err(TransportError::StreamStopped { code }));
        }
        if h.reset {
            return Poll::Ready(Err(lost("stream was reset")));
        }
        h.send_waker = Some(cx.waker().clone());
        self.check(side)?;
        Poll::Pending
    }

    /// The send stream's handle is gone: finish it if nothing else ended it (as quinn does).
    pub(crate) fn drop_send(&mut self, side: usize, id: u64) {
        let Some(h) = self.halves.get_mut(&(id, side)) else {
            return;
        };
        h.send_dropped = true;
        h.send_waker = None;
        self.sides[side].conn_credit_waiters.remove(&id);
        if self.sides[side].error.is_none() && h.stopped.is_none() && !h.fin && !h.reset {
            h.fin = true;
            self.send(side, Event::Fin { id });
        }
        self.maybe_remove((id, side));
    }

    // ----- Receiving -----

    /// The next chunk of the peer's half of stream `id`, `None` at its end.
    pub(crate) fn poll_read(
        &mut self,
        side: usize,
        id: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, TransportError>> {
        self.check(side)?;
        let key = (id, peer_of(side));
        let Some(h) = self.halves.get_mut(&key) else {
            return Poll::Ready(Err(lost("unknown stream")));
        };
        if let Some(code) = h.reset_received {
            return Poll::Ready(Err(TransportError::StreamReset { code }));
        }
        if h.stopped_here {
            return Poll::Ready(Err(lost("read on a stopped stream")));
        }
        if let Some(chunk) = h.queue.pop_front() {
            self.consumed(side, key, chunk.len() as u64);
            return Poll::Ready(Ok(Some(chunk)));
        }
        if h.fin_received {
            if !h.done {
                self.send(side, Event::Acked { id });
                self.stream_done(side, key);
            }
            return Poll::Ready(Ok(None));
        }
        h.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Asks the sender to stop; unread data is discarded.
    pub(crate) fn stop(&mut self, side: usize, id: u64, code: u64) {
        if self.check(side).is_err() {
            return;
        }
        let key = (id, peer_of(side));
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        if h.done || h.stopped_here {
            return;
        }
        h.stopped_here = true;
        h.recv_waker = None;
        let fin = h.fin_received;
        self.discard(side, key);
        self.send(side, Event::Stop { id, code });
        if fin {
            self.stream_done(side, key);
        }
    }

    /// The receive stream's handle is gone: stop it with code 0 unless it was read to the end
    /// (as quinn does).
    pub(crate) fn drop_recv(&mut self, side: usize, id: u64) {
        let key = (id, peer_of(side));
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        h.recv_dropped = true;
        h.recv_waker = None;
        if !h.done && !h.stopped_here {
            self.stop(side, id, 0);
        }
        self.maybe_remove(key);
    }

    /// `n` bytes of `key` were consumed by `side`: grant credit again when half a window was.
    fn consumed(&mut self, side: usize, key: (u64, usize), n: u64) {
        let window = self.sides[side].limits.stream_window;
        if let Some(h) = self.halves.get_mut(&key) {
            h.read += n;
            let max = h.read + window;
            if !h.fin_received && max - h.max_adv >= (window / 2).max(1) {
                h.max_adv = max;
                self.send(side, Event::MaxStreamData { id: key.0, max });
            }
        }
        self.consumed_conn(side, n);
    }

    fn consumed_conn(&mut self, side: usize, n: u64) {
        if n == 0 {
            return;
        }
        let s = &mut self.sides[side];
        s.conn_read += n;
        let max = s.conn_read + s.limits.conn_window;
        if max - s.conn_max_adv >= (s.limits.conn_window / 2).max(1) {
            s.conn_max_adv = max;
            self.send(side, Event::MaxData { max });
        }
    }

    /// Drops what `key` holds unread, giving its connection credit back.
    fn discard(&mut self, side: usize, key: (u64, usize)) {
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        let n: u64 = h.queue.drain(..).map(|c| c.len() as u64).sum();
        h.read += n;
        self.consumed_conn(side, n);
    }

    /// The stream is over for its receiver `side`: its uni-stream credit goes back to the peer.
    fn stream_done(&mut self, side: usize, key: (u64, usize)) {
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        if h.done {
            return;
        }
        h.done = true;
        let uni = h.uni;
        self.discard(side, key);
        if uni {
            let s = &mut self.sides[side];
            s.uni_max_adv += 1;
            let max = s.uni_max_adv;
            self.send(side, Event::MaxUniStreams { max });
        }
        self.maybe_remove(key);
    }

    fn maybe_remove(&mut self, key: (u64, usize)) {
        if self
            .halves
            .get(&key)
            .is_some_and(|h| h.done && h.send_dropped && h.recv_dropped)
        {
            self.halves.remove(&key);
        }
    }

    /// Makes a peer stream visible to `accept` on its first event.
    fn reveal(&mut self, side: usize, key: (u64, usize)) {
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        if h.visible {
            return;
        }
        h.visible = true;
        let s = &mut self.sides[side];
        if h.uni {
            s.incoming_uni.push_back(key.0);
            s.accept_uni_waiters.wake();
        } else {
            s.incoming_bi.push_back(key.0);
            s.accept_bi_waiters.wake();
        }
    }

    // ----- Events from the peer -----

    /// Applies a stream or credit event at its receiving end `side` (which is not over).
    pub(super) fn on_stream_event(&mut self, side: usize, event: Event) {
        let peer = peer_of(side);
        match event {
            // Handled by the connection (`Wire::deliver`).
            Event::Tls(_) | Event::Close { .. } => {}
            Event::Data { id, chunk } => {
                let key = (id, peer);
                self.reveal(side, key);
                let n = chunk.len() as u64;
                match self.halves.get_mut(&key) {
                    Some(h) if !h.done && !h.stopped_here => {
                        h.arrived += n;
                        h.queue.push_back(chunk);
                        wake(&mut h.recv_waker);
                    }
                    // Stopped or gone: dropped, its connection credit given back.
                    Some(h) => {
                        h.arrived += n;
                        self.consumed_conn(side, n);
                    }
                    None => self.consumed_conn(side, n),
                }
            }
            Event::Fin { id } => {
                let key = (id, peer);
                self.reveal(side, key);
                let Some(h) = self.halves.get_mut(&key) else {
                    return;
                };
                h.fin_received = true;
                wake(&mut h.recv_waker);
                if h.stopped_here {
                    self.stream_done(side, key);
                }
            }
            Event::Reset {
                id,
                code,
                final_size,
            } => {
                let key = (id, peer);
                self.reveal(side, key);
                let Some(h) = self.halves.get_mut(&key) else {
                    return;
                };
                // Bytes the sender counted but never sent (dropped by the reset) give their
                // connection credit back, as RESET_STREAM's final size does.
                let unsent = final_size.saturating_sub(h.arrived);
                h.arrived += unsent;
                let done = h.done;
                self.consumed_conn(side, unsent);
                if done {
                    return;
                }
                let Some(h) = self.halves.get_mut(&key) else {
                    return;
                };
                if !h.stopped_here {
                    h.reset_received = Some(code);
                }
                wake(&mut h.recv_waker);
                self.stream_done(side, key);
            }
            Event::Stop { id, code } => {
                let Some(h) = self.halves.get_mut(&(id, side)) else {
                    return;
                };
                if h.stopped.is_some() {
                    return;
                }
                h.stopped = Some(code);
                wake(&mut h.send_waker);
                // STOP_SENDING is answered with RESET_STREAM (RFC 9000 §3.5).
                if !h.reset && !h.acked {
                    h.reset = true;
                    let final_size = h.written;
                    self.send_reset(side, id, code, final_size);
                }
            }
            Event::MaxStreamData { id, max } => {
                if let Some(h) = self.halves.get_mut(&(id, side)) {
                    if max > h.max {
                        h.max = max;
                        wake(&mut h.send_waker);
                    }
                }
            }
            Event::MaxData { max } => {
                let s = &mut self.sides[side];
                if max > s.conn_max {
                    s.conn_max = max;
                    for (_, w) in s.conn_credit_waiters.drain() {
                        w.wake();
                    }
                }
            }
            Event::MaxUniStreams { max } => {
                let s = &mut self.sides[side];
                if max > s.uni_max {
                    s.uni_max = max;
                    s.open_uni_waiters.wake();
                }
            }
            Event::Acked { id } => {
                let key = (id, side);
                if let Some(h) = self.halves.get_mut(&key) {
                    h.acked = true;
                    wake(&mut h.send_waker);
                }
                self.maybe_remove(key);
            }
        }
    }
}
