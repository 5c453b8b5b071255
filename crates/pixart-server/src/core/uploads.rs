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

use super::files::sanitize_name;

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

/// A file being received: bytes written to the spool folder as they arrive (never held in
/// memory), counted and hashed for the part's ETag.
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    len: usize,
    hash: u64,
    limit: usize,
}

impl SpoolFile {
    /// Appends a chunk; refuses to grow past the limit it was created with.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        if self.len + chunk.len() > self.limit {
            return Err(UploadError::TooLarge(self.limit));
        }
        std::io::Write::write_all(&mut self.file, chunk).map_err(|e| UploadError::Io(format!("spooling: {e}")))?;
        self.len += chunk.len();
        self.hash = fnv1a(self.hash, chunk);
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flushes it; returns its path, length and ETag.
    pub fn finish(self) -> Result<(PathBuf, usize, String), UploadError> {
        let Self { path, file, len, hash, .. } = self;
        file.into_inner().map_err(|e| UploadError::Io(format!("spooling: {e}")))?;
        Ok((path, len, format!("\"{hash:016x}\"")))
    }
}

/// Uploads in flight, by upload id; their bytes are spooled under a folder.
#[derive(Debug)]
pub struct Uploads {
    pending: Mutex<HashMap<String, PendingUpload>>,
    spool: PathBuf,
}

impl Uploads {
    /// Uploads spooled under `spool` (emptied now: an upload does not survive a restart, the
    /// clients start it again).
    pub fn new(spool: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&spool);
        Self { pending: Mutex::default(), spool }
    }

    fn part_dir(&self, id: &str) -> PathBuf {
        self.spool.join(sanitize_name(id))
    }

    /// A new spool file of at most `limit` bytes.
    pub fn spool_file(&self, limit: usize) -> Result<SpoolFile, UploadError> {
        let io = |e: std::io::Error| UploadError::Io(format!("spooling: {e}"));
        std::fs::create_dir_all(&self.spool).map_err(io)?;
        let path = self.spool.join(format!("incoming-{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&path).map_err(io)?;
        Ok(SpoolFile { path, file: std::io::BufWriter::new(file), len: 0, hash: FNV_OFFSET, limit })
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

    /// Adds one received part (a finished [`SpoolFile`]); returns its ETag. The upload's parts
    /// together may not exceed `limit` bytes.
    pub fn add_part(&self, id: &str, number: u32, spooled: SpoolFile, limit: usize) -> Result<String, UploadError> {
        let (incoming, len, etag) = spooled.finish()?;
        let result = self.register_part(id, number, &incoming, len, &etag, limit);
        if result.is_err() {
            let _ = std::fs::remove_file(&incoming);
        }
        result.map(|()| etag)
    }

    fn register_part(
        &self,
        id: &str,
        number: u32,
        incoming: &std::path::Path,
        len: usize,
        etag: &str,
        limit: usize,
    ) -> Result<(), UploadError> {
        let mut pending = self.lock();
        let upload = pending.get_mut(id).ok_or(UploadError::Unknown)?;
        let replaced = upload.parts.get(&number).map_or(0, |p| p.len);
        if upload.received - replaced + len > limit {
            return Err(UploadError::TooLarge(limit));
        }
        let dir = self.part_dir(id);
        let path = dir.join(number.to_string());
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::rename(incoming, &path))
            .map_err(|e| UploadError::Io(format!("spooling part {number}: {e}")))?;
        upload.received = upload.received - replaced + len;
        upload.parts.insert(number, Part { path, etag: etag.to_string(), len });
        Ok(())
    }

    /// Ends a multipart upload: checks `parts` (number, etag) against what was received and
    /// returns the upload with its parts joined, in order, into one spooled file.
    pub fn complete(&self, id: &str, parts: &[(u32, String)]) -> Result<(PendingUpload, PathBuf), UploadError> {
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
        let joined = self.part_dir(id).join("joined");
        let mut join = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&joined)?);
            for part in std::mem::take(&mut upload.parts).into_values() {
                std::io::copy(&mut std::fs::File::open(&part.path)?, &mut out)?;
                std::fs::remove_file(&part.path)?;
            }
            std::io::Write::flush(&mut out)
        };
        match join() {
            Ok(()) => Ok((upload, joined)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.part_dir(id));
                Err(UploadError::Io(format!("joining the parts: {e}")))
            }
        }
    }

    /// Deletes what is left of a finished upload (after its joined file was moved away).
    pub fn discard(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.part_dir(id));
    }

    /// The key and name an upload in flight will be stored under.
    pub fn target(&self, id: &str) -> Option<(String, String)> {
        self.lock().get(id).map(|u| (u.key.clone(), u.name.clone()))
    }

    /// Drops uploads started more than `age` ago and never finished, with their spooled parts,
    /// and spool files nobody finished (a body cut off mid-way).
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
        let Ok(entries) = std::fs::read_dir(&self.spool) else { return };
        for entry in entries.flatten() {
            let stale = entry.file_name().to_str().is_some_and(|n| n.starts_with("incoming-"))
                && entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|e| e >= age));
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
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

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bits, continued over `bytes`: identifies a part's bytes, not a security check.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(uploads: &Uploads, id: &str, number: u32, bytes: &[u8], limit: usize) -> Result<String, UploadError> {
        let mut file = uploads.spool_file(limit)?;
        file.write(bytes)?;
        uploads.add_part(id, number, file, limit)
    }

    #[test]
    fn multipart_parts_join_in_order_and_are_checked() {
        let spool = std::env::temp_dir().join(format!("pixart-uploads-test-{}", std::process::id()));
        let uploads = Uploads::new(spool.clone());
        let (id, _, name) = uploads.begin("big file.bin", "application/octet-stream");
        assert_eq!(name, "big_file.bin");
        let e2 = part(&uploads, &id, 2, b"world", 100).unwrap();
        let e1 = part(&uploads, &id, 1, b"hello ", 100).unwrap();
        assert_ne!(e1, e2);
        assert_eq!(std::fs::read(spool.join(&id).join("1")).unwrap(), b"hello ", "parts live on disk");
        assert_eq!(part(&uploads, &id, 3, &[0; 95], 100), Err(UploadError::TooLarge(100)));
        let mut big = uploads.spool_file(10).unwrap();
        assert_eq!(big.write(&[0; 11]), Err(UploadError::TooLarge(10)), "a spool file stops at its limit");
        let wrong = uploads.complete(&id, &[(1, e1.clone()), (2, e1.clone())]);
        assert!(matches!(wrong, Err(UploadError::BadParts(_))));
        let (upload, joined) = uploads.complete(&id, &[(2, e2), (1, e1)]).unwrap();
        assert_eq!(std::fs::read(&joined).unwrap(), b"hello world");
        assert_eq!(upload.name, "big_file.bin");
        uploads.discard(&id);
        assert!(uploads.target(&id).is_none());
        assert_eq!(uploads.take(&id).unwrap_err(), UploadError::Unknown);
        assert!(!spool.join(&id).exists(), "completed: its parts are deleted");
        // An abandoned upload's parts go when it expires, and so do unfinished spool files.
        let (stale, _, _) = uploads.begin("x", "application/octet-stream");
        part(&uploads, &stale, 1, b"abc", 100).unwrap();
        uploads.expire(Duration::ZERO);
        assert!(!spool.join(&stale).exists());
        assert_eq!(
            std::fs::read_dir(&spool).unwrap().count(),
            0,
            "{:?}",
            std::fs::read_dir(&spool).unwrap().collect::<Vec<_>>()
        );
        uploads.cleanup();
        assert!(!spool.exists());
    }
}
