//! Files the server hands out by URL: generated images and uploads, written to one folder and
//! served at `/files/{key}/{name}`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Free space a file write leaves on the storage disk: what the job store needs to record how
/// requests end (a full disk fails the request that could not write its images, cleanly,
/// instead of leaving it unrecorded).
pub const FREE_SPACE_RESERVE: u64 = 16 << 20;

/// One stored file.
#[derive(Debug, Clone)]
pub struct StoredFile {
    /// Where it is on disk.
    pub path: PathBuf,
    /// Its MIME type.
    pub content_type: String,
}

/// The folder of served files: `{root}/{key}/{name}`, the MIME type beside it in
/// `{root}/{key}/.types/{name}`. The folder is the index, so files outlive the process (and a
/// folder shared by several servers serves the same files). Keys are request ids (generated
/// images) or upload ids; names are sanitised (never starting with a dot), so a URL can never
/// reach outside the folder nor name a type file.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Opens `root` (created when missing).
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root)
            .map_err(|e| io::Error::new(e.kind(), format!("storage folder {}: {e}", root.display())))?;
        Ok(Self { root: root.to_path_buf() })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn key_dir(&self, key: &str) -> PathBuf {
        self.root.join(sanitize_name(key))
    }

    /// Writes a file (through a temporary name, so a reader never sees half of it); returns the
    /// name it is stored (and served) under. Refused, with nothing left behind, when it would
    /// leave less than [`FREE_SPACE_RESERVE`] free.
    pub fn put(&self, key: &str, name: &str, content_type: &str, bytes: &[u8]) -> io::Result<String> {
        self.ensure_room(bytes.len() as u64)?;
        let written = self.prepare(key, name, content_type).and_then(|(name, partial)| {
            std::fs::write(&partial, bytes).and_then(|()| self.commit(key, &name, &partial))
        });
        if written.is_err() {
            let name = sanitize_name(name);
            let _ = std::fs::remove_file(self.key_dir(key).join(format!(".partial-{name}")));
            let _ = std::fs::remove_file(self.key_dir(key).join(".types").join(&name));
        }
        written
    }

    /// Free bytes on the folder's disk.
    pub fn free_space(&self) -> io::Result<u64> {
        fs4::available_space(&self.root)
    }

    /// Whether `bytes` more fit, leaving the reserve; the error says how much is free.
    pub fn ensure_room(&self, bytes: u64) -> io::Result<()> {
        let free = self.free_space()?;
        if free < bytes.saturating_add(FREE_SPACE_RESERVE) {
            let (free_mib, reserve_mib) = (free >> 20, FREE_SPACE_RESERVE >> 20);
            let root = self.root.display();
            let message = if bytes == 0 {
                format!("the storage disk is full: {free_mib} MiB free in {root}, less than the {reserve_mib} MiB kept for the job store")
            } else {
                format!(
                    "the storage disk is full: {free_mib} MiB free in {root}, not enough for {bytes} bytes and the {reserve_mib} MiB kept for the job store"
                )
            };
            return Err(io::Error::new(io::ErrorKind::StorageFull, message));
        }
        Ok(())
    }

    /// Like [`FileStore::put`], moving in a file already written elsewhere on the same disk.
    pub fn put_file(&self, key: &str, name: &str, content_type: &str, from: &Path) -> io::Result<String> {
        let (name, partial) = self.prepare(key, name, content_type)?;
        std::fs::rename(from, &partial)?;
        self.commit(key, &name, &partial)
    }

    fn prepare(&self, key: &str, name: &str, content_type: &str) -> io::Result<(String, PathBuf)> {
        let name = sanitize_name(name);
        let types = self.key_dir(key).join(".types");
        std::fs::create_dir_all(&types)?;
        std::fs::write(types.join(&name), content_type)?;
        Ok((name.clone(), self.key_dir(key).join(format!(".partial-{name}"))))
    }

    fn commit(&self, key: &str, name: &str, partial: &Path) -> io::Result<String> {
        std::fs::rename(partial, self.key_dir(key).join(name))?;
        Ok(name.to_string())
    }

    /// A stored file.
    pub fn get(&self, key: &str, name: &str) -> Option<StoredFile> {
        if sanitize_name(key) != key || sanitize_name(name) != name {
            return None;
        }
        let path = self.key_dir(key).join(name);
        if !path.is_file() {
            return None;
        }
        let content_type = std::fs::read_to_string(self.key_dir(key).join(".types").join(name))
            .unwrap_or_else(|_| "application/octet-stream".into());
        Some(StoredFile { path, content_type })
    }

    /// Deletes every file under `key`.
    pub fn remove_key(&self, key: &str) {
        let _ = std::fs::remove_dir_all(self.key_dir(key));
    }

    /// The keys last written more than `retention` ago (file times are on disk, so this holds
    /// across restarts); the caller deletes those that are no live request's.
    pub fn old_keys(&self, retention: Duration) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let now = SystemTime::now();
        let mut old_keys = Vec::new();
        for entry in entries.flatten() {
            let Some(key) = entry.file_name().to_str().map(str::to_string) else { continue };
            if key.starts_with('.') || !entry.path().is_dir() {
                continue; // the database, the upload spool
            }
            let newest = std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|f| f.metadata().ok()?.modified().ok())
                .max();
            if newest.is_none_or(|t| now.duration_since(t).unwrap_or_default() >= retention) {
                old_keys.push(key);
            }
        }
        old_keys
    }
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
        let dir = std::env::temp_dir().join(format!("pixart-files-{}", uuid::Uuid::new_v4()));
        let store = FileStore::open(&dir).unwrap();
        let name = store.put("req-1", "a b.png", "image/png", b"png").unwrap();
        assert_eq!(name, "a_b.png");
        let file = store.get("req-1", "a_b.png").unwrap();
        assert_eq!(std::fs::read(&file.path).unwrap(), b"png");
        assert_eq!(file.content_type, "image/png");
        assert!(file.path.starts_with(store.root()));
        // A new store on the same folder (a restart) serves the same file.
        let reopened = FileStore::open(&dir).unwrap();
        assert_eq!(reopened.get("req-1", "a_b.png").unwrap().content_type, "image/png");
        assert!(reopened.get("req-1", ".types").is_none() && reopened.get("..", "req-1").is_none());
        assert!(store.old_keys(Duration::from_secs(3600)).is_empty(), "written just now");
        assert_eq!(store.old_keys(Duration::ZERO), ["req-1"]);
        store.remove_key("req-1");
        assert!(store.get("req-1", "a_b.png").is_none());
        assert!(!file.path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
