//! What mailgate knows of the selected mailbox's message numbers: UID → sequence number,
//! learned from FETCH answers and kept right through EXPUNGE. Whatever it cannot follow (a
//! new SELECT, VANISHED, a new UIDVALIDITY) makes it forget, so a lookup is either right or
//! absent; absent only costs an upstream round trip.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct UidMap {
    by_uid: BTreeMap<u32, u32>,
}

/// More than this many known messages are not tracked (memory stays bounded).
const MAX_TRACKED: usize = 1 << 20;

impl UidMap {
    pub fn learn(&mut self, seq: u32, uid: u32) {
        if self.by_uid.len() < MAX_TRACKED || self.by_uid.contains_key(&uid) {
            self.by_uid.insert(uid, seq);
        }
    }

    pub fn seq(&self, uid: u32) -> Option<u32> {
        self.by_uid.get(&uid).copied()
    }

    /// `* seq EXPUNGE`: that message goes, the later ones move down by one.
    pub fn expunge(&mut self, seq: u32) {
        self.by_uid.retain(|_, s| *s != seq);
        for s in self.by_uid.values_mut() {
            if *s > seq {
                *s -= 1;
            }
        }
    }

    pub fn forget(&mut self) {
        self.by_uid.clear();
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
    }
}
