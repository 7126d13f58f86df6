//! The waiting queue: sequences that hold no KV blocks and wait to be admitted.
//!
//! Order: *resumed* sequences (preempted, or requeued after a stage failure — they were
//! admitted once and have clients waiting mid-stream) before *fresh* ones; within each class by
//! [`Rank`]: higher priority first, then earlier arrival, then submission order. The queue also
//! keeps what the prefill window needs about fresh sequences: the earliest arrival, how many
//! there are and how many tokens they bring.
//!
//! Invariant: every queued id appears once in `order` and once in `keys`, and the fresh
//! counters equal the sums over the fresh entries.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use super::SeqId;

/// Scheduling rank of a sequence: smaller is served first and preempted last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    priority: Reverse<i32>,
    arrival: Instant,
    /// Submission counter: breaks ties between equal arrival instants.
    order: u64,
}

impl Rank {
    pub fn new(priority: i32, arrival: Instant, order: u64) -> Self {
        Self {
            priority: Reverse(priority),
            arrival,
            order,
        }
    }
}

/// Queue key: `fresh == false` (resumed) sorts first.
type Key = (bool, Rank);

#[derive(Debug, Default)]
pub struct WaitingQueue {
    order: BTreeMap<Key, SeqId>,
    /// id → (key, tokens it brings).
    keys: HashMap<SeqId, (Key, usize)>,
    fresh_arrivals: BTreeSet<(Instant, u64)>,
    fresh_tokens: usize,
}

impl WaitingQueue {
    /// Queues `id`. `fresh` is false for a sequence that was running before.
    pub fn push(&mut self, id: SeqId, rank: Rank, fresh: bool, tokens: usize) {
        if self.keys.contains_key(&id) {
            debug_assert!(false, "sequence {id} queued twice");
            self.remove(id);
        }
        let key = (fresh, rank);
        self.order.insert(key, id);
        self.keys.insert(id, (key, tokens));
        if fresh {
            self.fresh_arrivals.insert((rank.arrival, rank.order));
            self.fresh_tokens += tokens;
        }
    }

    /// Removes `id`; false if it was not queued.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let Some(((fresh, rank), tokens)) = self.keys.remove(&id) else {
            return false;
        };
        self.order.remove(&(fresh, rank));
        if fresh {
            self.fresh_arrivals.remove(&(rank.arrival, rank.order));
            self.fresh_tokens -= tokens;
        }
        true
    }

    /// Queued ids in admission order.
    pub fn ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.order.values().copied()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// True if the first in line is a resumed sequence (it does not wait for a window).
    pub fn head_is_resumed(&self) -> bool {
        self.order.keys().next().is_some_and(|(fresh, _)| !fresh)
    }

    /// Arrival of the earliest fresh sequence.
    pub fn oldest_fresh_arrival(&self) -> Option<Instant> {
        self.fresh_arrivals.first().map(|(t, _)| *t)
    }

    pub fn fresh_len(&self) -> usize {
        self.fresh_arrivals.len()
    }

    /// Tokens the fresh sequences bring (their prompts).
    pub fn fresh_tokens(&self) -> usize {
        self.fresh_tokens
    }

    #[cfg(test)]
    pub fn contains(&self, id: SeqId) -> bool {
        self.keys.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn order_is_resumed_then_priority_then_arrival() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = WaitingQueue::default();
        q.push(1, Rank::new(0, ms(0), 0), true, 10);
        q.push(2, Rank::new(5, ms(1), 1), true, 20);
        q.push(3, Rank::new(0, ms(0), 2), true, 30); // same instant as 1: submission order
        q.push(4, Rank::new(-1, ms(0), 3), false, 40); // resumed: first despite priority
        assert_eq!(q.ids().collect::<Vec<_>>(), vec![4, 2, 1, 3]);
        assert!(q.head_is_resumed());
        assert_eq!(q.fresh_len(), 3);
        assert_eq!(q.fresh_tokens(), 60);
        assert_eq!(q.oldest_fresh_arrival(), Some(ms(0)));
        assert!(q.remove(4));
        assert!(!q.remove(4));
        assert!(!q.head_is_resumed());
        assert!(q.remove(1));
        assert!(q.remove(3));
        assert_eq!(q.oldest_fresh_arrival(), Some(ms(1)));
        assert_eq!(q.fresh_tokens(), 20);
        assert_eq!(q.len(), 1);
    }
}
