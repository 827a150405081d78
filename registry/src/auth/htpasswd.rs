//! Users and their bcrypt password hashes from an htpasswd file, checked in constant time.

use std::collections::HashMap;
use std::path::Path;

use crate::config::ConfigError;

/// Cost of the hashes [`entry`] writes, and of the stand-in hash checked for unknown users when
/// the file is empty: htpasswd's own default, paid once per five minutes per client (see `auth`).
const DEFAULT_COST: u32 = 10;

pub(super) struct Htpasswd {
    hashes: HashMap<String, String>,
    /// Checked for unknown users so that they take as long to refuse as a wrong password.
    stand_in: String,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Htpasswd")
            .field("users", &self.hashes.len())
            .finish_non_exhaustive()
    }
}

fn bcrypt_cost(hash: &str) -> Option<u32> {
    let rest = ["$2a$", "$2b$", "$2y$", "$2x$"]
        .iter()
        .find_map(|prefix| hash.strip_prefix(prefix))?;
    let cost: u32 = rest.get(..2)?.parse().ok()?;
    (rest.as_bytes().get(2) == Some(&b'$') && rest.len() == 56 && (4..=31).contains(&cost))
        .then_some(cost)
}

/// One htpasswd line (`user:bcrypt hash`) for `user` with `password`.
pub fn entry(user: &str, password: &str) -> Result<String, String> {
    if user.is_empty()
        || user
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "user name {user:?} must be non-empty, without ':', spaces or control characters"
        ));
    }
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    // bcrypt reads only the first 72 bytes: refuse rather than let the rest count for nothing.
    if password.len() > 72 {
        return Err("the password is longer than bcrypt's 72 bytes".into());
    }
    let hash = bcrypt::hash(password, DEFAULT_COST).map_err(|e| format!("hashing: {e}"))?;
    Ok(format!("{user}:{hash}"))
}

impl Htpasswd {
    pub(super) fn load(path: &Path) -> Result<Htpasswd, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Htpasswd::parse(&text)
            .map_err(|message| ConfigError::Invalid(format!("{}: {message}", path.display())))
    }

    fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut hashes = HashMap::new();
        let mut cost = None;
        for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {number} is not user:hash"))?;
            // Only the user is named: even a weak hash is not for the log.
            let entry_cost = bcrypt_cost(hash).ok_or_else(|| {
                format!(
                    "line {number} (user {user:?}) is not a bcrypt hash; create it with htpasswd -B"
                )
            })?;
            if hashes.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(format!("user {user:?} appears twice"));
            }
            cost = cost.max(Some(entry_cost));
        }
        let stand_in = bcrypt::hash(
            uuid::Uuid::new_v4().to_string(),
            cost.unwrap_or(DEFAULT_COST),
        )
        .map_err(|e| format!("hashing the stand-in password: {e}"))?;
        Ok(Htpasswd { hashes, stand_in })
    }

    /// Whether `password` is `user`'s. Slow by design (bcrypt): call it off the async workers.
    pub(super) fn verify(&self, user: &str, password: &str) -> bool {
        match self.hashes.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, &self.stand_in);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(entries: &[(&str, &str)]) -> String {
        entries
            .iter()
            .map(|(user, password)| format!("{user}:{}\n", bcrypt::hash(password, 4).unwrap()))
            .collect()
    }

    #[test]
    fn verifies_bcrypt_entries() {
        let htpasswd =
            Htpasswd::parse(&file(&[("alice", "s3cret"), ("robot$cacher", "x")])).unwrap();
        assert!(htpasswd.verify("alice", "s3cret"));
        assert!(!htpasswd.verify("alice", "S3cret"));
        assert!(!htpasswd.verify("mallory", "s3cret"));
        assert!(htpasswd.verify("robot$cacher", "x"));
        // htpasswd -B writes $2y$.
        let apache = "bob:$2y$05$pP0bmd4BhJ9wzUpR5QR1yO2hGb5Z7s7rXGgkYkWqNn0n8Ht4M6aBG\n";
        assert!(Htpasswd::parse(apache).is_ok());
    }

    #[test]
    fn written_entries_verify_and_bad_names_are_refused() {
        let line = entry("robot$berth-cacher", "pa ss").unwrap();
        let htpasswd = Htpasswd::parse(&line).unwrap();
        assert!(htpasswd.verify("robot$berth-cacher", "pa ss"));
        assert!(!htpasswd.verify("robot$berth-cacher", "pass"));
        for user in ["", "a:b", "a b", "a\nb"] {
            assert!(entry(user, "x").is_err(), "{user:?}");
        }
        assert!(entry("alice", "").is_err());
        assert!(entry("alice", &"x".repeat(73)).is_err());
        assert!(entry("alice", &"x".repeat(72)).is_ok());
    }

    #[test]
    fn other_hash_kinds_are_refused_without_echoing_them() {
        for line in [
            "alice:$apr1$abc$0123456789abcdef012345",
            "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "alice:plaintext",
            "alice",
        ] {
            let err = Htpasswd::parse(line).unwrap_err();
            assert!(
                !err.contains("apr1") && !err.contains("SHA") && !err.contains("plaintext"),
                "{err}"
            );
        }
        assert!(Htpasswd::parse(&file(&[("a", "x"), ("a", "y")])).is_err());
    }
}
