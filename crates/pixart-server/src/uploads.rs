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
    /// Parts received so far (multipart uploads), by part number.
    pub parts: BTreeMap<u32, Vec<u8>>,
    /// Bytes received so far.
    pub received: usize,
    /// When it started (unfinished uploads expire).
    pub started: Instant,
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
}

/// Uploads in flight, by upload id.
#[derive(Debug, Default)]
pub struct Uploads {
    pending: Mutex<HashMap<String, PendingUpload>>,
}

impl Uploads {
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

    /// Stores one part; returns its ETag.
    pub fn add_part(&self, id: &str, number: u32, bytes: Vec<u8>, limit: usize) -> Result<String, UploadError> {
        let mut pending = self.lock();
        let upload = pending.get_mut(id).ok_or(UploadError::Unknown)?;
        let replaced = upload.parts.get(&number).map_or(0, Vec::len);
        if upload.received - replaced + bytes.len() > limit {
            return Err(UploadError::TooLarge(limit));
        }
        let etag = etag(&bytes);
        upload.received = upload.received - replaced + bytes.len();
        upload.parts.insert(number, bytes);
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
            let matches = upload.parts.get(number).is_some_and(|bytes| etag(bytes) == *tag);
            if !matches {
                let message = format!("part {number}: not received or its etag differs");
                self.lock().insert(id.to_string(), upload);
                return Err(UploadError::BadParts(message));
            }
        }
        let bytes: Vec<u8> = std::mem::take(&mut upload.parts).into_values().flatten().collect();
        Ok((upload, bytes))
    }

    /// The key and name an upload in flight will be stored under.
    pub fn target(&self, id: &str) -> Option<(String, String)> {
        self.lock().get(id).map(|u| (u.key.clone(), u.name.clone()))
    }

    /// Drops uploads started more than `age` ago and never finished.
    pub fn expire(&self, age: Duration) {
        self.lock().retain(|_, upload| upload.started.elapsed() < age);
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
        let uploads = Uploads::default();
        let (id, _, name) = uploads.begin("big file.bin", "application/octet-stream");
        assert_eq!(name, "big_file.bin");
        let e2 = uploads.add_part(&id, 2, b"world".to_vec(), 100).unwrap();
        let e1 = uploads.add_part(&id, 1, b"hello ".to_vec(), 100).unwrap();
        assert_eq!(uploads.add_part(&id, 3, vec![0; 95], 100), Err(UploadError::TooLarge(100)));
        let wrong = uploads.complete(&id, &[(1, e1.clone()), (2, e1.clone())]);
        assert!(matches!(wrong, Err(UploadError::BadParts(_))));
        let (upload, bytes) = uploads.complete(&id, &[(2, e2), (1, e1)]).unwrap();
        assert_eq!(bytes, b"hello world");
        assert_eq!(upload.name, "big_file.bin");
        assert!(uploads.target(&id).is_none());
        assert_eq!(uploads.take(&id).unwrap_err(), UploadError::Unknown);
    }
}
