//! Parsing of the commands mailgate answers itself before authentication.
//!
//! The framer has already split the command into lines and literals ([`Part`]); this module
//! only understands the handful of commands valid in the not-authenticated state
//! (RFC 9051 §6.1–6.2). Everything after login is relayed, not parsed here.

use crate::auth::Credentials;
use crate::secret::Secret;

/// A framed piece of a command: a line (without its ending and without a trailing
/// literal announcement), or the literal data that followed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Line { text: Vec<u8>, literal_follows: bool },
    Literal(Vec<u8>),
}

#[derive(Debug)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    /// What the client said of itself (RFC 2971), when it gave a name.
    Id(Option<crate::metrics::clients::Software>),
    Login(Credentials),
    /// The mechanism upper-cased; the SASL-IR initial response as sent (`=` is empty).
    Authenticate {
        mechanism: String,
        initial: Option<Secret<Vec<u8>>>,
    },
}

#[derive(Debug)]
pub struct Tagged {
    pub tag: String,
    pub command: Command,
}

/// Why a command is refused with `BAD`; `tag` is `*` when none could be read.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub tag: String,
    pub reason: &'static str,
}

/// The command name of a line head, upper-cased, when it has a valid tag (for decisions
/// that must be made before the whole command has arrived, such as accepting a literal).
pub fn peek_name(head: &[u8]) -> Option<(String, String)> {
    let mut cursor = Cursor { text: head, pos: 0 };
    let tag = cursor.tag().ok()?;
    cursor.sp().ok()?;
    let name = cursor.atom().ok()?;
    Some((tag, String::from_utf8_lossy(name).to_ascii_uppercase()))
}

pub fn parse(parts: &[Part]) -> Result<Tagged, Invalid> {
    let Some(Part::Line { text, .. }) = parts.first() else {
        return Err(Invalid { tag: "*".into(), reason: "Empty command" });
    };
    let mut cursor = Cursor { text, pos: 0 };
    let tag = cursor.tag().map_err(|reason| Invalid { tag: "*".into(), reason })?;
    let bad = |reason| Invalid { tag: tag.clone(), reason };
    if parts.iter().any(|p| matches!(p, Part::Line { text, .. } if text.contains(&0))) {
        return Err(bad("NUL byte in command"));
    }
    cursor.sp().map_err(bad)?;
    let name = String::from_utf8_lossy(cursor.atom().map_err(bad)?).to_ascii_uppercase();
    let mut args = Args { parts, index: 0, cursor };
    let command = match name.as_str() {
        "CAPABILITY" => Command::Capability,
        "NOOP" => Command::Noop,
        "LOGOUT" => Command::Logout,
        "STARTTLS" => Command::StartTls,
        "ID" => {
            args.sp().map_err(bad)?;
            Command::Id(args.id_params().map_err(bad)?)
        }
        "LOGIN" => {
            args.sp().map_err(bad)?;
            let user = args.astring().map_err(bad)?;
            args.sp().map_err(bad)?;
            let password = Secret::new(args.astring().map_err(bad)?);
            let user = String::from_utf8(user).map_err(|_| bad("User name is not UTF-8"))?;
            let password = String::from_utf8(password.expose().clone()).map_err(|_| bad("Password is not UTF-8"))?;
            Command::Login(Credentials { user, password: Secret::new(password), authzid: None, oauth: None })
        }
        "AUTHENTICATE" => {
            args.sp().map_err(bad)?;
            let mechanism = String::from_utf8_lossy(args.cursor.atom().map_err(bad)?).to_ascii_uppercase();
            let initial = if args.cursor.peek() == Some(b' ') {
                args.sp().map_err(bad)?;
                Some(Secret::new(args.cursor.base64_or_empty().map_err(bad)?.to_vec()))
            } else {
                None
            };
            Command::Authenticate { mechanism, initial }
        }
        "SELECT" | "EXAMINE" | "LIST" | "LSUB" | "STATUS" | "APPEND" | "FETCH" | "UID" | "IDLE" | "ENABLE"
        | "CREATE" | "DELETE" | "RENAME" | "SUBSCRIBE" | "UNSUBSCRIBE" | "NAMESPACE" | "SEARCH" | "STORE" | "COPY"
        | "MOVE" | "EXPUNGE" | "CLOSE" | "UNSELECT" | "CHECK" | "GETQUOTAROOT" | "GETQUOTA" => {
            return Err(bad("Command not allowed before authentication"))
        }
        _ => return Err(bad("Unknown command")),
    };
    args.end().map_err(|reason| Invalid { tag: tag.clone(), reason })?;
    Ok(Tagged { tag, command })
}

struct Cursor<'a> {
    text: &'a [u8],
    pos: usize,
}

fn is_atom_char(b: u8) -> bool {
    // ATOM-CHAR: any CHAR except atom-specials: ( ) { SP CTL % * " \ ]
    (0x21..0x7f).contains(&b) && !b"(){%*\"\\]".contains(&b)
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn sp(&mut self) -> Result<(), &'static str> {
        if self.peek() == Some(b' ') {
            self.pos += 1;
            Ok(())
        } else {
            Err("Expected a space")
        }
    }

    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.pos;
        while self.peek().is_some_and(&keep) {
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    fn tag(&mut self) -> Result<String, &'static str> {
        let tag = self.take_while(|b| is_atom_char(b) && b != b'+' || b == b']');
        if tag.is_empty() {
            return Err("Missing or invalid tag");
        }
        Ok(String::from_utf8_lossy(tag).into_owned())
    }

    fn atom(&mut self) -> Result<&'a [u8], &'static str> {
        let atom = self.take_while(is_atom_char);
        if atom.is_empty() {
            Err("Expected an atom")
        } else {
            Ok(atom)
        }
    }

    fn quoted(&mut self) -> Result<Vec<u8>, &'static str> {
        self.pos += 1; // the opening quote
        let mut value = Vec::new();
        loop {
            match self.peek() {
                None => return Err("Unterminated quoted string"),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(value);
                }
                Some(b'\\') => {
                    match self.text.get(self.pos + 1) {
                        Some(&c @ (b'\\' | b'"')) => value.push(c),
                        _ => return Err("Invalid escape in quoted string"),
                    }
                    self.pos += 2;
                }
                Some(b'\r' | b'\n' | 0) => return Err("Invalid character in quoted string"),
                Some(c) => {
                    value.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn base64_or_empty(&mut self) -> Result<&'a [u8], &'static str> {
        if self.peek() == Some(b'=') && self.pos + 1 == self.text.len() {
            self.pos += 1;
            return Ok(b"");
        }
        let data = self.take_while(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
        if data.is_empty() {
            Err("Expected base64")
        } else {
            Ok(data)
        }
    }
}

/// Arguments spread over lines and literals.
struct Args<'a> {
    parts: &'a [Part],
    index: usize,
    cursor: Cursor<'a>,
}

impl Args<'_> {
    fn sp(&mut self) -> Result<(), &'static str> {
        self.cursor.sp()
    }

    fn literal_follows(&self) -> bool {
        matches!(self.parts.get(self.index), Some(Part::Line { literal_follows: true, .. }))
    }

    /// After a literal, parsing continues on the line that follows it.
    fn take_literal(&mut self) -> Result<Vec<u8>, &'static str> {
        let Some(Part::Literal(data)) = self.parts.get(self.index + 1) else {
            return Err("Missing literal");
        };
        let Some(Part::Line { text, .. }) = self.parts.get(self.index + 2) else {
            return Err("Missing line after literal");
        };
        if data.contains(&0) {
            return Err("NUL byte in literal");
        }
        self.index += 2;
        self.cursor = Cursor { text, pos: 0 };
        Ok(data.clone())
    }

    fn astring(&mut self) -> Result<Vec<u8>, &'static str> {
        if self.cursor.at_end() && self.literal_follows() {
            return self.take_literal();
        }
        match self.cursor.peek() {
            Some(b'"') => self.cursor.quoted(),
            _ => {
                let atom = self.cursor.take_while(|b| is_atom_char(b) || b == b']');
                if atom.is_empty() {
                    Err("Expected a string")
                } else {
                    Ok(atom.to_vec())
                }
            }
        }
    }

    /// A string, or `None` for NIL.
    fn nstring(&mut self) -> Result<Option<Vec<u8>>, &'static str> {
        if self.cursor.text[self.cursor.pos..].starts_with(b"NIL") {
            self.cursor.pos += 3;
            return Ok(None);
        }
        if self.cursor.at_end() && self.literal_follows() {
            return self.take_literal().map(Some);
        }
        if self.cursor.peek() == Some(b'"') {
            return self.cursor.quoted().map(Some);
        }
        Err("Expected a string or NIL")
    }

    /// `NIL` or `(field value ...)` (RFC 2971): the client's software, when named.
    fn id_params(&mut self) -> Result<Option<crate::metrics::clients::Software>, &'static str> {
        if self.cursor.text[self.cursor.pos..].eq_ignore_ascii_case(b"NIL") {
            self.cursor.pos += 3;
            return Ok(None);
        }
        if self.cursor.peek() != Some(b'(') {
            return Err("ID expects NIL or a parenthesized list");
        }
        self.cursor.pos += 1;
        let mut pairs = Vec::new();
        for pair in 0.. {
            if self.cursor.peek() == Some(b')') && pair > 0 {
                self.cursor.pos += 1;
                let pairs = pairs.iter().map(|(field, value): &(Option<Vec<u8>>, Option<Vec<u8>>)| {
                    (field.as_deref().unwrap_or_default(), value.as_deref())
                });
                return Ok(crate::metrics::clients::Software::from_id(pairs));
            }
            if pair > 0 {
                self.sp()?;
            }
            if pair >= 30 {
                return Err("Too many ID fields");
            }
            let field = self.nstring()?;
            self.sp()?;
            pairs.push((field, self.nstring()?));
        }
        unreachable!("the loop returns")
    }

    fn end(&self) -> Result<(), &'static str> {
        if self.cursor.at_end() && self.index + 1 == self.parts.len() {
            Ok(())
        } else {
            Err("Unexpected arguments")
        }
    }
}

/// Commands with a metric label of their own; anything else is `other`.
const LABELS: &[&str] = &[
    "append",
    "authenticate",
    "capability",
    "check",
    "close",
    "compress",
    "copy",
    "create",
    "delete",
    "enable",
    "examine",
    "expunge",
    "fetch",
    "getquota",
    "getquotaroot",
    "id",
    "idle",
    "list",
    "login",
    "logout",
    "lsub",
    "move",
    "namespace",
    "noop",
    "rename",
    "search",
    "select",
    "setquota",
    "status",
    "store",
    "subscribe",
    "unselect",
    "unsubscribe",
];

/// The bounded metric label of a command line (`tag CMD ...`, `tag UID CMD ...`).
pub fn metric_label(head: &[u8]) -> &'static str {
    let mut words = head.split(|&b| b == b' ').skip(1);
    let command = words.next().unwrap_or_default();
    if command.eq_ignore_ascii_case(b"UID") {
        let sub = words.next().unwrap_or_default();
        const UID: &[(&str, &str)] = &[
            ("fetch", "uid_fetch"),
            ("search", "uid_search"),
            ("store", "uid_store"),
            ("copy", "uid_copy"),
            ("move", "uid_move"),
            ("expunge", "uid_expunge"),
        ];
        return UID
            .iter()
            .find(|(name, _)| sub.eq_ignore_ascii_case(name.as_bytes()))
            .map_or("other", |(_, label)| label);
    }
    LABELS.iter().find(|name| command.eq_ignore_ascii_case(name.as_bytes())).copied().unwrap_or("other")
}

/// Whether a FETCH line (`tag FETCH ...`, `tag UID FETCH ...`) asks for message data
/// (bodies, sections, full messages) rather than only flags, sizes and envelopes: what a
/// download quota refuses.
pub fn fetches_message_data(line: &[u8]) -> bool {
    if !matches!(metric_label(line), "fetch" | "uid_fetch") {
        return false;
    }
    let upper = line.to_ascii_uppercase();
    let has = |needle: &[u8]| upper.windows(needle.len()).any(|w| w == needle);
    has(b"BODY[")
        || has(b"BODY.PEEK[")
        || has(b"BINARY[")
        || has(b"BINARY.PEEK[")
        || upper.windows(6).enumerate().any(|(i, w)| w == b"RFC822" && !upper[i + 6..].starts_with(b".SIZE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_data_fetches_are_told_from_flag_fetches() {
        for data in [
            &b"a FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"[..],
            b"a uid fetch 5 body[]",
            b"a FETCH 1 RFC822",
            b"a FETCH 1 (RFC822.SIZE RFC822.HEADER)",
            b"a UID FETCH 1 BINARY.PEEK[1]",
        ] {
            assert!(fetches_message_data(data), "{}", String::from_utf8_lossy(data));
        }
        for flags in [
            &b"a FETCH 1:* (FLAGS UID)"[..],
            b"a UID FETCH 1:* (RFC822.SIZE ENVELOPE BODYSTRUCTURE)",
            b"a STORE 1 +FLAGS (BODY[])",
            b"a SEARCH BODY hello",
        ] {
            assert!(!fetches_message_data(flags), "{}", String::from_utf8_lossy(flags));
        }
    }

    fn line(text: &str, literal_follows: bool) -> Part {
        Part::Line { text: text.as_bytes().to_vec(), literal_follows }
    }

    fn login(parts: &[Part]) -> (String, String) {
        match parse(parts).unwrap().command {
            Command::Login(c) => (c.user, c.password.expose().clone()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn login_accepts_atoms_quoted_strings_and_literals() {
        assert_eq!(login(&[line("a LOGIN alice s3cret", false)]), ("alice".into(), "s3cret".into()));
        assert_eq!(login(&[line(r#"a login "al ice" "p\"w\\d""#, false)]), ("al ice".into(), r#"p"w\d"#.into()));
        let parts = [line("a LOGIN alice ", true), Part::Literal(b"p w{}\"".to_vec()), line("", false)];
        assert_eq!(login(&parts), ("alice".into(), "p w{}\"".into()));
        let parts = [
            line("a LOGIN ", true),
            Part::Literal(b"alice".to_vec()),
            line(" ", true),
            Part::Literal("pässwörd".as_bytes().to_vec()),
            line("", false),
        ];
        assert_eq!(login(&parts), ("alice".into(), "pässwörd".into()));
    }

    #[test]
    fn authenticate_with_and_without_initial_response() {
        let Command::Authenticate { mechanism, initial } =
            parse(&[line("A1 authenticate plain", false)]).unwrap().command
        else {
            panic!()
        };
        assert_eq!((mechanism.as_str(), initial.is_none()), ("PLAIN", true));
        let Command::Authenticate { initial, .. } =
            parse(&[line("A1 AUTHENTICATE PLAIN AGEAYg==", false)]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(initial.unwrap().expose(), b"AGEAYg==");
        let Command::Authenticate { initial, .. } = parse(&[line("A1 AUTHENTICATE PLAIN =", false)]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(initial.unwrap().expose(), b"");
    }

    #[test]
    fn bad_commands_are_named_with_their_tag() {
        for (input, tag) in [
            ("a FROB", "a"),
            ("a LOGIN alice", "a"),
            ("a LOGIN alice pw extra", "a"),
            ("a LOGIN \"alice pw", "a"),
            ("a SELECT INBOX", "a"),
            ("a NOOP now", "a"),
            ("+ LOGIN a b", "*"),
            ("", "*"),
            ("GET / HTTP/1.1", "GET"),
            ("a ID (\"name\")", "a"),
        ] {
            let invalid = parse(&[line(input, false)]).unwrap_err();
            assert_eq!(invalid.tag, tag, "{input}");
        }
        let nul = parse(&[line("a LOGIN alice p\0w", false)]).unwrap_err();
        assert_eq!((nul.tag.as_str(), nul.reason), ("a", "NUL byte in command"));
    }

    #[test]
    fn id_accepts_nil_and_pairs() {
        assert!(matches!(parse(&[line("a ID NIL", false)]).unwrap().command, Command::Id(None)));
        let Command::Id(Some(software)) =
            parse(&[line(r#"a ID ("name" "Thunderbird" "version" NIL "os" "Linux")"#, false)]).unwrap().command
        else {
            panic!("no software")
        };
        assert_eq!(
            (software.name.as_str(), software.version.as_str(), software.os.as_str()),
            ("Thunderbird", "", "Linux")
        );
        let literal =
            [line("a ID (\"version\" \"1.2\" \"name\" ", true), Part::Literal(b"K-9 Mail".to_vec()), line(")", false)];
        let Command::Id(Some(software)) = parse(&literal).unwrap().command else { panic!("no software") };
        assert_eq!((software.name.as_str(), software.version.as_str()), ("K-9 Mail", "1.2"));
        assert!(matches!(parse(&[line(r#"a ID ("version" "1")"#, false)]).unwrap().command, Command::Id(None)));
    }

    #[test]
    fn random_commands_never_panic() {
        let mut seed = 0x1234_5678_9abc_def1_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const WORDS: &[&str] = &[
            "a",
            " ",
            "LOGIN",
            "AUTHENTICATE",
            "PLAIN",
            "ID",
            "(",
            ")",
            "\"",
            "\\",
            "NIL",
            "=",
            "x y",
            "\0",
            "{",
            "}",
            "]",
        ];
        for _ in 0..5000 {
            let text: String = (0..(next() % 12)).map(|_| WORDS[(next() % WORDS.len() as u64) as usize]).collect();
            let literal_follows = next() % 3 == 0;
            let mut parts = vec![line(&text, literal_follows)];
            if literal_follows {
                parts.push(Part::Literal(b"lit".to_vec()));
                parts.push(line(")", false));
            }
            let _ = parse(&parts);
            let _ = peek_name(text.as_bytes());
            let _ = metric_label(text.as_bytes());
        }
    }

    #[test]
    fn metric_labels_are_bounded() {
        assert_eq!(metric_label(b"a1 UID FETCH 1:* (FLAGS)"), "uid_fetch");
        assert_eq!(metric_label(b"a1 fetch 1 body[]"), "fetch");
        assert_eq!(metric_label(b"a1 XFROB alice"), "other");
        assert_eq!(metric_label(b"a1 UID XMOVE 1"), "other");
        assert_eq!(metric_label(b"DONE"), "other");
    }

    #[test]
    fn peek_name_reads_tag_and_command() {
        assert_eq!(peek_name(b"a1 login {5}"), Some(("a1".into(), "LOGIN".into())));
        assert_eq!(peek_name(b"{5}"), None);
    }
}
