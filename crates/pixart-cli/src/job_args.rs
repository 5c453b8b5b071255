//! Flags shared by `pixart serve` and `pixart worker`: where jobs and files live and how jobs
//! end.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use pixart_pipeline::LoadOptions;
use pixart_server::{ServerConfig, Storage};

use crate::model_args::ModelArgs;

/// Flags of every process that holds jobs. Every flag can also be set by the environment
/// variable shown.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// On shutdown (Ctrl-C, SIGTERM): how long the running request may take to finish before it
    /// is stopped and given back to the queue (e.g. 30s, 2m); then as long again for webhook
    /// deliveries (those left are sent by the next start).
    #[arg(long, env = "PIXART_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Folder for requests, results, logs, generated images and uploads; they survive restarts
    /// (default: $XDG_DATA_HOME/pixart/serve, else ~/.local/share/pixart/serve). With the
    /// embedded queue, one server per folder; with a shared queue, every front and worker uses
    /// the same folder (a shared file system across hosts).
    #[arg(long, env = "PIXART_STORAGE_DIR")]
    storage_dir: Option<PathBuf>,
    /// How long one webhook POST may take, connecting included (e.g. 10s); a receiver slower
    /// than that is not retried (it may have acted on the request), and one host ties up at most
    /// two of the eight delivery threads.
    #[arg(long, env = "PIXART_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    webhook_timeout: Duration,
    /// Also POST webhooks to loopback, private and link-local addresses (off by default: a
    /// client-supplied URL must not make the server call its own network).
    #[arg(long, env = "PIXART_ALLOW_PRIVATE_WEBHOOKS", value_parser = clap::builder::FalseyValueParser::new())]
    allow_private_webhooks: bool,
    /// Prompt encodings kept in memory (repeated prompts skip T5), 0 to 65536.
    #[arg(long, env = "PIXART_PROMPT_CACHE", default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=65536))]
    pub prompt_cache: u64,
    /// The folder requests may name LoRAs in by path (relative to it, or absolute inside it);
    /// without it, requests' LoRAs come by URL only (any other local path is refused).
    #[arg(long, env = "PIXART_LORA_DIR")]
    lora_dir: Option<PathBuf>,
    /// The largest LoRA file a request may use, in bytes (downloads stop there).
    #[arg(long, env = "PIXART_MAX_LORA_BYTES", default_value_t = 2 << 30)]
    max_lora_bytes: u64,
    /// The longest a LoRA download may take (e.g. 5m).
    #[arg(long, env = "PIXART_LORA_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    lora_timeout: Duration,
    /// The largest input picture (`image_url`, `mask_url`) a request may give, in bytes.
    #[arg(long, env = "PIXART_MAX_IMAGE_BYTES", default_value_t = 32 << 20)]
    max_image_bytes: u64,
    /// The longest an input picture's download may take (e.g. 1m).
    #[arg(long, env = "PIXART_IMAGE_TIMEOUT", default_value = "1m", value_parser = parse_duration)]
    image_timeout: Duration,
    /// With a shared queue: a running job whose worker shows no sign of life for this long
    /// (killed, machine lost) is given to another worker; a worker extends it every third of it.
    #[arg(long, env = "PIXART_VISIBILITY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    visibility_timeout: Duration,
}

impl JobArgs {
    /// How to load the model: the model flags plus this process' prompt cache.
    pub fn load_options(&self, model: &ModelArgs) -> anyhow::Result<LoadOptions> {
        let mut options = model.load_options()?;
        options.prompt_cache_size = self.prompt_cache as usize;
        Ok(options)
    }

    /// A server configuration with these settings (`storage` overrides the folder flag).
    pub fn config(&self, storage: Option<Storage>) -> ServerConfig {
        let folder = self.storage_dir.clone().map_or(Storage::UserData, Storage::Dir);
        let mut config = ServerConfig::default();
        config.shutdown_grace = self.shutdown_grace;
        config.storage = storage.unwrap_or(folder);
        config.webhook_timeout = self.webhook_timeout;
        config.allow_private_webhooks = self.allow_private_webhooks;
        config.visibility_timeout = self.visibility_timeout;
        config.lora_dir.clone_from(&self.lora_dir);
        config.max_lora_bytes = self.max_lora_bytes;
        config.lora_timeout = self.lora_timeout;
        config.max_image_bytes = self.max_image_bytes;
        config.image_timeout = self.image_timeout;
        config
    }
}

/// A retention period, or none (keep until exit).
#[derive(Debug, Clone, Copy)]
pub struct Retention(pub Option<Duration>);

pub fn parse_retention(text: &str) -> Result<Retention, String> {
    match text {
        "forever" | "none" => Ok(Retention(None)),
        _ => parse_duration(text).map(|d| Retention(Some(d))),
    }
}

/// A duration: `90` (seconds), `90s`, `30m`, `24h`, `7d`, `500ms`, `1h 30m` (humantime's forms).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration (e.g. 30s, 10m, 24h, 7d): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_duration("3 fortnights").unwrap_err().contains("not a duration"));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_retention("forever").unwrap().0.is_none());
    }
}
