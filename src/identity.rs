//! One canonical name per account, for everything that counts.
//!
//! Upstreams fold user names: Dovecot's default `auth_username_format = %Lu` lower-cases
//! them, and a domain is case-insensitive everywhere. If limits keyed on the name as typed,
//! `USER3` would be a different user from `user3` for the lockout, the session caps, the
//! download quota and the top-K, while the upstream logs both into one mailbox: every
//! spelling would get its own allowance. So every limit keys on [`Canonical::user`]:
//!
//! - the domain (after the last `@`) is always lower-cased (DNS names are case-insensitive);
//! - the local part is lower-cased too with `user_case = "lower"` (the default, like
//!   Dovecot's), kept as is with `"exact"` (for an upstream whose names are case-sensitive);
//! - with `default_domain`, a bare name gets it: `bob` and `bob@example.org` are one user
//!   (for an upstream that appends it, Dovecot's `auth_default_realm`).
//!
//! Routing and the upstream login get the name exactly as the client sent it, and cache keys
//! stay exact (a key that is too precise only misses). Overrides-file users are looked up by
//! their canonical name as well.

use serde::{Deserialize, Serialize};

/// How the local part of a user name is compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UserCase {
    /// Case-insensitive: lower-cased (Unicode lower case), as Dovecot's `%Lu`.
    #[default]
    Lower,
    /// Case-sensitive: kept as the client sent it (the domain is still lower-cased).
    Exact,
}

/// The canonical form of user names under one configuration.
#[derive(Clone, Debug, Default)]
pub struct Canonical {
    case: UserCase,
    /// Lower-cased, without a leading `@`; `None` when not configured.
    default_domain: Option<String>,
}

impl Canonical {
    pub fn new(case: UserCase, default_domain: &str) -> Canonical {
        let domain = default_domain.trim().trim_start_matches('@').trim_end_matches('.').to_lowercase();
        Canonical { case, default_domain: (!domain.is_empty()).then_some(domain) }
    }

    /// `name` as every limit, report and quota knows it.
    pub fn user(&self, name: &str) -> String {
        let (local, domain) = match name.rsplit_once('@') {
            Some((local, domain)) => (local, Some(domain)),
            None => (name, None),
        };
        let mut canonical = match self.case {
            UserCase::Lower => local.to_lowercase(),
            UserCase::Exact => local.to_string(),
        };
        let domain = match domain {
            Some(domain) => Some(domain.trim_end_matches('.').to_lowercase()),
            None => self.default_domain.clone(),
        };
        if let Some(domain) = domain {
            canonical.push('@');
            canonical.push_str(&domain);
        }
        canonical
    }
}

/// Whether `domain` can be a `default_domain` (checked with the configuration).
pub fn valid_default_domain(domain: &str) -> bool {
    !domain.contains('@') && !domain.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_case_by_default_and_the_domain_always() {
        let c = Canonical::default();
        assert_eq!(c.user("USER3"), "user3");
        assert_eq!(c.user("User3@Example.ORG"), "user3@example.org");
        assert_eq!(c.user("user3@example.org."), "user3@example.org", "a root dot is the same domain");
        assert_eq!(c.user("ÅSA"), "åsa");
        assert_eq!(c.user("a@b@Example.org"), "a@b@example.org", "the domain follows the last @");
        let exact = Canonical::new(UserCase::Exact, "");
        assert_eq!(exact.user("User3@Example.ORG"), "User3@example.org");
        assert_eq!(exact.user("User3"), "User3");
    }

    #[test]
    fn a_default_domain_joins_bare_names_to_their_full_form() {
        let c = Canonical::new(UserCase::Lower, "@Example.org");
        assert_eq!(c.user("Bob"), "bob@example.org");
        assert_eq!(c.user("bob@EXAMPLE.org"), "bob@example.org");
        assert_eq!(c.user("bob@other.net"), "bob@other.net");
        assert!(valid_default_domain("example.org") && !valid_default_domain("a@b") && !valid_default_domain("a b"));
    }
}
