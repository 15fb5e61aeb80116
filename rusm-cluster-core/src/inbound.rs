//! The receiving half of a link as a sans-IO machine: per-pair order, loss accounting, the
//! goodbye drain, and the memory a peer makes this node hold — with the typed reasons for which
//! the link must be closed when the peer does not play along.
//!
//! The runtime reads message streams and feeds what it reads in here; the machine decides what
//! is delivered, in which order, what is counted lost, when a goodbye is complete, and when the
//! link has to go. It never reads a clock: every input that needs time takes `now`, and
//! [`Inbound::poll_timeout`] says when to call [`Inbound::handle_timeout`] next.
//!
//! # Memory
//! A peer can make a node hold bytes in three places: messages delivered to mailboxes and not
//! yet read, messages held back behind a gap of their pair, and messages half received. The
//! runtime charges every message to one link budget *before* taking any of its payload (see
//! [`MessageAssembler::push_gated`](crate::wire::MessageAssembler::push_gated)), with
//! [`Inbound::assess`]; the charge travels with the message until its receiver drops it. When the
//! budget is spent the runtime stops reading, and QUIC flow control pushes back on the peer.
//!
//! Two things could then wedge the link for ever, and both close it with an [`InboundClose`]:
//! - a pair whose missing number never comes ([`InboundClose::GapTimeout`] after
//!   [`InboundConfig::gap_timeout`]): a peer that withholds message 1 and sends a million later
//!   ones fills the budget with held messages, then is cut off;
//! - a budget spent entirely on the peer's unfinished or out-of-order messages, with nothing
//!   waiting in a mailbox that a process could free ([`InboundClose::Stalled`] after
//!   [`InboundConfig::stall_timeout`]): a peer that announces thousands of large messages and
//!   never finishes them.
//!
//! A slow local process is not the peer's fault: while anything of the link waits in a mailbox,
//! a spent budget is plain backpressure and the link stays up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::order::{PeerKeyHasher, Placed, Reorder};
use crate::wire::{Dest, EnvelopeHeader, ReadError};

/// A (sender, destination) pair: messages of one pair are delivered in the order sent.
pub type PairKey = (Option<u64>, Dest);

/// What a message charges against its link's budget beyond its payload: its place in the
/// mailbox and the bookkeeping around it.
pub const MESSAGE_OVERHEAD: usize = 128;

/// What a number ahead of its pair's next one costs the reorder window per slot it adds
/// (the window spans every number from the next one to the farthest held), charged with the
/// message that grows the window.
const SLOT_COST: usize = 16;

/// The most numbers ahead a message is charged for (the reorder window's reach; farther ones
/// are kept in ordered maps and cost no slots).
const SLOT_REACH: u64 = 1 << 14;

/// Lost notices a link may hold for numbers not yet reached, beyond which the peer is cut off
/// (each costs memory until its number comes up; a sender only has as many as it has messages
/// in flight).
pub const MAX_PENDING_LOSSES: usize = 1 << 16;

/// A message as the runtime hands it in: its header and what it is charged.
pub trait InboundMessage {
    /// The message's envelope header.
    fn header(&self) -> &EnvelopeHeader;
    /// The bytes it holds of the link's budget (what [`Inbound::assess`] gave for it).
    fn charge(&self) -> usize;
}

/// The limits of the receiving half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboundConfig {
    /// How long a pair may hold messages behind a missing number before the link is closed.
    pub gap_timeout: Duration,
    /// How long the link budget may stay spent on the peer's unfinished and out-of-order
    /// messages alone (nothing in mailboxes to free it) before the link is closed.
    pub stall_timeout: Duration,
    /// How many (sender, destination) pairs a link may keep state for. A peer's pairs are
    /// forgotten as its processes exit (see [`Frame::Retire`](crate::wire::Frame::Retire)), so
    /// only the pairs of live processes count; a peer past this is cut off.
    pub max_pairs: usize,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            gap_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
            max_pairs: 1 << 18,
        }
    }
}

/// Why the receiving half wants its link closed. Each is the peer's doing (or a link so broken
/// it cannot make progress), never a local process's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InboundClose {
    /// A pair held messages behind a number that never came.
    #[error(
        "message {waiting_for} from {from:?} to {to:?} did not arrive within {after:?} \
         while later ones waited"
    )]
    GapTimeout {
        /// The pair's sending process.
        from: Option<u64>,
        /// The pair's destination.
        to: Dest,
        /// The number the pair waited for.
        waiting_for: u64,
        /// How long it waited.
        after: Duration,
    },
    /// The link budget stayed spent on the peer's unfinished and held-back messages.
    #[error(
        "link budget spent for {after:?} on the peer's unfinished ({partial_bytes} bytes) and \
         held-back ({held_bytes} bytes) messages"
    )]
    Stalled {
        /// Bytes charged to messages held back behind gaps.
        held_bytes: usize,
        /// Bytes charged to messages being received.
        partial_bytes: usize,
        /// How long nothing moved.
        after: Duration,
    },
    /// The peer keeps more pairs alive than [`InboundConfig::max_pairs`].
    #[error("more than {max} live (sender, destination) pairs")]
    TooManyPairs {
        /// [`InboundConfig::max_pairs`].
        max: usize,
    },
    /// The peer sent more lost notices for numbers not yet reached than any sender has
    /// messages in flight.
    #[error("more than {max} pending lost notices")]
    TooManyLosses {
        /// [`MAX_PENDING_LOSSES`].
        max: usize,
    },
}

/// What one input did to the counters a node keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// Messages that will never be delivered (their gap was released, their stream failed, the
    /// sender gave up on them, or they came after their number was given up).
    pub lost: u64,
    /// Messages refused as over the size limit.
    pub oversized: u64,
    /// Messages refused as malformed.
    pub malformed: u64,
}

/// The receiving half of one link (see the [module docs](self)).
#[derive(Debug)]
pub struct Inbound<M> {
    config: InboundConfig,
    reorder: Reorder<PairKey, M>,
    /// Bytes charged to held-back messages.
    held_bytes: usize,
    /// Pairs waiting on a missing number, and since when.
    gaps: HashMap<PairKey, Instant, PeerKeyHasher>,
    /// Bytes charged to messages granted credit and not yet whole.
    partial_bytes: usize,
    /// Since when the budget has been spent on the peer's messages alone.
    starved_since: Option<Instant>,
    /// Lost notices recorded for numbers not yet reached.
    pending_losses: usize,
    /// Message streams accepted, and how many of them are still being read.
    accepted: u64,
    open: usize,
    goodbye: Option<(String, u64)>,
    closed: Option<InboundClose>,
    /// Exited senders whose pairs were forgotten, kept for a gap timeout so a straggler of
    /// theirs is dropped instead of starting the pair afresh; oldest first.
    retired: VecDeque<(Instant, u64)>,
    retired_ids: HashSet<u64, PeerKeyHasher>,
}

impl<M: InboundMessage> Inbound<M> {
    /// The receiving half of a new link.
    pub fn new(config: InboundConfig) -> Self {
        Inbound {
            config,
            reorder: Reorder::new(),
            held_bytes: 0,
            gaps: HashMap::default(),
            partial_bytes: 0,
            starved_since: None,
            pending_losses: 0,
            accepted: 0,
            open: 0,
            goodbye: None,
            closed: None,
            retired: VecDeque::new(),
            retired_ids: HashSet::default(),
        }
    }

    /// What a message with this header is charged against the link budget — its payload, its
    /// bookkeeping, and the reorder slots it opens when it comes ahead of its pair's next
    /// number — and whether it fills a gap: it is the one its pair waits for while later ones
    /// are held. That one may be granted credit beyond the budget (up to the runtime's
    /// reserve): delivering it is what frees the messages held behind it.
    pub fn assess(&self, header: &EnvelopeHeader) -> (usize, bool) {
        let payload = usize::try_from(header.len).unwrap_or(usize::MAX);
        if self.gaps.is_empty() {
            // No pair waits (the common case): no gap to fill, and no window to grow but the
            // one this message may open, which the message after it pays for (charged at most
            // once per gap, since from then on a pair waits).
            return (payload.saturating_add(MESSAGE_OVERHEAD), false);
        }
        let key = (header.from, header.to.clone());
        let (ahead, window, waits) = self.reorder.standing(&key, header.seq);
        // Only the slots the window must grow by: those it spans already were paid for.
        let slots = if ahead == 0 {
            0
        } else {
            (ahead.min(SLOT_REACH) + 1).saturating_sub(window) as usize
        };
        let cost = payload.saturating_add(MESSAGE_OVERHEAD + slots * SLOT_COST);
        // Ahead 0 is the next number, or one already past (late: its cost does not matter).
        let fills_gap = ahead == 0 && waits;
        (cost, fills_gap)
    }

    /// A message stream was accepted.
    pub fn on_stream_accepted(&mut self) {
        self.accepted += 1;
        self.open += 1;
    }

    /// A message stream was read to its end (or failed; see
    /// [`on_read_error`](Self::on_read_error) for the latter).
    pub fn on_stream_closed(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    /// A message was granted `bytes` of credit and is being received.
    pub fn on_credit(&mut self, bytes: usize) {
        self.partial_bytes += bytes;
    }

    /// A message granted `bytes` of credit is whole, or its stream failed.
    pub fn on_uncredit(&mut self, bytes: usize) {
        self.partial_bytes = self.partial_bytes.saturating_sub(bytes);
    }

    /// A whole message arrived: pushes onto `out` what can now be delivered, in order.
    pub fn on_message(&mut self, now: Instant, msg: M, out: &mut Vec<M>) -> Counted {
        let h = msg.header();
        let (key, seq, charge) = ((h.from, h.to.clone()), h.seq, msg.charge());
        if self.is_forgotten(&key) {
            // A straggler of a pair already forgotten: its number was given up.
            return Counted {
                lost: 1,
                ..Counted::default()
            };
        }
        let before = out.len();
        match self.reorder.on_message(&key, seq, msg, out) {
            // In order with nothing waiting: the common case, no bookkeeping.
            // A pair not waiting stays so when its next message comes: no gap bookkeeping
            // (a pair waits exactly when it is in `gaps`).
            Placed::Delivered(0) if self.gaps.is_empty() || !self.gaps.contains_key(&key) => {
                if seq == 1 {
                    self.check_pairs();
                }
                Counted::default()
            }
            Placed::Delivered(_) => {
                let released = out[before + 1..].iter().map(|m| m.charge()).sum::<usize>();
                self.held_bytes = self.held_bytes.saturating_sub(released);
                self.track_gap(now, key);
                Counted::default()
            }
            Placed::Held => {
                self.held_bytes += charge;
                self.track_gap(now, key);
                self.check_pairs();
                Counted::default()
            }
            Placed::Late => {
                // A late number may still have made a pair (a number 0, say).
                self.check_pairs();
                Counted {
                    lost: 1,
                    ..Counted::default()
                }
            }
        }
    }

    /// A message stream ended badly: counts why, and stops waiting for its message when the
    /// header had arrived.
    pub fn on_read_error(&mut self, now: Instant, error: &ReadError, out: &mut Vec<M>) -> Counted {
        let mut counted = Counted::default();
        // A stream that failed before its header arrived says nothing of which message it was:
        // that message is counted by its sender's lost notice, or as a gap if the link goes down.
        let news = match error.header() {
            Some(h) => self.lost(now, (h.from, h.to.clone()), h.seq, out),
            None => false,
        };
        match error {
            ReadError::TooLarge { .. } => counted.oversized = 1,
            ReadError::Malformed { .. } => counted.malformed = 1,
            // A stream reset by its sender: lost, unless its lost notice was counted already.
            _ => counted.lost = u64::from(news),
        }
        counted
    }

    /// The peer says a numbered message will never come (`Lost` frame): stops waiting for it.
    /// Counted lost only if it had not arrived after all.
    pub fn on_lost_notice(
        &mut self,
        now: Instant,
        from: Option<u64>,
        to: Dest,
        seq: u64,
        out: &mut Vec<M>,
    ) -> Counted {
        let news = self.lost(now, (from, to), seq, out);
        Counted {
            lost: u64::from(news),
            ..Counted::default()
        }
    }

    fn lost(&mut self, now: Instant, key: PairKey, seq: u64, out: &mut Vec<M>) -> bool {
        if self.is_forgotten(&key) {
            // Its pair was retired and forgotten: this number was accounted for already.
            return false;
        }
        let before = out.len();
        let ahead = !self.reorder.is_next(&key, seq);
        let news = self.reorder.on_lost(&key, seq, out);
        // A notice for a pair never seen makes one: it counts against the cap too.
        self.check_pairs();
        if !news {
            return false;
        }
        if ahead {
            self.pending_losses += 1;
            if self.pending_losses > MAX_PENDING_LOSSES && self.closed.is_none() {
                self.closed = Some(InboundClose::TooManyLosses {
                    max: MAX_PENDING_LOSSES,
                });
            }
        }
        let released = out[before..].iter().map(|m| m.charge()).sum::<usize>();
        self.held_bytes = self.held_bytes.saturating_sub(released);
        self.track_gap(now, key);
        true
    }

    /// Whether `key` is a pair of an exited sender that was forgotten (a straggler of it must
    /// not start the pair afresh).
    fn is_forgotten(&self, key: &PairKey) -> bool {
        !self.retired_ids.is_empty()
            && key.0.is_some_and(|from| self.retired_ids.contains(&from))
            && !self.reorder.knows(key)
    }

    /// A pair was created: the peer is cut off past [`InboundConfig::max_pairs`].
    fn check_pairs(&mut self) {
        if self.reorder.pairs() > self.config.max_pairs && self.closed.is_none() {
            self.closed = Some(InboundClose::TooManyPairs {
                max: self.config.max_pairs,
            });
        }
    }

    /// The peer's process `from` exited (`Retire` frame): each of its pairs is forgotten once
    /// past its last number.
    pub fn on_retire(&mut self, now: Instant, from: u64, pairs: Vec<(Dest, u64)>) {
        for (to, last) in pairs {
            let key = (Some(from), to);
            self.reorder.retire(&key, last);
            self.track_gap(now, key);
        }
        if self.retired_ids.insert(from) {
            self.retired.push_back((now, from));
        }
        // A retirement naming pairs never seen makes them: they count against the cap too.
        self.check_pairs();
    }

    /// How many pairs the link keeps state for.
    pub fn pairs(&self) -> usize {
        self.reorder.pairs()
    }

    /// Keeps the pair's gap clock: started when it first waits, stopped when it settles.
    fn track_gap(&mut self, now: Instant, key: PairKey) {
        if self.reorder.waiting_for(&key).is_some() {
            self.gaps.entry(key).or_insert(now);
        } else if self.gaps.remove(&key).is_some() && self.gaps.is_empty() {
            // Pending losses are all behind us once no pair waits.
            self.pending_losses = 0;
        }
    }

    /// The peer said goodbye: it opened `streams` message streams in all.
    pub fn on_goodbye(&mut self, reason: String, streams: u64) {
        self.goodbye = Some((reason, streams));
    }

    /// Whether the peer said goodbye (the link then closes once its streams are read).
    pub fn goodbye_received(&self) -> bool {
        self.goodbye.is_some()
    }

    /// The goodbye's reason once every stream it announced has been read.
    pub fn goodbye_done(&self) -> Option<&str> {
        match &self.goodbye {
            Some((reason, streams)) if self.accepted >= *streams && self.open == 0 => Some(reason),
            _ => None,
        }
    }

    /// Tells the machine how the budget stands: whether reading waits for credit (`blocked`)
    /// and how many bytes of the budget are in use. When all of them are the peer's unfinished
    /// and held-back messages (nothing in mailboxes that a process could free), the stall clock
    /// runs.
    pub fn on_budget(&mut self, now: Instant, blocked: bool, in_use: usize) {
        let peers_own = self.held_bytes + self.partial_bytes;
        let starved = blocked && in_use <= peers_own;
        match (starved, self.starved_since) {
            (true, None) => self.starved_since = Some(now),
            (false, Some(_)) => self.starved_since = None,
            _ => {}
        }
    }

    /// Whether the stall clock runs (see [`on_budget`](Self::on_budget)): the runtime need
    /// only report the budget while reading waits for credit or while this holds.
    pub fn is_stalling(&self) -> bool {
        self.starved_since.is_some()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let gap = self
            .gaps
            .values()
            .min()
            .map(|since| *since + self.config.gap_timeout);
        let stall = self.starved_since.map(|s| s + self.config.stall_timeout);
        let retired = self
            .retired
            .front()
            .map(|(since, _)| *since + self.config.gap_timeout);
        [gap, stall, retired].into_iter().flatten().min()
    }

    /// Checks the clocks: `Some` once the link must be closed (and from then on).
    pub fn handle_timeout(&mut self, now: Instant) -> Option<&InboundClose> {
        while let Some((since, from)) = self.retired.front() {
            if now < *since + self.config.gap_timeout {
                break;
            }
            self.retired_ids.remove(from);
            self.retired.pop_front();
        }
        if self.closed.is_none() {
            if let Some(since) = self.starved_since {
                if now >= since + self.config.stall_timeout {
                    self.closed = Some(InboundClose::Stalled {
                        held_bytes: self.held_bytes,
                        partial_bytes: self.partial_bytes,
                        after: now - since,
                    });
                }
            }
        }
        if self.closed.is_none() {
            let expired = self
                .gaps
                .iter()
                .filter(|(_, since)| now >= **since + self.config.gap_timeout)
                .min_by_key(|(_, since)| **since);
            if let Some(((from, to), since)) = expired {
                let waiting_for = self
                    .reorder
                    .waiting_for(&(*from, to.clone()))
                    .unwrap_or_default();
                self.closed = Some(InboundClose::GapTimeout {
                    from: *from,
                    to: to.clone(),
                    waiting_for,
                    after: now - *since,
                });
            }
        }
        self.closed.as_ref()
    }

    /// Why the link must close, if it must (also set by too many lost notices, without a
    /// timeout).
    pub fn closed(&self) -> Option<&InboundClose> {
        self.closed.as_ref()
    }

    /// Bytes charged to messages held back behind gaps.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Bytes charged to messages being received.
    pub fn partial_bytes(&self) -> usize {
        self.partial_bytes
    }

    /// Messages held back behind gaps.
    pub fn held(&self) -> usize {
        self.reorder.held()
    }

    /// The link is gone: releases every held message, in order per pair, onto `out`, and counts
    /// the messages never seen (the gaps they waited behind) as lost.
    pub fn on_link_down(&mut self, out: &mut Vec<M>) -> Counted {
        let lost = self.reorder.drain(out);
        self.gaps.clear();
        self.held_bytes = 0;
        self.pending_losses = 0;
        Counted {
            lost,
            ..Counted::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireError;

    #[derive(Debug, PartialEq)]
    struct Msg(EnvelopeHeader);

    impl InboundMessage for Msg {
        fn header(&self) -> &EnvelopeHeader {
            &self.0
        }
        fn charge(&self) -> usize {
            self.0.len as usize + MESSAGE_OVERHEAD
        }
    }

    fn header(from: u64, seq: u64, len: u64) -> EnvelopeHeader {
        EnvelopeHeader {
            to: Dest::Name("db".into()),
            from: Some(from),
            seq,
            len,
        }
    }

    fn msg(from: u64, seq: u64) -> Msg {
        Msg(header(from, seq, 100))
    }

    fn seqs(out: &[Msg]) -> Vec<u64> {
        out.iter().map(|m| m.0.seq).collect()
    }

    fn machine() -> Inbound<Msg> {
        Inbound::new(InboundConfig {
            gap_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
            max_pairs: 100,
        })
    }

    #[test]
    fn in_order_messages_pass_straight_through() {
        let mut m = machine();
        let now = Instant::now();
        let mut out = Vec::new();
        for seq in 1..=3 {
            assert_eq!(m.on_message(now, msg(7, seq), &mut out), Counted::default());
        }
        assert_eq!(seqs(&out), [1, 2, 3]);
        assert_eq!(m.held_bytes(), 0);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn held_messages_are_charged_until_their_gap_fills() {
        let mut m = machine();
        let now = Instant::now();
        let mut out = Vec::new();
        m.on_message(now, msg(7, 2), &mut out);
        m.on_message(now, msg(7, 3), &mut out);
        assert!(out.is_empty());
        assert_eq!(m.held(), 2);
        assert_eq!(m.held_bytes(), 2 * (100 + MESSAGE_OVERHEAD));
        assert_eq!(m.poll_timeout(), Some(now + Duration::from_secs(30)));
        // The missing one is next, so it may be granted credit beyond the budget.
        assert!(m.assess(&header(7, 1, 100)).1);
        assert!(!m.assess(&header(7, 4, 100)).1);
        m.on_message(now, msg(7, 1), &mut out);
        assert_eq!(seqs(&out), [1, 2, 3]);
        assert_eq!(m.held_bytes(), 0);
        assert_eq!(m.poll_timeout(), None, "a filled gap stops its clock");
    }

    #[test]
    fn a_message_ahead_is_charged_for_the_slots_it_opens() {
        let m = machine();
        let mut m = m;
        assert_eq!(m.assess(&header(1, 1, 10)), (10 + MESSAGE_OVERHEAD, false));
        // While no pair waits, a message ahead is charged its payload alone.
        assert_eq!(m.assess(&header(1, 11, 10)), (10 + MESSAGE_OVERHEAD, false));
        // Once number 11 is held, the window spans 1..=11: numbers within it add no slots.
        m.on_message(Instant::now(), Msg(header(1, 11, 10)), &mut Vec::new());
        assert_eq!(
            m.assess(&header(2, 11, 10)).0,
            10 + MESSAGE_OVERHEAD + 11 * SLOT_COST
        );
        assert_eq!(m.assess(&header(1, 5, 10)).0, 10 + MESSAGE_OVERHEAD);
        assert_eq!(
            m.assess(&header(1, 13, 10)).0,
            10 + MESSAGE_OVERHEAD + 2 * SLOT_COST
        );
        assert_eq!(
            m.assess(&header(1, u64::MAX - 1, 10)).0,
            10 + MESSAGE_OVERHEAD + (SLOT_REACH as usize + 1 - 11) * SLOT_COST
        );
        assert_eq!(m.assess(&header(1, 1, u64::MAX)).0, usize::MAX);
    }

    #[test]
    fn a_gap_that_never_fills_closes_the_link() {
        let mut m = machine();
        let t0 = Instant::now();
        let mut out = Vec::new();
        for seq in 2..=1000 {
            m.on_message(t0, msg(7, seq), &mut out);
        }
        assert!(m.handle_timeout(t0 + Duration::from_secs(29)).is_none());
        let closed = m.handle_timeout(t0 + Duration::from_secs(30)).cloned();
        assert_eq!(
            closed,
            Some(InboundClose::GapTimeout {
                from: Some(7),
                to: Dest::Name("db".into()),
                waiting_for: 1,
                after: Duration::from_secs(30),
            })
        );
        // Unrelated pairs kept flowing meanwhile.
        let mut other = Vec::new();
        m.on_message(t0, msg(8, 1), &mut other);
        assert_eq!(seqs(&other), [1]);
        // Link down: what waited is released and the gap counted.
        let counted = m.on_link_down(&mut out);
        assert_eq!(counted.lost, 1);
        assert_eq!(out.len(), 999);
    }

    #[test]
    fn a_budget_spent_on_the_peers_own_messages_stalls_the_link() {
        let mut m = machine();
        let t0 = Instant::now();
        // Four 8 MiB messages half received, nothing in any mailbox.
        for _ in 0..4 {
            m.on_credit(8 << 20);
        }
        m.on_budget(t0, true, 32 << 20);
        assert!(m.is_stalling());
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        assert!(m.handle_timeout(t0 + Duration::from_secs(9)).is_none());
        assert!(matches!(
            m.handle_timeout(t0 + Duration::from_secs(10)),
            Some(InboundClose::Stalled {
                partial_bytes,
                held_bytes: 0,
                ..
            }) if *partial_bytes == 32 << 20
        ));
    }

    #[test]
    fn a_slow_local_reader_is_backpressure_not_a_stall() {
        let mut m = machine();
        let t0 = Instant::now();
        m.on_credit(1 << 20);
        // 16 MiB in use, of which only 1 MiB is the peer's unfinished message: the rest waits
        // in mailboxes, and a process reading it frees the budget.
        m.on_budget(t0, true, 16 << 20);
        assert_eq!(m.poll_timeout(), None);
        assert!(m.handle_timeout(t0 + Duration::from_secs(3600)).is_none());
        // Unblocked before the clock ran out: the clock starts afresh next time.
        m.on_budget(t0, true, 1 << 20);
        m.on_budget(t0 + Duration::from_secs(9), false, 0);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn lost_notices_and_failed_streams_release_the_pair_and_are_counted_once() {
        let mut m = machine();
        let now = Instant::now();
        let mut out = Vec::new();
        m.on_message(now, msg(7, 1), &mut out);
        m.on_message(now, msg(7, 3), &mut out);
        m.on_message(now, msg(7, 5), &mut out);
        let c = m.on_lost_notice(now, Some(7), Dest::Name("db".into()), 2, &mut out);
        assert_eq!(c.lost, 1);
        assert_eq!(seqs(&out), [1, 3]);
        let too_large = ReadError::TooLarge {
            header: header(7, 4, 1 << 30),
            max: 8 << 20,
        };
        assert_eq!(m.on_read_error(now, &too_large, &mut out).oversized, 1);
        assert_eq!(seqs(&out), [1, 3, 5]);
        assert_eq!(m.held_bytes(), 0);
        // A notice for something delivered is not news.
        let c = m.on_lost_notice(now, Some(7), Dest::Name("db".into()), 3, &mut out);
        assert_eq!(c, Counted::default());
        // A malformed stream without a header counts, and releases nothing.
        let malformed = ReadError::Malformed {
            header: None,
            error: WireError::Truncated { have: 1, want: 2 },
        };
        assert_eq!(m.on_read_error(now, &malformed, &mut out).malformed, 1);
        // A late duplicate is counted lost.
        assert_eq!(m.on_message(now, msg(7, 2), &mut out).lost, 1);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn a_flood_of_lost_notices_ahead_closes_the_link() {
        let mut m = machine();
        let now = Instant::now();
        let mut out = Vec::new();
        for seq in 2..=(MAX_PENDING_LOSSES as u64 + 1) {
            m.on_lost_notice(now, Some(1), Dest::Name("x".into()), seq, &mut out);
        }
        assert!(m.closed().is_none());
        m.on_lost_notice(now, Some(1), Dest::Name("x".into()), 1 << 40, &mut out);
        assert_eq!(
            m.closed(),
            Some(&InboundClose::TooManyLosses {
                max: MAX_PENDING_LOSSES
            })
        );
    }

    #[test]
    fn pairs_of_exited_processes_are_forgotten_and_live_ones_are_capped() {
        let mut m = machine();
        let t0 = Instant::now();
        let mut out = Vec::new();
        let db = || Dest::Name("db".into());
        // 1,000 short-lived processes, one message each: no state is left behind.
        for from in 0..1000 {
            m.on_message(t0, msg(from, 1), &mut out);
            m.on_retire(t0, from, vec![(db(), 1)]);
        }
        assert_eq!(out.len(), 1000);
        assert_eq!(m.pairs(), 0);
        // Retired before its messages came: kept until they have, in order.
        m.on_retire(t0, 5000, vec![(db(), 2)]);
        m.on_message(t0, msg(5000, 2), &mut out);
        m.on_message(t0, msg(5000, 1), &mut out);
        assert_eq!(seqs(&out[1000..]), [1, 2]);
        assert_eq!(m.pairs(), 0);
        // A straggler of a forgotten pair is dropped and counted, not started afresh.
        assert_eq!(m.on_message(t0, msg(7, 1), &mut out).lost, 1);
        assert_eq!(m.pairs(), 0);
        // A notice or a failed stream of a forgotten pair was accounted for already.
        let reset = ReadError::Transport {
            header: Some(header(8, 1, 100)),
            error: crate::transport::TransportError::StreamReset { code: 3 },
        };
        assert_eq!(m.on_read_error(t0, &reset, &mut out), Counted::default());
        assert_eq!(
            m.on_lost_notice(t0, Some(9), Dest::Name("db".into()), 1, &mut out),
            Counted::default()
        );
        assert_eq!(m.pairs(), 0);
        // The memory of exited senders lasts a gap timeout.
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        assert!(m.handle_timeout(t0 + Duration::from_secs(30)).is_none());
        assert_eq!(m.poll_timeout(), None);
        // Live pairs beyond the cap cut the peer off.
        for from in 0..=100 {
            m.on_message(t0, msg(10_000 + from, 1), &mut out);
        }
        assert_eq!(m.closed(), Some(&InboundClose::TooManyPairs { max: 100 }));
    }

    #[test]
    fn goodbye_completes_once_every_announced_stream_is_read() {
        let mut m = machine();
        m.on_stream_accepted();
        m.on_goodbye("shutdown".into(), 3);
        assert!(m.goodbye_received());
        assert_eq!(m.goodbye_done(), None);
        m.on_stream_closed();
        m.on_stream_accepted();
        m.on_stream_accepted();
        assert_eq!(m.goodbye_done(), None, "two streams still being read");
        m.on_stream_closed();
        m.on_stream_closed();
        assert_eq!(m.goodbye_done(), Some("shutdown"));
    }
}
