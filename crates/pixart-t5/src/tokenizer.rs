//! The T5 tokenizer: a sentencepiece Unigram model read from `spiece.model` (what the published
//! PixArt-Σ repos ship) or from a `tokenizer.json` when only that is present.
//!
//! From `spiece.model`, encoding follows the slow (sentencepiece) `T5Tokenizer` exactly: special
//! tokens (`</s>`, `<pad>`, `<unk>`, `<extra_id_N>`) split out of the raw text, each other chunk
//! normalized by sentencepiece's normalizer ([`crate::normalizer`]) and segmented by Unigram
//! Viterbi over the whole chunk, truncation to `max_length - 1` tokens and `</s>` appended.
//!
//! From `tokenizer.json`, the `tokenizers` crate runs the file as transformers would. The two
//! differ on rare inputs (transformers 5's conversion splits on every Unicode whitespace and drops
//! characters after a composed grapheme); `spiece.model` is preferred when both are present.

use std::path::Path;

use serde::Deserialize;
use tokenizers::models::unigram::Unigram;
use tokenizers::{Model, Tokenizer};

use pixart_core::{UnsupportedConfig, WeightsError};

use crate::error::{SpieceError, T5Error};
use crate::normalizer::{PrecompiledCharsmap, SentencePieceNormalizer};
use crate::spiece::{PieceType, SentencePieceModel, MODEL_TYPE_UNIGRAM};

/// The number of `<extra_id_N>` sentinel tokens T5 appends to the sentencepiece vocabulary
/// unless `tokenizer_config.json` says otherwise.
pub const DEFAULT_EXTRA_IDS: usize = 100;

/// The most sentinel tokens a `tokenizer_config.json` may ask for.
pub const MAX_EXTRA_IDS: usize = 10_000;

/// A prompt encoded and padded to a fixed length, as the text encoder consumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedTokens {
    /// Token ids, `</s>`-terminated, padded with the pad id.
    pub ids: Vec<u32>,
    /// 1 for real tokens (including `</s>`), 0 for padding.
    pub mask: Vec<u32>,
}

impl PaddedTokens {
    /// The number of real (unpadded) tokens.
    pub fn len_unpadded(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0).count()
    }
}

/// The T5 sentencepiece tokenizer.
#[derive(Clone)]
pub struct T5Tokenizer {
    backend: Backend,
    vocab_size: usize,
    eos_id: u32,
    pad_id: u32,
}

#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one per loaded tokenizer: its size does not matter
enum Backend {
    /// Built from `spiece.model`: sentencepiece's own algorithm.
    SentencePiece(SentencePieceEncoder),
    /// A `tokenizer.json`, run by the `tokenizers` crate as transformers runs it.
    TokenizerJson(Tokenizer),
}

/// sentencepiece's encoder with the slow `T5Tokenizer`'s handling of special tokens.
#[derive(Clone)]
struct SentencePieceEncoder {
    normalizer: SentencePieceNormalizer,
    unigram: Unigram,
    /// Special tokens matched whole in the raw text, longest first.
    specials: Vec<(String, u32)>,
}

impl SentencePieceEncoder {
    /// Splits the text on special tokens (leftmost match, longest on ties), then normalizes and
    /// segments each remaining chunk on its own, as the slow tokenizer does.
    fn encode(&self, text: &str) -> Result<Vec<u32>, T5Error> {
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            let next = self
                .specials
                .iter()
                .filter_map(|(tok, id)| rest.find(tok.as_str()).map(|pos| (pos, tok.len(), *id)))
                .min_by_key(|&(pos, len, _)| (pos, std::cmp::Reverse(len)));
            let Some((pos, len, id)) = next else {
                self.encode_chunk(rest, &mut ids)?;
                return Ok(ids);
            };
            self.encode_chunk(&rest[..pos], &mut ids)?;
            ids.push(id);
            rest = &rest[pos + len..];
        }
    }

    fn encode_chunk(&self, chunk: &str, ids: &mut Vec<u32>) -> Result<(), T5Error> {
        let normalized = self.normalizer.normalize(chunk);
        if normalized.is_empty() {
            return Ok(());
        }
        let tokens = self
            .unigram
            .tokenize(&normalized)
            .map_err(|source| T5Error::Tokenizers { context: "cannot segment the prompt".into(), source })?;
        ids.extend(tokens.iter().map(|t| t.id));
        Ok(())
    }
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    extra_ids: Option<usize>,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.backend {
            Backend::SentencePiece(_) => "spiece.model",
            Backend::TokenizerJson(_) => "tokenizer.json",
        };
        f.debug_struct("T5Tokenizer")
            .field("backend", &backend)
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl T5Tokenizer {
    /// Loads the tokenizer of a diffusers `tokenizer/` folder: `spiece.model` when present (the
    /// published layout, encoded exactly like the slow `T5Tokenizer`), else `tokenizer.json`.
    /// `tokenizer_config.json`, when present, may set `extra_ids`.
    pub fn from_dir(dir: &Path) -> Result<Self, T5Error> {
        let spiece = dir.join("spiece.model");
        if spiece.is_file() {
            let config_path = dir.join("tokenizer_config.json");
            let config: TokenizerConfig = if config_path.is_file() {
                pixart_core::load_config(&config_path)?
            } else {
                TokenizerConfig::default()
            };
            let extra_ids = config.extra_ids.unwrap_or(DEFAULT_EXTRA_IDS);
            if extra_ids > MAX_EXTRA_IDS {
                return Err(UnsupportedConfig::new("extra_ids", extra_ids, format!("at most {MAX_EXTRA_IDS}"))
                    .in_file(&config_path)
                    .into());
            }
            return Self::from_spiece_model(&spiece, extra_ids);
        }
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        Err(T5Error::NoTokenizer { dir: dir.to_path_buf() })
    }

    /// Builds the tokenizer from a sentencepiece `spiece.model`, appending `extra_ids` sentinel
    /// tokens `<extra_id_{extra_ids-1}>` … `<extra_id_0>` after the sentencepiece vocabulary.
    pub fn from_spiece_model(path: &Path, extra_ids: usize) -> Result<Self, T5Error> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Io { path: path.to_path_buf(), source })?;
        let in_file = |source| T5Error::Spiece { path: Some(path.to_path_buf()), source };
        let sp = SentencePieceModel::parse(&bytes).map_err(in_file)?;
        Self::from_sentencepiece(&sp, extra_ids).map_err(|e| match e {
            T5Error::Spiece { path: None, source } => in_file(source),
            other => other,
        })
    }

    /// Builds the tokenizer from an already parsed sentencepiece model.
    pub fn from_sentencepiece(sp: &SentencePieceModel, extra_ids: usize) -> Result<Self, T5Error> {
        if sp.model_type != MODEL_TYPE_UNIGRAM {
            return Err(SpieceError::NotUnigram(sp.model_type).into());
        }
        let id_of = |id: i32, what: &'static str| -> Result<u32, T5Error> {
            u32::try_from(id)
                .ok()
                .filter(|&i| (i as usize) < sp.pieces.len())
                .ok_or(T5Error::Spiece { path: None, source: SpieceError::MissingPiece { what, id } })
        };
        let unk_id = id_of(sp.unk_id, "unknown")?;
        let eos_id = id_of(sp.eos_id, "end-of-sequence")?;
        let pad_id = id_of(sp.pad_id, "padding")?;

        let mut vocab: Vec<(String, f64)> = sp.pieces.iter().map(|p| (p.piece.clone(), f64::from(p.score))).collect();
        let sentinels: Vec<String> = (0..extra_ids).rev().map(|i| format!("<extra_id_{i}>")).collect();
        vocab.extend(sentinels.iter().map(|s| (s.clone(), 0.0)));
        let vocab_size = vocab.len();
        let unigram = Unigram::from(vocab, Some(unk_id as usize), sp.byte_fallback)
            .map_err(|source| T5Error::Tokenizers { context: "cannot build the Unigram model".into(), source })?;
        let charsmap = if sp.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(PrecompiledCharsmap::parse(&sp.precompiled_charsmap)?)
        };
        // Control and unknown pieces, and the sentinels, are whole special tokens in the text, as
        // in the slow tokenizer (segmentation never produces them).
        let mut specials: Vec<(String, u32)> = sp
            .pieces
            .iter()
            .enumerate()
            // An empty piece would match everywhere: it is never a special token.
            .filter(|(_, p)| matches!(p.kind, PieceType::Control | PieceType::Unknown) && !p.piece.is_empty())
            .map(|(id, p)| (p.piece.clone(), id as u32))
            .chain(sentinels.into_iter().enumerate().map(|(i, s)| (s, (sp.pieces.len() + i) as u32)))
            .collect();
        specials.sort_by_key(|(tok, _)| std::cmp::Reverse(tok.len()));
        let encoder = SentencePieceEncoder {
            normalizer: SentencePieceNormalizer {
                charsmap,
                add_dummy_prefix: sp.add_dummy_prefix,
                remove_extra_whitespaces: sp.remove_extra_whitespaces,
                escape_whitespaces: sp.escape_whitespaces,
            },
            unigram,
            specials,
        };
        Ok(Self { backend: Backend::SentencePiece(encoder), vocab_size, eos_id, pad_id })
    }

    /// Loads a `tokenizer.json` (a fast-tokenizer file of a T5 tokenizer).
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, T5Error> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|source| T5Error::Tokenizers { context: format!("cannot load {}", path.display()), source })?;
        // Truncation and `</s>` are applied by `encode`; any post-processor would add it twice.
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        inner.with_truncation(None).map_err(|source| T5Error::Tokenizers {
            context: format!("cannot turn truncation off in {}", path.display()),
            source,
        })?;
        inner.with_padding(None);
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| {
                UnsupportedConfig::new("special tokens", format!("no {token}"), "a vocabulary with </s> and <pad>")
                    .in_file(path)
            })
        };
        let eos_id = id("</s>")?;
        let pad_id = id("<pad>")?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self { backend: Backend::TokenizerJson(inner), vocab_size, eos_id, pad_id })
    }

    /// The vocabulary size, sentinels included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Encodes `text`, keeps at most `max_length - 1` tokens and appends `</s>`, as
    /// `T5Tokenizer(text, max_length=max_length, truncation=True)` does.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Vec<u32>, T5Error> {
        if max_length == 0 {
            return Err(T5Error::Input("max_length must be at least 1 (room for </s>)".into()));
        }
        let mut ids = match &self.backend {
            Backend::SentencePiece(encoder) => encoder.encode(text)?,
            Backend::TokenizerJson(tokenizer) => tokenizer
                .encode(text, false)
                .map_err(|source| T5Error::Tokenizers { context: "cannot encode the prompt".into(), source })?
                .get_ids()
                .to_vec(),
        };
        ids.truncate(max_length - 1);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// Encodes like [`Self::encode`] and pads to exactly `max_length` (`padding="max_length"`).
    pub fn encode_padded(&self, text: &str, max_length: usize) -> Result<PaddedTokens, T5Error> {
        let mut ids = self.encode(text, max_length)?;
        let mut mask = vec![1u32; ids.len()];
        ids.resize(max_length, self.pad_id);
        mask.resize(max_length, 0);
        Ok(PaddedTokens { ids, mask })
    }
}
