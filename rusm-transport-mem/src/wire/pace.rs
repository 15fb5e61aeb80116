//! The link's rate: stream data leaves at most at the link's rate (bytes per second, one
//! direction), shared fairly by the streams that have data waiting — round-robin, in slices of at
//! most [`SLICE`] bytes — so a large message takes time to cross and never holds a small one
//! behind it, as on QUIC, whose packets interleave streams.
//!
//! A slice goes out the moment the link is free (it arrives after the link's latency, as any
//! event), then keeps the link busy for its size divided by the rate. A small message on an idle
//! link therefore crosses at once; only bulk transfers are paced. Control events (TLS records,
//! credit, stops, acknowledgements, the close) are not paced. While the link is cut nothing
//! leaves; when the rate is lifted (`None`), what waits leaves at once, in turn order.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::{Event, Wire, CLIENT, SERVER};
use crate::network::LinkState;

/// The largest piece of a chunk sent in one go.
pub(super) const SLICE: usize = 64 << 10;

/// How far a paced link may catch up on the time its driver overslept (timers are coarse).
const CATCH_UP: Duration = Duration::from_millis(2);

/// Stream events waiting for the link, one direction.
#[derive(Default)]
pub(super) struct Pacer {
    /// Streams with events waiting, in turn order.
    turns: VecDeque<u64>,
    /// What waits, by stream, in order (data, end of stream, reset).
    waiting: HashMap<u64, VecDeque<Event>>,
    /// When the link is free again.
    free_at: Option<Instant>,
}

impl Pacer {
    pub(super) fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// Whether stream `id` has events waiting (its later ones must wait behind them).
    pub(super) fn holds(&self, id: u64) -> bool {
        self.waiting.contains_key(&id)
    }

    pub(super) fn push(&mut self, id: u64, event: Event) {
        let q = self.waiting.entry(id).or_default();
        if q.is_empty() {
            self.turns.push_back(id);
        }
        q.push_back(event);
    }

    /// Forgets what stream `id` still had to send (it was reset or stopped).
    pub(super) fn purge(&mut self, id: u64) {
        if self.waiting.remove(&id).is_some() {
            self.turns.retain(|t| *t != id);
        }
    }

    pub(super) fn clear(&mut self) {
        *self = Pacer::default();
    }

    /// When the next slice may leave, if anything waits.
    pub(super) fn next_at(&self, now: Instant) -> Option<Instant> {
        if self.is_empty() {
            return None;
        }
        Some(self.free_at.map_or(now, |t| t.max(now)))
    }

    /// The next event to send, data cut to at most `max` bytes; the stream's turn passes.
    fn next_slice(&mut self, max: usize) -> Option<Event> {
        let id = self.turns.pop_front()?;
        let q = self.waiting.get_mut(&id)?;
        let mut event = q.pop_front()?;
        if let Event::Data { chunk, .. } = &mut event {
            if chunk.len() > max {
                let rest = chunk.split_off(max);
                q.push_front(Event::Data { id, chunk: rest });
            }
        }
        if q.is_empty() {
            self.waiting.remove(&id);
        } else {
            self.turns.push_back(id);
        }
        Some(event)
    }
}

impl Wire {
    /// Sends what the link's rate allows now, in both directions.
    pub(super) fn transmit(&mut self, state: &LinkState, now: Instant) {
        if state.cut {
            return;
        }
        for from in [CLIENT, SERVER] {
            loop {
                let pacer = &mut self.pacers[from];
                let Some(rate) = state.rate else {
                    // Unpaced: everything goes now.
                    let Some(event) = pacer.next_slice(usize::MAX) else {
                        break;
                    };
                    self.emit(from, event, now, state.latency);
                    continue;
                };
                let start = match pacer.free_at {
                    Some(t) if t > now => break,
                    Some(t) => t.max(now.checked_sub(CATCH_UP).unwrap_or(now)),
                    None => now,
                };
                let Some(event) = pacer.next_slice(SLICE) else {
                    break;
                };
                let bytes = match &event {
                    Event::Data { chunk, .. } => chunk.len() as u64,
                    _ => 0,
                };
                let busy = bytes.saturating_mul(1_000_000_000) / rate.max(1);
                pacer.free_at = Some(start + Duration::from_nanos(busy));
                self.emit(from, event, start, state.latency);
            }
        }
    }
}
