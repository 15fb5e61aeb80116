//! Per-pair ordering, sans-IO. Each message travels on its own stream, so QUIC orders nothing
//! between messages; the sender numbers the messages of each (sender, destination) pair and this
//! buffer holds back an early one until its predecessors are delivered or known lost. Only a pair
//! ever waits on itself, never unrelated traffic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

#[derive(Debug)]
struct Pair<M> {
    next: u64,
    held: BTreeMap<u64, M>,
    lost: BTreeSet<u64>,
}

impl<M> Default for Pair<M> {
    fn default() -> Self {
        Pair {
            next: 1,
            held: BTreeMap::new(),
            lost: BTreeSet::new(),
        }
    }
}

impl<M> Pair<M> {
    /// Moves `next` past delivered-in-order held messages and known losses.
    fn advance(&mut self, out: &mut Vec<M>) -> usize {
        let mut released = 0;
        loop {
            if let Some(m) = self.held.remove(&self.next) {
                out.push(m);
                released += 1;
            } else if !self.lost.remove(&self.next) {
                return released;
            }
            self.next += 1;
        }
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
        let pair = self.pair(key);
        if seq < pair.next || pair.lost.contains(&seq) || pair.held.contains_key(&seq) {
            return Placed::Late;
        }
        if seq > pair.next {
            pair.held.insert(seq, msg);
            self.held += 1;
            return Placed::Held;
        }
        out.push(msg);
        pair.next += 1;
        let released = pair.advance(out);
        self.held -= released;
        Placed::Delivered(released)
    }

    /// Message number `seq` of pair `key` is known lost (refused as too large, truncated): stops
    /// waiting for it and pushes what it held back onto `out`. Returns whether this was news:
    /// `false` when the message was already delivered, held, or known lost.
    pub fn on_lost(&mut self, key: &K, seq: u64, out: &mut Vec<M>) -> bool {
        let pair = self.pair(key);
        if seq < pair.next || pair.held.contains_key(&seq) || !pair.lost.insert(seq) {
            return false;
        }
        let released = pair.advance(out);
        self.held -= released;
        true
    }

    /// The link is gone: releases every held message, in order per pair, onto `out`, and returns
    /// how many messages were never seen (the gaps they waited behind).
    pub fn drain(&mut self, out: &mut Vec<M>) -> u64 {
        let mut missing = 0;
        for (_, mut pair) in self.pairs.drain() {
            while let Some((&seq, _)) = pair.held.first_key_value() {
                let gap = (pair.next..seq).filter(|s| !pair.lost.contains(s)).count();
                missing += gap as u64;
                pair.next = seq;
                pair.advance(out);
            }
        }
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
}
