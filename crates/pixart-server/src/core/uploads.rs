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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most parts of one multipart upload (part numbers run from 1 to this), as in S3.
pub const MAX_PARTS: u32 = 10_000;

use super::files::sanitize_name;

/// An upload started but not finished: its target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingUpload {
    /// The file's key in the store.
    pub key: String,
    /// Its sanitised name.
    pub name: String,
    /// Its MIME type.
    pub content_type: String,
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
/// memory, never a blocking write on the runtime), counted and hashed for the part's ETag.
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
    file: tokio::io::BufWriter<tokio::fs::File>,
    len: usize,
    hash: u64,
    limit: usize,
}

impl SpoolFile {
    /// A new spool file at `path` of at most `limit` bytes.
    pub async fn create(path: PathBuf, limit: usize) -> Result<Self, UploadError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io("spooling"))?;
        }
        let file = tokio::fs::File::create(&path).await.map_err(io("spooling"))?;
        Ok(Self { path, file: tokio::io::BufWriter::new(file), len: 0, hash: FNV_OFFSET, limit })
    }

    /// Appends a chunk; refuses to grow past the limit it was created with.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        use tokio::io::AsyncWriteExt;
        if self.len + chunk.len() > self.limit {
            return Err(UploadError::TooLarge(self.limit));
        }
        self.file.write_all(chunk).await.map_err(io("spooling"))?;
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

    /// Flushes it; returns the finished file.
    pub async fn finish(mut self) -> Result<Spooled, UploadError> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await.map_err(io("spooling"))?;
        let Self { path, len, hash, .. } = self;
        Ok(Spooled { path, len, etag: format!("\"{hash:016x}\"") })
    }
}

/// A received file, written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    /// Where it is.
    pub path: PathBuf,
    /// Its length in bytes.
    pub len: usize,
    /// Its ETag (a hash of its bytes).
    pub etag: String,
}

/// Uploads in flight, kept in a spool folder: `{spool}/{id}/upload.json` (the target) and
/// `{spool}/{id}/{n}` + `{n}.etag` per part. The parts are on disk, so any HTTP front sharing
/// the storage folder can take any part of an upload, and an upload survives a restart. The
/// parts' count and total size are kept beside them (`{spool}/{id}/sizes`, updated under a lock
/// of the upload's `upload.json`), so checking the limits costs the same for every part (at
/// most [`MAX_PARTS`] per upload, each non-empty).
#[derive(Debug)]
pub struct Uploads {
    spool: PathBuf,
}

fn io(what: &str) -> impl Fn(std::io::Error) -> UploadError + '_ {
    move |e| UploadError::Io(format!("{what}: {e}"))
}

impl Uploads {
    /// Uploads spooled under `spool`.
    pub fn new(spool: PathBuf) -> Self {
        Self { spool }
    }

    fn dir(&self, id: &str) -> Option<PathBuf> {
        // Ids are 32 hex digits (see `begin`); anything else names no upload.
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| self.spool.join(id))
    }

    /// A new spool file of at most `limit` bytes.
    pub async fn spool_file(&self, limit: usize) -> Result<SpoolFile, UploadError> {
        SpoolFile::create(self.spool.join(format!("incoming-{}", uuid::Uuid::new_v4().simple())), limit).await
    }

    /// Starts an upload; returns `(upload id, key, name)`.
    pub fn begin(&self, file_name: &str, content_type: &str) -> Result<(String, String, String), UploadError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let upload = PendingUpload {
            key: uuid::Uuid::new_v4().simple().to_string(),
            name: sanitize_name(file_name),
            content_type: content_type.to_string(),
        };
        let dir = self.spool.join(&id);
        std::fs::create_dir_all(&dir).map_err(io("starting an upload"))?;
        let meta = serde_json::to_vec(&upload).map_err(|e| UploadError::Io(e.to_string()))?;
        std::fs::write(dir.join("upload.json"), meta).map_err(io("starting an upload"))?;
        Ok((id, upload.key, upload.name))
    }

    fn read_target(dir: &Path) -> Result<PendingUpload, UploadError> {
        let meta = std::fs::read(dir.join("upload.json")).map_err(|_| UploadError::Unknown)?;
        serde_json::from_slice(&meta).map_err(|e| UploadError::Io(format!("upload.json: {e}")))
    }

    /// The key and name an upload in flight will be stored under.
    pub fn target(&self, id: &str) -> Option<(String, String)> {
        let upload = Self::read_target(&self.dir(id)?).ok()?;
        Some((upload.key, upload.name))
    }

    /// Takes an upload for finishing: its folder is renamed away (atomic, so two calls cannot
    /// both finish it); returns the folder it now has and its target.
    fn take_dir(&self, id: &str) -> Result<(PathBuf, PendingUpload), UploadError> {
        let dir = self.dir(id).ok_or(UploadError::Unknown)?;
        let taken = self.spool.join(format!("finishing-{id}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::rename(&dir, &taken).map_err(|_| UploadError::Unknown)?;
        match Self::read_target(&taken) {
            Ok(upload) => Ok((taken, upload)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&taken);
                Err(e)
            }
        }
    }

    /// Takes a single-part upload's target (key, name, content type), ending the upload.
    pub fn take(&self, id: &str) -> Result<PendingUpload, UploadError> {
        let (taken, upload) = self.take_dir(id)?;
        let _ = std::fs::remove_dir_all(&taken);
        Ok(upload)
    }

    /// The parts received so far: number → (path, length, etag).
    fn parts(dir: &Path) -> BTreeMap<u32, (PathBuf, usize, String)> {
        let mut parts = BTreeMap::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Some(number) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let len = entry.metadata().map(|m| m.len() as usize).unwrap_or(0);
            let etag = std::fs::read_to_string(dir.join(format!("{number}.etag"))).unwrap_or_default();
            parts.insert(number, (entry.path(), len, etag));
        }
        parts
    }

    /// Adds one received part (a finished [`SpoolFile`]); returns its ETag. The upload's parts
    /// together may not exceed `limit` bytes.
    pub fn add_part(&self, id: &str, number: u32, spooled: &Spooled, limit: usize) -> Result<String, UploadError> {
        let result = self.register_part(id, number, &spooled.path, spooled.len, &spooled.etag, limit);
        if result.is_err() {
            let _ = std::fs::remove_file(&spooled.path);
        }
        result.map(|()| spooled.etag.clone())
    }

    fn register_part(
        &self,
        id: &str,
        number: u32,
        incoming: &Path,
        len: usize,
        etag: &str,
        limit: usize,
    ) -> Result<(), UploadError> {
        if !(1..=MAX_PARTS).contains(&number) {
            return Err(UploadError::BadParts(format!("part numbers run from 1 to {MAX_PARTS}, got {number}")));
        }
        if len == 0 {
            return Err(UploadError::BadParts(format!("part {number} is empty")));
        }
        let dir = self.dir(id).ok_or(UploadError::Unknown)?;
        // Held while the part is counted and moved in: parts may arrive at several fronts at once.
        let lock = std::fs::File::open(dir.join("upload.json")).map_err(|_| UploadError::Unknown)?;
        fs4::FileExt::lock(&lock).map_err(io("locking an upload"))?;
        let (count, total) = Self::sizes(&dir);
        let target = dir.join(number.to_string());
        let replaced = std::fs::metadata(&target).map(|m| m.len() as usize).ok();
        let count = count + usize::from(replaced.is_none());
        let total = total.saturating_sub(replaced.unwrap_or(0)) + len;
        if total > limit {
            return Err(UploadError::TooLarge(limit));
        }
        if count > MAX_PARTS as usize {
            return Err(UploadError::BadParts(format!("an upload has at most {MAX_PARTS} parts")));
        }
        // The new count and total are written first (through a temporary name): a part that
        // then fails to move in is over-counted, never under-counted.
        let sizes = dir.join("sizes.partial");
        std::fs::write(&sizes, format!("{count} {total}")).map_err(io("spooling a part"))?;
        std::fs::rename(&sizes, dir.join("sizes")).map_err(io("spooling a part"))?;
        std::fs::write(dir.join(format!("{number}.etag")), etag).map_err(io("spooling a part"))?;
        std::fs::rename(incoming, target).map_err(|_| UploadError::Unknown)
    }

    /// The count and total size of an upload's parts (from `sizes`; counted once from the parts
    /// themselves for an upload spooled before it was kept).
    fn sizes(dir: &Path) -> (usize, usize) {
        let kept = std::fs::read_to_string(dir.join("sizes")).ok().and_then(|text| {
            let (count, total) = text.split_once(' ')?;
            Some((count.parse().ok()?, total.parse().ok()?))
        });
        kept.unwrap_or_else(|| {
            let parts = Self::parts(dir);
            (parts.len(), parts.values().map(|p| p.1).sum())
        })
    }

    /// Ends a multipart upload: checks `parts` (number, etag) against what was received and
    /// returns the upload with its parts joined, in order, into one spooled file. Call
    /// [`Uploads::discard`] with the returned folder once the file was moved away.
    pub fn complete(&self, id: &str, parts: &[(u32, String)]) -> Result<(PendingUpload, PathBuf), UploadError> {
        let (taken, upload) = self.take_dir(id)?;
        let give_back = |error: UploadError| {
            if let Some(dir) = self.dir(id) {
                let _ = std::fs::rename(&taken, dir);
            }
            error
        };
        let received = Self::parts(&taken);
        let mut listed: Vec<&(u32, String)> = parts.iter().collect();
        listed.sort_by_key(|(n, _)| *n);
        if listed.is_empty() || listed.len() != received.len() {
            return Err(give_back(UploadError::BadParts(format!(
                "{} parts listed, {} received",
                listed.len(),
                received.len()
            ))));
        }
        for (number, tag) in &listed {
            if received.get(number).is_none_or(|part| part.2 != *tag) {
                return Err(give_back(UploadError::BadParts(format!(
                    "part {number}: not received or its etag differs"
                ))));
            }
        }
        let joined = taken.join("joined");
        let join = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&joined)?);
            for (path, _, _) in received.values() {
                std::io::copy(&mut std::fs::File::open(path)?, &mut out)?;
            }
            std::io::Write::flush(&mut out)
        };
        match join() {
            Ok(()) => Ok((upload, joined)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&taken);
                Err(UploadError::Io(format!("joining the parts: {e}")))
            }
        }
    }

    /// Deletes what is left of a completed upload (the folder holding `joined`).
    pub fn discard(&self, joined: &Path) {
        if let Some(dir) = joined.parent().filter(|d| d.starts_with(&self.spool)) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Deletes uploads started more than `age` ago and never finished, and spool files nobody
    /// finished (a body cut off mid-way).
    pub fn expire(&self, age: Duration) {
        let Ok(entries) = std::fs::read_dir(&self.spool) else { return };
        for entry in entries.flatten() {
            let stale = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|e| e >= age));
            if !stale {
                continue;
            }
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }

    /// Deletes the spool folder (a temporary storage folder's shutdown).
    pub fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.spool);
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
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let spooled = runtime.block_on(async {
            let mut file = uploads.spool_file(limit).await?;
            file.write(bytes).await?;
            file.finish().await
        })?;
        uploads.add_part(id, number, &spooled, limit)
    }

    #[test]
    fn multipart_parts_join_in_order_and_are_checked() {
        let spool = std::env::temp_dir().join(format!("pixart-uploads-test-{}", uuid::Uuid::new_v4()));
        let uploads = Uploads::new(spool.clone());
        let (id, _, name) = uploads.begin("big file.bin", "application/octet-stream").unwrap();
        assert_eq!(name, "big_file.bin");
        let e2 = part(&uploads, &id, 2, b"world", 100).unwrap();
        // Another front on the same folder takes the next part.
        let e1 = part(&Uploads::new(spool.clone()), &id, 1, b"hello ", 100).unwrap();
        assert_ne!(e1, e2);
        assert_eq!(std::fs::read(spool.join(&id).join("1")).unwrap(), b"hello ", "parts live on disk");
        assert_eq!(part(&uploads, &id, 3, &[0; 95], 100), Err(UploadError::TooLarge(100)));
        // Part numbers are bounded and a part has bytes.
        assert!(matches!(part(&uploads, &id, MAX_PARTS + 1, b"x", 100), Err(UploadError::BadParts(_))));
        assert!(matches!(part(&uploads, &id, 3, b"", 100), Err(UploadError::BadParts(m)) if m.contains("empty")));
        // The count and total kept beside the parts hold across fronts: replacing part 2 counts its
        // new size only.
        part(&Uploads::new(spool.clone()), &id, 2, b"world", 100).unwrap();
        assert_eq!(std::fs::read_to_string(spool.join(&id).join("sizes")).unwrap(), "2 11");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut big = uploads.spool_file(10).await.unwrap();
            assert_eq!(big.write(&[0; 11]).await, Err(UploadError::TooLarge(10)), "a spool file stops at its limit");
        });
        let wrong = uploads.complete(&id, &[(1, e1.clone()), (2, e1.clone())]);
        assert!(matches!(wrong, Err(UploadError::BadParts(_))));
        assert!(uploads.target(&id).is_some(), "a refused complete leaves the upload as it was");
        let (upload, joined) = uploads.complete(&id, &[(2, e2), (1, e1)]).unwrap();
        assert_eq!(std::fs::read(&joined).unwrap(), b"hello world");
        assert_eq!(upload.name, "big_file.bin");
        uploads.discard(&joined);
        assert!(uploads.target(&id).is_none());
        assert_eq!(uploads.take(&id).unwrap_err(), UploadError::Unknown);
        assert!(uploads.target("../../etc").is_none());
        // An abandoned upload's parts go when it expires, and so do unfinished spool files.
        let (stale, _, _) = uploads.begin("x", "application/octet-stream").unwrap();
        part(&uploads, &stale, 1, b"abc", 100).unwrap();
        uploads.expire(Duration::ZERO);
        assert!(!spool.join(&stale).exists());
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
        uploads.cleanup();
        assert!(!spool.exists());
    }
}
