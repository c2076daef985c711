//! Sequence numbers as the client sees them while a cache job answers: a message learned in
//! phase one may be answered after the job relayed an EXPUNGE (a `UID FETCH` may bring one,
//! RFC 9051 §7.5.1), and its number must then be the one the client now uses. A VANISHED
//! names UIDs, not numbers: after one, numbers learned earlier cannot be followed and the
//! message is asked again.

#[derive(Debug, Default)]
pub struct Renumber {
    /// The expunged sequence numbers relayed to the client, in order.
    expunged: Vec<u32>,
    /// A VANISHED was relayed: numbers can no longer be followed.
    vanished: bool,
}

/// A point in the job's relayed responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(usize);

impl Renumber {
    /// Notes a relayed untagged response (`rest` is what follows `* `).
    pub fn relayed(&mut self, rest: &[u8]) {
        let rest = super::framing::strip_eol(rest);
        let mut words = rest.splitn(3, |&b| b == b' ');
        let (first, second) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
        if second.eq_ignore_ascii_case(b"EXPUNGE") {
            if let Some(seq) = std::str::from_utf8(first).ok().and_then(|s| s.parse().ok()) {
                self.expunged.push(seq);
            }
        } else if first.eq_ignore_ascii_case(b"VANISHED") && !second.eq_ignore_ascii_case(b"(EARLIER)") {
            self.vanished = true;
        }
    }

    pub fn mark(&self) -> Mark {
        Mark(self.expunged.len())
    }

    /// The number `seq` (current at `since`) has now; `None` when that message was expunged
    /// since, or when a VANISHED makes it unknowable.
    pub fn current(&self, seq: u32, since: Mark) -> Option<u32> {
        if self.vanished {
            return None;
        }
        let mut seq = seq;
        for &gone in &self.expunged[since.0..] {
            match gone.cmp(&seq) {
                std::cmp::Ordering::Less => seq -= 1,
                std::cmp::Ordering::Equal => return None,
                std::cmp::Ordering::Greater => {}
            }
        }
        Some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_the_expunges_relayed_after_them() {
        let mut r = Renumber::default();
        r.relayed(b"2 EXPUNGE\r\n");
        let mark = r.mark();
        assert_eq!(r.current(5, mark), Some(5), "an expunge before the mark is already counted");
        r.relayed(b"3 EXPUNGE\r\n");
        r.relayed(b"3 EXISTS\r\n");
        r.relayed(b"3 expunge");
        assert_eq!(r.current(5, mark), Some(3));
        assert_eq!(r.current(2, mark), Some(2));
        assert_eq!(r.current(3, mark), None, "expunged itself");
        assert_eq!(r.current(4, mark), None, "became 3, then expunged");
        r.relayed(b"VANISHED (EARLIER) 7:9");
        assert_eq!(r.current(2, mark), Some(2), "EARLIER is history, not news");
        r.relayed(b"VANISHED 12");
        assert_eq!(r.current(2, mark), None);
        assert_eq!(r.current(2, r.mark()), None, "once unknowable, the job asks again");
    }
}
