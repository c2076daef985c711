//! One account's recent activity, as support staff need it, and the mistakes it shows.
//!
//! Sans-I/O: [`History`] is plain data (serialised as JSON for Redis, so that a fleet
//! keeps one history per account); [`History::apply`] takes an [`Event`] and the time the
//! caller gives, updates the history and returns the detections that fired. Nothing here
//! reads a clock, a socket or a store, so the tests move time and feed events.
//!
//! What is kept is bounded per account whatever the account does (see the `MAX_*`
//! constants): devices aggregated, not sessions listed, so that a phone polling every five
//! minutes for a week costs one row. No message content, subject or address is kept: a
//! client is its protocol, its software (IMAP `ID`), the network its address is in
//! (`/24`, `/48`) and the listener it came through.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Devices (distinct clients) remembered per account; the least recently seen goes first.
pub const MAX_DEVICES: usize = 16;
/// Notable events (deletions, detections, plaintext logins, quota readings) per account.
pub const MAX_EVENTS: usize = 64;
/// Sessions in progress remembered per account (a login whose end was not seen: the
/// instance may have stopped).
pub const MAX_OPEN: usize = 32;
/// POP3 maildrop observations (one per POP3 session that said its `STAT`).
pub const MAX_POLLS: usize = 32;
/// Full IMAP resyncs remembered (their times, for the per-day count).
pub const MAX_RESYNCS: usize = 256;

const DAY: u64 = 86_400;

/// A client of the account, as far as mailgate can tell clients apart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// `imap` or `pop3`.
    pub protocol: String,
    /// IMAP `ID` name and version (`Thunderbird 115.3`); POP3 clients say nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<String>,
    /// The network of the client's address (`192.0.2.0/24`, `2001:db8:1::/48`).
    pub network: String,
    /// The listener the client came through.
    pub listener: String,
    /// The TLS version, `None` for a session without TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
}

impl Client {
    /// Whether two sessions are the same device: the same protocol, software and network,
    /// and for POP3 (no software to tell) the same listener.
    pub fn same_device(&self, other: &Client) -> bool {
        self.protocol == other.protocol
            && self.network == other.network
            && (self.software == other.software || self.software.is_none() || other.software.is_none())
            && (self.protocol != "pop3" || self.listener == other.listener)
    }

    /// How the client is named to support staff: `IMAP Thunderbird 115 from 192.0.2.0/24`.
    pub fn describe(&self) -> String {
        let protocol = self.protocol.to_ascii_uppercase();
        match &self.software {
            Some(software) => format!("{protocol} {software} from {}", self.network),
            None => format!("{protocol} client from {} (listener {})", self.network, self.listener),
        }
    }
}

/// What a session's end reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Bytes sent to the client.
    pub bytes: u64,
    /// Messages fetched (IMAP FETCH responses, POP3 RETRs).
    pub messages: u64,
    /// Messages deleted by this client: POP3 DELEs committed by the upstream's `+OK` to
    /// QUIT; IMAP messages expunged or moved out of INBOX by its commands.
    pub deleted: u64,
    /// Full resyncs of a large mailbox (at least 90 % of a mailbox of 1,000 messages or more).
    pub full_resyncs: u32,
    /// The POP3 maildrop as the session's first `STAT` (or listing) found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maildrop: Option<Maildrop>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maildrop {
    pub messages: u64,
    pub octets: u64,
}

/// What happened, as the relays report it.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A session logged in.
    Login { session: String, client: Client },
    /// A logged-in session said what software it is (IMAP `ID` after login).
    Identified { session: String, client: Client },
    /// A session ended (`client` as known at the end: an IMAP `ID` may have come late).
    Ended { session: String, client: Client, summary: Summary },
    /// The upstream's INBOX quota (STORAGE, in KiB).
    Quota { used_kib: u64, limit_kib: u64 },
}

/// A mistake the history shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A POP3 client deletes what it downloads while another client also reads the
    /// account: mail disappears from the other device.
    Pop3DeletesShared,
    /// A POP3 client never deletes while the maildrop keeps growing: it will fill up.
    Pop3KeepsMail,
    /// Several POP3 clients poll the account: each gets part of the mail, or duplicates.
    Pop3SeveralClients,
    /// Full resyncs of a large IMAP mailbox many times a day.
    HeavyResyncs,
    /// Logins without TLS.
    Plaintext,
    /// The mailbox is nearly full.
    QuotaNearlyFull,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Pop3DeletesShared,
        Kind::Pop3KeepsMail,
        Kind::Pop3SeveralClients,
        Kind::HeavyResyncs,
        Kind::Plaintext,
        Kind::QuotaNearlyFull,
    ];

    /// The metric label and JSON name.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Pop3DeletesShared => "pop3_deletes_shared",
            Kind::Pop3KeepsMail => "pop3_keeps_mail",
            Kind::Pop3SeveralClients => "pop3_several_clients",
            Kind::HeavyResyncs => "heavy_resyncs",
            Kind::Plaintext => "plaintext",
            Kind::QuotaNearlyFull => "quota_nearly_full",
        }
    }
}

/// When a detection fires, and how often.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    /// How long a device, a deletion or a poll counts (`[insight] window`).
    pub window: u64,
    /// How long an account's history lasts without activity (`keep_for`).
    pub keep_for: u64,
    /// POP3 sessions in a row without deletions, each finding more mail, that make a
    /// growing maildrop (`growth_polls`).
    pub growth_polls: usize,
    /// Full resyncs a day above which they are too many (`resyncs_per_day`).
    pub resyncs_per_day: usize,
    /// A detection fires again for the same account only after this (`repeat_after`).
    pub repeat_after: u64,
    /// The used share of the quota that counts as nearly full (`quota_warn_at`).
    pub quota_warn_at: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            window: DAY,
            keep_for: 7 * DAY,
            growth_polls: 3,
            resyncs_per_day: 10,
            repeat_after: DAY,
            quota_warn_at: 0.9,
        }
    }
}

/// A client's aggregate over the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub client: Client,
    pub first_seen: u64,
    pub last_seen: u64,
    pub sessions: u64,
    /// Sessions without TLS.
    #[serde(default)]
    pub plaintext_sessions: u64,
    pub bytes: u64,
    pub messages: u64,
    pub deleted: u64,
    /// When it last deleted something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_deleted: Option<u64>,
    #[serde(default)]
    pub full_resyncs: u64,
}

/// A session whose login was seen and whose end was not (yet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub session: String,
    pub client: Client,
    pub since: u64,
}

/// One POP3 session's look at the maildrop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poll {
    pub client: Client,
    pub at: u64,
    pub maildrop: Maildrop,
    pub deleted: u64,
}

/// Something support staff should see in the account's timeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notable {
    pub at: u64,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    /// A client deleted messages (POP3: committed by QUIT; IMAP: expunged or moved out of
    /// INBOX).
    Deleted { client: Client, count: u64 },
    /// A login without TLS.
    Plaintext { client: Client },
    /// A detection fired.
    Detected { detection: Kind, text: String },
}

/// The last INBOX quota reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaReading {
    pub at: u64,
    pub used_kib: u64,
    pub limit_kib: u64,
}

impl QuotaReading {
    pub fn share(&self) -> f64 {
        if self.limit_kib == 0 {
            return 1.0;
        }
        self.used_kib as f64 / self.limit_kib as f64
    }
}

/// A detection that fired: what, and the sentence for the log, the history and the view.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    pub kind: Kind,
    pub text: String,
}

/// An account's history. Every list is bounded (see the module's constants).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// When anything was last recorded.
    pub updated: u64,
    pub devices: Vec<Device>,
    pub open: Vec<Open>,
    pub polls: VecDeque<Poll>,
    pub resyncs: VecDeque<u64>,
    pub events: VecDeque<Notable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaReading>,
    /// When each detection last fired (for `repeat_after`).
    pub fired: Vec<(Kind, u64)>,
    /// Sessions whose end came before their login (with Redis, each is an update of its
    /// own, and a short session's end can overtake its login): the late login is not
    /// taken for a session still open.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub ended_early: VecDeque<String>,
}

impl History {
    /// Applies `event` at `now` (Unix seconds): the history forgets what is older than
    /// `keep_for`, learns the event, and returns the detections that fire (each also in
    /// the history's events, and remembered so that it repeats only after `repeat_after`).
    pub fn apply(&mut self, event: Event, now: u64, rules: &Rules) -> Vec<Detection> {
        self.forget_before(now.saturating_sub(rules.keep_for));
        self.updated = now;
        let mut found = Vec::new();
        match event {
            Event::Login { session, client } => {
                let index = self.device(&client, now);
                let device = &mut self.devices[index];
                device.sessions += 1;
                device.last_seen = now;
                if client.tls.is_none() {
                    device.plaintext_sessions += 1;
                    self.note(now, What::Plaintext { client: client.clone() });
                    found.push(Detection {
                        kind: Kind::Plaintext,
                        text: format!(
                            "{} logged in without TLS: its password crosses the network readable",
                            client.describe()
                        ),
                    });
                }
                self.open.retain(|o| o.session != session);
                match self.ended_early.iter().position(|s| *s == session) {
                    Some(i) => {
                        self.ended_early.remove(i);
                    }
                    None => {
                        self.open.push(Open { session, client, since: now });
                        if self.open.len() > MAX_OPEN {
                            self.open.remove(0);
                        }
                    }
                }
            }
            Event::Identified { session, client } => {
                self.device(&client, now);
                if let Some(open) = self.open.iter_mut().find(|o| o.session == session) {
                    open.client = client;
                }
            }
            Event::Ended { session, client, summary } => {
                let before = self.open.len();
                self.open.retain(|o| o.session != session);
                if self.open.len() == before {
                    self.ended_early.push_back(session);
                    while self.ended_early.len() > MAX_OPEN {
                        self.ended_early.pop_front();
                    }
                }
                let index = self.device(&client, now);
                let device = &mut self.devices[index];
                // A client that said its software only after login: the row learns it.
                if device.client.software.is_none() {
                    device.client.software = client.software.clone();
                }
                device.last_seen = now;
                device.bytes += summary.bytes;
                device.messages += summary.messages;
                device.deleted += summary.deleted;
                device.full_resyncs += u64::from(summary.full_resyncs);
                if summary.deleted > 0 {
                    device.last_deleted = Some(now);
                    self.note(now, What::Deleted { client: client.clone(), count: summary.deleted });
                }
                for _ in 0..summary.full_resyncs {
                    self.resyncs.push_back(now);
                }
                while self.resyncs.len() > MAX_RESYNCS {
                    self.resyncs.pop_front();
                }
                if let (Some(maildrop), "pop3") = (summary.maildrop, client.protocol.as_str()) {
                    self.polls.push_back(Poll { client: client.clone(), at: now, maildrop, deleted: summary.deleted });
                    while self.polls.len() > MAX_POLLS {
                        self.polls.pop_front();
                    }
                }
            }
            Event::Quota { used_kib, limit_kib } => {
                self.quota = Some(QuotaReading { at: now, used_kib, limit_kib });
            }
        }
        found.extend(self.pop3_deletes_shared(now, rules));
        found.extend(self.pop3_keeps_mail(now, rules));
        found.extend(self.pop3_several_clients(now, rules));
        found.extend(self.heavy_resyncs(now, rules));
        found.extend(self.quota_nearly_full(rules));
        found.retain(|d| self.due(d.kind, now, rules));
        for detection in &found {
            self.fired.retain(|(kind, _)| *kind != detection.kind);
            self.fired.push((detection.kind, now));
            self.note(now, What::Detected { detection: detection.kind, text: detection.text.clone() });
        }
        found
    }

    /// The index of `client`'s device row, made (and the least recently seen dropped) when new.
    fn device(&mut self, client: &Client, now: u64) -> usize {
        if let Some(i) = self.devices.iter().position(|d| d.client.same_device(client)) {
            let device = &mut self.devices[i];
            device.client.tls = client.tls.clone();
            if client.software.is_some() {
                device.client.software = client.software.clone();
            }
            return i;
        }
        if self.devices.len() >= MAX_DEVICES {
            let oldest = (0..self.devices.len()).min_by_key(|&i| self.devices[i].last_seen).unwrap_or(0);
            self.devices.remove(oldest);
        }
        self.devices.push(Device {
            client: client.clone(),
            first_seen: now,
            last_seen: now,
            sessions: 0,
            plaintext_sessions: 0,
            bytes: 0,
            messages: 0,
            deleted: 0,
            last_deleted: None,
            full_resyncs: 0,
        });
        self.devices.len() - 1
    }

    fn note(&mut self, at: u64, what: What) {
        self.events.push_back(Notable { at, what });
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Forgets what happened before `cutoff`.
    fn forget_before(&mut self, cutoff: u64) {
        self.devices.retain(|d| d.last_seen >= cutoff);
        self.open.retain(|o| o.since >= cutoff);
        self.polls.retain(|p| p.at >= cutoff);
        self.resyncs.retain(|&at| at >= cutoff);
        self.events.retain(|e| e.at >= cutoff);
        self.fired.retain(|&(_, at)| at >= cutoff);
    }

    fn due(&self, kind: Kind, now: u64, rules: &Rules) -> bool {
        !self.fired.iter().any(|&(k, at)| k == kind && now < at.saturating_add(rules.repeat_after))
    }

    /// Devices used within the window: seen, or with a session still open.
    fn active(&self, now: u64, rules: &Rules) -> impl Iterator<Item = &Client> {
        let since = now.saturating_sub(rules.window);
        let seen = self.devices.iter().filter(move |d| d.last_seen >= since).map(|d| &d.client);
        seen.chain(self.open.iter().map(|o| &o.client))
    }

    fn pop3_deletes_shared(&self, now: u64, rules: &Rules) -> Option<Detection> {
        let since = now.saturating_sub(rules.window);
        let deleting = self
            .devices
            .iter()
            .filter(|d| d.client.protocol == "pop3" && d.last_deleted.is_some_and(|at| at >= since))
            .max_by_key(|d| d.last_deleted)?;
        let other = self.active(now, rules).find(|c| !c.same_device(&deleting.client))?;
        Some(Detection {
            kind: Kind::Pop3DeletesShared,
            text: format!(
                "{} deletes the mail it downloads ({} messages so far) while {} also uses the account: \
                 mail disappears from the other device",
                deleting.client.describe(),
                deleting.deleted,
                other.describe()
            ),
        })
    }

    fn pop3_keeps_mail(&self, now: u64, rules: &Rules) -> Option<Detection> {
        let since = now.saturating_sub(rules.window.max(rules.keep_for));
        let last = self.polls.back().filter(|p| p.at >= since)?;
        let polls: Vec<&Poll> = self.polls.iter().filter(|p| p.client.same_device(&last.client)).collect();
        let recent = &polls[polls.len().saturating_sub(rules.growth_polls.max(2))..];
        let growing = recent.len() >= rules.growth_polls.max(2)
            && recent.iter().all(|p| p.deleted == 0)
            && recent.windows(2).all(|w| w[1].maildrop.messages >= w[0].maildrop.messages)
            && recent.last()?.maildrop.messages > recent.first()?.maildrop.messages;
        growing.then(|| {
            let (first, last) = (recent[0].maildrop, recent[recent.len() - 1].maildrop);
            Detection {
                kind: Kind::Pop3KeepsMail,
                text: format!(
                    "{} leaves all mail on the server and the mailbox keeps growing ({} to {} messages, {} to {} \
                     octets over {} polls): it will reach its quota",
                    last_client(&polls),
                    first.messages,
                    last.messages,
                    first.octets,
                    last.octets,
                    recent.len()
                ),
            }
        })
    }

    fn pop3_several_clients(&self, now: u64, rules: &Rules) -> Option<Detection> {
        let mut clients: Vec<&Client> = Vec::new();
        for client in self.active(now, rules).filter(|c| c.protocol == "pop3") {
            if !clients.iter().any(|c| c.same_device(client)) {
                clients.push(client);
            }
        }
        (clients.len() >= 2).then(|| Detection {
            kind: Kind::Pop3SeveralClients,
            text: format!(
                "{} POP3 clients poll the account ({}): each downloads what the others have not deleted yet, \
                 so mail is split between them or duplicated",
                clients.len(),
                clients.iter().map(|c| c.describe()).collect::<Vec<_>>().join("; ")
            ),
        })
    }

    fn heavy_resyncs(&self, now: u64, rules: &Rules) -> Option<Detection> {
        let day = self.resyncs.iter().filter(|&&at| at >= now.saturating_sub(DAY)).count();
        (day > rules.resyncs_per_day).then(|| Detection {
            kind: Kind::HeavyResyncs,
            text: format!(
                "{day} full resyncs of a large IMAP mailbox in the last 24 hours (more than {}): a client that \
                 keeps no local cache, or several devices; archiving old mail makes each one lighter",
                rules.resyncs_per_day
            ),
        })
    }

    fn quota_nearly_full(&self, rules: &Rules) -> Option<Detection> {
        let quota = self.quota.filter(|q| q.share() >= rules.quota_warn_at)?;
        Some(Detection {
            kind: Kind::QuotaNearlyFull,
            text: format!(
                "the mailbox is {:.0} % full ({} of {} KiB): new mail bounces once it is full",
                quota.share() * 100.0,
                quota.used_kib,
                quota.limit_kib
            ),
        })
    }

    /// The bytes this history takes in memory (for the memory tier's bound), as the
    /// allocator hands them out: every list by its capacity (not its length) times the
    /// size of its element, every string by its capacity, and each allocation's
    /// bookkeeping (glibc: 16 bytes, 32 at least). Checked against the process's resident
    /// memory in `insight::tests`: the former estimate, without the elements' sizes and
    /// spare capacity, weighed about a third of what a history takes.
    pub fn weight(&self) -> u32 {
        use std::mem::size_of;
        fn allocation(bytes: usize) -> usize {
            match bytes {
                0 => 0,
                n => (n + 8).next_multiple_of(16).max(32),
            }
        }
        fn string(s: &str, capacity: usize) -> usize {
            allocation(capacity.max(s.len()))
        }
        fn optional(s: &Option<String>) -> usize {
            s.as_ref().map_or(0, |s| string(s, s.capacity()))
        }
        fn client(c: &Client) -> usize {
            string(&c.protocol, c.protocol.capacity())
                + optional(&c.software)
                + string(&c.network, c.network.capacity())
                + string(&c.listener, c.listener.capacity())
                + optional(&c.tls)
        }
        let devices = allocation(self.devices.capacity() * size_of::<Device>())
            + self.devices.iter().map(|d| client(&d.client)).sum::<usize>();
        let open = allocation(self.open.capacity() * size_of::<Open>())
            + (self.open.iter()).map(|o| string(&o.session, o.session.capacity()) + client(&o.client)).sum::<usize>();
        let polls = allocation(self.polls.capacity() * size_of::<Poll>())
            + self.polls.iter().map(|p| client(&p.client)).sum::<usize>();
        let events = allocation(self.events.capacity() * size_of::<Notable>())
            + (self.events.iter())
                .map(|e| match &e.what {
                    What::Deleted { client: c, .. } | What::Plaintext { client: c } => client(c),
                    What::Detected { text, .. } => string(text, text.capacity()),
                })
                .sum::<usize>();
        let lists = allocation(self.resyncs.capacity() * size_of::<u64>())
            + allocation(self.fired.capacity() * size_of::<(Kind, u64)>())
            + allocation(self.ended_early.capacity() * size_of::<String>())
            + self.ended_early.iter().map(|s| string(s, s.capacity())).sum::<usize>();
        // The history itself, behind its Arc and Mutex.
        let own = allocation(size_of::<History>() + 32);
        (own + devices + open + polls + events + lists).min(u32::MAX as usize) as u32
    }
}

fn last_client(polls: &[&Poll]) -> String {
    polls.last().map(|p| p.client.describe()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pop3(network: &str) -> Client {
        Client {
            protocol: "pop3".into(),
            software: None,
            network: network.into(),
            listener: "pop3s".into(),
            tls: Some("TLSv1.3".into()),
        }
    }

    fn imap(software: Option<&str>, network: &str) -> Client {
        Client {
            protocol: "imap".into(),
            software: software.map(Into::into),
            network: network.into(),
            listener: "imaps".into(),
            tls: Some("TLSv1.3".into()),
        }
    }

    fn session(history: &mut History, id: &str, client: &Client, summary: Summary, at: u64) -> Vec<Detection> {
        let rules = Rules::default();
        let mut found = history.apply(Event::Login { session: id.into(), client: client.clone() }, at, &rules);
        found.extend(history.apply(
            Event::Ended { session: id.into(), client: client.clone(), summary },
            at + 10,
            &rules,
        ));
        found
    }

    fn kinds(found: &[Detection]) -> Vec<Kind> {
        found.iter().map(|d| d.kind).collect()
    }

    #[test]
    fn a_pop3_client_deleting_while_an_imap_client_reads_fires_once_a_day() {
        let mut history = History::default();
        let t = 1_000_000;
        let phone = imap(Some("K-9 Mail 6.7"), "::/48");
        assert!(session(&mut history, "a", &phone, Summary::default(), t).is_empty());
        let deleting =
            Summary { deleted: 3, maildrop: Some(Maildrop { messages: 3, octets: 900 }), ..Default::default() };
        let found = session(&mut history, "b", &pop3("127.0.0.0/24"), deleting.clone(), t + 100);
        assert_eq!(kinds(&found), [Kind::Pop3DeletesShared]);
        assert!(found[0].text.contains("K-9 Mail 6.7") && found[0].text.contains("3 messages"), "{}", found[0].text);
        // The next poll the same day: already told.
        assert!(session(&mut history, "c", &pop3("127.0.0.0/24"), deleting.clone(), t + 200).is_empty());
        // A day later, the phone is still in use: again.
        let later = t + DAY + 300;
        session(&mut history, "d", &phone, Summary::default(), later);
        let found = session(&mut history, "e", &pop3("127.0.0.0/24"), deleting, later + 10);
        assert_eq!(kinds(&found), [Kind::Pop3DeletesShared]);
        let deleted: Vec<_> = history.events.iter().filter(|e| matches!(e.what, What::Deleted { .. })).collect();
        assert_eq!(deleted.len(), 3);
    }

    #[test]
    fn a_pop3_client_alone_deleting_is_no_mistake() {
        let mut history = History::default();
        for (i, at) in [0u64, 600, 1200].into_iter().enumerate() {
            let summary =
                Summary { deleted: 2, maildrop: Some(Maildrop { messages: 2, octets: 10 }), ..Default::default() };
            assert!(session(&mut history, &i.to_string(), &pop3("10.0.0.0/24"), summary, 5_000 + at).is_empty());
        }
        assert_eq!(history.devices.len(), 1);
        assert_eq!((history.devices[0].sessions, history.devices[0].deleted), (3, 6));
    }

    #[test]
    fn an_imap_login_after_pop3_deletions_fires_too() {
        let mut history = History::default();
        let deleting = Summary { deleted: 1, ..Default::default() };
        assert!(session(&mut history, "a", &pop3("10.0.0.0/24"), deleting, 100).is_empty());
        let rules = Rules::default();
        let found = history.apply(Event::Login { session: "b".into(), client: imap(None, "::/48") }, 4000, &rules);
        assert_eq!(kinds(&found), [Kind::Pop3DeletesShared]);
    }

    #[test]
    fn a_growing_maildrop_never_emptied_fires_after_the_configured_polls() {
        let mut history = History::default();
        let poll =
            |messages| Summary { maildrop: Some(Maildrop { messages, octets: messages * 1000 }), ..Default::default() };
        assert!(session(&mut history, "1", &pop3("10.0.0.0/24"), poll(5), 0).is_empty());
        assert!(session(&mut history, "2", &pop3("10.0.0.0/24"), poll(7), 600).is_empty());
        let found = session(&mut history, "3", &pop3("10.0.0.0/24"), poll(9), 1200);
        assert_eq!(kinds(&found), [Kind::Pop3KeepsMail]);
        assert!(found[0].text.contains("5 to 9 messages"), "{}", found[0].text);
    }

    #[test]
    fn a_maildrop_that_does_not_grow_or_is_emptied_is_fine() {
        let mut history = History::default();
        let poll = |messages, deleted| Summary {
            maildrop: Some(Maildrop { messages, octets: messages }),
            deleted,
            ..Default::default()
        };
        for (i, (messages, deleted)) in [(5, 0), (5, 0), (5, 0), (6, 6), (2, 0), (3, 0)].into_iter().enumerate() {
            let found =
                session(&mut history, &i.to_string(), &pop3("10.0.0.0/24"), poll(messages, deleted), i as u64 * 600);
            assert!(!kinds(&found).contains(&Kind::Pop3KeepsMail), "poll {i}");
        }
    }

    #[test]
    fn two_pop3_clients_on_different_networks_or_listeners_are_several() {
        let mut history = History::default();
        assert!(session(&mut history, "1", &pop3("10.0.0.0/24"), Summary::default(), 0).is_empty());
        let found = session(&mut history, "2", &pop3("::/48"), Summary::default(), 100);
        assert_eq!(kinds(&found), [Kind::Pop3SeveralClients]);
        // Two days later, only one of them is still active: nothing new.
        let found = session(&mut history, "3", &pop3("::/48"), Summary::default(), 3 * DAY);
        assert!(found.is_empty());
    }

    #[test]
    fn full_resyncs_beyond_the_daily_count_fire() {
        let mut history = History::default();
        let client = imap(Some("Outlook 16"), "10.0.0.0/24");
        let heavy = Summary { full_resyncs: 1, messages: 20_000, ..Default::default() };
        for i in 0..10 {
            assert!(session(&mut history, &i.to_string(), &client, heavy.clone(), i * 1000).is_empty());
        }
        let found = session(&mut history, "x", &client, heavy, 10_500);
        assert_eq!(kinds(&found), [Kind::HeavyResyncs]);
        assert_eq!(history.devices[0].full_resyncs, 11);
    }

    #[test]
    fn plaintext_logins_and_a_full_quota_fire() {
        let mut history = History::default();
        let rules = Rules::default();
        let mut client = pop3("10.0.0.0/24");
        client.tls = None;
        let found = history.apply(Event::Login { session: "1".into(), client }, 10, &rules);
        assert_eq!(kinds(&found), [Kind::Plaintext]);
        assert_eq!(history.devices[0].plaintext_sessions, 1);
        assert!(history.apply(Event::Quota { used_kib: 80, limit_kib: 100 }, 20, &rules).is_empty());
        let found = history.apply(Event::Quota { used_kib: 95, limit_kib: 100 }, 30, &rules);
        assert_eq!(kinds(&found), [Kind::QuotaNearlyFull]);
        assert!(found[0].text.contains("95 %"), "{}", found[0].text);
    }

    #[test]
    fn imap_software_said_after_login_names_the_device_row() {
        let mut history = History::default();
        let rules = Rules::default();
        history.apply(Event::Login { session: "1".into(), client: imap(None, "10.0.0.0/24") }, 0, &rules);
        let summary = Summary { bytes: 500, messages: 4, ..Default::default() };
        history.apply(
            Event::Ended { session: "1".into(), client: imap(Some("Thunderbird 128"), "10.0.0.0/24"), summary },
            5,
            &rules,
        );
        assert_eq!(history.devices.len(), 1);
        assert_eq!(history.devices[0].client.software.as_deref(), Some("Thunderbird 128"));
        assert_eq!((history.devices[0].bytes, history.devices[0].messages), (500, 4));
        assert!(history.open.is_empty());
        // The next session says who it is only after its login: the same row, told while open.
        let identified = imap(Some("Thunderbird 128"), "10.0.0.0/24");
        history.apply(Event::Login { session: "2".into(), client: imap(None, "10.0.0.0/24") }, 10, &rules);
        history.apply(Event::Identified { session: "2".into(), client: identified.clone() }, 11, &rules);
        assert_eq!((history.devices.len(), history.devices[0].sessions), (1, 2));
        assert_eq!(history.open[0].client, identified, "known while connected");
        // Another version is another program on the same network: a row of its own.
        history.apply(
            Event::Identified { session: "2".into(), client: imap(Some("Thunderbird 140"), "10.0.0.0/24") },
            12,
            &rules,
        );
        assert_eq!(history.devices.len(), 2);
    }

    #[test]
    fn an_end_recorded_before_its_login_leaves_no_session_open() {
        let mut history = History::default();
        let rules = Rules::default();
        let client = pop3("10.0.0.0/24");
        let summary = Summary { messages: 2, ..Default::default() };
        history.apply(Event::Ended { session: "s".into(), client: client.clone(), summary }, 10, &rules);
        history.apply(Event::Login { session: "s".into(), client: client.clone() }, 10, &rules);
        assert!(history.open.is_empty() && history.ended_early.is_empty(), "{history:?}");
        assert_eq!((history.devices[0].sessions, history.devices[0].messages), (1, 2));
        // In order, nothing is remembered.
        history.apply(Event::Login { session: "t".into(), client: client.clone() }, 20, &rules);
        history.apply(Event::Ended { session: "t".into(), client, summary: Summary::default() }, 30, &rules);
        assert!(history.open.is_empty() && history.ended_early.is_empty(), "{history:?}");
        let back: History = serde_json::from_str(&serde_json::to_string(&history).unwrap()).unwrap();
        assert_eq!(back, history);
    }

    #[test]
    fn everything_is_bounded_and_old_activity_forgotten() {
        let mut history = History::default();
        let rules = Rules { repeat_after: 0, ..Rules::default() };
        for i in 0..2_000u64 {
            let mut client = pop3(&format!("10.{}.{}.0/24", i / 256, i % 256));
            client.tls = None;
            let summary = Summary {
                deleted: 1,
                full_resyncs: 2,
                maildrop: Some(Maildrop { messages: i, octets: i }),
                ..Default::default()
            };
            history.apply(Event::Login { session: format!("s{i}"), client: client.clone() }, i, &rules);
            history.apply(Event::Login { session: format!("o{i}"), client: client.clone() }, i, &rules);
            history.apply(Event::Ended { session: format!("s{i}"), client, summary }, i, &rules);
        }
        assert!(history.devices.len() <= MAX_DEVICES);
        assert!(history.open.len() <= MAX_OPEN);
        assert!(history.polls.len() <= MAX_POLLS);
        assert!(history.resyncs.len() <= MAX_RESYNCS);
        assert!(history.events.len() <= MAX_EVENTS);
        assert!(history.fired.len() <= Kind::ALL.len());
        assert!(history.ended_early.len() <= MAX_OPEN);
        // The largest history, as the allocator counts it (lists by their capacity).
        assert!(history.weight() < 128 << 10, "{}", history.weight());
        let json = serde_json::to_string(&history).unwrap();
        assert!(json.len() < 64 << 10, "{}", json.len());
        let back: History = serde_json::from_str(&json).unwrap();
        assert_eq!(back, history);
        // A week without activity: all forgotten.
        history.apply(Event::Quota { used_kib: 1, limit_kib: 100 }, 2_000 + 8 * DAY, &rules);
        assert!(history.devices.is_empty() && history.polls.is_empty() && history.events.is_empty());
    }
}
