// Shared by the tokenizer targets: a parsed vocabulary must build a tokenizer or fail cleanly,
// and a tokenizer that claims to keep text must give it back.
use ferrolm::{Tokenizer, TokenizerParts};

const TEXT: &str = "hello world, this is a test 123 don't é中👋\n\t  x";

pub fn exercise(parts: TokenizerParts) {
    let Ok(tokenizer) = Tokenizer::new(parts) else {
        return;
    };
    let Ok(ids) = tokenizer.encode_ordinary(TEXT) else {
        return;
    };
    for &id in &ids {
        assert!((id as usize) < tokenizer.vocab_size(), "id {id} out of range");
    }
    let bytes = tokenizer.decode_bytes(&ids).expect("ids from encode decode");
    if tokenizer.is_lossless() {
        assert_eq!(bytes, TEXT.as_bytes(), "a lossless tokenizer lost text");
    }
}
