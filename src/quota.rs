//! Quota awareness (`[insight]`): what an upstream's `GETQUOTAROOT INBOX` answer says
//! (RFC 9208 §5.1, and RFC 2087 which Dovecot 2.3 announces), the `ALERT` text a nearly
//! full account is told, and the per-account memory of when it was last asked and told.
//!
//! Sans-I/O: the caller (`imap::quota`, through the relay) talks to the upstream and gives
//! the time; nothing here reads a clock or a socket, so the tests move time and feed byte
//! lines.
//!
//! The memory is this process's only, bounded ([`MAX_ACCOUNTS`]): a full book first
//! forgets the accounts whose windows have all passed (they tell nothing any more), and
//! only when every account is within a window the least recently asked sixteenth, in one
//! pass. A fleet may ask an account once per instance per window, which costs the upstream
//! one command per instance, not per login.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Accounts remembered at most (about 150 bytes each: 15 MB). More accounts asked within
/// one window than this (`quota_check_every`; alerts: `quota_alert_every`) lose their
/// windows, least recently asked first.
pub const MAX_ACCOUNTS: usize = 100_000;

/// What the `STORAGE` resource of an account's INBOX quota root says, in KiB (RFC 9208
/// §5.1: "units of 1024 octets").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub used_kib: u64,
    pub limit_kib: u64,
}

impl Usage {
    /// Used share of the limit (`1.0` = full; may exceed 1). A limit of 0 is full.
    pub fn share(self) -> f64 {
        if self.limit_kib == 0 {
            return 1.0;
        }
        self.used_kib as f64 / self.limit_kib as f64
    }
}

/// The `STORAGE` usage in `* QUOTA` lines of a `GETQUOTAROOT INBOX` answer (lines
/// without their CRLF). Several roots: the fullest counts (the one that stops delivery
/// first). `None` when no line says anything readable: garbage is no quota.
pub fn parse_answer<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Option<Usage> {
    lines.into_iter().filter_map(parse_quota_line).max_by(|a, b| a.share().total_cmp(&b.share()))
}

/// One `* QUOTA root (resource usage limit ...)` line's STORAGE, if any.
pub fn parse_quota_line(line: &[u8]) -> Option<Usage> {
    let rest = strip_prefix_ci(line, b"* QUOTA ")?;
    // The root: a quoted string (with `\"` and `\\` escapes) or an atom.
    let rest = if let Some(quoted) = rest.strip_prefix(b"\"") {
        let mut i = 0;
        loop {
            match quoted.get(i)? {
                b'\\' => i += 2,
                b'"' => break &quoted[i + 1..],
                _ => i += 1,
            }
        }
    } else {
        let end = rest.iter().position(|&b| b == b' ')?;
        &rest[end..]
    };
    let list = rest.trim_ascii_start().strip_prefix(b"(")?;
    let list = list.strip_suffix(b")")?;
    let words: Vec<&[u8]> = list.split(|&b| b == b' ').filter(|w| !w.is_empty()).collect();
    if words.len() % 3 != 0 {
        return None;
    }
    words.chunks(3).find(|triple| triple[0].eq_ignore_ascii_case(b"STORAGE")).and_then(|triple| {
        // Numbers beyond u64 are garbage, not a wrapped value. A limit of 0 is how some
        // servers say "unlimited": no quota, never "100 % full".
        Some(Usage { used_kib: number(triple[1])?, limit_kib: number(triple[2]).filter(|&l| l > 0)? })
    })
}

fn number(word: &[u8]) -> Option<u64> {
    if word.is_empty() || !word.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(word).ok()?.parse().ok()
}

fn strip_prefix_ci<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = line.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &line[prefix.len()..])
}

/// Whether a response line belongs to the quota answer (never relayed to the client).
pub fn is_quota_response(line: &[u8]) -> bool {
    let Some(rest) = strip_prefix_ci(line, b"* ") else { return false };
    let word = rest.split(|&b| b == b' ').next().unwrap_or_default();
    word.eq_ignore_ascii_case(b"QUOTA") || word.eq_ignore_ascii_case(b"QUOTAROOT")
}

/// A size as people read it: `4.7 GB`, `5 GB`, `980 MB`, one decimal below 10, none
/// above. Units of 1024 under the names people know: a quota configured as `5G` (Dovecot's
/// `quota_rule` counts in KiB, MiB, GiB) reads `5 GB`, as the customer's plan says, and as
/// Windows and Outlook show sizes.
pub fn readable(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} bytes");
    }
    let rounded = (value * 10.0).round() / 10.0;
    if rounded >= 10.0 || rounded.fract() == 0.0 {
        format!("{} {}", value.round(), UNITS[unit])
    } else {
        format!("{rounded:.1} {}", UNITS[unit])
    }
}

/// The operator's alert text with `{percent}`, `{used}`, `{limit}` filled in. One line:
/// CR and LF (which would end the response early) become spaces.
pub fn alert_text(template: &str, usage: Usage) -> String {
    let percent = (usage.share() * 100.0).floor() as u64;
    template
        .replace("{percent}", &percent.to_string())
        .replace("{used}", &readable(usage.used_kib.saturating_mul(1024)))
        .replace("{limit}", &readable(usage.limit_kib.saturating_mul(1024)))
        .replace(['\r', '\n'], " ")
}

/// The settings of one decision (from `[insight]`).
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub check_every: Duration,
    pub warn_at: f64,
    pub alert_every: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    checked: SystemTime,
    alerted: Option<SystemTime>,
    /// The latest reading and when it was recorded.
    reading: Option<(Usage, SystemTime)>,
}

/// One row of `/debug/quota`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    pub account: String,
    /// Bytes.
    pub used: u64,
    pub limit: u64,
    pub share: f64,
    /// When it was read (RFC 3339).
    pub read_at: String,
}

/// Room in a full book: the accounts whose windows have all passed go (their entries say
/// nothing: they would be asked and could be alerted anyway); if that frees nothing, the
/// least recently asked sixteenth. Either way one pass frees many, so a book that stays
/// full pays a scan per `capacity / 16` new accounts, not per account.
fn make_room(accounts: &mut HashMap<String, Entry>, capacity: usize, policy: &Policy, now: SystemTime) {
    let passed = |at: SystemTime, window: Duration| now.duration_since(at).unwrap_or(Duration::ZERO) >= window;
    accounts.retain(|_, e| {
        !(passed(e.checked, policy.check_every) && e.alerted.is_none_or(|at| passed(at, policy.alert_every)))
    });
    if accounts.len() < capacity {
        return;
    }
    let mut asked: Vec<(SystemTime, String)> = accounts.iter().map(|(k, e)| (e.checked, k.clone())).collect();
    let cut = (capacity / 16).max(1).min(asked.len() - 1);
    asked.select_nth_unstable(cut);
    for (_, account) in &asked[..cut] {
        accounts.remove(account);
    }
}

/// When each account was last asked and told, and what it said.
pub struct QuotaBook {
    accounts: Mutex<HashMap<String, Entry>>,
    capacity: usize,
}

impl Default for QuotaBook {
    fn default() -> Self {
        QuotaBook::new(MAX_ACCOUNTS)
    }
}

impl QuotaBook {
    pub fn new(capacity: usize) -> QuotaBook {
        QuotaBook { accounts: Mutex::new(HashMap::new()), capacity: capacity.max(1) }
    }

    /// Whether `account` is due to be asked at `now`; when it is, the check is noted at
    /// once, so that concurrent logins of one account ask once.
    pub fn due(&self, account: &str, policy: &Policy, now: SystemTime) -> bool {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = accounts.get_mut(account) {
            let age = now.duration_since(entry.checked).unwrap_or(Duration::ZERO);
            if age < policy.check_every {
                return false;
            }
            entry.checked = now;
            return true;
        }
        if accounts.len() >= self.capacity {
            make_room(&mut accounts, self.capacity, policy, now);
        }
        accounts.insert(account.to_string(), Entry { checked: now, alerted: None, reading: None });
        true
    }

    /// Records what the upstream said and returns whether the client is to be alerted
    /// (over `warn_at`, and not alerted within `alert_every`); an alert is noted as sent.
    pub fn record(&self, account: &str, usage: Usage, policy: &Policy, now: SystemTime) -> bool {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = accounts.entry(account.to_string()).or_insert(Entry { checked: now, alerted: None, reading: None });
        entry.reading = Some((usage, now));
        if usage.share() < policy.warn_at {
            return false;
        }
        let recent =
            entry.alerted.is_some_and(|at| now.duration_since(at).unwrap_or(Duration::ZERO) < policy.alert_every);
        if recent {
            return false;
        }
        entry.alerted = Some(now);
        true
    }

    /// The latest reading of `account`'s quota and when it was recorded (what `fullest`
    /// reports, one account at a time).
    #[cfg(test)]
    fn latest(&self, account: &str) -> Option<(Usage, SystemTime)> {
        let accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        accounts.get(account)?.reading
    }

    /// The `limit` fullest accounts read, fullest first.
    pub fn fullest(&self, limit: usize) -> Vec<Row> {
        let accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<Row> = accounts
            .iter()
            .filter_map(|(account, e)| {
                let (usage, read_at) = e.reading?;
                Some(Row {
                    account: account.clone(),
                    used: usage.used_kib.saturating_mul(1024),
                    limit: usage.limit_kib.saturating_mul(1024),
                    share: (usage.share() * 10_000.0).round() / 10_000.0,
                    read_at: crate::units::rfc3339(read_at),
                })
            })
            .collect();
        rows.sort_by(|a, b| b.share.total_cmp(&a.share).then_with(|| b.used.cmp(&a.used)));
        rows.truncate(limit);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dovecot_answer_with_quoted_empty_root_reads_storage() {
        let lines: [&[u8]; 2] = [b"* QUOTAROOT INBOX \"\"", b"* QUOTA \"\" (STORAGE 4700000 5000000)"];
        assert_eq!(parse_answer(lines), Some(Usage { used_kib: 4_700_000, limit_kib: 5_000_000 }));
    }

    #[test]
    fn atom_root_and_several_resources_take_storage() {
        let line = b"* QUOTA User (MESSAGE 10 1000 STORAGE 512 1024)";
        assert_eq!(parse_quota_line(line), Some(Usage { used_kib: 512, limit_kib: 1024 }));
        let quoted = b"* quota \"User \\\"q\\\"\" (storage 1 2 MESSAGE 3 4)";
        assert_eq!(parse_quota_line(quoted), Some(Usage { used_kib: 1, limit_kib: 2 }));
    }

    #[test]
    fn the_fullest_of_several_roots_counts() {
        let lines: [&[u8]; 3] =
            [b"* QUOTAROOT INBOX a b", b"* QUOTA a (STORAGE 10 100)", b"* QUOTA b (STORAGE 95 100)"];
        assert_eq!(parse_answer(lines), Some(Usage { used_kib: 95, limit_kib: 100 }));
    }

    #[test]
    fn garbage_and_huge_numbers_are_no_quota() {
        for line in [
            &b"* QUOTA \"\" (MESSAGE 1 2)"[..],
            b"* QUOTA \"\" (STORAGE 1)",
            b"* QUOTA \"\" (STORAGE x 2)",
            b"* QUOTA \"\" (STORAGE -1 2)",
            b"* QUOTA \"\" (STORAGE 99999999999999999999999 2)",
            b"* QUOTA \"unterminated (STORAGE 1 2)",
            b"* QUOTA \"\" STORAGE 1 2",
            b"* QUOTA",
            b"* OK fine",
            b"",
        ] {
            assert_eq!(parse_quota_line(line), None, "{}", String::from_utf8_lossy(line));
        }
        let max = b"* QUOTA \"\" (STORAGE 18446744073709551615 18446744073709551615)";
        assert_eq!(parse_quota_line(max).map(Usage::share), Some(1.0));
        assert_eq!(Usage { used_kib: 5, limit_kib: 0 }.share(), 1.0);
    }

    #[test]
    fn quota_responses_are_recognized_and_others_not() {
        assert!(is_quota_response(b"* QUOTAROOT INBOX \"\""));
        assert!(is_quota_response(b"* quota \"\" (STORAGE 1 2)"));
        assert!(!is_quota_response(b"* OK [ALERT] hello"));
        assert!(!is_quota_response(b"* QUOTAX"));
        assert!(is_quota_response(b"* QUOTAROOT"), "garbage of the answer is the answer's");
        assert!(!is_quota_response(b"A1 QUOTA x"));
    }

    #[test]
    fn sizes_read_as_people_read_them() {
        const GIB: u64 = 1 << 30;
        assert_eq!(readable(47 * GIB / 10), "4.7 GB");
        assert_eq!(readable(5 * GIB), "5 GB");
        assert_eq!(readable(980 << 20), "980 MB");
        assert_eq!(readable(12_345_678), "12 MB");
        assert_eq!(readable(1023), "1023 bytes");
        assert_eq!(readable(1_536), "1.5 KB");
        assert_eq!(readable(1_023_999), "1000 KB");
        assert_eq!(readable(u64::MAX), "16384 PB");
    }

    #[test]
    fn alert_text_fills_the_placeholders_on_one_line() {
        // Dovecot's `quota_rule = *:storage=5G`, 4.7 GiB used.
        let usage = Usage { used_kib: 47 * (1 << 20) / 10, limit_kib: 5 << 20 };
        let text = alert_text("Your mailbox is {percent} % full ({used} of {limit}).\r\nBye", usage);
        assert_eq!(text, "Your mailbox is 93 % full (4.7 GB of 5 GB).  Bye");
    }

    #[test]
    fn an_account_is_asked_once_per_window_and_alerted_once_per_alert_window() {
        let book = QuotaBook::new(10);
        let policy =
            Policy { check_every: Duration::from_secs(3600), warn_at: 0.9, alert_every: Duration::from_secs(86_400) };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let full = Usage { used_kib: 95, limit_kib: 100 };
        assert!(book.due("a@x", &policy, t0));
        assert!(!book.due("a@x", &policy, t0 + Duration::from_secs(60)));
        assert!(book.record("a@x", full, &policy, t0));
        let later = t0 + Duration::from_secs(7200);
        assert!(book.due("a@x", &policy, later));
        assert!(!book.record("a@x", full, &policy, later), "alerted within the day");
        let next_day = t0 + Duration::from_secs(90_000);
        assert!(book.record("a@x", full, &policy, next_day));
        assert!(!book.record("b@x", Usage { used_kib: 89, limit_kib: 100 }, &policy, t0), "below the share");
        let rows = book.fullest(10);
        assert_eq!(rows.iter().map(|r| r.account.as_str()).collect::<Vec<_>>(), ["a@x", "b@x"]);
        assert_eq!((rows[0].used, rows[0].limit, rows[0].share), (95 * 1024, 100 * 1024, 0.95));
        assert_eq!(book.fullest(1).len(), 1);
        assert_eq!(book.latest("a@x"), Some((full, next_day)));
        assert_eq!(book.latest("b@x").map(|(usage, _)| usage.used_kib), Some(89));
        assert_eq!(book.latest("c@x"), None);
        assert!(book.due("c@x", &policy, t0));
        assert_eq!(book.latest("c@x"), None, "asked, not read yet");
    }

    #[test]
    fn a_full_book_first_forgets_accounts_whose_windows_passed() {
        let book = QuotaBook::new(3);
        let policy =
            Policy { check_every: Duration::from_secs(3600), warn_at: 0.9, alert_every: Duration::from_secs(86_400) };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let full = Usage { used_kib: 95, limit_kib: 100 };
        assert!(book.due("alerted", &policy, t0));
        assert!(book.record("alerted", full, &policy, t0));
        assert!(book.due("quiet", &policy, t0));
        assert!(book.due("recent", &policy, t0 + Duration::from_secs(7000)));
        // Two hours on: `quiet` says nothing any more and goes; `alerted` keeps its day.
        assert!(book.due("new", &policy, t0 + Duration::from_secs(7200)));
        assert!(!book.record("alerted", full, &policy, t0 + Duration::from_secs(7300)), "still alerted today");
        assert_eq!(book.latest("quiet"), None);
        assert!(!book.due("recent", &policy, t0 + Duration::from_secs(7300)));
    }

    #[test]
    fn a_limit_of_zero_is_no_quota() {
        assert_eq!(parse_quota_line(b"* QUOTA \"\" (STORAGE 12000 0)"), None);
    }

    #[test]
    fn a_full_book_forgets_the_least_recently_asked() {
        let book = QuotaBook::new(2);
        let policy = Policy { check_every: Duration::from_secs(3600), warn_at: 0.9, alert_every: Duration::ZERO };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(book.due("a", &policy, t0));
        assert!(book.due("b", &policy, t0 + Duration::from_secs(1)));
        assert!(book.due("c", &policy, t0 + Duration::from_secs(2)));
        assert!(book.due("a", &policy, t0 + Duration::from_secs(3)), "a was forgotten");
        assert!(!book.due("c", &policy, t0 + Duration::from_secs(4)));
    }
}
