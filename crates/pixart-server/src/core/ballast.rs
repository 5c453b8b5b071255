//! [`Ballast`]: space held in the storage folder for the job store. When the disk fills up
//! (another process, a flood of uploads), the store may not be able to record even a failure;
//! giving up the ballast frees room for it, so a request that could not store its images still
//! ends (failed, with its webhook) instead of staying "in progress". It is written again once
//! the disk has room.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::files::FREE_SPACE_RESERVE;

/// A file of reserved space.
#[derive(Debug)]
pub struct Ballast {
    path: PathBuf,
}

impl Ballast {
    /// Its size.
    pub const SIZE: u64 = 4 << 20;

    /// The ballast at `path` (not written yet: see [`Ballast::ensure`]).
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf() }
    }

    /// Writes it when it is missing and the disk has room for it beyond [`FREE_SPACE_RESERVE`];
    /// returns whether it is in place. Blocking.
    pub fn ensure(&self) -> io::Result<bool> {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() == Self::SIZE) {
            return Ok(true);
        }
        let folder = self.path.parent().unwrap_or(Path::new("."));
        if fs4::available_space(folder)? < Self::SIZE + FREE_SPACE_RESERVE {
            return Ok(false);
        }
        // Real bytes, not a sparse file: the space must be taken to be given back.
        let partial = self.path.with_extension("partial");
        let written = std::fs::File::create(&partial).and_then(|mut file| {
            let block = vec![0u8; 1 << 20];
            for _ in 0..Self::SIZE / block.len() as u64 {
                file.write_all(&block)?;
            }
            file.sync_all()
        });
        match written.and_then(|()| std::fs::rename(&partial, &self.path)) {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }

    /// Deletes it, freeing its space; returns whether it was there.
    pub async fn release(&self) -> bool {
        tokio::fs::remove_file(&self.path).await.is_ok()
    }
}
