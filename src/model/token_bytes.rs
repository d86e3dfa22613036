//! The bytes each token of a vocabulary stands for: what held-out bits per byte are counted in,
//! and what keeps generated text valid UTF-8 ([`super::utf8`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokenizers::DecoderWrapper;

use super::tokenizer::TextTokenizer;

/// The bytes each token id stands for.
#[derive(Debug, Clone)]
pub struct TokenBytes {
    table: Arc<Vec<Vec<u8>>>,
}

impl TokenBytes {
    /// The table of a tokenizer (see the module docs for how bytes are counted).
    pub fn new(tokenizer: &TextTokenizer) -> Self {
        let inner = tokenizer.inner();
        let byte_level = matches!(inner.get_decoder(), Some(d) if is_byte_level(d));
        let added = inner.get_added_tokens_decoder();
        let unicode_to_byte = byte_level.then(unicode_to_byte);
        let table = (0..tokenizer.vocab_size() as u32)
            .map(|id| {
                if let Some(token) = added.get(&id) {
                    return token.content.as_bytes().to_vec();
                }
                let Some(piece) = tokenizer.id_to_token(id) else {
                    return Vec::new();
                };
                match &unicode_to_byte {
                    Some(map) => piece_bytes_byte_level(&piece, map),
                    None => piece_bytes(&piece),
                }
            })
            .collect();
        TokenBytes {
            table: Arc::new(table),
        }
    }

    /// The bytes of `id` (none for ids outside the vocabulary).
    pub fn of(&self, id: u32) -> &[u8] {
        self.table.get(id as usize).map_or(&[], Vec::as_slice)
    }
}

fn is_byte_level(decoder: &DecoderWrapper) -> bool {
    match decoder {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(is_byte_level),
        _ => false,
    }
}

/// GPT-2's byte ↔ printable character table, inverted: printable bytes stand for themselves,
/// the others for U+0100 onwards, in byte order.
fn unicode_to_byte() -> BTreeMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut map = BTreeMap::new();
    let mut next = 256u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

fn piece_bytes_byte_level(piece: &str, map: &BTreeMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match map.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// Bytes of a SentencePiece-style piece: `<0xNN>` is one byte, `▁` a space.
fn piece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece
        .strip_prefix("<0x")
        .and_then(|rest| rest.strip_suffix('>'))
    {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_pieces_count_their_bytes() {
        assert_eq!(piece_bytes("<0xE3>"), vec![0xe3]);
        assert_eq!(piece_bytes("\u{2581}hello"), b" hello".to_vec());
        assert_eq!(piece_bytes("<0xZZ>"), b"<0xZZ>".to_vec());
        let map = unicode_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(piece_bytes_byte_level("\u{120}hi", &map), b" hi".to_vec());
    }
}
