//! The sending half of a link's per-pair numbering, sans-IO. Messages of one (sender,
//! destination) pair are numbered from 1 in the order they are handed to the link; the receiver
//! ([`crate::inbound`]) delivers them in that order, whatever order their streams arrive in.
//!
//! Both send paths use it: a default send numbers its message once its stream is open (so a
//! send cancelled while waiting for stream credit leaves no gap), a coalescing link numbers
//! under its queue's lock (so numbers follow queue order).

use std::collections::HashMap;

use crate::inbound::PairKey;
use crate::wire::Dest;

/// The last number given to each pair of one link.
#[derive(Debug, Default)]
pub struct Numbering {
    seqs: HashMap<PairKey, u64, foldhash::fast::RandomState>,
    /// The destinations each sending process has numbered pairs to.
    by_sender: HashMap<u64, Vec<Dest>, foldhash::fast::RandomState>,
}

impl Numbering {
    /// A link's numbering, with no pair numbered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Numbers the next message of pair (`from`, `to`), handing the destination back. The
    /// destination is copied only for a pair's first message.
    pub fn next(&mut self, from: Option<u64>, to: Dest) -> (u64, Dest) {
        let key = (from, to);
        if let Some(s) = self.seqs.get_mut(&key) {
            *s += 1;
            return (*s, key.1);
        }
        if let Some(id) = from {
            self.by_sender.entry(id).or_default().push(key.1.clone());
        }
        self.seqs.insert(key.clone(), 1);
        (1, key.1)
    }

    /// Process `from` exited (its id is never reused): forgets its pairs and returns each
    /// destination with the last number given, for the peer's
    /// [`Frame::Retire`](crate::wire::Frame::Retire).
    pub fn retire(&mut self, from: u64) -> Vec<(Dest, u64)> {
        let dests = self.by_sender.remove(&from).unwrap_or_default();
        dests
            .into_iter()
            .filter_map(|to| {
                let last = self.seqs.remove(&(Some(from), to.clone()))?;
                Some((to, last))
            })
            .collect()
    }

    /// How many pairs have been numbered.
    pub fn pairs(&self) -> usize {
        self.seqs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pair_counts_from_one_on_its_own() {
        let mut n = Numbering::new();
        let db = || Dest::Name("db".into());
        let pid = Dest::Pid { id: 4, creation: 9 };
        assert_eq!(n.next(Some(1), db()), (1, db()));
        assert_eq!(n.next(Some(1), db()), (2, db()));
        assert_eq!(n.next(Some(2), db()).0, 1, "another sender");
        assert_eq!(n.next(Some(1), pid.clone()), (1, pid.clone()));
        assert_eq!(n.next(None, db()).0, 1, "sent from outside a process");
        assert_eq!(n.next(Some(1), db()).0, 3);
        assert_eq!(n.pairs(), 4);
        // Process 1 exits: its two pairs end at their last numbers and are forgotten.
        let mut retired = n.retire(1);
        retired.sort();
        assert_eq!(retired, vec![(pid, 1), (db(), 3)]);
        assert_eq!(n.pairs(), 2);
        assert!(n.retire(1).is_empty());
        assert!(n.retire(99).is_empty());
    }
}
