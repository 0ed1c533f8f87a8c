//! `ferrolm._core.CoreShardWriter`: the Rust shard writer behind `ferrolm.data.shard_corpus`.

use super::tokenizer::CoreTokenizer;
use super::{detached, interruptible};
use crate::error::Error;
use crate::shard::input::{DocumentOptions, TextSplit};
use crate::shard::manifest::{self, InputRecord, Manifest};
use crate::shard::safetensors::Dtype;
use crate::shard::{ShardOptions, ShardWriter};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

#[pyclass(module = "ferrolm._core")]
pub struct CoreShardWriter {
    /// None once `finish` has run.
    writer: Option<ShardWriter>,
}

impl CoreShardWriter {
    fn writer(&mut self) -> PyResult<&mut ShardWriter> {
        self.writer.as_mut().ok_or_else(|| {
            Error::invalid("this shard writer has already finished (or was interrupted)").into()
        })
    }
}

#[pymethods]
impl CoreShardWriter {
    #[new]
    #[pyo3(signature = (output_dir, tokenizer, tokenizer_json, *, val_fraction, shard_tokens, seed, bos, eos, dtype, resume, num_threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        output_dir: PathBuf,
        tokenizer: &CoreTokenizer,
        tokenizer_json: String,
        val_fraction: f64,
        shard_tokens: i128,
        seed: u64,
        bos: Option<u32>,
        eos: Option<u32>,
        dtype: &str,
        resume: bool,
        num_threads: Option<usize>,
    ) -> PyResult<Self> {
        let dtype = match dtype {
            "uint16" => Dtype::U16,
            "uint32" => Dtype::U32,
            other => {
                return Err(Error::invalid(format!(
                    "dtype must be \"uint16\" or \"uint32\", got {other:?}"
                ))
                .into())
            }
        };
        let options = ShardOptions {
            output_dir,
            val_fraction,
            shard_tokens: crate::shard::shard_tokens_option(shard_tokens)?,
            seed,
            bos,
            eos,
            dtype,
            resume,
            num_threads,
        };
        let shared = tokenizer.shared();
        let writer = detached(py, || ShardWriter::create(options, shared, &tokenizer_json))?;
        Ok(CoreShardWriter {
            writer: Some(writer),
        })
    }

    /// Adds documents in order (GIL released while they are encoded).
    fn add_documents(&mut self, py: Python<'_>, documents: Vec<String>) -> PyResult<()> {
        let writer = self.writer()?;
        detached(py, || writer.add_documents(&documents))
    }

    /// Reads a text / JSON lines file (optionally .zst or .gz) in Rust and adds its documents.
    /// `text_split`: "file", "blank_lines" or "delimiter" (with `delimiter`). Returns (documents, bytes).
    /// While it runs, Ctrl-C stops it within a batch's document (KeyboardInterrupt; the writer
    /// is then unusable, and what is on disk resumes), and `progress(file_bytes, documents,
    /// tokens)` is called every 50 ms with the bytes of this file consumed so far and the totals.
    #[pyo3(signature = (path, *, text_field, text_split, delimiter=None, strict_lines=false, strict_utf8=false, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_file(
        &mut self,
        py: Python<'_>,
        path: PathBuf,
        text_field: String,
        text_split: &str,
        delimiter: Option<String>,
        strict_lines: bool,
        strict_utf8: bool,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<(u64, u64)> {
        let text_split = match (text_split, delimiter) {
            ("file", _) => TextSplit::WholeFile,
            ("blank_lines", _) => TextSplit::BlankLines,
            ("delimiter", Some(d)) if !d.is_empty() => TextSplit::Delimiter(d),
            (other, _) => {
                return Err(Error::invalid(format!(
                    "text_split must be \"file\", \"blank_lines\" or \"delimiter\" with a non-empty delimiter, got {other:?}"
                ))
                .into())
            }
        };
        let options = DocumentOptions {
            text_field,
            text_split,
            strict_lines,
            strict_utf8,
            // Large batches: each costs a hand-over between the reading and the encoding threads
            // and a dispatch on the pool (progress and Ctrl-C do not wait for a batch's end).
            batch_documents: 65536,
            batch_bytes: 16 << 20,
        };
        let writer = self.writer()?;
        let counters = writer.counters();
        let outcome = interruptible(
            py,
            |stop| writer.add_file(&path, &options, stop),
            |_| match &progress {
                Some(callback) => {
                    let read = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                    let done = (
                        read(&counters.file_bytes),
                        read(&counters.documents_read),
                        read(&counters.tokens),
                    );
                    callback.call1(done).map(|_| ())
                }
                None => Ok(()),
            },
        );
        match outcome {
            Ok(stats) => Ok((stats.documents, stats.bytes)),
            Err(error) => {
                // Stopped part-way through a batch (or failed in one), the writer's state is
                // no longer what is on disk: drop it, so nothing can finish a partial run
                // (without the GIL: it waits for a shard write in progress).
                let writer = self.writer.take();
                py.detach(move || drop(writer));
                Err(error)
            }
        }
    }

    /// Records an input read outside Rust (Parquet) for resume checks: its size, mtime and the
    /// sha256 of the whole file. Call before adding its documents.
    fn begin_file(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let writer = self.writer()?;
        detached(py, || writer.begin_input(&path, true).map(|_| ()))
    }

    /// Reads and validates `directory/manifest.json` (format, version, vocabulary, ids, file
    /// names, totals), its tokenizer (sha256 and vocabulary size against `vocab_size`); with
    /// `verify_files`, also every shard's size and sha256. Returns its JSON.
    #[staticmethod]
    #[pyo3(signature = (directory, *, verify_files=false))]
    fn read_manifest(py: Python<'_>, directory: PathBuf, verify_files: bool) -> PyResult<String> {
        detached(py, || {
            let manifest = Manifest::read(&directory.join(manifest::MANIFEST))?;
            // The tokenizer is at hand in the same directory: vocab_size is checked against it.
            manifest::verify_tokenizer(&directory, &manifest)?;
            if verify_files {
                for shard in manifest.splits.values().flat_map(|s| &s.shards) {
                    manifest::verify_shard(&directory, shard)?;
                }
            }
            Ok(serde_json::to_string(&manifest).expect("manifest serialises"))
        })
    }

    #[getter]
    fn tokens_so_far(&mut self) -> PyResult<u64> {
        Ok(self.writer()?.tokens_so_far())
    }

    #[getter]
    fn documents_read(&mut self) -> PyResult<u64> {
        Ok(self.writer()?.documents_read())
    }

    /// Records lines that were skipped by a Python-side reader (e.g. Parquet rows without text).
    fn count_bad_lines(&mut self, n: u64) -> PyResult<()> {
        self.writer()?.skipped.bad_lines += n;
        Ok(())
    }

    /// Closes the last shards and writes manifest.json; returns the manifest as JSON text.
    fn finish(&mut self, py: Python<'_>, inputs: Vec<(String, u64, u64)>) -> PyResult<String> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| Error::invalid("this shard writer has already finished"))?;
        let inputs = inputs
            .into_iter()
            .map(|(path, documents, bytes)| InputRecord {
                path,
                documents,
                bytes,
            })
            .collect();
        detached(py, || {
            let manifest = writer.finish(inputs)?;
            Ok(serde_json::to_string(&manifest).expect("manifest serialises"))
        })
    }
}
