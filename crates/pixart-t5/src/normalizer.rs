//! sentencepiece's text normalizer, reproduced exactly: the precompiled charsmap (a darts-clone
//! double-array trie of rewrite rules, e.g. NFKC for `nmt_nfkc`) applied by longest prefix match,
//! leading/trailing whitespace removed, runs of spaces collapsed, a dummy-prefix `▁` added and
//! spaces escaped as `▁` (sentencepiece `normalizer.cc`).
//!
//! The `tokenizers` crate's `Precompiled` normalizer works per grapheme cluster and keeps only the
//! first match of a cluster, which drops characters (e.g. `e\u{301}\u{302}` loses the circumflex);
//! sentencepiece does not, so we walk the trie ourselves.

use crate::error::SpieceError;

/// The `▁` sentencepiece writes for a space.
pub const SPACE_SYMBOL: char = '▁';

/// The compiled normalization rules of a `spiece.model`.
#[derive(Debug, Clone)]
pub struct PrecompiledCharsmap {
    /// Double-array trie units (darts-clone layout).
    trie: Vec<u32>,
    /// NUL-separated replacement strings, indexed by the trie's values.
    normalized: Vec<u8>,
}

impl PrecompiledCharsmap {
    /// Parses `NormalizerSpec.precompiled_charsmap`: a little-endian u32 trie size in bytes, the
    /// trie units, then the replacement strings.
    pub fn parse(blob: &[u8]) -> Result<Self, SpieceError> {
        let invalid = || SpieceError::InvalidCharsmap;
        let size = u32::from_le_bytes(blob.get(..4).ok_or_else(invalid)?.try_into().map_err(|_| invalid())?) as usize;
        let trie_end = size.checked_add(4).ok_or_else(invalid)?;
        let trie_bytes = blob.get(4..trie_end).ok_or_else(invalid)?;
        if !size.is_multiple_of(4) || size == 0 {
            return Err(invalid());
        }
        let trie = trie_bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Self { trie, normalized: blob.get(trie_end..).unwrap_or_default().to_vec() })
    }

    /// The longest rule matching a prefix of `input`: `(bytes consumed, replacement)`.
    pub fn longest_prefix(&self, input: &[u8]) -> Option<(usize, &str)> {
        let unit = |pos: usize| self.trie.get(pos).copied();
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let has_leaf = |u: u32| (u >> 8) & 1 == 1;
        let label = |u: u32| u & ((1 << 31) | 0xff);
        let value = |u: u32| (u & ((1 << 31) - 1)) as usize;

        let mut best = None;
        let mut node = offset(unit(0)?);
        for (i, &byte) in input.iter().enumerate() {
            node ^= byte as usize;
            let u = unit(node)?;
            if label(u) != u32::from(byte) {
                break;
            }
            node ^= offset(u);
            if has_leaf(u) {
                best = Some((i + 1, value(unit(node)?)));
            }
        }
        let (len, start) = best?;
        let tail = self.normalized.get(start..)?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let replacement = std::str::from_utf8(&tail[..end]).ok()?;
        Some((len, replacement))
    }
}

/// sentencepiece's `Normalizer` with the flags of a `NormalizerSpec`.
#[derive(Debug, Clone)]
pub struct SentencePieceNormalizer {
    /// The rewrite rules; `None` when the model has none (identity).
    pub charsmap: Option<PrecompiledCharsmap>,
    /// Prepend `▁` to non-empty text.
    pub add_dummy_prefix: bool,
    /// Drop leading and trailing spaces, collapse inner runs.
    pub remove_extra_whitespaces: bool,
    /// Write spaces as `▁`.
    pub escape_whitespaces: bool,
}

impl SentencePieceNormalizer {
    /// Normalizes one prefix: the longest rule, else one character unchanged.
    fn normalize_prefix<'a>(&'a self, input: &'a str) -> (&'a str, usize) {
        if let Some((len, replacement)) = self.charsmap.as_ref().and_then(|c| c.longest_prefix(input.as_bytes())) {
            // A rule never ends inside a UTF-8 character of valid input; guard anyway.
            if input.is_char_boundary(len) {
                return (replacement, len);
            }
        }
        let len = input.chars().next().map_or(0, char::len_utf8);
        (&input[..len], len)
    }

    /// Normalizes `text` as sentencepiece does before segmentation.
    pub fn normalize(&self, text: &str) -> String {
        let mut input = text;
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let (piece, consumed) = self.normalize_prefix(input);
                if piece != " " {
                    break;
                }
                input = &input[consumed..];
            }
        }
        let mut out = String::with_capacity(input.len() + 3);
        if input.is_empty() {
            return out;
        }
        let space = if self.escape_whitespaces { SPACE_SYMBOL } else { ' ' };
        if self.add_dummy_prefix {
            out.push(space);
        }
        let mut prev_is_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut piece, consumed) = self.normalize_prefix(input);
            if prev_is_space {
                piece = piece.trim_start_matches(' ');
            }
            if !piece.is_empty() {
                for c in piece.chars() {
                    out.push(if c == ' ' { space } else { c });
                }
                prev_is_space = piece.ends_with(' ');
            }
            input = &input[consumed..];
            if !self.remove_extra_whitespaces {
                prev_is_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.pop();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> SentencePieceNormalizer {
        SentencePieceNormalizer {
            charsmap: None,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }

    #[test]
    fn whitespace_rules_without_a_charsmap() {
        let n = plain();
        assert_eq!(n.normalize("  a   b  "), "▁a▁b");
        assert_eq!(n.normalize("   "), "");
        assert_eq!(n.normalize(""), "");
        let keep = SentencePieceNormalizer { remove_extra_whitespaces: false, add_dummy_prefix: false, ..plain() };
        assert_eq!(keep.normalize(" a  b "), "▁a▁▁b▁");
    }

    #[test]
    fn corrupt_charsmaps_are_errors() {
        assert!(PrecompiledCharsmap::parse(&[]).is_err());
        assert!(PrecompiledCharsmap::parse(&[8, 0, 0, 0, 1]).is_err());
        assert!(PrecompiledCharsmap::parse(&[3, 0, 0, 0, 1, 2, 3]).is_err());
    }

    #[test]
    fn lookups_outside_the_trie_do_not_panic() {
        // A one-unit trie whose offset points far outside the array.
        let map = PrecompiledCharsmap::parse(&[4, 0, 0, 0, 0, 0xff, 0xff, 0x7f]).unwrap();
        assert_eq!(map.longest_prefix(b"abc"), None);
    }
}
