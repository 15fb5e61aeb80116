//! Per-pair ordering, sans-IO. Each message travels on its own stream, so QUIC orders nothing
//! between messages; the sender numbers the messages of each (sender, destination) pair and this
//! buffer holds back an early one until its predecessors are delivered or known lost. Only a pair
//! ever waits on itself, never unrelated traffic.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::Hash;

/// The hasher of per-link maps keyed by what peers send: foldhash's quality variant, seeded at
/// random per map (several times faster than SipHash on these small keys, and not predictable
/// by a peer).
pub type PeerKeyHasher = foldhash::quality::RandomState;

/// What became of a message handed to [`Reorder::on_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Delivered, with this many held-back successors released behind it.
    Delivered(usize),
    /// Held back until its predecessors arrive.
    Held,
    /// Its number was already delivered or given up on (a duplicate, or a message that arrived
    /// after its gap had been released); dropped.
    Late,
}

/// Numbers less than this far ahead of the next expected one are held in a ring indexed by
/// number, so any disorder among them costs constant time per message (coalesced streams read
/// side by side hold back thousands); farther ones — only a sender far ahead, or a hostile one,
/// produces them — go to ordered maps.
const WINDOW: u64 = 1 << 14;

/// One number in the window. A held message is boxed, so an empty slot costs 16 bytes: a
/// number far ahead costs the window 16 bytes per number skipped, not a message's size.
#[derive(Debug)]
enum Slot<M> {
    Empty,
    Held(Box<M>),
    Lost,
}

#[derive(Debug)]
struct Pair<M> {
    next: u64,
    /// `window[i]` stands for number `next + i`. The front is never `Held` or `Lost` (`next`
    /// would have moved past it), and the back is never `Empty`.
    window: VecDeque<Slot<M>>,
    far_held: BTreeMap<u64, M>,
    far_lost: BTreeSet<u64>,
    /// The sender will send nothing after this number: the pair is forgotten once past it.
    last: Option<u64>,
}

impl<M> Default for Pair<M> {
    fn default() -> Self {
        Pair {
            next: 1,
            window: VecDeque::new(),
            far_held: BTreeMap::new(),
            far_lost: BTreeSet::new(),
            last: None,
        }
    }
}

impl<M> Pair<M> {
    fn is_settled(&self) -> bool {
        self.window.is_empty() && self.far_held.is_empty() && self.far_lost.is_empty()
    }

    /// Retired and past its last number: nothing more can come.
    fn is_done(&self) -> bool {
        self.last.is_some_and(|last| self.next > last) && self.is_settled()
    }

    /// Records number `seq` (at least `next`) as held or lost; `false` if it already was one
    /// of the two.
    fn put(&mut self, seq: u64, slot: Slot<M>) -> bool {
        let ahead = seq - self.next;
        if ahead < WINDOW {
            let i = ahead as usize;
            if self.window.len() <= i {
                self.window.resize_with(i + 1, || Slot::Empty);
            }
            if !matches!(self.window[i], Slot::Empty) {
                return false;
            }
            self.window[i] = slot;
            return true;
        }
        if self.far_held.contains_key(&seq) || self.far_lost.contains(&seq) {
            return false;
        }
        match slot {
            Slot::Held(m) => {
                self.far_held.insert(seq, *m);
            }
            Slot::Lost => {
                self.far_lost.insert(seq);
            }
            Slot::Empty => {}
        }
        true
    }

    /// Moves `next` past held messages (pushed onto `out`) and known losses; returns how many
    /// messages it released.
    fn advance(&mut self, out: &mut Vec<M>) -> usize {
        let mut released = 0;
        loop {
            while matches!(self.window.front(), Some(Slot::Held(_) | Slot::Lost)) {
                if let Some(Slot::Held(m)) = self.window.pop_front() {
                    out.push(*m);
                    released += 1;
                }
                self.next += 1;
            }
            // Bring far numbers the window now reaches into it.
            let reach = self.next.saturating_add(WINDOW);
            let mut pulled = false;
            while let Some(entry) = self.far_held.first_entry() {
                if *entry.key() >= reach {
                    break;
                }
                let (seq, m) = entry.remove_entry();
                pulled |= self.put(seq, Slot::Held(Box::new(m)));
            }
            while let Some(&seq) = self.far_lost.first() {
                if seq >= reach {
                    break;
                }
                self.far_lost.pop_first();
                pulled |= self.put(seq, Slot::Lost);
            }
            if !pulled || !matches!(self.window.front(), Some(Slot::Held(_) | Slot::Lost)) {
                return released;
            }
        }
    }

    /// Releases every held message in order onto `out`; returns how many numbers before them
    /// were neither seen nor known lost.
    fn drain(self, out: &mut Vec<M>) -> u64 {
        let mut missing = 0;
        let mut unseen = 0;
        let mut pos = self.next;
        for slot in self.window {
            match slot {
                Slot::Empty => unseen += 1,
                Slot::Held(m) => {
                    missing += unseen;
                    unseen = 0;
                    out.push(*m);
                }
                Slot::Lost => {}
            }
            pos += 1;
        }
        for (seq, m) in self.far_held {
            let lost = self.far_lost.range(pos..seq).count() as u64;
            missing += unseen + (seq - pos) - lost;
            unseen = 0;
            out.push(m);
            pos = seq + 1;
        }
        missing
    }
}

/// The reorder buffer of one link. `K` names a pair, `M` is a message.
#[derive(Debug)]
pub struct Reorder<K, M> {
    pairs: HashMap<K, Pair<M>, PeerKeyHasher>,
    held: usize,
}

impl<K: Hash + Eq + Clone, M> Default for Reorder<K, M> {
    fn default() -> Self {
        Reorder {
            pairs: HashMap::default(),
            held: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, M> Reorder<K, M> {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many messages are held back.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The pair's state (the key is copied only for a pair's first message).
    fn pair(&mut self, key: &K) -> &mut Pair<M> {
        if !self.pairs.contains_key(key) {
            self.pairs.insert(key.clone(), Pair::default());
        }
        self.pairs.get_mut(key).expect("inserted above")
    }

    /// Message number `seq` (from 1) of pair `key` arrived: pushes onto `out` whatever can now be
    /// delivered, in order.
    pub fn on_message(&mut self, key: &K, seq: u64, msg: M, out: &mut Vec<M>) -> Placed {
        if seq == u64::MAX {
            // No sender gets this far; refusing it keeps every `seq + 1` below safe.
            return Placed::Late;
        }
        let pair = self.pair(key);
        if seq < pair.next {
            return Placed::Late;
        }
        if seq == pair.next && pair.is_settled() {
            // In order with nothing waiting: the common case.
            out.push(msg);
            pair.next += 1;
            if pair.last.is_some() {
                self.forget_if_done(key);
            }
            return Placed::Delivered(0);
        }
        if !pair.put(seq, Slot::Held(Box::new(msg))) {
            return Placed::Late;
        }
        let first = seq == pair.next;
        let released = pair.advance(out);
        self.held = self.held + 1 - released;
        self.forget_if_done(key);
        if first {
            Placed::Delivered(released - 1)
        } else {
            Placed::Held
        }
    }

    /// Message number `seq` of pair `key` is known lost (refused as too large, truncated): stops
    /// waiting for it and pushes what it held back onto `out`. Returns whether this was news:
    /// `false` when the message was already delivered, held, or known lost.
    pub fn on_lost(&mut self, key: &K, seq: u64, out: &mut Vec<M>) -> bool {
        if seq == u64::MAX {
            return false;
        }
        let pair = self.pair(key);
        if seq < pair.next || !pair.put(seq, Slot::Lost) {
            return false;
        }
        let released = pair.advance(out);
        self.held -= released;
        self.forget_if_done(key);
        true
    }

    /// The sender of pair `key` will send nothing after number `last` (its process exited): the
    /// pair's state is dropped once every number up to `last` was delivered or given up, now
    /// or when the last of them comes. Returns whether it was dropped now.
    pub fn retire(&mut self, key: &K, last: u64) -> bool {
        // A pair not seen yet is created, so its messages still in flight are kept in order.
        self.pair(key).last = Some(last);
        self.forget_if_done(key)
    }

    fn forget_if_done(&mut self, key: &K) -> bool {
        if self.pairs.get(key).is_some_and(Pair::is_done) {
            self.pairs.remove(key);
            return true;
        }
        false
    }

    /// Whether pair `key` has state here.
    pub fn knows(&self, key: &K) -> bool {
        self.pairs.contains_key(key)
    }

    /// Whether `seq` is the number pair `key` waits for next (what a message that fills a gap,
    /// or one in order, carries).
    pub fn is_next(&self, key: &K, seq: u64) -> bool {
        seq == self.pairs.get(key).map_or(1, |p| p.next)
    }

    /// For a message numbered `seq` of pair `key`, in one look-up: how far ahead of the
    /// pair's next number it is, how many numbers the pair's window spans, and whether the
    /// pair waits (holds messages or knows of later losses).
    pub fn standing(&self, key: &K, seq: u64) -> (u64, u64, bool) {
        match self.pairs.get(key) {
            Some(p) => (
                seq.saturating_sub(p.next),
                p.window.len() as u64,
                !p.is_settled(),
            ),
            None => (seq.saturating_sub(1), 0, false),
        }
    }

    /// The number pair `key` waits for while it holds messages or knows of later losses;
    /// `None` when the pair is settled.
    pub fn waiting_for(&self, key: &K) -> Option<u64> {
        self.pairs
            .get(key)
            .filter(|p| !p.is_settled())
            .map(|p| p.next)
    }

    /// How many pairs this buffer knows.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
    }

    /// The link is gone: releases every held message, in order per pair, onto `out`, and returns
    /// how many messages were never seen (the gaps they waited behind).
    pub fn drain(&mut self, out: &mut Vec<M>) -> u64 {
        // Saturating: a hostile peer can leave gaps near 2^64 in several pairs.
        let missing = self
            .pairs
            .drain()
            .map(|(_, pair)| pair.drain(out))
            .fold(0u64, u64::saturating_add);
        self.held = 0;
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_arrival_order_is_delivered_in_send_order() {
        // Every permutation of 5 messages, plus interleaved pairs.
        let mut perm: Vec<u64> = (1..=5).collect();
        let mut count = 0;
        permute(&mut perm, 0, &mut |order| {
            let mut r = Reorder::new();
            let mut out = Vec::new();
            for &s in order {
                r.on_message(&"a", s, s, &mut out);
                r.on_message(&"b", 6 - s, 100 + 6 - s, &mut Vec::new());
            }
            assert_eq!(out, vec![1, 2, 3, 4, 5]);
            assert_eq!(r.held(), 0);
            count += 1;
        });
        assert_eq!(count, 120);
    }

    fn permute(v: &mut Vec<u64>, k: usize, f: &mut dyn FnMut(&[u64])) {
        if k == v.len() {
            return f(v);
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }

    #[test]
    fn a_known_loss_releases_what_waits_behind_it() {
        let mut r = Reorder::new();
        let mut out = Vec::new();
        r.on_message(&(), 1, 'a', &mut out);
        assert_eq!(r.on_message(&(), 3, 'c', &mut out), Placed::Held);
        assert_eq!(r.on_message(&(), 4, 'd', &mut out), Placed::Held);
        assert!(r.on_lost(&(), 2, &mut out));
        assert_eq!(out, vec!['a', 'c', 'd']);
        assert_eq!(r.held(), 0);
        assert_eq!(r.on_message(&(), 2, 'b', &mut out), Placed::Late);
        // Notices for what was delivered, or already known lost, are not news.
        assert!(!r.on_lost(&(), 1, &mut out));
        assert!(!r.on_lost(&(), 2, &mut out));
        assert!(!r.on_lost(&(), 4, &mut out));
        assert!(r.on_message(&(), 6, 'f', &mut out) == Placed::Held);
        assert!(!r.on_lost(&(), 6, &mut out), "a held message is not lost");
        assert!(r.on_lost(&(), 7, &mut out));
        assert!(!r.on_lost(&(), 7, &mut out));
    }

    #[test]
    fn unrelated_pairs_never_wait_on_each_other() {
        let mut r = Reorder::new();
        let mut out = Vec::new();
        assert_eq!(r.on_message(&1, 2, "1-2", &mut out), Placed::Held);
        assert_eq!(r.on_message(&2, 1, "2-1", &mut out), Placed::Delivered(0));
        assert_eq!(out, vec!["2-1"]);
    }

    #[test]
    fn drain_releases_in_order_and_counts_gaps() {
        let mut r = Reorder::new();
        let mut out = Vec::new();
        r.on_message(&(), 3, 3, &mut out);
        r.on_message(&(), 6, 6, &mut out);
        r.on_lost(&(), 5, &mut out);
        assert!(out.is_empty());
        // Missing: 1, 2 and 4 (5 is a known loss, already counted by whoever reported it).
        assert_eq!(r.drain(&mut out), 3);
        assert_eq!(out, vec![3, 6]);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn duplicates_are_late() {
        let mut r = Reorder::new();
        let mut out = Vec::new();
        r.on_message(&(), 2, 2, &mut out);
        assert_eq!(r.on_message(&(), 2, 2, &mut out), Placed::Late);
        r.on_message(&(), 1, 1, &mut out);
        assert_eq!(r.on_message(&(), 1, 1, &mut out), Placed::Late);
        assert_eq!(out, vec![1, 2]);
    }

    #[test]
    fn heavy_disorder_near_and_far_keeps_order() {
        // 60,000 numbers arriving in blocks read side by side (as coalesced streams are), some
        // blocks far ahead of the window, every 97th message lost instead of arriving.
        let n: u64 = 60_000;
        let block = 20_000;
        let mut arrivals = Vec::new();
        for i in 0..block {
            for b in (0..n / block).rev() {
                arrivals.push(b * block + i + 1);
            }
        }
        let mut r = Reorder::new();
        let mut out = Vec::new();
        for &seq in &arrivals {
            if seq % 97 == 0 {
                assert!(r.on_lost(&(), seq, &mut out));
            } else {
                assert_ne!(r.on_message(&(), seq, seq, &mut out), Placed::Late);
            }
        }
        let want: Vec<u64> = (1..=n).filter(|s| s % 97 != 0).collect();
        assert_eq!(out, want);
        assert_eq!(r.held(), 0);
        assert_eq!(r.on_message(&(), 5, 5, &mut out), Placed::Late);
    }

    #[test]
    fn a_retired_pair_is_forgotten_once_past_its_last_number() {
        let mut r = Reorder::new();
        let mut out = Vec::new();
        r.on_message(&"a", 1, 1, &mut out);
        assert!(r.retire(&"a", 1), "nothing more can come");
        assert!(!r.knows(&"a"));
        // Retired before its messages arrived: kept until they have.
        assert!(!r.retire(&"b", 3));
        r.on_message(&"b", 2, 2, &mut out);
        r.on_message(&"b", 1, 1, &mut out);
        assert!(r.knows(&"b"));
        assert!(r.on_lost(&"b", 3, &mut out));
        assert!(!r.knows(&"b"));
        assert_eq!(out, vec![1, 1, 2]);
        assert_eq!(r.pairs(), 0);
        // A retired pair with nothing sent is dropped at once.
        assert!(r.retire(&"c", 0));
        assert_eq!(r.pairs(), 0);
    }

    #[test]
    fn the_largest_number_is_refused_without_overflow() {
        let mut r = Reorder::new();
        let mut out = Vec::new();
        assert_eq!(r.on_message(&(), u64::MAX, 0, &mut out), Placed::Late);
        assert!(!r.on_lost(&(), u64::MAX, &mut out));
        assert_eq!(r.on_message(&(), u64::MAX - 1, 1, &mut out), Placed::Held);
        assert_eq!(r.drain(&mut out), u64::MAX - 2);
        assert_eq!(out, vec![1]);
        assert!(r.is_next(&(), 1));
    }

    #[test]
    fn a_number_far_ahead_is_held_and_drained_without_walking_the_gap() {
        let mut r = Reorder::new();
        let mut out = Vec::new();
        assert_eq!(r.on_message(&(), u64::MAX - 1, 1, &mut out), Placed::Held);
        assert_eq!(r.on_message(&(), 3, 3, &mut out), Placed::Held);
        assert!(r.on_lost(&(), 2, &mut out));
        assert!(r.on_lost(&(), u64::MAX - 2, &mut out));
        assert_eq!(r.on_message(&(), u64::MAX - 1, 1, &mut out), Placed::Late);
        assert!(out.is_empty());
        assert_eq!(r.held(), 2);
        // Missing: 1, then everything from 4 to MAX - 3 (MAX - 2 is a known loss).
        assert_eq!(r.drain(&mut out), 1 + (u64::MAX - 3 - 4 + 1));
        assert_eq!(out, vec![3, 1]);
    }
}
