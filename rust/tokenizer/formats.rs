//! Reading and writing the tokenizer files people already have:
//! - Hugging Face `tokenizer.json` with a byte-level BPE model (GPT-2, RoBERTa, Llama-3 style);
//! - `vocab.json` + `merges.txt`, and GPT-2's original `encoder.json` + `vocab.bpe` (same formats);
//! - tiktoken rank files (`*.tiktoken`: base64 token, space, rank), which carry no pattern.

use super::bytelevel;
use super::pretokenize::{
    resolve_pattern, SplitBehavior, SplitOptions, CL100K_HF_PATTERN, CL100K_PATTERN,
    GPT2_CLASSIC_PATTERN,
};
use super::{cap, quote, MergeRule, Tokenizer, TokenizerParts};
use crate::error::{Error, Result};
use crate::files;
use base64::Engine;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The spelling of `pattern` to write into a tokenizer.json. Hugging Face compiles patterns with
/// Oniguruma's Ruby syntax, where tiktoken's `\p{N}{1,3}+` is not possessive but "one or more runs
/// of one to three digits"; `CL100K_HF_PATTERN` drops that `+`, which changes nothing for
/// fancy-regex (nothing follows it in its alternative), so both engines split alike.
pub fn pattern_for_hf(pattern: &str) -> &str {
    if pattern == CL100K_PATTERN {
        CL100K_HF_PATTERN
    } else {
        pattern
    }
}

fn pattern_from_hf(pattern: &str) -> &str {
    if pattern == CL100K_HF_PATTERN {
        CL100K_PATTERN
    } else {
        pattern
    }
}

/// Loads a tokenizer from a file or a directory holding one of the supported formats.
/// `pattern` overrides the pre-tokenization pattern (required for a tiktoken file whose name
/// does not say which encoding it is).
pub fn load(path: &Path, pattern: Option<&str>) -> Result<TokenizerParts> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return load_directory(path, pattern);
    }
    let name = file_name(path);
    if name.ends_with(".tiktoken") {
        return load_tiktoken(path, pattern, None);
    }
    match name.as_str() {
        "vocab.json" | "encoder.json" => {
            let merges = sibling(path, &["merges.txt", "vocab.bpe"])?;
            load_vocab_merges(path, &merges, pattern)
        }
        "merges.txt" | "vocab.bpe" => {
            let vocab = sibling(path, &["vocab.json", "encoder.json"])?;
            load_vocab_merges(&vocab, path, pattern)
        }
        _ if name.ends_with(".json") => with_pattern(load_hf_json(path)?, pattern),
        _ => Err(Error::format(
            path.display().to_string(),
            "unrecognised tokenizer file: expected tokenizer.json, vocab.json/encoder.json with \
             merges.txt/vocab.bpe, or a *.tiktoken rank file",
        )),
    }
}

fn load_directory(dir: &Path, pattern: Option<&str>) -> Result<TokenizerParts> {
    let has = |name: &str| dir.join(name).is_file();
    if has("tokenizer.json") {
        return with_pattern(load_hf_json(&dir.join("tokenizer.json"))?, pattern);
    }
    for (vocab, merges) in [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")] {
        if has(vocab) && has(merges) {
            return load_vocab_merges(&dir.join(vocab), &dir.join(merges), pattern);
        }
    }
    let mut rank_files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| file_name(p).ends_with(".tiktoken"))
        .collect();
    rank_files.sort();
    match rank_files.as_slice() {
        [one] => load_tiktoken(one, pattern, None),
        [] => Err(Error::format(
            dir.display().to_string(),
            "no tokenizer found: expected tokenizer.json, vocab.json + merges.txt, encoder.json + \
             vocab.bpe, or one *.tiktoken file",
        )),
        many => Err(Error::format(
            dir.display().to_string(),
            format!(
                "{} *.tiktoken files found; pass the path of the one to load",
                many.len()
            ),
        )),
    }
}

/// A `pattern=` override replaces the file's pattern with a regex split `Isolated` (all text kept).
fn with_pattern(mut parts: TokenizerParts, pattern: Option<&str>) -> Result<TokenizerParts> {
    if let Some(p) = pattern {
        parts.pattern = resolve_pattern(p)?.to_string();
        parts.split = SplitOptions::default();
    }
    Ok(parts)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sibling(path: &Path, names: &[&str]) -> Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::format(
                path.display().to_string(),
                format!("needs {} beside it", names.join(" or ")),
            )
        })
}

// ---------------------------------------------------------------------------------------------
// vocab.json + merges.txt (and encoder.json + vocab.bpe)

pub fn load_vocab_merges(
    vocab_path: &Path,
    merges_path: &Path,
    pattern: Option<&str>,
) -> Result<TokenizerParts> {
    let vocab_loc = vocab_path.display().to_string();
    let vocab_value: Value = serde_json::from_str(&files::read_utf8(vocab_path)?)
        .map_err(|e| Error::format(&vocab_loc, format!("not valid JSON: {e}")))?;
    let vocab = parse_vocab_object(&vocab_value, &vocab_loc)?;

    let merges_loc = merges_path.display().to_string();
    let text = files::read_utf8(merges_path)?;
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || (index == 0 && line.starts_with("#version")) {
            continue;
        }
        let location = format!("{merges_loc}:{}", index + 1);
        let (left, right) = line
            .split_once(' ')
            .filter(|(_, r)| !r.contains(' '))
            .ok_or_else(|| {
                Error::format(
                    &location,
                    format!(
                        "expected two tokens separated by one space, found {}",
                        quote(line)
                    ),
                )
            })?;
        merges.push((
            lookup(&vocab, left, &location)?,
            lookup(&vocab, right, &location)?,
        ));
    }

    // In a BPE vocabulary every multi-character token is made by a merge; the others (GPT-2's
    // <|endoftext|>, RoBERTa's <s> </s> <pad> <unk> <mask>) are special tokens, which these files
    // do not declare: one spelled like a special token (`<...>` or `[...]`) is taken as one. Any
    // other token that no merge makes is what a truncated merges file leaves: an error.
    let merged: FxHashSet<String> = merges
        .iter()
        .map(|&(l, r)| format!("{}{}", vocab.by_id[&l], vocab.by_id[&r]))
        .collect();
    let looks_special = |t: &str| {
        (t.starts_with('<') && t.ends_with('>')) || (t.starts_with('[') && t.ends_with(']'))
    };
    let mut tokens = Vec::new();
    let mut specials = Vec::new();
    let mut orphans: Vec<(&String, u32)> = Vec::new();
    for (text, id) in &vocab.entries {
        let id = *id;
        if text.chars().count() > 1 && !merged.contains(text) {
            if looks_special(text) {
                specials.push((text.clone(), id));
            } else {
                orphans.push((text, id));
            }
        } else {
            tokens.push((byte_level_bytes(text, &vocab_loc)?, id));
        }
    }
    if let Some(&(text, id)) = orphans.iter().min_by_key(|(_, id)| *id) {
        return Err(Error::format(
            &merges_loc,
            format!(
                "vocabulary token {} (id {id}) is not made by any merge and is not a special token ({} such token(s) in {vocab_loc}); is this merges file truncated?",
                quote(text),
                orphans.len()
            ),
        ));
    }
    specials.sort_by_key(|(_, id)| *id);
    Ok(TokenizerParts {
        tokens,
        merge_rule: MergeRule::List(merges),
        specials,
        pattern: resolve_pattern(pattern.unwrap_or("gpt2"))?.to_string(),
        split: SplitOptions::default(),
        whole_piece_first: false,
        add_prefix_space: false,
    })
}

struct VocabEntries {
    entries: Vec<(String, u32)>,
    ids: FxHashMap<String, u32>,
    by_id: FxHashMap<u32, String>,
}

fn parse_vocab_object(value: &Value, location: &str) -> Result<VocabEntries> {
    let object = value.as_object().ok_or_else(|| {
        Error::format(
            location,
            "expected a JSON object mapping each token to its id",
        )
    })?;
    let mut entries = Vec::with_capacity(object.len());
    let mut ids = FxHashMap::default();
    let mut by_id = FxHashMap::default();
    for (token, id) in object {
        let id = id
            .as_u64()
            .filter(|&i| i < u32::MAX as u64)
            .ok_or_else(|| {
                Error::format(
                    location,
                    format!(
                        "token {}: expected a non-negative integer id, found {}",
                        quote(token),
                        cap(&id.to_string())
                    ),
                )
            })? as u32;
        if let Some(other) = by_id.insert(id, token.clone()) {
            return Err(Error::format(
                location,
                format!(
                    "id {id} is given to two tokens: {} and {}",
                    quote(&other),
                    quote(token)
                ),
            ));
        }
        ids.insert(token.clone(), id);
        entries.push((token.clone(), id));
    }
    Ok(VocabEntries {
        entries,
        ids,
        by_id,
    })
}

fn lookup(vocab: &VocabEntries, token: &str, location: &str) -> Result<u32> {
    vocab.ids.get(token).copied().ok_or_else(|| {
        Error::format(
            location,
            format!(
                "merge refers to {}, which is not in the vocabulary",
                quote(token)
            ),
        )
    })
}

fn byte_level_bytes(token: &str, location: &str) -> Result<Vec<u8>> {
    bytelevel::decode_str(token).map_err(|c| {
        Error::format(
            location,
            format!(
                "token {} contains {c:?} (U+{:04X}), which is not a byte-level BPE character; \
                 ferrolm reads byte-level BPE vocabularies (GPT-2 / RoBERTa / Llama-3 style)",
                quote(token),
                c as u32
            ),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json

pub fn load_hf_json(path: &Path) -> Result<TokenizerParts> {
    parse_hf_json(&files::read_utf8(path)?, &path.display().to_string())
}

fn field<'v>(value: &'v Value, name: &str, location: &str, at: &str) -> Result<&'v Value> {
    value
        .get(name)
        .ok_or_else(|| Error::format(location, format!("missing field {at}{name}")))
}

fn unsupported(location: &str, at: &str, found: &Value, expected: &str) -> Error {
    Error::format(
        location,
        format!(
            "field {at}: unsupported value {}; ferrolm reads {expected}",
            cap(&found.to_string())
        ),
    )
}

pub fn parse_hf_json(text: &str, location: &str) -> Result<TokenizerParts> {
    let root: Value = serde_json::from_str(text)
        .map_err(|e| Error::format(location, format!("not valid JSON: {e}")))?;
    let model = field(&root, "model", location, "")?;
    let model_type = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
    if model_type != "BPE" {
        return Err(unsupported(
            location,
            "model.type",
            &json!(model_type),
            "byte-level BPE models",
        ));
    }
    type Check = (&'static str, fn(&Value) -> bool);
    let checks: [Check; 4] = [
        ("dropout", |v: &Value| v.is_null()),
        ("continuing_subword_prefix", |v: &Value| {
            v.is_null() || v == ""
        }),
        ("end_of_word_suffix", |v: &Value| v.is_null() || v == ""),
        ("byte_fallback", |v: &Value| v.is_null() || v == false),
    ];
    for (name, ok) in checks {
        if let Some(v) = model.get(name) {
            if !ok(v) {
                return Err(unsupported(
                    location,
                    &format!("model.{name}"),
                    v,
                    "byte-level BPE without it",
                ));
            }
        }
    }
    if let Some(n) = root.get("normalizer") {
        if !n.is_null() {
            return Err(unsupported(
                location,
                "normalizer",
                n,
                "tokenizers without a normalizer",
            ));
        }
    }
    let (pattern, split, add_prefix_space) =
        parse_hf_pre_tokenizer(root.get("pre_tokenizer"), location)?;

    let vocab = parse_vocab_object(
        field(model, "vocab", location, "model.")?,
        &format!("{location}: model.vocab"),
    )?;
    let merges_value = field(model, "merges", location, "model.")?;
    let merges_list = merges_value
        .as_array()
        .ok_or_else(|| Error::format(location, "field model.merges: expected a list"))?;
    let mut merges = Vec::with_capacity(merges_list.len());
    for (index, merge) in merges_list.iter().enumerate() {
        let at = format!("{location}: model.merges[{index}]");
        let (left, right) = match merge {
            Value::String(s) => s
                .split_once(' ')
                .filter(|(_, r)| !r.contains(' '))
                .ok_or_else(|| {
                    Error::format(&at, format!("expected \"left right\", found {}", quote(s)))
                })?,
            Value::Array(pair) if pair.len() == 2 && pair.iter().all(Value::is_string) => (
                pair[0].as_str().unwrap_or(""),
                pair[1].as_str().unwrap_or(""),
            ),
            other => {
                return Err(Error::format(
                    &at,
                    format!(
                        "expected \"left right\" or [left, right], found {}",
                        cap(&other.to_string())
                    ),
                ))
            }
        };
        merges.push((lookup(&vocab, left, &at)?, lookup(&vocab, right, &at)?));
    }

    let mut specials: Vec<(String, u32)> = Vec::new();
    if let Some(added) = root.get("added_tokens").filter(|v| !v.is_null()) {
        let list = added
            .as_array()
            .ok_or_else(|| Error::format(location, "field added_tokens: expected a list"))?;
        for (index, token) in list.iter().enumerate() {
            let at = format!("{location}: added_tokens[{index}]");
            let content = token
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::format(&at, "expected a string field \"content\""))?;
            let id = token
                .get("id")
                .and_then(Value::as_u64)
                .filter(|&i| i < u32::MAX as u64)
                .ok_or_else(|| {
                    Error::format(&at, "expected a non-negative integer field \"id\"")
                })?;
            specials.push((content.to_string(), id as u32));
        }
    }
    let special_texts: FxHashSet<&str> = specials.iter().map(|(t, _)| t.as_str()).collect();
    let mut tokens = Vec::with_capacity(vocab.entries.len());
    let vocab_location = format!("{location}: model.vocab");
    let merged: FxHashSet<String> = merges
        .iter()
        .map(|&(l, r)| format!("{}{}", vocab.by_id[&l], vocab.by_id[&r]))
        .collect();
    for (text, id) in &vocab.entries {
        // Added tokens listed in the model vocabulary too (RoBERTa's <s>) are special only, unless
        // the vocabulary token is a byte or made by a merge: then it is ordinary as well.
        let ordinary_too = text.chars().count() == 1 || merged.contains(text);
        if ordinary_too || !special_texts.contains(text.as_str()) {
            tokens.push((byte_level_bytes(text, &vocab_location)?, *id));
        }
    }
    let whole_piece_first = model
        .get("ignore_merges")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(TokenizerParts {
        tokens,
        merge_rule: MergeRule::List(merges),
        specials,
        pattern,
        split,
        whole_piece_first,
        add_prefix_space,
    })
}

/// ByteLevel alone (with its own GPT-2 regex), or Split(pattern, behavior, invert) followed by
/// ByteLevel(use_regex=false).
fn parse_hf_pre_tokenizer(
    value: Option<&Value>,
    location: &str,
) -> Result<(String, SplitOptions, bool)> {
    let expected =
        "a ByteLevel pre-tokenizer, or a Sequence of Split and ByteLevel(use_regex=false)";
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Err(Error::format(
            location,
            format!("field pre_tokenizer is missing; ferrolm reads {expected}"),
        ));
    };
    let kind = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let byte_level = |v: &Value| -> (bool, bool) {
        let flag =
            |name: &str, default: bool| v.get(name).and_then(Value::as_bool).unwrap_or(default);
        (flag("add_prefix_space", false), flag("use_regex", true))
    };
    match kind(value).as_str() {
        "ByteLevel" => {
            let (prefix, use_regex) = byte_level(value);
            if !use_regex {
                return Err(unsupported(
                    location,
                    "pre_tokenizer.use_regex",
                    &json!(false),
                    expected,
                ));
            }
            Ok((
                GPT2_CLASSIC_PATTERN.to_string(),
                SplitOptions::default(),
                prefix,
            ))
        }
        "Sequence" => {
            let steps = value
                .get("pretokenizers")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let [split, last] = steps else {
                return Err(unsupported(
                    location,
                    "pre_tokenizer.pretokenizers",
                    value,
                    expected,
                ));
            };
            if kind(split) != "Split" {
                return Err(unsupported(
                    location,
                    "pre_tokenizer.pretokenizers[0].type",
                    &json!(kind(split)),
                    expected,
                ));
            }
            if kind(last) != "ByteLevel" {
                return Err(unsupported(
                    location,
                    "pre_tokenizer.pretokenizers[1].type",
                    &json!(kind(last)),
                    expected,
                ));
            }
            let (prefix, use_regex) = byte_level(last);
            if use_regex {
                return Err(unsupported(
                    location,
                    "pre_tokenizer.pretokenizers[1].use_regex",
                    &json!(true),
                    expected,
                ));
            }
            if prefix {
                // After a Split, Hugging Face puts the space before every piece, not before the
                // text: a different tokenizer from ByteLevel(add_prefix_space) alone. Refused
                // rather than encoded differently.
                return Err(Error::format(
                    location,
                    "field pre_tokenizer.pretokenizers[1].add_prefix_space: true after a Split \
                     (a space before every piece) is not supported; ferrolm reads \
                     add_prefix_space only on a ByteLevel pre-tokenizer alone",
                ));
            }
            let behavior = match split.get("behavior") {
                Some(Value::String(b)) => SplitBehavior::from_hf(b),
                _ => None,
            }
            .ok_or_else(|| {
                let names: Vec<&str> = SplitBehavior::ALL.iter().map(|b| b.as_hf()).collect();
                Error::format(
                    location,
                    format!(
                        "field pre_tokenizer.pretokenizers[0].behavior: expected one of {}, found {}",
                        names.join(", "),
                        cap(&split.get("behavior").map_or("nothing".into(), |v| v.to_string()))
                    ),
                )
            })?;
            let invert = match split.get("invert") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(Error::format(
                        location,
                        format!(
                            "field pre_tokenizer.pretokenizers[0].invert: expected true or false, \
                             found {}",
                            cap(&other.to_string())
                        ),
                    ))
                }
            };
            let pattern = split.get("pattern");
            let (regex, literal) = match (
                pattern.and_then(|p| p.get("Regex")).and_then(Value::as_str),
                pattern.and_then(|p| p.get("String")).and_then(Value::as_str),
            ) {
                (Some(r), _) => (pattern_from_hf(r).to_string(), false),
                (None, Some(s)) if !s.is_empty() => (s.to_string(), true),
                _ => {
                    return Err(Error::format(location, "field pre_tokenizer.pretokenizers[0].pattern: expected {\"Regex\": ...} or a non-empty {\"String\": ...}"))
                }
            };
            let options = SplitOptions {
                behavior,
                invert,
                literal,
            };
            Ok((regex, options, false))
        }
        other => Err(unsupported(
            location,
            "pre_tokenizer.type",
            &json!(other),
            expected,
        )),
    }
}

/// A `tokenizer.json` that Hugging Face tokenizers loads and that encodes like `tokenizer`.
pub fn to_hf_json(tokenizer: &Tokenizer) -> Result<String> {
    let parts = tokenizer.parts();
    let mut ordinary: Vec<&(Vec<u8>, u32)> = parts.tokens.iter().collect();
    ordinary.sort_by_key(|(_, id)| *id);
    let mut vocab = Map::with_capacity(ordinary.len());
    for (bytes, id) in &ordinary {
        vocab.insert(bytelevel::encode_bytes(bytes), json!(id));
    }
    // Special tokens go in the model vocabulary too, as Hugging Face writes them: tokenizers gives
    // an added token that is missing from model.vocab a fresh id, ignoring the one listed.
    for (content, id) in &parts.specials {
        vocab.entry(content.clone()).or_insert_with(|| json!(id));
    }
    let merges: Vec<Value> = tokenizer
        .merge_list()?
        .into_iter()
        .map(|(l, r)| {
            let side = |id| bytelevel::encode_bytes(tokenizer.token_bytes(id).unwrap_or_default());
            Value::String(format!("{} {}", side(l), side(r)))
        })
        .collect();
    let added: Vec<Value> = parts
        .specials
        .iter()
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = |add_prefix_space: bool, use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space,
               "trim_offsets": true, "use_regex": use_regex})
    };
    let pretokenizer = tokenizer.pretokenizer();
    let options = pretokenizer.options();
    let pre_tokenizer = if parts.add_prefix_space {
        // One space before the text, then the GPT-2 split: only ByteLevel alone says this (after a
        // Split, Hugging Face would put a space before every piece).
        if pretokenizer.name() != Some("gpt2") || options != SplitOptions::default() {
            return Err(Error::invalid(
                "a tokenizer with add_prefix_space and a pattern other than GPT-2's cannot be written as a Hugging Face tokenizer.json (ByteLevel's add_prefix_space comes with the GPT-2 pattern only)",
            ));
        }
        byte_level(true, true)
    } else {
        let pattern = if options.literal {
            json!({"String": pretokenizer.pattern()})
        } else {
            json!({"Regex": pattern_for_hf(pretokenizer.pattern())})
        };
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": pattern, "behavior": options.behavior.as_hf(),
             "invert": options.invert},
            byte_level(false, false),
        ]})
    };
    let root = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": byte_level(parts.add_prefix_space, true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": tokenizer.parts().whole_piece_first || parts.merge_rule == MergeRule::Ranks,
            "vocab": vocab, "merges": merges,
        },
    });
    serde_json::to_string_pretty(&root)
        .map_err(|e| Error::invalid(format!("cannot write JSON: {e}")))
}

// ---------------------------------------------------------------------------------------------
// tiktoken rank files

/// The special tokens of tiktoken's published encodings, by file stem (their patterns come from
/// the one name table, `pretokenize::PATTERN_NAMES`).
fn known_specials(stem: &str) -> Option<Vec<(String, u32)>> {
    let s = |t: &str, id| (t.to_string(), id);
    match stem {
        "r50k_base" | "p50k_base" | "gpt2" => Some(vec![s("<|endoftext|>", 50256)]),
        "cl100k_base" => Some(vec![
            s("<|endoftext|>", 100257),
            s("<|fim_prefix|>", 100258),
            s("<|fim_middle|>", 100259),
            s("<|fim_suffix|>", 100260),
            s("<|endofprompt|>", 100276),
        ]),
        "o200k_base" => Some(vec![
            s("<|endoftext|>", 199999),
            s("<|endofprompt|>", 200018),
        ]),
        _ => None,
    }
}

/// Reads a rank file. Without `pattern` the file's name must be one of tiktoken's encodings
/// (then its special tokens are added too); `specials` replaces the special tokens.
pub fn load_tiktoken(
    path: &Path,
    pattern: Option<&str>,
    specials: Option<Vec<(String, u32)>>,
) -> Result<TokenizerParts> {
    let location = path.display().to_string();
    let stem = file_name(path).trim_end_matches(".tiktoken").to_string();
    let known = known_specials(&stem);
    let pattern = match (pattern, &known) {
        (Some(p), _) => resolve_pattern(p)?.to_string(),
        (None, Some(_)) => resolve_pattern(&stem)?.to_string(),
        (None, None) => {
            return Err(Error::format(
                &location,
                "a tiktoken rank file does not record its pre-tokenization pattern: give one \
                 (--pattern on the command line, pattern= in Python): gpt2, cl100k, o200k or a regex",
            ))
        }
    };
    let specials = specials.or(known).unwrap_or_default();
    let text = files::read_utf8(path)?;
    let tokens = parse_tiktoken(&text, &location)?;
    Ok(TokenizerParts {
        tokens,
        merge_rule: MergeRule::Ranks,
        specials,
        pattern,
        split: SplitOptions::default(),
        whole_piece_first: true,
        add_prefix_space: false,
    })
}

pub fn parse_tiktoken(text: &str, location: &str) -> Result<Vec<(Vec<u8>, u32)>> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut tokens = Vec::new();
    let mut seen_ranks: FxHashMap<u32, usize> = FxHashMap::default();
    let mut seen_tokens: FxHashMap<Vec<u8>, usize> = FxHashMap::default();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let at = format!("{location}:{line_no}");
        let (token, rank) = line.split_once(' ').ok_or_else(|| {
            Error::format(
                &at,
                format!("expected \"<base64 token> <rank>\", found {}", quote(line)),
            )
        })?;
        let bytes = engine.decode(token).map_err(|e| {
            Error::format(
                &at,
                format!("token {} is not valid base64: {e}", quote(token)),
            )
        })?;
        let rank: u32 = rank.parse().ok().filter(|&r| r < u32::MAX).ok_or_else(|| {
            Error::format(
                &at,
                format!("rank {} is not a non-negative integer", quote(rank)),
            )
        })?;
        if let Some(first) = seen_ranks.insert(rank, line_no) {
            return Err(Error::format(
                &at,
                format!("duplicate rank {rank} (first on line {first})"),
            ));
        }
        if let Some(first) = seen_tokens.insert(bytes.clone(), line_no) {
            return Err(Error::format(
                &at,
                format!("duplicate token {} (first on line {first})", quote(token)),
            ));
        }
        if bytes.is_empty() {
            return Err(Error::format(&at, "empty token"));
        }
        tokens.push((bytes, rank));
    }
    Ok(tokens)
}

/// A rank file for `tokenizer`'s ordinary tokens. Rank files merge by id order, so a merge list
/// whose merged ids do not increase along the list cannot be expressed and is an error.
pub fn to_tiktoken(tokenizer: &Tokenizer) -> Result<String> {
    let parts = tokenizer.parts();
    if let MergeRule::List(list) = &parts.merge_rule {
        let mut last = None;
        for (index, &(l, r)) in list.iter().enumerate() {
            let mut joined = tokenizer.token_bytes(l).unwrap_or_default().to_vec();
            joined.extend_from_slice(tokenizer.token_bytes(r).unwrap_or_default());
            let id = tokenizer.ordinary_id(&joined);
            if id <= last {
                return Err(Error::invalid(format!(
                    "merge {index} makes id {id:?} after id {last:?}: a tiktoken rank file needs merged ids \
                     that increase with merge order, so this vocabulary can only be saved as tokenizer.json"
                )));
            }
            last = id;
        }
    }
    let engine = base64::engine::general_purpose::STANDARD;
    let mut ordinary: Vec<&(Vec<u8>, u32)> = parts.tokens.iter().collect();
    ordinary.sort_by_key(|(_, id)| *id);
    let mut out = String::with_capacity(ordinary.len() * 12);
    for (bytes, id) in ordinary {
        out.push_str(&engine.encode(bytes));
        out.push(' ');
        out.push_str(&id.to_string());
        out.push('\n');
    }
    Ok(out)
}
