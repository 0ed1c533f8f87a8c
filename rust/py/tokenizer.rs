//! `ferrolm._core.CoreTokenizer`: the Rust tokenizer behind `ferrolm.Tokenizer`.

use super::{detached, detached_above};
use crate::error::Error;
use crate::tokenizer::{
    bytelevel, formats, pretokenize, MergeRule, SpecialPolicy, Tokenizer, TokenizerParts,
};
use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::PyBytes;
use std::path::PathBuf;
use std::sync::Arc;

/// Texts per GIL-free chunk of a batch call: between chunks the caller's Ctrl-C is honoured.
const BATCH_CHUNK_BYTES: usize = 32 << 20;

type TokensAndOffsets<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<i64>>);

#[pyclass(frozen, module = "ferrolm._core")]
pub struct CoreTokenizer {
    inner: Arc<Tokenizer>,
}

fn policy(allowed: Vec<u32>, disallowed: Vec<u32>) -> SpecialPolicy {
    SpecialPolicy {
        allowed,
        disallowed,
    }
}

/// Splits a batch into runs of at most `BATCH_CHUNK_BYTES` of text.
fn chunk_ranges<S: AsRef<str>>(texts: &[S]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, t) in texts.iter().enumerate() {
        bytes += t.as_ref().len();
        if bytes >= BATCH_CHUNK_BYTES {
            ranges.push(start..i + 1);
            start = i + 1;
            bytes = 0;
        }
    }
    if start < texts.len() || ranges.is_empty() {
        ranges.push(start..texts.len());
    }
    ranges
}

impl CoreTokenizer {
    pub(crate) fn from_tokenizer(inner: Tokenizer) -> Self {
        CoreTokenizer {
            inner: Arc::new(inner),
        }
    }

    /// The shared tokenizer, for other core objects (shard writers) that encode with it.
    pub(crate) fn shared(&self) -> Arc<Tokenizer> {
        self.inner.clone()
    }

    fn build(
        py: Python<'_>,
        make: impl FnOnce() -> crate::Result<TokenizerParts> + Send,
    ) -> PyResult<Self> {
        Self::build_at(py, None, make)
    }

    /// `build` for parts read from `location` (a file): what the core refuses in them is a
    /// format error naming the file.
    fn build_at(
        py: Python<'_>,
        location: Option<String>,
        make: impl FnOnce() -> crate::Result<TokenizerParts> + Send,
    ) -> PyResult<Self> {
        let inner = detached(py, || {
            Tokenizer::new(make()?).map_err(|e| match (e, &location) {
                (Error::Invalid(message), Some(at)) => Error::format(at.clone(), message),
                (e, _) => e,
            })
        })?;
        Ok(Self::from_tokenizer(inner))
    }

    fn batch(
        &self,
        py: Python<'_>,
        texts: &[PyBackedStr],
        policy: &SpecialPolicy,
        num_threads: Option<i64>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let num_threads = num_threads
            .map(|n| crate::pool::check_num_threads(n, "num_threads"))
            .transpose()?;
        let mut out = Vec::with_capacity(texts.len());
        for range in chunk_ranges(texts) {
            let chunk = &texts[range];
            out.extend(detached(py, || {
                self.inner.encode_batch(chunk, policy, num_threads)
            })?);
            py.check_signals()?;
        }
        Ok(out)
    }
}

#[pymethods]
impl CoreTokenizer {
    /// Loads tokenizer.json, vocab.json + merges.txt, encoder.json + vocab.bpe or a *.tiktoken file.
    #[staticmethod]
    #[pyo3(signature = (path, pattern=None))]
    fn load(py: Python<'_>, path: PathBuf, pattern: Option<String>) -> PyResult<Self> {
        let at = path.display().to_string();
        Self::build_at(py, Some(at), || formats::load(&path, pattern.as_deref()))
    }

    #[staticmethod]
    #[pyo3(signature = (path, pattern=None, special_tokens=None))]
    fn load_tiktoken(
        py: Python<'_>,
        path: PathBuf,
        pattern: Option<String>,
        special_tokens: Option<Vec<(String, u32)>>,
    ) -> PyResult<Self> {
        let at = path.display().to_string();
        Self::build_at(py, Some(at), || {
            formats::load_tiktoken(&path, pattern.as_deref(), special_tokens)
        })
    }

    #[staticmethod]
    fn from_json(py: Python<'_>, text: String) -> PyResult<Self> {
        Self::build_at(py, Some("tokenizer.json".into()), || {
            formats::parse_hf_json(&text, "tokenizer.json")
        })
    }

    /// `merges` None: tiktoken rank semantics (ids are ranks); else the merge list as id pairs.
    #[staticmethod]
    #[pyo3(signature = (tokens, merges, special_tokens, pattern, whole_piece_first=false, add_prefix_space=false))]
    fn from_parts(
        py: Python<'_>,
        tokens: Vec<(Vec<u8>, u32)>,
        merges: Option<Vec<(u32, u32)>>,
        special_tokens: Vec<(String, u32)>,
        pattern: String,
        whole_piece_first: bool,
        add_prefix_space: bool,
    ) -> PyResult<Self> {
        Self::build(py, || {
            Ok(TokenizerParts {
                tokens,
                merge_rule: merges.map_or(MergeRule::Ranks, MergeRule::List),
                specials: special_tokens,
                pattern: pretokenize::resolve_pattern(&pattern)?.to_string(),
                split: pretokenize::SplitOptions::default(),
                whole_piece_first,
                add_prefix_space,
            })
        })
    }

    fn to_json(&self, py: Python<'_>) -> PyResult<String> {
        detached(py, || formats::to_hf_json(&self.inner))
    }

    fn to_tiktoken(&self, py: Python<'_>) -> PyResult<String> {
        detached(py, || formats::to_tiktoken(&self.inner))
    }

    fn save_json(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        detached(py, || {
            crate::files::write_atomic(&path, formats::to_hf_json(&self.inner)?.as_bytes())
        })
    }

    fn save_tiktoken(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        detached(py, || {
            crate::files::write_atomic(&path, formats::to_tiktoken(&self.inner)?.as_bytes())
        })
    }

    // Texts arrive as `PyBackedStr`: the str's own UTF-8 buffer, borrowed without a copy (a str
    // holding lone surrogates has none: UnicodeEncodeError, which the Python layer handles).
    fn encode_ordinary(&self, py: Python<'_>, text: PyBackedStr) -> PyResult<Vec<u32>> {
        detached_above(py, text.len(), || self.inner.encode_ordinary(&text))
    }

    fn encode(
        &self,
        py: Python<'_>,
        text: PyBackedStr,
        allowed: Vec<u32>,
        disallowed: Vec<u32>,
    ) -> PyResult<Vec<u32>> {
        let policy = policy(allowed, disallowed);
        detached_above(py, text.len(), || self.inner.encode(&text, &policy))
    }

    fn encode_to_numpy<'py>(
        &self,
        py: Python<'py>,
        text: PyBackedStr,
        allowed: Vec<u32>,
        disallowed: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let policy = policy(allowed, disallowed);
        let ids = detached_above(py, text.len(), || self.inner.encode(&text, &policy))?;
        Ok(ids.into_pyarray(py))
    }

    #[pyo3(signature = (texts, allowed, disallowed, num_threads=None))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<PyBackedStr>,
        allowed: Vec<u32>,
        disallowed: Vec<u32>,
        num_threads: Option<i64>,
    ) -> PyResult<Vec<Vec<u32>>> {
        self.batch(py, &texts, &policy(allowed, disallowed), num_threads)
    }

    /// All texts' tokens in one flat uint32 array plus int64 offsets (len(texts) + 1 entries):
    /// text i is `tokens[offsets[i]:offsets[i + 1]]`. Both arrays are handed over without a copy.
    #[pyo3(signature = (texts, allowed, disallowed, num_threads=None))]
    fn encode_batch_numpy<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<PyBackedStr>,
        allowed: Vec<u32>,
        disallowed: Vec<u32>,
        num_threads: Option<i64>,
    ) -> PyResult<TokensAndOffsets<'py>> {
        let policy = policy(allowed, disallowed);
        let num_threads = num_threads
            .map(|n| crate::pool::check_num_threads(n, "num_threads"))
            .transpose()?;
        let mut flat = Vec::new();
        let mut offsets = vec![0i64];
        for range in chunk_ranges(&texts) {
            let chunk = &texts[range];
            detached(py, || {
                self.inner
                    .encode_batch_flat(chunk, &policy, num_threads, &mut flat, &mut offsets)
            })?;
            py.check_signals()?;
        }
        Ok((flat.into_pyarray(py), offsets.into_pyarray(py)))
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = detached(py, || {
            let mut checked = Vec::with_capacity(ids.len());
            for (position, &id) in ids.iter().enumerate() {
                if id < 0 || id >= self.inner.vocab_size() as i64 {
                    // Name the largest valid id: "0..N" reads as inclusive to most people.
                    return Err(Error::invalid(format!(
                        "token id {id} at position {position} is out of range (valid ids: 0 to {})",
                        self.inner.vocab_size() as i64 - 1
                    )));
                }
                checked.push(id as u32);
            }
            self.inner.decode_bytes(&checked)
        })?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// The bytes of one token.
    fn token_bytes<'py>(&self, py: Python<'py>, id: i64) -> PyResult<Bound<'py, PyBytes>> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.inner.token_bytes(id))
            .map(|b| PyBytes::new(py, b))
            .ok_or_else(|| Error::UnknownToken(format!("id {id}")).into())
    }

    /// A special token's text, or an ordinary token in its byte-level spelling ("Ġthe").
    fn token_to_id(&self, token: &str) -> PyResult<u32> {
        if let Some(id) = self.inner.special_id(token) {
            return Ok(id);
        }
        bytelevel::decode_str(token)
            .ok()
            .and_then(|bytes| self.inner.ordinary_id(&bytes))
            .ok_or_else(|| Error::UnknownToken(format!("{token:?}")).into())
    }

    /// The inverse of `token_to_id`.
    fn id_to_token(&self, id: i64) -> PyResult<String> {
        let id32 = u32::try_from(id).map_err(|_| Error::UnknownToken(format!("id {id}")))?;
        if let Some((text, _)) = self.inner.special_tokens().iter().find(|(_, s)| *s == id32) {
            return Ok(text.clone());
        }
        self.inner
            .token_bytes(id32)
            .map(bytelevel::encode_bytes)
            .ok_or_else(|| Error::UnknownToken(format!("id {id}")).into())
    }

    fn ordinary_id(&self, token: &[u8]) -> Option<u32> {
        self.inner.ordinary_id(token)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn special_tokens(&self) -> Vec<(String, u32)> {
        self.inner.special_tokens().to_vec()
    }

    #[getter]
    fn pattern(&self) -> String {
        self.inner.pretokenizer().pattern().to_string()
    }

    #[getter]
    fn pattern_name(&self) -> Option<&'static str> {
        self.inner.pretokenizer().name()
    }

    /// False when the pre-tokenizer drops text (a Hugging Face Split with behaviour Removed).
    #[getter]
    fn is_lossless(&self) -> bool {
        self.inner.is_lossless()
    }

    #[getter]
    fn is_rank_based(&self) -> bool {
        self.inner.parts().merge_rule == MergeRule::Ranks
    }

    fn __repr__(&self) -> String {
        format!(
            "CoreTokenizer(vocab_size={}, pattern={:?}, special_tokens={})",
            self.inner.vocab_size(),
            self.inner.pretokenizer().name().unwrap_or("custom"),
            self.inner.special_tokens().len()
        )
    }
}
