//! Files a request points at by URL (LoRAs, input pictures): http(s) URLs fetched with the
//! webhook address rules (no loopback or private address unless allowed, no redirect), a size
//! limit and connect/read/overall timeouts; a URL of this server's own `/files/` is read from
//! the storage folder, without a network round trip.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::files::FileStore;
use super::webhook_target::{check_url, PolicyResolver};

/// What a fetch may do.
#[derive(Debug, Clone, Copy)]
pub struct FetchRules {
    /// Fetch from loopback and private addresses too.
    pub allow_private: bool,
    /// The largest file, in bytes.
    pub max_bytes: u64,
    /// The longest a download may take.
    pub timeout: Duration,
}

/// Fetches the files requests point at.
#[derive(Debug)]
pub struct RemoteFiles {
    rules: FetchRules,
    /// This server's stored files (`/files/{key}/{name}`).
    files: Option<Arc<FileStore>>,
    agent: ureq::Agent,
}

/// One source's problem, as a message.
pub type Problem = String;

impl RemoteFiles {
    /// A fetcher with these rules and this server's files.
    pub fn new(rules: FetchRules, files: Option<Arc<FileStore>>) -> Self {
        // The whole download within the timeout; a server that stops sending for 30 s (or never
        // answers a connection for 10 s) fails sooner, not holding the worker for the whole of it.
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(rules.timeout.min(Duration::from_secs(10)))
            .timeout_read(rules.timeout.min(Duration::from_secs(30)))
            .timeout(rules.timeout)
            .redirects(0)
            .resolver(PolicyResolver { allow_private: rules.allow_private })
            .build();
        Self { rules, files, agent }
    }

    /// The rules.
    pub fn rules(&self) -> &FetchRules {
        &self.rules
    }

    /// The stored file a URL of this server's `/files/` names (`base_url`: the address the
    /// request came in on).
    pub fn own_file(&self, url: &url::Url, base_url: Option<&str>) -> Option<PathBuf> {
        let files = self.files.as_ref()?;
        let base = url::Url::parse(base_url?).ok()?;
        if url.origin() != base.origin() {
            return None;
        }
        let mut segments = url.path_segments()?;
        let (files_segment, key, name) = (segments.next()?, segments.next()?, segments.next()?);
        (files_segment == "files" && segments.next().is_none()).then_some(())?;
        files.get(key, name).map(|f| f.path)
    }

    /// The bytes at `url`: this server's own file, or fetched within the rules.
    pub fn get(&self, url: &url::Url, base_url: Option<&str>) -> Result<Vec<u8>, Problem> {
        match self.own_file(url, base_url) {
            Some(path) => self.read_local(&path),
            None => self.fetch(url),
        }
    }

    /// A local file within the size limit.
    pub fn read_local(&self, path: &std::path::Path) -> Result<Vec<u8>, Problem> {
        let size = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
        if size > self.rules.max_bytes {
            return Err(format!("{size} bytes: larger than the limit ({} bytes)", self.rules.max_bytes));
        }
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Fetches `url` over the network within the rules.
    pub fn fetch(&self, url: &url::Url) -> Result<Vec<u8>, Problem> {
        check_url(url, self.rules.allow_private)?;
        let response = self.agent.get(url.as_str()).call().map_err(|e| format!("cannot fetch {url}: {e}"))?;
        if (300..400).contains(&response.status()) {
            return Err(format!("{url} answered a redirect ({}): give the final URL", response.status()));
        }
        let mut bytes = Vec::new();
        let limit = self.rules.max_bytes;
        std::io::Read::read_to_end(&mut std::io::Read::take(response.into_reader(), limit + 1), &mut bytes)
            .map_err(|e| format!("cannot fetch {url}: {e}"))?;
        if bytes.len() as u64 > limit {
            return Err(format!("larger than the limit ({limit} bytes)"));
        }
        Ok(bytes)
    }
}
