//! What mailgate knows of the selected mailbox's message numbers: UID → sequence number,
//! learned from FETCH answers and kept right through EXPUNGE. Whatever it cannot follow (a
//! new SELECT, VANISHED, a new UIDVALIDITY) makes it forget, so a lookup is either right or
//! absent; absent only costs an upstream round trip.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct UidMap {
    by_uid: BTreeMap<u32, u32>,
    /// Every message of the mailbox is known (learned from `UID SEARCH ALL`, with no new
    /// message announced since).
    complete: bool,
}

/// More than this many known messages are not tracked (memory stays bounded).
const MAX_TRACKED: usize = 1 << 20;

/// Up to this many known messages, an EXPUNGE is followed; beyond, the map is forgotten.
const FOLLOW_EXPUNGES_UP_TO: usize = 10_000;

impl UidMap {
    pub fn learn(&mut self, seq: u32, uid: u32) {
        if self.by_uid.len() < MAX_TRACKED || self.by_uid.contains_key(&uid) {
            self.by_uid.insert(uid, seq);
        }
    }

    pub fn seq(&self, uid: u32) -> Option<u32> {
        self.by_uid.get(&uid).copied()
    }

    /// `* seq EXPUNGE`: that message goes, the later ones move down by one. Following it
    /// costs a pass over the map, so a large map is dropped instead (a mass expunge would
    /// cost a pass per message; relearning costs one `UID SEARCH ALL`).
    pub fn expunge(&mut self, seq: u32) {
        if self.by_uid.len() > FOLLOW_EXPUNGES_UP_TO {
            self.forget();
            return;
        }
        self.by_uid.retain(|_, s| {
            if *s == seq {
                return false;
            }
            if *s > seq {
                *s -= 1;
            }
            true
        });
    }

    pub fn forget(&mut self) {
        self.by_uid.clear();
        self.complete = false;
    }

    /// All UIDs of the mailbox, ascending, as `UID SEARCH ALL` lists them: the n-th is
    /// message n.
    pub fn learn_all(&mut self, uids: &[u32]) {
        self.by_uid.clear();
        for (i, &uid) in uids.iter().take(MAX_TRACKED).enumerate() {
            self.by_uid.insert(uid, i as u32 + 1);
        }
        self.complete = uids.len() <= MAX_TRACKED;
    }

    /// Every message as (sequence number, UID), in order, when all are known.
    pub fn all(&self) -> Option<Vec<(u32, u32)>> {
        self.complete.then(|| self.by_uid.iter().map(|(&uid, &seq)| (seq, uid)).collect())
    }

    /// The highest UID known.
    pub fn highest(&self) -> Option<u32> {
        self.by_uid.keys().next_back().copied()
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// `* n EXISTS` may announce messages whose UIDs are not known yet.
    pub fn exists(&mut self, count: u32) {
        if count as usize != self.by_uid.len() {
            self.complete = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expunge_renumbers_the_messages_after_it() {
        let mut map = UidMap::default();
        for (seq, uid) in [(1, 10), (2, 11), (3, 15), (4, 20)] {
            map.learn(seq, uid);
        }
        map.expunge(2);
        assert_eq!((map.seq(10), map.seq(11), map.seq(15), map.seq(20)), (Some(1), None, Some(2), Some(3)));
        map.forget();
        assert_eq!(map.seq(10), None);
        map.learn_all(&[3, 5, 9]);
        assert!(map.is_complete());
        assert_eq!(map.seq(9), Some(3));
        map.exists(4);
        assert!(!map.is_complete());
    }

    #[test]
    fn a_mass_expunge_of_a_large_mailbox_stays_cheap() {
        let mut map = UidMap::default();
        let uids: Vec<u32> = (1..=50_000).collect();
        map.learn_all(&uids);
        // The first expunge drops the map (no pass per message follows): forgotten, not
        // wrong, and lookups go upstream again.
        map.expunge(1);
        assert!(!map.is_complete());
        assert_eq!(map.seq(50_000), None);
        assert_eq!(map.by_uid.len(), 0);
    }
}
