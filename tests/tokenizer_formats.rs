//! Property tests of the file formats and of encode/decode on the pure Rust core.

use ferrolm::tokenizer::formats;
use ferrolm::{MergeRule, SpecialPolicy, Tokenizer, TokenizerParts};
use proptest::prelude::*;

/// A rank vocabulary: the 256 bytes, then multi-byte tokens each made by extending an earlier
/// token by one byte. Every prefix of a token is then an earlier token, which makes it a valid
/// BPE vocabulary: merging a token's bytes with lower ranks always ends in exactly two parts, so an
/// equivalent merge list exists. (Joining two arbitrary tokens does not guarantee that.)
fn rank_parts(joins: &[(usize, usize)]) -> TokenizerParts {
    let mut tokens: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
    for &(a, b) in joins {
        let a = a % tokens.len();
        let mut joined = tokens[a].0.clone();
        joined.push((b % 256) as u8);
        if joined.len() <= 12 && !tokens.iter().any(|(t, _)| *t == joined) {
            let id = tokens.len() as u32;
            tokens.push((joined, id));
        }
    }
    TokenizerParts {
        tokens,
        merge_rule: MergeRule::Ranks,
        specials: vec![("<|end|>".to_string(), 100_000)],
        pattern: ferrolm::tokenizer::pretokenize::GPT2_PATTERN.to_string(),
        split: Default::default(),
        whole_piece_first: true,
        add_prefix_space: false,
    }
}

fn joins() -> impl Strategy<Value = Vec<(usize, usize)>> {
    // Bias towards ASCII letters and space so that the joined tokens occur in the texts.
    let pick = prop_oneof![Just(32usize), 97usize..123, 0usize..600];
    proptest::collection::vec((pick.clone(), pick), 0..200)
}

fn texts() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[ a-e'\\n0-9é中👋]{0,80}"]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn tiktoken_file_round_trips(joins in joins()) {
        let tokenizer = Tokenizer::new(rank_parts(&joins)).unwrap();
        let text = formats::to_tiktoken(&tokenizer).unwrap();
        let mut parsed = formats::parse_tiktoken(&text, "mem").unwrap();
        let mut original = tokenizer.parts().tokens.clone();
        parsed.sort_by_key(|(_, id)| *id);
        original.sort_by_key(|(_, id)| *id);
        prop_assert_eq!(parsed, original);
    }

    #[test]
    fn tokenizer_json_round_trips_with_identical_encodings(joins in joins(), text in texts()) {
        let tokenizer = Tokenizer::new(rank_parts(&joins)).unwrap();
        let json = formats::to_hf_json(&tokenizer).unwrap();
        let again = Tokenizer::new(formats::parse_hf_json(&json, "mem").unwrap()).unwrap();
        prop_assert_eq!(again.encode_ordinary(&text).unwrap(), tokenizer.encode_ordinary(&text).unwrap());
        prop_assert_eq!(again.special_tokens(), tokenizer.special_tokens());
    }

    #[test]
    fn decode_inverts_encode(joins in joins(), text in texts()) {
        let tokenizer = Tokenizer::new(rank_parts(&joins)).unwrap();
        let ids = tokenizer.encode_ordinary(&text).unwrap();
        prop_assert_eq!(tokenizer.decode_bytes(&ids).unwrap(), text.as_bytes());
        let policy = SpecialPolicy { allowed: vec![100_000], disallowed: vec![] };
        let with_special = format!("{text}<|end|>{text}");
        let ids = tokenizer.encode(&with_special, &policy).unwrap();
        prop_assert!(ids.contains(&100_000));
        prop_assert_eq!(tokenizer.decode_bytes(&ids).unwrap(), with_special.as_bytes());
    }

    /// A merge list cut anywhere is refused (a token no merge makes) or is the whole list.
    #[test]
    fn truncated_merge_lists_are_errors_or_identical(joins in joins(), cut in 0usize..400, text in texts()) {
        let full = Tokenizer::new(rank_parts(&joins)).unwrap();
        let merges = full.merge_list().unwrap();
        let keep = merges.len().saturating_sub(cut % (merges.len() + 1));
        let mut parts = rank_parts(&joins);
        parts.merge_rule = MergeRule::List(merges[..keep].to_vec());
        parts.whole_piece_first = false;
        match Tokenizer::new(parts) {
            Err(e) => {
                prop_assert!(keep < merges.len());
                prop_assert!(e.to_string().contains("no merge makes it"), "{}", e);
            }
            Ok(t) => {
                prop_assert_eq!(keep, merges.len());
                prop_assert_eq!(t.encode_ordinary(&text).unwrap(), full.encode_ordinary(&text).unwrap());
            }
        }
    }

    /// Ids far beyond the number of tokens are refused before any table is sized by them.
    #[test]
    fn huge_ids_are_errors(joins in joins(), id in 2_000_000u32..u32::MAX) {
        let mut parts = rank_parts(&joins);
        parts.specials.push(("<|big|>".to_string(), id));
        let e = Tokenizer::new(parts).unwrap_err().to_string();
        prop_assert!(e.contains("<|big|>") && e.contains(&id.to_string()), "{}", e);
    }

    #[test]
    fn parsers_never_panic_on_garbage(text in any::<String>()) {
        let _ = formats::parse_tiktoken(&text, "garbage");
        let _ = formats::parse_hf_json(&text, "garbage");
        let json = format!("{{\"model\": {{\"type\": \"BPE\", \"vocab\": {text:?}, \"merges\": []}}}}");
        let _ = formats::parse_hf_json(&json, "garbage");
    }
}

#[test]
fn disallowed_special_is_an_error_naming_the_token() {
    let tokenizer = Tokenizer::new(rank_parts(&[])).unwrap();
    let policy = SpecialPolicy {
        allowed: vec![],
        disallowed: vec![100_000],
    };
    let error = tokenizer
        .encode("abc <|end|>", &policy)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("<|end|>") && error.contains("byte 4"),
        "{error}"
    );
}
