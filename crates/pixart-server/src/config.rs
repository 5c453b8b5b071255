//! What a server is allowed to do: limits, retention, credentials.

use std::path::PathBuf;
use std::time::Duration;

/// Where a server keeps its jobs (`jobs.sqlite3`), generated images and uploads (`files/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// The per-user data folder: `$XDG_DATA_HOME/pixart/serve`, else
    /// `~/.local/share/pixart/serve` (the default: requests survive restarts).
    UserData,
    /// This folder (created when missing).
    Dir(PathBuf),
    /// A fresh temporary folder removed when the server stops: nothing survives a restart, so
    /// on shutdown queued requests fail (`ServerShutdown`) instead of waiting for the next start.
    Temporary,
}

impl Storage {
    /// The folder to use, or why there is none.
    pub fn resolve(&self) -> Result<PathBuf, crate::ServerError> {
        match self {
            Storage::Dir(dir) => Ok(dir.clone()),
            Storage::Temporary => Ok(std::env::temp_dir().join(format!("pixart-serve-{}", uuid::Uuid::new_v4()))),
            Storage::UserData => {
                // $XDG_DATA_HOME, else ~/.local/share on Linux; the platform's data folder elsewhere.
                dirs::data_dir().map(|b| b.join("pixart").join("serve")).ok_or_else(|| {
                    crate::ServerError::Config(
                        "storage: no per-user data folder (neither XDG_DATA_HOME nor HOME is set); pass \
                         --storage-dir DIR, or --temporary-storage to keep nothing across restarts"
                            .into(),
                    )
                })
            }
        }
    }

    /// [`Storage::resolve`], and the folder created when missing.
    pub fn create(&self) -> Result<PathBuf, crate::ServerError> {
        let root = self.resolve()?;
        std::fs::create_dir_all(&root)
            .map_err(|e| crate::ServerError::Config(format!("storage folder {}: {e}", root.display())))?;
        Ok(root)
    }

    /// Whether what is stored outlives the server.
    pub fn is_durable(&self) -> bool {
        !matches!(self, Storage::Temporary)
    }
}

/// Where the queue lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueBackend {
    /// An SQLite database in the storage folder: one server (the default).
    Embedded,
    /// A Redis server (`redis://HOST:PORT[/DB]`), shared by any number of HTTP fronts and
    /// workers; their storage folder must be shared too (the same folder on one host, a shared
    /// file system across hosts).
    Redis(String),
}

/// Settings of one server. [`ServerConfig::default`] is what `pixart serve` uses without flags;
/// change its fields to set others.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The app id the server answers to (`owner/alias`), e.g. `fal-ai/pixart-sigma`.
    pub app_id: String,
    /// Most requests waiting in the queue (the one being generated not counted); a submit beyond
    /// it gets 429 (both fal clients retry 429).
    pub max_queue: usize,
    /// How long a finished request (its result, logs and images) stays available; `None` keeps
    /// everything until the server stops.
    pub retention: Option<Duration>,
    /// Largest JSON body accepted on the API routes, in bytes.
    pub max_request_bytes: usize,
    /// Largest uploaded file accepted by the storage routes, in bytes.
    pub max_upload_bytes: usize,
    /// When set, every API call must send `Authorization: Key <api_key>` (or `Bearer <api_key>`).
    /// Generated and uploaded files stay readable by URL, like fal's CDN.
    pub api_key: Option<String>,
    /// On shutdown: how long the request being generated may take to finish before it is
    /// stopped, and then how long webhook deliveries may take (those left stay pending for the
    /// next start).
    pub shutdown_grace: Duration,
    /// Where jobs, generated images and uploads are kept (see [`Storage`]).
    pub storage: Storage,
    /// Where the queue lives.
    pub queue: QueueBackend,
    /// With a shared queue: a running job whose worker has not shown signs of life for this long
    /// is given to another worker (its worker extends it every third of this while it works).
    pub visibility_timeout: Duration,
    /// Tries per webhook delivery, 1 to 10 (1 s, 2 s, 4 s… apart; see [`crate::core::retry`]).
    pub webhook_attempts: u32,
    /// Timeout of one webhook POST.
    pub webhook_timeout: Duration,
    /// Browser origins allowed to call the API (`https://app.example.com`), or `*` for any.
    /// Empty (the default): no CORS headers, so pages on other origins cannot read responses.
    pub cors_origins: Vec<String>,
    /// POST webhooks to loopback, private and link-local addresses too. Off by default: a
    /// client-supplied URL must not make the server call its own network (see
    /// [`crate::webhook_target`]).
    pub allow_private_webhooks: bool,
    /// Longest a client may take to send a request's headers; slower connections are closed.
    pub header_read_timeout: Duration,
    /// Longest a request body may pause between chunks before the request is refused (408) and
    /// its connection closed. Responses being computed are never cut.
    pub idle_timeout: Duration,
    /// Longest a whole API request body (JSON, read into memory) may take to arrive (408 after
    /// it): a client trickling a body cannot hold its memory for longer. Uploads, spooled to
    /// disk, are bounded by `idle_timeout` only.
    pub body_timeout: Duration,
    /// Most connections open at once; more wait in the listen queue until one closes.
    pub max_connections: usize,
    /// Bytes all API request bodies being received may hold together (at least
    /// `max_request_bytes`); a body that would go past it gets 503.
    pub max_body_memory: usize,
    /// The folder requests may name LoRAs in by path (`loras[i].path` relative to it, or an
    /// absolute path inside it); `None`: LoRAs come by URL only.
    pub lora_dir: Option<PathBuf>,
    /// The largest LoRA file, in bytes.
    pub max_lora_bytes: u64,
    /// The longest a LoRA download may take.
    pub lora_timeout: Duration,
    /// The largest input picture (`image_url`, `mask_url`) a request may give, in bytes (a
    /// file, a download or a `data:` URI's content).
    pub max_image_bytes: u64,
    /// The longest an input picture's download may take.
    pub image_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            app_id: "fal-ai/pixart-sigma".into(),
            max_queue: 256,
            retention: Some(Duration::from_secs(24 * 3600)),
            max_request_bytes: 1 << 20,
            max_upload_bytes: 100 << 20,
            api_key: None,
            shutdown_grace: Duration::from_secs(30),
            storage: Storage::UserData,
            queue: QueueBackend::Embedded,
            visibility_timeout: Duration::from_secs(30),
            webhook_attempts: 3,
            webhook_timeout: Duration::from_secs(10),
            cors_origins: Vec::new(),
            allow_private_webhooks: false,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_body_memory: 64 << 20,
            lora_dir: None,
            max_lora_bytes: 2 << 30,
            lora_timeout: Duration::from_secs(300),
            max_image_bytes: 32 << 20,
            image_timeout: Duration::from_secs(60),
        }
    }
}

impl ServerConfig {
    /// Checks the settings; each problem names the setting and what it allows.
    pub fn validate(&self) -> Result<(), crate::ServerError> {
        let bad = |field: &str, message: &str| Err(crate::ServerError::Config(format!("{field}: {message}")));
        let parts: Vec<&str> = self.app_id.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty() || !p.chars().all(is_id_char)) {
            return bad("app_id", "must be `owner/alias` (letters, digits, `-`, `_`, `.`), e.g. fal-ai/pixart-sigma");
        }
        let counts: [(&str, usize, usize, usize); 7] = [
            ("max_queue", self.max_queue, 1, 1_000_000),
            ("max_connections", self.max_connections, 1, 1_000_000),
            ("max_request_bytes", self.max_request_bytes, 1024, 1 << 30),
            ("max_upload_bytes", self.max_upload_bytes, 1, 1 << 40),
            ("max_lora_bytes", usize::try_from(self.max_lora_bytes).unwrap_or(usize::MAX), 1, 1 << 36),
            ("max_image_bytes", usize::try_from(self.max_image_bytes).unwrap_or(usize::MAX), 1, 1 << 32),
            ("max_body_memory", self.max_body_memory, self.max_request_bytes, 1 << 40),
        ];
        for (field, value, min, max) in counts {
            if !(min..=max).contains(&value) {
                return bad(field, &format!("must be from {min} to {max}"));
            }
        }
        let attempts = 1..=crate::core::retry::RetryPolicy::MAX_WEBHOOK_ATTEMPTS;
        if !attempts.contains(&self.webhook_attempts) {
            return bad("webhook_attempts", &format!("must be from {} to {}", attempts.start(), attempts.end()));
        }
        let hour = Duration::from_secs(3600);
        let durations = [
            ("header_read_timeout", self.header_read_timeout, Duration::from_millis(1), hour),
            ("idle_timeout", self.idle_timeout, Duration::from_millis(1), hour),
            ("body_timeout", self.body_timeout, Duration::from_millis(1), hour),
            ("webhook_timeout", self.webhook_timeout, Duration::from_millis(1), Duration::from_secs(600)),
            ("shutdown_grace", self.shutdown_grace, Duration::ZERO, 24 * hour),
            ("visibility_timeout", self.visibility_timeout, Duration::from_secs(1), hour),
            ("lora_timeout", self.lora_timeout, Duration::from_secs(1), hour),
            ("image_timeout", self.image_timeout, Duration::from_secs(1), hour),
            ("retention", self.retention.unwrap_or_default(), Duration::ZERO, 100 * 365 * 24 * hour),
        ];
        for (field, value, min, max) in durations {
            if value < min || value > max {
                let (min, max) = (humantime::format_duration(min), humantime::format_duration(max));
                return bad(field, &format!("must be from {min} to {max}"));
            }
        }
        self.validate_origins()?;
        if let QueueBackend::Redis(url) = &self.queue {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return bad("queue", &format!("{url:?}: use redis://HOST:PORT[/DB] (or rediss:// for TLS)"));
            }
            if self.storage == Storage::Temporary {
                return bad(
                    "storage",
                    "a shared queue needs a storage folder its fronts and workers share (--storage-dir), not a temporary one",
                );
            }
        }
        if self.api_key.as_deref().is_some_and(str::is_empty) {
            return bad("api_key", "must not be empty (leave it unset to serve without a key)");
        }
        Ok(())
    }

    fn validate_origins(&self) -> Result<(), crate::ServerError> {
        for origin in &self.cors_origins {
            let valid = origin == "*"
                || url::Url::parse(origin).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.host().is_some()
                        && u.path() == "/"
                        && !origin.ends_with('/')
                        && u.query().is_none()
                        && u.username().is_empty()
                });
            if !valid {
                return Err(crate::ServerError::Config(format!(
                    "cors_origins: {origin:?} is not an origin: use scheme://host[:port] (no path), or * for any"
                )));
            }
        }
        Ok(())
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}
