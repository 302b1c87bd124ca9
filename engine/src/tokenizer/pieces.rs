//! The exact bytes each token stands for, so that decoding is plain byte
//! concatenation (as llama.cpp does) and never loses a partial character.

/// How a vocabulary entry's spelling maps to bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PieceKind {
    /// GPT-2 byte-level BPE: every char stands for one byte.
    ByteLevel,
    /// SentencePiece: '▁' is a space, `<0xXX>` is one byte.
    SentencePiece,
    /// The text itself (control and user-defined tokens).
    Raw,
}

/// Bytes per token id, stored flat.
pub(super) struct PieceTable {
    data: Vec<u8>,
    /// `offsets[i]..offsets[i + 1]` is token i; len = vocab + 1.
    offsets: Vec<usize>,
    strip_leading_space: bool,
}

impl PieceTable {
    pub(super) fn new(strip_leading_space: bool) -> Self {
        PieceTable {
            data: Vec::new(),
            offsets: vec![0],
            strip_leading_space,
        }
    }

    /// Appends the next id's piece.
    pub(super) fn push(&mut self, text: &str, kind: PieceKind) {
        match kind {
            PieceKind::Raw => self.data.extend_from_slice(text.as_bytes()),
            PieceKind::ByteLevel => match byte_level_decode(text) {
                Some(b) => self.data.extend_from_slice(&b),
                // A spelling outside the byte alphabet is taken as text, as
                // HF's ByteLevel decoder does.
                None => self.data.extend_from_slice(text.as_bytes()),
            },
            PieceKind::SentencePiece => match parse_byte_token(text) {
                Some(b) => self.data.push(b),
                None => {
                    for part in text.split('▁').enumerate() {
                        if part.0 > 0 {
                            self.data.push(b' ');
                        }
                        self.data.extend_from_slice(part.1.as_bytes());
                    }
                }
            },
        }
        self.offsets.push(self.data.len());
    }

    pub(super) fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub(super) fn get(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let (start, end) = (*self.offsets.get(i)?, *self.offsets.get(i + 1)?);
        Some(&self.data[start..end])
    }

    pub(super) fn strip_leading_space(&self) -> bool {
        self.strip_leading_space
    }
}

/// `<0xXX>` → the byte XX.
pub(super) fn parse_byte_token(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte → char table: printable Latin-1 bytes stand for themselves,
/// the other 68 bytes map, in order, to U+0100 onwards.
pub(super) fn byte_to_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('\u{FFFD}')
}

/// The inverse of `byte_to_char`.
fn char_to_byte(c: char) -> Option<u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE
        .get_or_init(|| (0..=255u8).map(|b| (byte_to_char(b), b)).collect())
        .get(&c)
        .copied()
}

/// A byte-level spelling ("Ġthe") back to bytes (" the"); None if some char
/// is outside the alphabet.
pub(super) fn byte_level_decode(s: &str) -> Option<Vec<u8>> {
    s.chars().map(char_to_byte).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_alphabet() {
        // Known values of GPT-2's bytes_to_unicode.
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(0), 'Ā');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0xA0), 'ł');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(all.len(), 256);
        assert_eq!(byte_level_decode("ĠParis").unwrap(), b" Paris");
        assert_eq!(byte_level_decode("<|im_end|>").unwrap(), b"<|im_end|>");
        assert!(byte_level_decode("a b").is_none());
    }

    #[test]
    fn table() {
        let mut t = PieceTable::new(true);
        t.push("▁Hello▁world", PieceKind::SentencePiece);
        t.push("<0xE4>", PieceKind::SentencePiece);
        t.push("ĠĊ", PieceKind::ByteLevel);
        t.push("<s>", PieceKind::Raw);
        assert_eq!(t.len(), 4);
        assert_eq!(t.get(0).unwrap(), b" Hello world");
        assert_eq!(t.get(1).unwrap(), &[0xE4]);
        assert_eq!(t.get(2).unwrap(), b" \n");
        assert_eq!(t.get(3).unwrap(), b"<s>");
        assert!(t.get(4).is_none());
        assert!(t.strip_leading_space());
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0x0A0>"), None);
    }
}
