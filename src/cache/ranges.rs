//! A column's items in the second tier, a range of UIDs per value.
//!
//! One Redis key per message and item costs, for a header sync of 10,000 messages, 20,000
//! keyed hashes for the names, 20,000 values opened and Redis's own work per key: more
//! than Dovecot takes to answer. Items of a column (headers, sizes, structure) are small
//! and read together, so a command that stored many of one range shares the range as one
//! value: every item the column holds there, [`RANGE_UIDS`] UIDs per value. A sync then
//! reads ten values where it read twenty thousand.
//!
//! Items are immutable under one UIDVALIDITY, so any range value is true whoever wrote it
//! and whenever: two instances writing one range at once can only lose each other's extra
//! items (then read one by one, or from the upstream), never make one wrong. What a range
//! lacks, single items still carry: a command that stored few items of a range (a new
//! message) shares them one by one, and a reader asks those after the ranges.
//!
//! A range carries what the column holds when it is written, which may include items of
//! another session's command still running, that its completion may take back (an
//! `[EXPUNGEISSUED]`, see `imap::snapshot::Stored`). What such a command stores is content
//! (placeholders of expunged messages are never stored) or belongs to a message already
//! expunged, whose UID no session's message numbers hold again: no answer is composed
//! from it.

use bytes::Bytes;

use super::{ImapKey, Key, Name};

/// UIDs per range value.
pub const RANGE_UIDS: u32 = 1024;

/// A command that stored at least this many items of one column in one range shares the
/// range whole; fewer go one by one.
pub const RANGE_FROM: usize = 32;

/// The first UID of the range holding `uid`.
pub fn start(uid: u32) -> u32 {
    uid - uid % RANGE_UIDS
}

/// The key of the range value holding `key`'s item (a column item's key). Its item name
/// starts with NUL, which no FETCH item has, and its UID is the range's first.
pub fn key(key: &ImapKey) -> Key {
    Key::Imap(ImapKey {
        account: key.account.clone(),
        mailbox: key.mailbox.clone(),
        uid_validity: key.uid_validity,
        uid: start(key.uid),
        item: Name::new(&format!("\0range {}", key.item.as_str())),
        kind: key.kind,
    })
}

/// A range's items: (UID, value), in UID order.
pub type Entries = Vec<(u32, Bytes)>;

/// `entries` (UID and item, ascending) as one value: UID, length and bytes of each.
pub fn encode(entries: &[(u32, Bytes)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|(_, v)| 8 + v.len()).sum());
    for (uid, value) in entries {
        out.extend_from_slice(&uid.to_be_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// The entries of a range value starting at UID `first` (slices of `value`); `None` unless
/// it is whole: lengths within the value, UIDs ascending inside the range.
pub fn decode(value: &Bytes, first: u32) -> Option<Entries> {
    let word = |at: usize| -> Option<u32> { Some(u32::from_be_bytes(value.get(at..at + 4)?.try_into().ok()?)) };
    let end_uid = first.checked_add(RANGE_UIDS);
    let mut entries: Vec<(u32, Bytes)> = Vec::new();
    let mut at = 0;
    while at < value.len() {
        let (uid, len) = (word(at)?, word(at + 4)? as usize);
        let end = (at + 8).checked_add(len).filter(|&end| end <= value.len())?;
        let inside = uid >= first && end_uid.is_none_or(|end_uid| uid < end_uid);
        if !inside || entries.last().is_some_and(|&(last, _)| last >= uid) {
            return None;
        }
        entries.push((uid, value.slice(at + 8..end)));
        at = end;
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Account, Kind, LoginProof};

    #[test]
    fn ranges_round_trip_and_refuse_what_is_not_theirs() {
        let entries = vec![(1024, Bytes::from_static(b"RFC822.SIZE 10")), (2047, Bytes::from_static(b"RFC822.SIZE 7"))];
        let raw = Bytes::from(encode(&entries));
        assert_eq!(decode(&raw, 1024).unwrap(), entries);
        // Another range's, cut short, out of order.
        assert!(decode(&raw, 0).is_none());
        assert!(decode(&raw, 2048).is_none());
        assert!(decode(&raw.slice(..raw.len() - 1), 1024).is_none());
        let reversed = vec![entries[1].clone(), entries[0].clone()];
        assert!(decode(&Bytes::from(encode(&reversed)), 1024).is_none());
        assert_eq!(decode(&Bytes::new(), 0).unwrap(), vec![]);
    }

    #[test]
    fn a_range_key_names_the_range_and_the_item() {
        let item = |uid: u32| ImapKey {
            account: Account::new("default", "bob", &LoginProof::upstream_accepted()),
            mailbox: Name::new("INBOX"),
            uid_validity: 7,
            uid,
            item: Name::new("RFC822.SIZE"),
            kind: Kind::Structure,
        };
        assert_eq!(key(&item(1)), key(&item(1023)));
        assert_ne!(key(&item(1023)), key(&item(1024)));
        let Key::Imap(range) = key(&item(1500)) else { panic!() };
        assert_eq!((range.uid, range.item.as_str()), (1024, "\0range RFC822.SIZE"));
    }
}
