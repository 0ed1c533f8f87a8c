//! GPT-2's byte-to-unicode map: byte-level BPE files (HF `tokenizer.json`, `vocab.json`,
//! `encoder.json`) store each token's bytes as printable characters, one character per byte.
//! Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in byte order.

use std::sync::OnceLock;

fn is_printable(byte: u8) -> bool {
    matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The character that stands for `byte` in byte-level files.
pub fn byte_to_char(byte: u8) -> char {
    table().0[byte as usize]
}

/// The byte a byte-level character stands for, or None for a character outside the alphabet.
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 0x200 {
        let b = table().1[cp as usize];
        (b != u16::MAX).then_some(b as u8)
    } else {
        None
    }
}

/// Bytes -> byte-level string ("Ġthe" for b" the").
pub fn encode_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

/// Byte-level string -> bytes, or the first character that is not in the alphabet.
pub fn decode_str(s: &str) -> Result<Vec<u8>, char> {
    s.chars().map(|c| char_to_byte(c).ok_or(c)).collect()
}

/// The 256 alphabet characters sorted by code point: the order in which Hugging Face's trainer
/// numbers the initial alphabet.
pub fn alphabet_in_char_order() -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..=255).collect();
    bytes.sort_by_key(|&b| byte_to_char(b));
    bytes
}

type Tables = ([char; 256], [u16; 0x200]);

fn table() -> &'static Tables {
    static TABLE: OnceLock<Tables> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut to_char = ['\0'; 256];
        let mut to_byte = [u16::MAX; 0x200];
        let mut next_extra = 0x100u32;
        for byte in 0..=255u8 {
            let cp = if is_printable(byte) {
                byte as u32
            } else {
                next_extra += 1;
                next_extra - 1
            };
            to_char[byte as usize] = char::from_u32(cp).expect("below U+0200");
            to_byte[cp as usize] = byte as u16;
        }
        (to_char, to_byte)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_characters() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0), '\u{100}');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
    }

    #[test]
    fn round_trip_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let s = encode_bytes(&all);
        assert_eq!(s.chars().count(), 256);
        assert_eq!(decode_str(&s).unwrap(), all);
        assert_eq!(decode_str("a€"), Err('€'));
    }

    #[test]
    fn alphabet_order_starts_with_printable_ascii() {
        let order = alphabet_in_char_order();
        assert_eq!(order[0], b'!');
        assert_eq!(order.len(), 256);
    }
}
