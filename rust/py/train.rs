//! `ferrolm._core.CoreBpeTrainer`: the Rust BPE trainer behind `ferrolm.training.train_tokenizer`.
//!
//! Stateful on purpose: Python streams texts from an iterator in batches (`feed_texts`) and hands
//! over file lists (`feed_files`, read by Rust); `train` then merges. Every call runs its work on
//! a worker thread while the calling thread waits without the GIL and polls for signals, so Ctrl-C
//! stops the work within one block or merge and raises KeyboardInterrupt; nothing is written.

use super::interruptible;
use super::tokenizer::CoreTokenizer;
use crate::corpus::{self, ReadOptions, Utf8Policy};
use crate::error::Error;
use crate::tokenizer::train::{self, ChunkCounter, StopReason, TieBreak, TrainOptions};
use crate::tokenizer::Tokenizer;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// (merges, vocabulary size, distinct chunks, why training stopped).
type TrainSummary = (usize, usize, usize, &'static str);

/// Counts pre-tokenized chunks from texts and files, then trains a byte-level BPE vocabulary.
#[pyclass(module = "ferrolm._core")]
pub struct CoreBpeTrainer {
    counter: Option<ChunkCounter>,
    pattern: String,
    num_threads: Option<usize>,
    show_progress: bool,
}

impl CoreBpeTrainer {
    fn counter(&mut self) -> PyResult<&mut ChunkCounter> {
        self.counter.as_mut().ok_or_else(|| {
            Error::invalid("this trainer has already trained; create a new one").into()
        })
    }
}

#[pymethods]
impl CoreBpeTrainer {
    #[new]
    #[pyo3(signature = (pattern, num_threads=None, show_progress=false))]
    fn new(pattern: String, num_threads: Option<usize>, show_progress: bool) -> PyResult<Self> {
        let counter = ChunkCounter::new(&pattern, num_threads, show_progress)?;
        Ok(CoreBpeTrainer {
            counter: Some(counter),
            pattern,
            num_threads,
            show_progress,
        })
    }

    /// Counts each text as one sequence (Hugging Face's `train_from_iterator`).
    fn feed_texts(&mut self, py: Python<'_>, texts: Vec<String>) -> PyResult<()> {
        let counter = self.counter()?;
        interruptible(py, |stop| counter.count_texts(&texts, stop), |_| Ok(()))
    }

    /// Reads and counts files. Returns, for each file where invalid UTF-8 was replaced, the
    /// file, the number of lines and the first location ("path:line").
    #[pyo3(signature = (paths, text_field="text".to_string(), errors="replace"))]
    fn feed_files(
        &mut self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        text_field: String,
        errors: &str,
    ) -> PyResult<Vec<(String, u64, String)>> {
        let read = ReadOptions {
            text_field,
            utf8: Utf8Policy::parse(errors)?,
        };
        let counter = self.counter()?;
        let already = counter.utf8_reports().len();
        interruptible(
            py,
            |stop| {
                counter.count_files(&paths, &read, stop)?;
                Ok(counter.utf8_reports()[already..]
                    .iter()
                    .map(|(path, report)| {
                        let at = report.first_offset.unwrap_or(0);
                        let location = corpus::detect_format(path)
                            .map(|format| corpus::location(path, format, at))
                            .unwrap_or_else(|_| path.display().to_string());
                        (path.display().to_string(), report.replaced_lines, location)
                    })
                    .collect())
            },
            |_| Ok(()),
        )
    }

    /// (bytes, sequences, chunks) ingested so far.
    #[getter]
    fn ingested(&self) -> (u64, u64, u64) {
        match &self.counter {
            Some(c) => {
                let s = c.stats();
                (
                    s.bytes.load(Ordering::Relaxed),
                    s.sequences.load(Ordering::Relaxed),
                    s.chunks.load(Ordering::Relaxed),
                )
            }
            None => (0, 0, 0),
        }
    }

    /// Trains on everything fed so far. Returns the tokenizer and (merges, vocabulary size,
    /// distinct chunks, why training stopped: "vocab_size" | "no_pairs" | "min_frequency").
    #[pyo3(signature = (vocab_size, special_tokens, min_frequency=0, tie_break="hf"))]
    fn train(
        &mut self,
        py: Python<'_>,
        vocab_size: usize,
        special_tokens: Vec<String>,
        min_frequency: u64,
        tie_break: &str,
    ) -> PyResult<(CoreTokenizer, TrainSummary)> {
        let options = TrainOptions {
            vocab_size,
            special_tokens,
            min_frequency,
            tie_break: TieBreak::parse(tie_break)?,
            pattern: self.pattern.clone(),
            num_threads: self.num_threads,
            show_progress: self.show_progress,
        };
        let counter = self.counter.take().ok_or_else(|| {
            PyErr::from(Error::invalid(
                "this trainer has already trained; create a new one",
            ))
        })?;
        let (tokenizer, stats) = interruptible(
            py,
            |stop| {
                let trained = train::finish(counter, &options, stop)?;
                Ok((Tokenizer::new(trained.parts)?, trained.stats))
            },
            |_| Ok(()),
        )?;
        let reason = match stats.stop_reason {
            StopReason::VocabularyFull => "vocab_size",
            StopReason::NoPairsLeft => "no_pairs",
            StopReason::BelowMinFrequency => "min_frequency",
        };
        Ok((
            CoreTokenizer::from_tokenizer(tokenizer),
            (
                stats.merges,
                stats.vocab_size,
                stats.distinct_chunks,
                reason,
            ),
        ))
    }
}
