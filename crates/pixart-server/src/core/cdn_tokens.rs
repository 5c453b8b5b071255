//! Short-lived upload tokens (`/rest/storage/auth/token`, used by the Python client's CDN
//! uploads), kept as empty files named by the token in the storage folder: they outlive a
//! restart (the client keeps using its token until it expires), and a folder shared by several
//! servers knows them all.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// How long a token is valid.
pub const LIFETIME: Duration = Duration::from_secs(3600);

/// The tokens handed out.
#[derive(Debug)]
pub struct CdnTokens {
    dir: PathBuf,
}

impl CdnTokens {
    /// Tokens kept in `dir` (created when the first is issued).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// A new token (32 hex digits), valid for [`LIFETIME`].
    pub fn issue(&self) -> std::io::Result<String> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.dir.join(&token), b"")?;
        Ok(token)
    }

    /// Whether `token` was issued less than [`LIFETIME`] ago.
    pub fn is_valid(&self, token: &str) -> bool {
        if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        std::fs::metadata(self.dir.join(token))
            .and_then(|m| m.modified())
            .is_ok_and(|issued| SystemTime::now().duration_since(issued).is_ok_and(|age| age < LIFETIME))
    }

    /// Deletes expired tokens.
    pub fn expire(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let old =
                entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a >= LIFETIME));
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_valid_until_they_expire_and_across_instances() {
        let dir = std::env::temp_dir().join(format!("pixart-tokens-{}", uuid::Uuid::new_v4()));
        let tokens = CdnTokens::new(dir.clone());
        let token = tokens.issue().unwrap();
        assert!(tokens.is_valid(&token));
        assert!(CdnTokens::new(dir.clone()).is_valid(&token), "a restarted server knows it");
        assert!(!tokens.is_valid("../../etc/passwd") && !tokens.is_valid(&"0".repeat(32)));
        let file = std::fs::File::options().write(true).open(dir.join(&token)).unwrap();
        file.set_modified(SystemTime::now() - LIFETIME).unwrap();
        assert!(!tokens.is_valid(&token));
        tokens.expire();
        assert!(!dir.join(&token).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
