//! `ferrolm._core.CoreLoader`: the Rust packed-batch loader behind `ferrolm.data.PackedLoader`.
//!
//! `next` waits for the prefetch thread with the GIL released (in slices, so Ctrl-C is honoured)
//! and hands the batch's vectors to numpy without copying.

use super::detached;
use crate::error::Error;
use crate::loader::prefetch::{BufferPool, Buffers, Loader};
use crate::loader::{Cursor, Dataset, LoaderOptions, Packing, Position, SourcePosition, Verify};
use numpy::ndarray::{ArrayView1, ArrayView2};
use numpy::{PyArray1, PyArray2};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type BatchArrays<'py> = (
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray1<i32>>,
    usize,
    usize,
);

/// (epoch, row where the epoch began, rows consumed) of one source.
type SourceState = (u64, u64, u64);

/// (source, epoch, [(first token, length) of each span]) of one planned row.
type PlannedRow = (usize, u64, Vec<(u64, u32)>);

/// Owns one batch's vectors while numpy arrays view them (it is their `base`); when the last
/// array goes, the vectors return to the loader's pool instead of the allocator.
#[pyclass(frozen, module = "ferrolm._core")]
struct BatchMemory {
    buffers: Buffers,
    pool: Arc<BufferPool>,
}

impl Drop for BatchMemory {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buffers));
    }
}

#[pyclass(module = "ferrolm._core")]
pub struct CoreLoader {
    dataset: Arc<Dataset>,
    /// Only ever reached through `&mut self` (`Mutex::get_mut`, which never locks): the Mutex
    /// makes the class `Sync` without a lock a forked child could inherit held.
    loader: Mutex<Loader>,
}

impl CoreLoader {
    fn loader(&mut self) -> &mut Loader {
        self.loader
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[pymethods]
impl CoreLoader {
    #[new]
    #[pyo3(signature = (sources, weights, *, split, batch_size, seq_len, packing, seed, rank, world_size, buffer_size, mask_boundary_labels, verify, prefetch))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        sources: Vec<PathBuf>,
        weights: Vec<u64>,
        split: String,
        batch_size: usize,
        seq_len: usize,
        packing: &str,
        seed: u64,
        rank: usize,
        world_size: usize,
        buffer_size: usize,
        mask_boundary_labels: bool,
        verify: &str,
        prefetch: usize,
    ) -> PyResult<Self> {
        let packing = Packing::parse(packing)?;
        let verify = match verify {
            "eager" => Verify::Eager,
            "lazy" => Verify::Lazy,
            "off" => Verify::Off,
            other => {
                return Err(Error::invalid(format!(
                    "verify must be \"eager\", \"lazy\" or \"off\", got {other:?}"
                ))
                .into())
            }
        };
        let options = LoaderOptions {
            sources,
            weights,
            split,
            seq_len,
            packing,
            seed,
            buffer_size,
            mask_boundary_labels,
            verify,
        };
        let dataset = Arc::new(detached(py, || Dataset::open(options))?);
        let loader = Loader::new(dataset.clone(), rank, batch_size, world_size, prefetch)?;
        Ok(CoreLoader {
            dataset,
            loader: Mutex::new(loader),
        })
    }

    /// The next batch: (input_ids, labels, position_ids, cu_seqlens, num_cu_seqlens, max_seqlen).
    fn next<'py>(&mut self, py: Python<'py>) -> PyResult<BatchArrays<'py>> {
        let loader = self.loader();
        let batch = loop {
            let ready = detached(py, || loader.next_timeout(Duration::from_millis(100)))?;
            match ready {
                Some(batch) => break batch,
                None => py.check_signals()?,
            }
        };
        let shape = (batch.batch_size, batch.seq_len);
        let (num_cu, max_seqlen) = (batch.num_cu_seqlens, batch.max_seqlen);
        let memory = Bound::new(
            py,
            BatchMemory {
                buffers: Buffers {
                    input_ids: batch.input_ids,
                    labels: batch.labels,
                    position_ids: batch.position_ids,
                    cu_seqlens: batch.cu_seqlens,
                },
                pool: loader.pool().clone(),
            },
        )?;
        let owned = memory.get();
        let matrix = |v: &Vec<i64>| {
            let view = ArrayView2::from_shape(shape, v).expect("B * T elements");
            // SAFETY: `memory` becomes the array's base object, so the vector outlives the array,
            // and nothing resizes it while it is alive (it is only reused after `memory` drops).
            unsafe { PyArray2::borrow_from_array(&view, memory.clone().into_any()) }
        };
        let cu = ArrayView1::from(&owned.buffers.cu_seqlens[..]);
        Ok((
            matrix(&owned.buffers.input_ids),
            matrix(&owned.buffers.labels),
            matrix(&owned.buffers.position_ids),
            // SAFETY: as above.
            unsafe { PyArray1::borrow_from_array(&cu, memory.clone().into_any()) },
            num_cu,
            max_seqlen,
        ))
    }

    /// (position in global rows, [(epoch, epoch_start, rows) per source]) after the last batch.
    fn state(&mut self) -> (u64, Vec<SourceState>) {
        let position = self.loader().position();
        (
            position.global,
            position
                .sources
                .iter()
                .map(|p| (p.epoch, p.epoch_start, p.rows))
                .collect(),
        )
    }

    /// Continues after the position that `state` returned.
    fn load_state(&mut self, position: u64, sources: Vec<SourceState>) -> PyResult<()> {
        let position = Position {
            global: position,
            sources: sources
                .into_iter()
                .map(|(epoch, epoch_start, rows)| SourcePosition {
                    epoch,
                    epoch_start,
                    rows,
                })
                .collect(),
        };
        Ok(self.loader().seek(position)?)
    }

    /// Rows `[start, start + count)` of the global stream, without tokens:
    /// [(source, epoch, [(first token in the source's stream, length), ...]), ...].
    fn plan(&self, py: Python<'_>, start: u64, count: u64) -> PyResult<Vec<PlannedRow>> {
        let dataset = self.dataset.clone();
        let rows = detached(py, || {
            let mut cursor = Cursor::new(
                dataset.clone(),
                &Position::start(dataset.sources.len()),
                None,
            )?;
            cursor.plan(start);
            Ok(cursor.plan(count))
        })?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.source,
                    r.epoch,
                    r.spans.iter().map(|s| (s.start, s.len)).collect(),
                )
            })
            .collect())
    }

    /// (rows, row tokens from documents, padded tokens, segments) over the delivered batches.
    fn stats(&mut self) -> (u64, u64, u64, u64) {
        let s = self.loader().stats();
        (s.rows, s.tokens, s.padded, s.segments)
    }

    /// Checks every shard's sha256 now.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        let dataset = self.dataset.clone();
        detached(py, || dataset.verify_all())
    }

    /// Stops the prefetch thread (the next batch starts it again).
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        let loader = self.loader();
        detached(py, || {
            loader.close();
            Ok(())
        })
    }

    #[getter]
    fn fingerprint(&self) -> String {
        self.dataset.fingerprint.clone()
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.dataset.options.seed
    }

    #[getter]
    fn seq_len(&self) -> usize {
        self.dataset.seq_len()
    }

    #[getter]
    fn packing(&self) -> &'static str {
        self.dataset.options.packing.name()
    }

    #[getter]
    fn weights(&self) -> Vec<u64> {
        self.dataset.schedule.weights().to_vec()
    }

    #[getter]
    fn batch_size(&mut self) -> usize {
        self.loader().batch_size
    }

    #[getter]
    fn rank(&mut self) -> usize {
        self.loader().rank
    }

    #[getter]
    fn world_size(&mut self) -> usize {
        self.loader().world_size
    }

    #[getter]
    fn vocab_size(&self) -> u64 {
        self.dataset.sources[0].vocab_size
    }

    #[getter]
    fn pad_id(&self) -> i64 {
        self.dataset.pad_id
    }

    #[getter]
    fn segments_per_row(&self) -> usize {
        self.dataset.segments_per_row
    }

    #[getter]
    fn cu_seqlens_len(&mut self) -> usize {
        let b = self.loader().batch_size;
        self.dataset.cu_seqlens_len(b)
    }

    /// Per source: rows in one epoch when known without packing (concat), else None.
    #[getter]
    fn rows_per_epoch(&self) -> Vec<Option<u64>> {
        (0..self.dataset.sources.len())
            .map(|s| self.dataset.rows_per_epoch(s))
            .collect()
    }

    /// Per source: (directory, tokens, documents).
    #[getter]
    fn sources(&self) -> Vec<(PathBuf, u64, u64)> {
        self.dataset
            .sources
            .iter()
            .map(|s| (s.dir.clone(), s.n_tokens, s.n_docs))
            .collect()
    }
}
