//! Who logs in with what: the bounded reports behind `/debug/plaintext-clients` (the users
//! a TLS migration still has to reach) and `/debug/client-software` (which programs and
//! versions log in, over which TLS version: "which Outlook versions still use TLS 1.0").
//!
//! Both are this process's memory only (a fleet has one per instance), bounded, and hold
//! no secret: a canonical user name (the admin listener's token protects `/debug/*`), an
//! address prefix, and what the client said of itself in IMAP `ID` (RFC 2971), cleaned.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// What a client said of itself in IMAP `ID`: `name`, `version`, `os` (printable ASCII, at
/// most [`FIELD_CHARS`] each; the client chooses them, so they are data, never trusted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Software {
    pub name: String,
    pub version: String,
    pub os: String,
}

pub const FIELD_CHARS: usize = 64;

impl Software {
    /// From `ID`'s field/value pairs (values `None` for NIL); `None` without a name.
    pub fn from_id<'a>(pairs: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>) -> Option<Software> {
        let mut software = Software::default();
        for (field, value) in pairs {
            let Some(value) = value else { continue };
            let slot = match field.to_ascii_lowercase().as_slice() {
                b"name" => &mut software.name,
                b"version" => &mut software.version,
                b"os" => &mut software.os,
                _ => continue,
            };
            *slot = clean(value);
        }
        (!software.name.is_empty()).then_some(software)
    }
}

/// Printable ASCII only (anything else becomes `?`), at most [`FIELD_CHARS`].
fn clean(value: &[u8]) -> String {
    (value.iter().take(FIELD_CHARS))
        .map(|&b| if (b' '..=b'~').contains(&b) { b as char } else { '?' })
        .collect::<String>()
        .trim()
        .to_string()
}

/// The network a client's address is in, as support staff look it up: `/24` for IPv4,
/// `/48` for IPv6 (a customer's whole site), never the whole address.
pub fn address_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => address_prefix(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
                format!("{prefix}/48")
            }
        },
    }
}

/// One plaintext login, as the report records it.
pub struct PlaintextLogin<'a> {
    pub account: &'a str,
    pub protocol: &'static str,
    pub listener: &'a str,
    /// The verdict's label: `warn`, `exception` or `allow`.
    pub mode: &'static str,
    pub ip: IpAddr,
    pub software: Option<&'a Software>,
}

/// A row of `/debug/plaintext-clients`.
#[derive(Clone, Debug, Serialize)]
pub struct PlaintextClient {
    pub user: String,
    pub protocol: &'static str,
    pub listener: String,
    pub mode: &'static str,
    pub client: Option<Software>,
    pub address_prefix: String,
    #[serde(serialize_with = "moment")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "moment")]
    pub last_seen: SystemTime,
    pub logins: u64,
}

fn moment<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::units::rfc3339(*at))
}

/// The users who logged in without TLS, one row per user, protocol and listener; the
/// least recently seen row goes when a new one does not fit.
pub struct PlaintextClients {
    capacity: usize,
    rows: Mutex<HashMap<(String, &'static str, String), PlaintextClient>>,
}

impl PlaintextClients {
    pub fn new(capacity: usize) -> Self {
        PlaintextClients { capacity: capacity.max(1), rows: Mutex::new(HashMap::new()) }
    }

    pub fn record(&self, login: &PlaintextLogin<'_>, now: SystemTime) {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let key = (login.account.to_string(), login.protocol, login.listener.to_string());
        if !rows.contains_key(&key) && rows.len() >= self.capacity {
            // O(rows), only when full and a new user arrives: rows are users who logged in.
            let oldest = rows.iter().min_by_key(|(_, row)| row.last_seen).map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                rows.remove(&oldest);
            }
        }
        let row = rows.entry(key).or_insert_with(|| PlaintextClient {
            user: login.account.to_string(),
            protocol: login.protocol,
            listener: login.listener.to_string(),
            mode: login.mode,
            client: None,
            address_prefix: String::new(),
            first_seen: now,
            last_seen: now,
            logins: 0,
        });
        row.mode = login.mode;
        row.address_prefix = address_prefix(login.ip);
        row.last_seen = now;
        row.logins += 1;
        if let Some(software) = login.software {
            row.client = Some(software.clone());
        }
    }

    /// What a session said of itself after its login (IMAP `ID` sent after LOGIN).
    pub fn identified(&self, account: &str, protocol: &'static str, listener: &str, software: &Software) {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(row) = rows.get_mut(&(account.to_string(), protocol, listener.to_string())) {
            row.client = Some(software.clone());
        }
    }

    /// The rows, most logins first (the most recently seen first among equals).
    pub fn rows(&self) -> Vec<PlaintextClient> {
        let mut rows: Vec<_> = self.rows.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        rows.sort_by(|a, b| b.logins.cmp(&a.logins).then(b.last_seen.cmp(&a.last_seen)).then(a.user.cmp(&b.user)));
        rows
    }

    /// [`rows`](Self::rows) as CSV (RFC 4180), for the support team's spreadsheet.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "user,protocol,listener,mode,client_name,client_version,client_os,address_prefix,first_seen,last_seen,logins\r\n",
        );
        for row in self.rows() {
            let client = row.client.unwrap_or_default();
            let fields = [
                row.user,
                row.protocol.into(),
                row.listener,
                row.mode.into(),
                client.name,
                client.version,
                client.os,
                row.address_prefix,
                crate::units::rfc3339(row.first_seen),
                crate::units::rfc3339(row.last_seen),
                row.logins.to_string(),
            ];
            out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
            out.push_str("\r\n");
        }
        out
    }
}

/// A CSV field, quoted when it must be; a leading `=`, `+`, `-` or `@` (a spreadsheet
/// formula from a client-chosen ID name) is prefixed with `'`.
fn csv_field(field: &str) -> String {
    let field = match field.chars().next() {
        Some('=' | '+' | '-' | '@') => format!("'{field}"),
        _ => field.to_string(),
    };
    if field.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field
    }
}

/// A row of `/debug/client-software`.
#[derive(Clone, Debug, Serialize)]
pub struct SoftwareCount {
    pub protocol: &'static str,
    /// `None`: the client sent no `ID` (every POP3 client), or this row counts the kinds
    /// beyond the census's capacity (`name` is then `(other)`).
    pub client: Option<Software>,
    /// `TLSv1` ... `TLSv1.3`, or `none` (a login in clear text).
    pub tls: &'static str,
    pub logins: u64,
    #[serde(serialize_with = "moment")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "moment")]
    pub last_seen: SystemTime,
}

type CensusKey = (&'static str, Option<Software>, &'static str);

/// Logins counted by protocol, client software and TLS version; kinds beyond the capacity
/// are counted together under `(other)`, so that the total stays true.
pub struct SoftwareCensus {
    capacity: usize,
    rows: Mutex<HashMap<CensusKey, SoftwareCount>>,
}

impl SoftwareCensus {
    pub fn new(capacity: usize) -> Self {
        SoftwareCensus { capacity: capacity.max(1), rows: Mutex::new(HashMap::new()) }
    }

    pub fn record(
        &self,
        protocol: &'static str,
        software: Option<Software>,
        tls: Option<&'static str>,
        now: SystemTime,
    ) {
        let tls = tls.unwrap_or("none");
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (protocol, software, tls);
        if !rows.contains_key(&key) && rows.len() >= self.capacity {
            let other = Software { name: "(other)".into(), ..Software::default() };
            key = (protocol, Some(other), tls);
        }
        let row = rows.entry(key.clone()).or_insert_with(|| SoftwareCount {
            protocol,
            client: key.1,
            tls,
            logins: 0,
            first_seen: now,
            last_seen: now,
        });
        row.logins += 1;
        row.last_seen = now;
    }

    /// The rows, most logins first.
    pub fn rows(&self) -> Vec<SoftwareCount> {
        let mut rows: Vec<_> = self.rows.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        rows.sort_by(|a, b| {
            let name = |row: &SoftwareCount| row.client.as_ref().map(|c| (c.name.clone(), c.version.clone()));
            b.logins.cmp(&a.logins).then_with(|| name(a).cmp(&name(b))).then(a.tls.cmp(b.tls))
        });
        rows
    }
}

/// Both reports.
pub struct ClientReports {
    pub plaintext: PlaintextClients,
    pub census: SoftwareCensus,
}

/// A logged-in IMAP session that had not said what it is: counted in the census once, at
/// its first `ID` after login ([`identified`](Self::identified)), or without software when
/// it ends without one.
pub struct Unidentified {
    pub reports: std::sync::Arc<ClientReports>,
    pub protocol: &'static str,
    pub listener: String,
    pub account: String,
    pub tls: Option<&'static str>,
    /// The session logged in without TLS: its plaintext report row learns the software.
    pub plaintext: bool,
    /// Set once counted.
    pub counted: bool,
}

impl Unidentified {
    pub fn identified(&mut self, software: Software) {
        if self.plaintext {
            self.reports.plaintext.identified(&self.account, self.protocol, &self.listener, &software);
        }
        self.reports.census.record(self.protocol, Some(software), self.tls, SystemTime::now());
        self.counted = true;
    }
}

impl Drop for Unidentified {
    fn drop(&mut self) {
        if !self.counted {
            self.reports.census.record(self.protocol, None, self.tls, SystemTime::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn software(name: &str, version: &str) -> Software {
        Software { name: name.into(), version: version.into(), os: String::new() }
    }

    #[test]
    fn id_fields_are_cleaned_and_bounded() {
        let long = vec![b'x'; 500];
        let pairs: Vec<(&[u8], Option<&[u8]>)> = vec![
            (b"NAME", Some(b"Thunder\x01bird")),
            (b"version", Some(&long)),
            (b"os", None),
            (b"vendor", Some(b"Mozilla")),
        ];
        let found = Software::from_id(pairs).unwrap();
        assert_eq!(found.name, "Thunder?bird");
        assert_eq!(found.version.len(), FIELD_CHARS);
        assert_eq!(found.os, "");
        assert!(Software::from_id(vec![(b"version".as_slice(), Some(b"1".as_slice()))]).is_none());
    }

    #[test]
    fn prefixes_hide_the_host() {
        assert_eq!(address_prefix("192.0.2.77".parse().unwrap()), "192.0.2.0/24");
        assert_eq!(address_prefix("2001:db8:1:2::5".parse().unwrap()), "2001:db8:1::/48");
        assert_eq!(address_prefix("::ffff:198.51.100.9".parse().unwrap()), "198.51.100.0/24");
    }

    #[test]
    fn the_report_keeps_recent_users_within_its_capacity() {
        let report = PlaintextClients::new(2);
        let t = |s: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + s);
        let ip = "192.0.2.7".parse().unwrap();
        let login = |account, software| PlaintextLogin {
            account,
            protocol: "imap",
            listener: "imap",
            mode: "warn",
            ip,
            software,
        };
        let thunderbird = software("Thunderbird", "52.0");
        report.record(&login("alice", None), t(1));
        report.record(&login("bob", Some(&thunderbird)), t(2));
        report.record(&login("alice", None), t(3));
        report.identified("alice", "imap", "imap", &software("Outlook", "16.0"));
        // Full: carol pushes out bob, the least recently seen.
        report.record(&login("carol", None), t(4));
        let rows = report.rows();
        let users: Vec<_> = rows.iter().map(|r| (r.user.as_str(), r.logins)).collect();
        assert_eq!(users, [("alice", 2), ("carol", 1)]);
        assert_eq!(rows[0].client.as_ref().unwrap().name, "Outlook");
        assert_eq!(rows[0].address_prefix, "192.0.2.0/24");
        assert_eq!(crate::units::rfc3339(rows[0].first_seen), "2027-01-15T08:00:01Z");
        let csv = report.csv();
        assert!(csv.starts_with("user,protocol,"), "{csv}");
        assert!(
            csv.contains(
                "\r\nalice,imap,imap,warn,Outlook,16.0,,192.0.2.0/24,2027-01-15T08:00:01Z,2027-01-15T08:00:03Z,2\r\n"
            ),
            "{csv}"
        );
    }

    #[test]
    fn csv_fields_cannot_break_rows_or_become_formulas() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn the_census_counts_every_login_once_and_overflows_into_other() {
        let reports =
            std::sync::Arc::new(ClientReports { plaintext: PlaintextClients::new(10), census: SoftwareCensus::new(2) });
        let now = SystemTime::now();
        reports.census.record("imap", Some(software("Outlook", "16.0")), Some("TLSv1"), now);
        reports.census.record("imap", Some(software("Outlook", "16.0")), Some("TLSv1"), now);
        let note = |tls| {
            Box::new(Unidentified {
                reports: reports.clone(),
                protocol: "imap",
                listener: "imaps".into(),
                account: "bob".into(),
                tls,
                plaintext: false,
                counted: false,
            })
        };
        // One identifies itself after login (once: a second ID counts nothing), one never
        // does: each counts once.
        let mut identified = note(Some("TLSv1.3"));
        identified.identified(software("Outlook", "16.0"));
        drop(identified);
        drop(note(Some("TLSv1.3")));
        let rows = reports.census.rows();
        let seen: Vec<_> = rows.iter().map(|r| (r.client.as_ref().map(|c| c.name.as_str()), r.tls, r.logins)).collect();
        assert_eq!(
            seen,
            [(Some("Outlook"), "TLSv1", 2), (Some("(other)"), "TLSv1.3", 1), (Some("Outlook"), "TLSv1.3", 1)]
        );
        assert_eq!(rows.iter().map(|r| r.logins).sum::<u64>(), 4);
    }
}
