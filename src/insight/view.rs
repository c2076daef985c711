//! The support view of one account (`/debug/accounts/<user>`): the help desk's questions
//! answered from its [`History`] in one place. Which devices and programs used the account
//! recently, over which protocol and TLS; who deleted how many messages when; how full the
//! mailbox is; how heavy its syncs are; which detections fired. JSON for tools, and the
//! same facts as a small server-rendered HTML page for a browser (no script, no external
//! resource, every value escaped).

use serde::Serialize;

use super::history::{History, Kind, What};
use crate::units::rfc3339_unix as timestamp;

#[derive(Debug, Serialize)]
pub struct AccountView {
    pub account: String,
    /// When this view was made (RFC 3339, UTC).
    pub generated: String,
    /// How far back the history goes.
    pub history_days: u64,
    /// One sentence per thing support should know first: the detections of the history,
    /// newest first, or that nothing looks wrong.
    pub findings: Vec<String>,
    pub devices: Vec<DeviceView>,
    pub deletions: Vec<DeletionView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaView>,
    pub syncs: SyncView,
    pub detections: Vec<DetectionView>,
}

#[derive(Debug, Serialize)]
pub struct DeviceView {
    /// How support names it: `IMAP Thunderbird 128 from 192.0.2.0/24`.
    pub client: String,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub software: Option<String>,
    pub network: String,
    pub listener: String,
    /// The TLS version of its last session, `none` without TLS.
    pub tls: String,
    pub first_seen: String,
    pub last_seen: String,
    /// A session of it is open now (as far as this history knows).
    pub connected: bool,
    pub sessions: u64,
    pub plaintext_sessions: u64,
    pub bytes: u64,
    pub messages: u64,
    pub deleted: u64,
    pub full_resyncs: u64,
}

#[derive(Debug, Serialize)]
pub struct DeletionView {
    pub at: String,
    pub client: String,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct QuotaView {
    pub read_at: String,
    pub used_kib: u64,
    pub limit_kib: u64,
    pub percent: f64,
}

#[derive(Debug, Serialize)]
pub struct SyncView {
    /// Full resyncs of a large IMAP mailbox in the last 24 hours, and in the history.
    pub full_resyncs_24h: usize,
    pub full_resyncs: usize,
    /// What all devices fetched over the history.
    pub bytes: u64,
    pub messages: u64,
}

#[derive(Debug, Serialize)]
pub struct DetectionView {
    pub at: String,
    pub detection: Kind,
    pub text: String,
}

impl AccountView {
    pub fn new(account: &str, history: &History, now: u64, keep_for: u64) -> AccountView {
        let mut devices: Vec<DeviceView> = (history.devices.iter())
            .map(|d| DeviceView {
                client: d.client.describe(),
                protocol: d.client.protocol.clone(),
                software: d.client.software.clone(),
                network: d.client.network.clone(),
                listener: d.client.listener.clone(),
                tls: d.client.tls.clone().unwrap_or_else(|| "none".into()),
                first_seen: timestamp(d.first_seen),
                last_seen: timestamp(d.last_seen),
                connected: history.open.iter().any(|o| o.client.same_device(&d.client)),
                sessions: d.sessions,
                plaintext_sessions: d.plaintext_sessions,
                bytes: d.bytes,
                messages: d.messages,
                deleted: d.deleted,
                full_resyncs: d.full_resyncs,
            })
            .collect();
        devices.sort_by(|a, b| b.last_seen.cmp(&a.last_seen));
        let deletions = (history.events.iter().rev())
            .filter_map(|e| match &e.what {
                What::Deleted { client, count } => {
                    Some(DeletionView { at: timestamp(e.at), client: client.describe(), count: *count })
                }
                _ => None,
            })
            .collect();
        let detections: Vec<DetectionView> = (history.events.iter().rev())
            .filter_map(|e| match &e.what {
                What::Detected { detection, text } => {
                    Some(DetectionView { at: timestamp(e.at), detection: *detection, text: text.clone() })
                }
                _ => None,
            })
            .collect();
        let mut findings: Vec<String> = detections.iter().map(|d| format!("{}: {}", d.at, d.text)).collect();
        if findings.is_empty() {
            findings.push("No common mistake detected in this history.".into());
        }
        AccountView {
            account: account.to_string(),
            generated: timestamp(now),
            history_days: keep_for.div_ceil(86_400),
            findings,
            deletions,
            quota: history.quota.map(|q| QuotaView {
                read_at: timestamp(q.at),
                used_kib: q.used_kib,
                limit_kib: q.limit_kib,
                percent: (q.share() * 1000.0).round() / 10.0,
            }),
            syncs: SyncView {
                full_resyncs_24h: history.resyncs.iter().filter(|&&at| at + 86_400 > now).count(),
                full_resyncs: history.resyncs.len(),
                bytes: history.devices.iter().map(|d| d.bytes).sum(),
                messages: history.devices.iter().map(|d| d.messages).sum(),
            },
            devices,
            detections,
        }
    }

    /// The same facts as a self-contained HTML page.
    pub fn html(&self) -> String {
        let mut page = String::with_capacity(8 << 10);
        let title = format!("mailgate: {}", escape(&self.account));
        page.push_str(&format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n\
             <meta name=\"viewport\" content=\"width=device-width\">\n<style>\
             body{{font-family:sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
             th,td{{border:1px solid #bbb;padding:.3em .6em;text-align:left}}th{{background:#eee}}\
             .finding{{background:#fff4d6;padding:.4em;margin:.3em 0}}td.n{{text-align:right}}</style></head>\n<body>\n\
             <h1 id=\"account\">{}</h1>\n<p>History of the last {} days, as of <span id=\"generated\">{}</span>.</p>\n",
            escape(&self.account),
            self.history_days,
            escape(&self.generated)
        ));
        page.push_str("<h2>Findings</h2>\n<div id=\"findings\">\n");
        for finding in &self.findings {
            page.push_str(&format!("<p class=\"finding\">{}</p>\n", escape(finding)));
        }
        page.push_str(
            "</div>\n<h2>Devices and programs</h2>\n<table id=\"devices\"><tr><th>client</th><th>protocol</th>\
            <th>software</th><th>network</th><th>listener</th><th>TLS</th><th>first seen</th><th>last seen</th>\
            <th>connected</th><th>sessions</th><th>without TLS</th><th>bytes</th><th>messages</th><th>deleted</th>\
            <th>full resyncs</th></tr>\n",
        );
        for d in &self.devices {
            let cells = [
                escape(&d.client),
                escape(&d.protocol),
                escape(d.software.as_deref().unwrap_or("")),
                escape(&d.network),
                escape(&d.listener),
                escape(&d.tls),
                escape(&d.first_seen),
                escape(&d.last_seen),
                if d.connected { "yes" } else { "no" }.to_string(),
            ];
            page.push_str("<tr>");
            for cell in cells {
                page.push_str(&format!("<td>{cell}</td>"));
            }
            for n in [d.sessions, d.plaintext_sessions, d.bytes, d.messages, d.deleted, d.full_resyncs] {
                page.push_str(&format!("<td class=\"n\">{n}</td>"));
            }
            page.push_str("</tr>\n");
        }
        page.push_str("</table>\n<h2>Deletions</h2>\n<table id=\"deletions\"><tr><th>when</th><th>client</th><th>messages</th></tr>\n");
        for d in &self.deletions {
            page.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>\n",
                escape(&d.at),
                escape(&d.client),
                d.count
            ));
        }
        page.push_str("</table>\n<h2>Mailbox</h2>\n<table id=\"mailbox\">\n");
        match &self.quota {
            Some(q) => page.push_str(&format!(
                "<tr><th>quota used</th><td id=\"quota\">{} % ({} of {} KiB, read {})</td></tr>\n",
                q.percent,
                q.used_kib,
                q.limit_kib,
                escape(&q.read_at)
            )),
            None => page.push_str("<tr><th>quota used</th><td id=\"quota\">not known</td></tr>\n"),
        }
        page.push_str(&format!(
            "<tr><th>full resyncs (24 h)</th><td id=\"resyncs\">{}</td></tr>\n<tr><th>full resyncs (history)</th>\
             <td>{}</td></tr>\n<tr><th>bytes fetched</th><td id=\"bytes\">{}</td></tr>\n<tr><th>messages fetched</th>\
             <td id=\"messages\">{}</td></tr>\n</table>\n",
            self.syncs.full_resyncs_24h, self.syncs.full_resyncs, self.syncs.bytes, self.syncs.messages
        ));
        page.push_str("<h2>Detections</h2>\n<table id=\"detections\"><tr><th>when</th><th>detection</th><th>what it means</th></tr>\n");
        for d in &self.detections {
            page.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                escape(&d.at),
                d.detection.label(),
                escape(&d.text)
            ));
        }
        page.push_str("</table>\n</body></html>\n");
        page
    }
}

/// HTML text escaping (the values come from clients: `ID` strings, user names).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::history::{Client, Event, Rules, Summary};
    use super::*;

    #[test]
    fn the_view_names_devices_deletions_and_detections_and_escapes_client_strings() {
        let mut history = History::default();
        let rules = Rules::default();
        let imap = Client {
            protocol: "imap".into(),
            software: Some("<script>alert(1)</script> 1".into()),
            network: "::/48".into(),
            listener: "imaps".into(),
            tls: Some("TLSv1.3".into()),
        };
        let pop3 = Client {
            protocol: "pop3".into(),
            software: None,
            network: "127.0.0.0/24".into(),
            listener: "pop3s".into(),
            tls: None,
        };
        history.apply(Event::Login { session: "a".into(), client: imap.clone() }, 1_700_000_000, &rules);
        history.apply(Event::Login { session: "b".into(), client: pop3.clone() }, 1_700_000_100, &rules);
        let summary = Summary { deleted: 4, messages: 4, bytes: 4000, ..Default::default() };
        history.apply(Event::Ended { session: "b".into(), client: pop3, summary }, 1_700_000_110, &rules);
        let view = AccountView::new("jane@example.org", &history, 1_700_000_200, 7 * 86_400);
        assert_eq!(view.devices.len(), 2);
        assert!(view.devices.iter().any(|d| d.connected && d.protocol == "imap"));
        assert_eq!(view.deletions.len(), 1);
        assert_eq!(view.deletions[0].count, 4);
        let kinds: Vec<Kind> = view.detections.iter().map(|d| d.detection).collect();
        assert!(kinds.contains(&Kind::Pop3DeletesShared) && kinds.contains(&Kind::Plaintext), "{kinds:?}");
        assert_eq!(view.generated, "2023-11-14T22:16:40Z");
        let html = view.html();
        assert!(!html.contains("<script>"), "client strings are escaped");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("jane@example.org"));
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["deletions"][0]["count"], 4);
    }
}
