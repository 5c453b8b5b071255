//! Where a request's input pictures (`image_url`, `mask_url`) may come from, and how they are
//! read: an http(s) URL (fetched with the webhook address rules, a size limit and timeouts), a
//! URL of this server's own `/files/` (read from the storage folder: `fal.storage.upload` then
//! `image_url`), a `data:` URI, or — on the command line only — a local path. The bytes are
//! decoded within the decoding limits (PNG, JPEG, WebP; EXIF orientation applied, alpha
//! dropped). Every problem is a field error naming the field, before any step runs.

use std::path::Path;
use std::sync::Arc;

use pixart_fal::{DecodeLimits, FieldError, GenerateRequest, ImageUrl, InputPictures};
use pixart_pipeline::RgbImage;

use super::files::FileStore;
use super::remote_file::{FetchRules, Problem, RemoteFiles};

/// What an input picture's URL may name, and how it is read.
#[derive(Debug, Clone, Copy)]
pub struct ImageRules {
    /// Any local path (the command line, where the user names their own files); the server
    /// takes none.
    pub any_local_path: bool,
    /// Fetching URLs: addresses, size and time.
    pub fetch: FetchRules,
    /// Decoding: pixels, sides, memory.
    pub decode: DecodeLimits,
}

/// Reads and decodes input pictures.
#[derive(Debug)]
pub struct ImageSource {
    any_local_path: bool,
    decode: DecodeLimits,
    remote: RemoteFiles,
}

impl ImageSource {
    /// A source with these rules and this server's files.
    pub fn new(rules: ImageRules, files: Option<Arc<FileStore>>) -> Self {
        Self {
            any_local_path: rules.any_local_path,
            decode: rules.decode,
            remote: RemoteFiles::new(rules.fetch, files),
        }
    }

    /// The request's pictures, read and decoded. `base_url` is the address the request came in
    /// on (a URL on it under `/files/` is this server's own file). Every field that cannot be
    /// used is reported.
    pub fn resolve(&self, request: &GenerateRequest, base_url: Option<&str>) -> Result<InputPictures, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut read = |field: &str, source: &Option<ImageUrl>| match source {
            Some(source) => match self.picture(source, base_url) {
                Ok(picture) => Some(Arc::new(picture)),
                Err(problem) => {
                    errors.push(FieldError::value(field, problem));
                    None
                }
            },
            None => None,
        };
        let pictures =
            InputPictures { image: read("image_url", &request.image_url), mask: read("mask_url", &request.mask_url) };
        if errors.is_empty() {
            Ok(pictures)
        } else {
            Err(errors)
        }
    }

    /// One picture, read and decoded.
    pub fn picture(&self, source: &ImageUrl, base_url: Option<&str>) -> Result<RgbImage, Problem> {
        let bytes = self.bytes(source.as_str(), base_url)?;
        pixart_fal::decode_image(&bytes, &self.decode).map_err(|e| format!("the picture {e}"))
    }

    fn bytes(&self, text: &str, base_url: Option<&str>) -> Result<Vec<u8>, Problem> {
        if text.starts_with("data:") {
            let bytes = pixart_fal::data_uri_bytes(text)?;
            let limit = self.remote.rules().max_bytes;
            if bytes.len() as u64 > limit {
                return Err(format!("carries {} bytes: more than the limit ({limit} bytes)", bytes.len()));
            }
            return Ok(bytes);
        }
        match url::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => self.remote.get(&url, base_url),
            Ok(url) if url.scheme() == "file" => {
                let path = url.to_file_path().map_err(|()| format!("{text:?} is not a file path"))?;
                self.local(&path)
            }
            Ok(url) if url.scheme().len() > 1 => Err(format!("{}: URLs must be http(s) or data:", url.scheme())),
            _ => self.local(Path::new(text)),
        }
    }

    fn local(&self, path: &Path) -> Result<Vec<u8>, Problem> {
        if !self.any_local_path {
            return Err("local paths are not accepted here: give an http(s) URL, a data: URI, or upload the file \
                        (fal.storage.upload) and give its URL"
                .into());
        }
        self.remote.read_local(path)
    }
}
