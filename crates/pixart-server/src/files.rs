//! Files the server hands out by URL: generated images and uploads, written to one folder and
//! served at `/files/{key}/{name}`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One stored file.
#[derive(Debug, Clone)]
pub struct StoredFile {
    /// Where it is on disk.
    pub path: PathBuf,
    /// Its MIME type.
    pub content_type: String,
    /// When it was written.
    pub created: Instant,
}

/// The folder of served files and its index. Keys are request ids (generated images) or upload
/// ids; names are sanitised, so a URL can never reach outside the folder.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    temporary: bool,
    index: Mutex<HashMap<(String, String), StoredFile>>,
}

impl FileStore {
    /// Opens `dir` (created when missing), or a fresh temporary folder removed by [`Self::cleanup`].
    pub fn open(dir: Option<&Path>) -> io::Result<Self> {
        let (root, temporary) = match dir {
            Some(dir) => (dir.to_path_buf(), false),
            None => (std::env::temp_dir().join(format!("pixart-serve-{}", uuid::Uuid::new_v4())), true),
        };
        std::fs::create_dir_all(&root)
            .map_err(|e| io::Error::new(e.kind(), format!("storage folder {}: {e}", root.display())))?;
        Ok(Self { root, temporary, index: Mutex::new(HashMap::new()) })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a file; returns its URL path (`/files/{key}/{name}`).
    pub fn put(&self, key: &str, name: &str, content_type: &str, bytes: &[u8]) -> io::Result<String> {
        let name = sanitize_name(name);
        let dir = self.root.join(sanitize_name(key));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(&name);
        std::fs::write(&path, bytes)?;
        let file = StoredFile { path, content_type: content_type.to_string(), created: Instant::now() };
        self.index.lock().unwrap_or_else(|e| e.into_inner()).insert((key.to_string(), name.clone()), file);
        Ok(url_path(key, &name))
    }

    /// A stored file.
    pub fn get(&self, key: &str, name: &str) -> Option<StoredFile> {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).get(&(key.to_string(), name.to_string())).cloned()
    }

    /// Deletes every file under `key`.
    pub fn remove_key(&self, key: &str) {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).retain(|(k, _), _| k != key);
        let _ = std::fs::remove_dir_all(self.root.join(sanitize_name(key)));
    }

    /// Deletes files written more than `retention` ago whose key is not a live request.
    pub fn expire(&self, retention: Duration, is_live: impl Fn(&str) -> bool) {
        let now = Instant::now();
        let old: Vec<String> = {
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            index
                .iter()
                .filter(|((key, _), file)| now.duration_since(file.created) >= retention && !is_live(key))
                .map(|((key, _), _)| key.clone())
                .collect()
        };
        for key in old {
            self.remove_key(&key);
        }
    }

    /// Removes the folder if it is a temporary one.
    pub fn cleanup(&self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// `/files/{key}/{name}`.
pub fn url_path(key: &str, name: &str) -> String {
    format!("/files/{key}/{name}")
}

/// A file name safe in a path segment and a URL: ASCII letters, digits, `.`, `-`, `_`; other
/// characters become `_`; no leading dot; at most 128 characters; never empty.
pub fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' })
        .take(128)
        .collect();
    while out.starts_with('.') {
        out.replace_range(0..1, "_");
    }
    if out.is_empty() {
        out.push_str("file");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_folder() {
        assert_eq!(sanitize_name("../../etc/passwd"), "_._.._etc_passwd");
        assert_eq!(sanitize_name(".."), "_.");
        assert_eq!(sanitize_name(""), "file");
        assert_eq!(sanitize_name("cat photo (1).png"), "cat_photo__1_.png");
        assert_eq!(sanitize_name(&"a".repeat(300)).len(), 128);
    }

    #[test]
    fn stored_files_are_found_and_removed() {
        let store = FileStore::open(None).unwrap();
        let url = store.put("req-1", "a b.png", "image/png", b"png").unwrap();
        assert_eq!(url, "/files/req-1/a_b.png");
        let file = store.get("req-1", "a_b.png").unwrap();
        assert_eq!(std::fs::read(&file.path).unwrap(), b"png");
        assert!(file.path.starts_with(store.root()));
        store.remove_key("req-1");
        assert!(store.get("req-1", "a_b.png").is_none());
        assert!(!file.path.exists());
        store.cleanup();
        assert!(!store.root().exists());
    }
}
