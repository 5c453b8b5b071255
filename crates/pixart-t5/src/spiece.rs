//! A reader for sentencepiece's `spiece.model` (the `ModelProto` protobuf), reading only the fields
//! a Unigram tokenizer needs. Field numbers follow `sentencepiece_model.proto`.

use crate::error::SpieceError;

/// The kind of a sentencepiece vocabulary entry (`SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece (1).
    Normal,
    /// The unknown piece (2).
    Unknown,
    /// A control symbol such as `</s>` or `<pad>` (3): never produced from text.
    Control,
    /// A user-defined symbol (4): always matched as a whole.
    UserDefined,
    /// An unused piece (5).
    Unused,
    /// A byte-fallback piece `<0xNN>` (6).
    Byte,
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece's text, with `▁` for spaces.
    pub piece: String,
    /// Its log-probability score.
    pub score: f32,
    /// Its type.
    pub kind: PieceType,
}

/// The parts of `TrainerSpec` and `NormalizerSpec` that affect encoding.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    /// Vocabulary, in id order.
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 = Unigram, 2 = BPE, 3 = word, 4 = char.
    pub model_type: i32,
    /// `TrainerSpec.byte_fallback`.
    pub byte_fallback: bool,
    /// `TrainerSpec.unk_id`.
    pub unk_id: i32,
    /// `TrainerSpec.eos_id` (-1 when absent).
    pub eos_id: i32,
    /// `TrainerSpec.pad_id` (-1 when absent).
    pub pad_id: i32,
    /// `NormalizerSpec.name` (e.g. `nmt_nfkc`).
    pub normalizer_name: String,
    /// `NormalizerSpec.precompiled_charsmap`: the compiled normalization rules.
    pub precompiled_charsmap: Vec<u8>,
    /// `NormalizerSpec.add_dummy_prefix`: prepend `▁` to the text.
    pub add_dummy_prefix: bool,
    /// `NormalizerSpec.remove_extra_whitespaces`: strip and collapse runs of spaces.
    pub remove_extra_whitespaces: bool,
    /// `NormalizerSpec.escape_whitespaces`: write spaces as `▁`.
    pub escape_whitespaces: bool,
}

/// The only model type this reader accepts.
pub const MODEL_TYPE_UNIGRAM: i32 = 1;

impl SentencePieceModel {
    /// Parses the bytes of a `spiece.model` file.
    pub fn parse(bytes: &[u8]) -> Result<Self, SpieceError> {
        let mut model = SentencePieceModel {
            pieces: Vec::new(),
            model_type: MODEL_TYPE_UNIGRAM,
            byte_fallback: false,
            unk_id: 0,
            eos_id: 2,
            pad_id: -1,
            normalizer_name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut reader = Reader::new(bytes);
        while let Some((field, value)) = reader.next_field()? {
            match (field, value) {
                (1, Value::Bytes(b)) => model.pieces.push(parse_piece(b)?),
                (2, Value::Bytes(b)) => {
                    let mut r = Reader::new(b);
                    while let Some((f, v)) = r.next_field()? {
                        match (f, v) {
                            (3, Value::Varint(x)) => model.model_type = x as i32,
                            (35, Value::Varint(x)) => model.byte_fallback = x != 0,
                            (40, Value::Varint(x)) => model.unk_id = x as i64 as i32,
                            (42, Value::Varint(x)) => model.eos_id = x as i64 as i32,
                            (43, Value::Varint(x)) => model.pad_id = x as i64 as i32,
                            _ => {}
                        }
                    }
                }
                (3, Value::Bytes(b)) => {
                    let mut r = Reader::new(b);
                    while let Some((f, v)) = r.next_field()? {
                        match (f, v) {
                            (1, Value::Bytes(s)) => model.normalizer_name = String::from_utf8_lossy(s).into_owned(),
                            (2, Value::Bytes(s)) => model.precompiled_charsmap = s.to_vec(),
                            (3, Value::Varint(x)) => model.add_dummy_prefix = x != 0,
                            (4, Value::Varint(x)) => model.remove_extra_whitespaces = x != 0,
                            (5, Value::Varint(x)) => model.escape_whitespaces = x != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err(SpieceError::NoPieces);
        }
        Ok(model)
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece, SpieceError> {
    let mut piece = Piece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    let mut r = Reader::new(bytes);
    while let Some((f, v)) = r.next_field()? {
        match (f, v) {
            (1, Value::Bytes(s)) => {
                piece.piece = std::str::from_utf8(s).map_err(|_| SpieceError::PieceNotUtf8)?.to_string()
            }
            (2, Value::Fixed32(x)) => piece.score = f32::from_bits(x),
            (3, Value::Varint(x)) => {
                piece.kind = match x {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    other => return Err(SpieceError::UnknownPieceType(other)),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

enum Value<'a> {
    Varint(u64),
    /// No field we read is a 64-bit fixed value; it is skipped like any unknown field.
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn truncated() -> SpieceError {
        SpieceError::Truncated
    }

    fn varint(&mut self) -> Result<u64, SpieceError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or_else(Self::truncated)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Self::truncated())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SpieceError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(Self::truncated)?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, SpieceError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| Self::truncated())?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let bytes = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            }
            _ => return Err(Self::truncated()),
        };
        Ok(Some((key >> 3, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    #[test]
    fn parses_pieces_specs_and_negative_ids() {
        let mut piece = Vec::new();
        bytes_field(1, "▁a".as_bytes(), &mut piece);
        varint(2 << 3 | 5, &mut piece);
        piece.extend_from_slice(&(-1.5f32).to_bits().to_le_bytes());
        varint(3 << 3, &mut piece);
        varint(3, &mut piece);
        let mut trainer = Vec::new();
        varint(40 << 3, &mut trainer);
        varint(2, &mut trainer);
        varint(41 << 3, &mut trainer);
        varint(u64::MAX, &mut trainer); // bos_id = -1, ten-byte varint
        varint(43 << 3, &mut trainer);
        varint(0, &mut trainer);
        let mut normalizer = Vec::new();
        bytes_field(1, b"nmt_nfkc", &mut normalizer);
        bytes_field(2, &[1, 2, 3], &mut normalizer);
        varint(3 << 3, &mut normalizer);
        varint(0, &mut normalizer);
        let mut model = Vec::new();
        bytes_field(1, &piece, &mut model);
        bytes_field(2, &trainer, &mut model);
        bytes_field(3, &normalizer, &mut model);

        let m = SentencePieceModel::parse(&model).unwrap();
        assert_eq!(m.pieces, vec![Piece { piece: "▁a".into(), score: -1.5, kind: PieceType::Control }]);
        assert_eq!((m.unk_id, m.pad_id, m.eos_id), (2, 0, 2));
        assert_eq!(m.normalizer_name, "nmt_nfkc");
        assert_eq!(m.precompiled_charsmap, vec![1, 2, 3]);
        assert!(!m.add_dummy_prefix && m.remove_extra_whitespaces && m.escape_whitespaces);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut model = Vec::new();
        bytes_field(1, b"abc", &mut model);
        model.truncate(model.len() - 1);
        assert!(SentencePieceModel::parse(&model).is_err());
        assert!(SentencePieceModel::parse(&[0xff]).is_err());
        assert!(SentencePieceModel::parse(&[]).is_err());
    }
}
