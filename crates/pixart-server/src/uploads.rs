//! Uploads in flight: the storage flows of both fal clients.
//!
//! - JS (`@fal-ai/client`): `POST /rest/storage/upload/initiate` → `{upload_url, file_url}`, then
//!   `PUT upload_url`; files over 90 MB: `initiate-multipart`, `PUT {upload_url}/{n}` per part,
//!   `POST {upload_url}/complete` with `{parts: [{partNumber, etag}]}`.
//! - Python (`fal-client`): `POST /rest/storage/auth/token` → `{token, token_type, base_url,
//!   expires_at}`, then `POST {CDN}/files/upload` with the bytes → `{access_url}`; files over
//!   100 MB: `POST {base_url}/files/upload/multipart` → `{access_url, uploadId}`,
//!   `PUT {access_url}/multipart/{uploadId}/{n}` (ETag header), `POST …/complete`.
//! - Python's fallback (`initiate?storage_type=gcs`) is the JS single-part flow.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::files::sanitize_name;

/// An upload started but not finished.
#[derive(Debug)]
pub struct PendingUpload {
    /// The file's key in the store.
    pub key: String,
    /// Its sanitised name.
    pub name: String,
    /// Its MIME type.
    pub content_type: String,
    /// Parts received so far (multipart uploads), by part number: written to disk as they
    /// arrive, so an unfinished upload holds no memory.
    pub parts: BTreeMap<u32, Part>,
    /// Bytes received so far.
    pub received: usize,
    /// When it started (unfinished uploads expire).
    pub started: Instant,
}

/// One received part of a multipart upload, spooled to a file.
#[derive(Debug, Clone)]
pub struct Part {
    /// Where its bytes are.
    pub path: PathBuf,
    /// Its ETag.
    pub etag: String,
    /// Its length in bytes.
    pub len: usize,
}

/// A problem with an upload call.
#[derive(Debug, PartialEq, Eq)]
pub enum UploadError {
    /// No such upload (unknown, finished or expired).
    Unknown,
    /// The file would exceed the upload limit.
    TooLarge(usize),
    /// The complete call's part list does not match what was received.
    BadParts(String),
    /// A part could not be written to or read from the spool folder.
    Io(String),
}

/// Uploads in flight, by upload id; parts are spooled under a folder.
#[derive(Debug)]
pub struct Uploads {
    pending: Mutex<HashMap<String, PendingUpload>>,
    spool: PathBuf,
}

impl Uploads {
    /// Uploads whose parts are spooled under `spool` (created when the first part arrives).
    pub fn new(spool: PathBuf) -> Self {
        Self { pending: Mutex::default(), spool }
    }

    fn part_dir(&self, id: &str) -> PathBuf {
        self.spool.join(id)
    }

    /// Starts an upload; returns `(upload id, key, name)`.
    pub fn begin(&self, file_name: &str, content_type: &str) -> (String, String, String) {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let key = uuid::Uuid::new_v4().simple().to_string();
        let name = sanitize_name(file_name);
        let upload = PendingUpload {
            key: key.clone(),
            name: name.clone(),
            content_type: content_type.to_string(),
            parts: BTreeMap::new(),
            received: 0,
            started: Instant::now(),
        };
        self.lock().insert(id.clone(), upload);
        (id, key, name)
    }

    /// Takes a single-part upload's target (key, name, content type), ending the upload.
    pub fn take(&self, id: &str) -> Result<PendingUpload, UploadError> {
        self.lock().remove(id).ok_or(UploadError::Unknown)
    }

    /// Stores one part on disk; returns its ETag.
    pub fn add_part(&self, id: &str, number: u32, bytes: &[u8], limit: usize) -> Result<String, UploadError> {
        {
            let pending = self.lock();
            let upload = pending.get(id).ok_or(UploadError::Unknown)?;
            let replaced = upload.parts.get(&number).map_or(0, |p| p.len);
            if upload.received - replaced + bytes.len() > limit {
                return Err(UploadError::TooLarge(limit));
            }
        }
        // Written outside the lock; a concurrent PUT of the same part number writes the same file.
        let dir = self.part_dir(id);
        let path = dir.join(number.to_string());
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, bytes))
            .map_err(|e| UploadError::Io(format!("spooling part {number}: {e}")))?;
        let etag = etag(bytes);
        let mut pending = self.lock();
        let Some(upload) = pending.get_mut(id) else {
            drop(pending);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(UploadError::Unknown);
        };
        let replaced = upload.parts.get(&number).map_or(0, |p| p.len);
        if upload.received - replaced + bytes.len() > limit {
            return Err(UploadError::TooLarge(limit));
        }
        upload.received = upload.received - replaced + bytes.len();
        upload.parts.insert(number, Part { path, etag: etag.clone(), len: bytes.len() });
        Ok(etag)
    }

    /// Ends a multipart upload: checks `parts` (number, etag) against what was received and
    /// returns the upload with its bytes joined in part order.
    pub fn complete(&self, id: &str, parts: &[(u32, String)]) -> Result<(PendingUpload, Vec<u8>), UploadError> {
        let mut upload = self.lock().remove(id).ok_or(UploadError::Unknown)?;
        let mut listed: Vec<&(u32, String)> = parts.iter().collect();
        listed.sort_by_key(|(n, _)| *n);
        if listed.is_empty() || listed.len() != upload.parts.len() {
            let message = format!("{} parts listed, {} received", listed.len(), upload.parts.len());
            self.lock().insert(id.to_string(), upload);
            return Err(UploadError::BadParts(message));
        }
        for (number, tag) in &listed {
            let matches = upload.parts.get(number).is_some_and(|part| part.etag == *tag);
            if !matches {
                let message = format!("part {number}: not received or its etag differs");
                self.lock().insert(id.to_string(), upload);
                return Err(UploadError::BadParts(message));
            }
        }
        let mut bytes = Vec::with_capacity(upload.received);
        for part in std::mem::take(&mut upload.parts).into_values() {
            let read = std::fs::read(&part.path).map_err(|e| UploadError::Io(format!("reading a spooled part: {e}")));
            match read {
                Ok(data) => bytes.extend_from_slice(&data),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(self.part_dir(id));
                    return Err(e);
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.part_dir(id));
        Ok((upload, bytes))
    }

    /// The key and name an upload in flight will be stored under.
    pub fn target(&self, id: &str) -> Option<(String, String)> {
        self.lock().get(id).map(|u| (u.key.clone(), u.name.clone()))
    }

    /// Drops uploads started more than `age` ago and never finished, with their spooled parts.
    pub fn expire(&self, age: Duration) {
        let expired: Vec<String> = {
            let mut pending = self.lock();
            let ids: Vec<String> =
                pending.iter().filter(|(_, u)| u.started.elapsed() >= age).map(|(id, _)| id.clone()).collect();
            for id in &ids {
                pending.remove(id);
            }
            ids
        };
        for id in expired {
            let _ = std::fs::remove_dir_all(self.part_dir(&id));
        }
    }

    /// Deletes every spooled part (on shutdown).
    pub fn cleanup(&self) {
        self.lock().clear();
        let _ = std::fs::remove_dir_all(&self.spool);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingUpload>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A quoted ETag of a part (FNV-1a, 64 bits: identifies the bytes, not a security check).
pub fn etag(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("\"{hash:016x}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_parts_join_in_order_and_are_checked() {
        let spool = std::env::temp_dir().join(format!("pixart-uploads-test-{}", std::process::id()));
        let uploads = Uploads::new(spool.clone());
        let (id, _, name) = uploads.begin("big file.bin", "application/octet-stream");
        assert_eq!(name, "big_file.bin");
        let e2 = uploads.add_part(&id, 2, b"world", 100).unwrap();
        let e1 = uploads.add_part(&id, 1, b"hello ", 100).unwrap();
        assert_eq!(std::fs::read(spool.join(&id).join("1")).unwrap(), b"hello ", "parts live on disk");
        assert_eq!(uploads.add_part(&id, 3, &[0; 95], 100), Err(UploadError::TooLarge(100)));
        let wrong = uploads.complete(&id, &[(1, e1.clone()), (2, e1.clone())]);
        assert!(matches!(wrong, Err(UploadError::BadParts(_))));
        let (upload, bytes) = uploads.complete(&id, &[(2, e2), (1, e1)]).unwrap();
        assert_eq!(bytes, b"hello world");
        assert_eq!(upload.name, "big_file.bin");
        assert!(uploads.target(&id).is_none());
        assert_eq!(uploads.take(&id).unwrap_err(), UploadError::Unknown);
        assert!(!spool.join(&id).exists(), "completed: its parts are deleted");
        // An abandoned upload's parts go when it expires.
        let (stale, _, _) = uploads.begin("x", "application/octet-stream");
        uploads.add_part(&stale, 1, b"abc", 100).unwrap();
        uploads.expire(Duration::ZERO);
        assert!(!spool.join(&stale).exists());
        uploads.cleanup();
        assert!(!spool.exists());
    }
}
