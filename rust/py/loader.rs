//! `ferrolm._core.CoreLoader`: the Rust packed-batch loader behind `ferrolm.data.PackedLoader`.
//!
//! `next` takes a ready batch with the GIL held (no system call: see `prefetch::Shared`), or
//! waits for one with the GIL released (in slices, so Ctrl-C is honoured). Batches live in
//! reusable slots: the numpy arrays viewing a slot are made once and returned again each time the
//! slot comes back, with whatever the Python layer attached to them (its torch tensors). The
//! Python layer hands a slot back (`release`) only once nothing references its arrays.

use super::detached;
use crate::error::Error;
use crate::loader::prefetch::{Filled, Loader, Slot};
use crate::loader::{Cursor, Dataset, LoaderOptions, Packing, Position, SourcePosition, Verify};
use numpy::ndarray::{ArrayView1, ArrayView2};
use numpy::{PyArray1, PyArray2};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// (slot id, (input_ids, labels, position_ids, cu_seqlens) arrays, the objects attached to the
/// slot or None, num_cu_seqlens, max_seqlen).
type Delivered<'py> = (u64, Bound<'py, PyTuple>, Option<Py<PyAny>>, usize, usize);

/// (epoch, row where the epoch began, rows consumed) of one source.
type SourceState = (u64, u64, u64);

/// (source, epoch, [(first token, length) of each span]) of one planned row.
type PlannedRow = (usize, u64, Vec<(u64, u32)>);

/// Keeps a slot's memory alive while numpy arrays view it (it is their `base`).
#[pyclass(frozen, module = "ferrolm._core")]
struct SlotMemory {
    _slot: Arc<Slot>,
}

/// The arrays made for one slot, and what the Python layer attached to them.
struct SlotViews {
    arrays: Py<PyTuple>,
    attached: Option<Attached>,
}

/// What is handed out from a slot (its numpy arrays, or torch tensors made from them) and the
/// counts that show whether anything else still holds it: a slot is refilled only when every
/// count is back to what it was when nothing but the loader held the objects (see `unheld`).
struct Attached {
    objects: Py<PyTuple>,
    counts: Vec<isize>,
    /// Reference counts of the slot's arrays (a torch storage made by `from_numpy` holds one).
    array_counts: Vec<isize>,
    tensors: Option<TensorCounts>,
}

/// Where a delivered slot stands.
#[derive(PartialEq, Eq)]
enum Hold {
    /// Something outside the loader still holds what was handed out.
    Held,
    /// Nothing does: refill the slot and hand out the same objects again.
    Free,
    /// A tensor no longer views the slot's memory (its storage was moved, e.g. to shared memory
    /// by a DataLoader worker that sent it, which drops the storage's reference to the array):
    /// the objects cannot be handed out again, so the slot is let go instead.
    Moved,
}

/// For torch tensors, what Python reference counts do not show: other C++ references to the
/// same tensor (a view's base, autograd's saved tensors, DLPack) in `Tensor._use_count()`, and
/// other tensors on the same memory (`detach()`, `.data`, a kept `untyped_storage()`) in the
/// storage's use count.
struct TensorCounts {
    /// The storages (kept alive so that their addresses stay valid) and their `_cdata` addresses.
    _storages: Py<PyTuple>,
    cdata: Vec<Py<PyAny>>,
    storage_use_count: Py<PyAny>,
    counts: Vec<i64>,
}

impl Attached {
    fn python_counts(objects: &Bound<'_, PyTuple>) -> Vec<isize> {
        // SAFETY: reading the reference count of a live object (we hold a reference to it).
        objects
            .iter()
            .map(|o| unsafe { pyo3::ffi::Py_REFCNT(o.as_ptr()) })
            .collect()
    }

    fn tensor_counts(
        objects: &Bound<'_, PyTuple>,
        cdata: &[Py<PyAny>],
        storage_use_count: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<i64>> {
        let py = objects.py();
        let mut counts = Vec::with_capacity(objects.len() + cdata.len());
        for o in objects.iter() {
            counts.push(o.call_method0("_use_count")?.extract()?);
        }
        for c in cdata {
            counts.push(storage_use_count.call1((c.bind(py),))?.extract()?);
        }
        Ok(counts)
    }

    /// Whether anything but the loader holds the objects (Python counts first: they are free
    /// to read and they fail for the batch the caller is still holding).
    fn hold(&self, py: Python<'_>, arrays: &Bound<'_, PyTuple>) -> PyResult<Hold> {
        let array_counts = Self::python_counts(arrays);
        if array_counts
            .iter()
            .zip(&self.array_counts)
            .any(|(now, then)| now < then)
        {
            return Ok(Hold::Moved);
        }
        let objects = self.objects.bind(py);
        if array_counts != self.array_counts || Self::python_counts(objects) != self.counts {
            return Ok(Hold::Held);
        }
        let free = match &self.tensors {
            None => true,
            Some(t) => {
                Self::tensor_counts(objects, &t.cdata, t.storage_use_count.bind(py))? == t.counts
            }
        };
        Ok(if free { Hold::Free } else { Hold::Held })
    }
}

#[pyclass(module = "ferrolm._core")]
pub struct CoreLoader {
    dataset: Arc<Dataset>,
    /// Only ever reached through `&mut self` (`Mutex::get_mut`, which never locks): the Mutex
    /// makes the class `Sync` without a lock a forked child could inherit held.
    loader: Mutex<Loader>,
    /// Slots delivered and not yet released.
    handed: HashMap<u64, Arc<Slot>>,
    /// Views of the slots that are handed out or free (pruned when the thread restarts, which
    /// drops the slots it had queued).
    views: HashMap<u64, SlotViews>,
    generation: u64,
    /// Batches taken since the last hand-back, and how many between two (`release_batches`).
    taken: usize,
    release_every: usize,
}

impl CoreLoader {
    fn loader(&mut self) -> &mut Loader {
        self.loader
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands back every delivered slot whose attached objects nothing else holds any more.
    fn release_unheld(&mut self, py: Python<'_>) -> PyResult<()> {
        let mut done = Vec::new();
        for id in self.handed.keys() {
            if let Some(views) = self.views.get(id) {
                if let Some(attached) = &views.attached {
                    match attached.hold(py, views.arrays.bind(py))? {
                        Hold::Held => {}
                        hold => done.push((*id, hold)),
                    }
                }
            }
        }
        for (id, hold) in done {
            let slot = self.handed.remove(&id).expect("listed above");
            // SAFETY: nothing but this loader holds the arrays or tensors of the slot (checked
            // above), so nothing reads its memory until it is delivered again.
            if hold == Hold::Moved || !unsafe { self.loader().release(slot) } {
                self.views.remove(&id);
            }
        }
        Ok(())
    }

    /// Records a delivered slot and returns its views (made the first time it is seen).
    fn deliver<'py>(&mut self, py: Python<'py>, filled: Filled) -> PyResult<Delivered<'py>> {
        let Filled { slot, batch } = filled;
        let id = slot.id();
        self.handed.insert(id, slot.clone());
        let generation = self.loader().generation;
        if generation != self.generation {
            self.generation = generation;
            let free = self.loader().free_ids();
            let handed = &self.handed;
            self.views
                .retain(|id, _| handed.contains_key(id) || free.contains(id));
        }
        let views = match self.views.entry(id) {
            Entry::Occupied(views) => views.into_mut(),
            Entry::Vacant(place) => {
                place.insert(make_views(py, &slot, (batch.batch_size, batch.seq_len))?)
            }
        };
        Ok((
            id,
            views.arrays.bind(py).clone(),
            views
                .attached
                .as_ref()
                .map(|a| a.objects.clone_ref(py).into_any()),
            batch.num_cu_seqlens,
            batch.max_seqlen,
        ))
    }
}

/// Numpy arrays of a delivered slot's memory (made once per slot).
fn make_views(py: Python<'_>, slot: &Arc<Slot>, shape: (usize, usize)) -> PyResult<SlotViews> {
    let owner = Bound::new(
        py,
        SlotMemory {
            _slot: slot.clone(),
        },
    )?
    .into_any();
    // SAFETY: the slot is delivered (held by this consumer): nothing writes it.
    let buffers = unsafe { slot.buffers() };
    let matrix = |v: &Vec<i64>| {
        let view = ArrayView2::from_shape(shape, v).expect("B * T elements");
        // SAFETY: `owner` becomes the array's base object, so the memory outlives the array,
        // and it never moves (see `prefetch::Slot`); the slot is refilled only once nothing
        // but the loader holds the arrays or anything made from them (`release_unheld`).
        unsafe { PyArray2::borrow_from_array(&view, owner.clone()) }.into_any()
    };
    let cu = ArrayView1::from(&buffers.cu_seqlens[..]);
    let arrays = PyTuple::new(
        py,
        [
            matrix(&buffers.input_ids),
            matrix(&buffers.labels),
            matrix(&buffers.position_ids),
            // SAFETY: as above.
            unsafe { PyArray1::borrow_from_array(&cu, owner.clone()) }.into_any(),
        ],
    )?;
    Ok(SlotViews {
        arrays: arrays.unbind(),
        attached: None,
    })
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
            release_every: loader.release_batches(),
            loader: Mutex::new(loader),
            handed: HashMap::new(),
            views: HashMap::new(),
            generation: 0,
            taken: 0,
        })
    }

    /// The next batch: (slot id, (input_ids, labels, position_ids, cu_seqlens), attached or
    /// None, num_cu_seqlens, max_seqlen). The arrays view the slot's memory, which is refilled
    /// only after `release`.
    fn next<'py>(&mut self, py: Python<'py>) -> PyResult<Delivered<'py>> {
        self.taken += 1;
        if self.taken >= self.release_every {
            self.taken = 0;
            self.release_unheld(py)?;
        }
        // A ready batch is taken without giving up the GIL (re-taking it costs more).
        if let Some(filled) = self.loader().next_filled(Duration::ZERO)? {
            return self.deliver(py, filled);
        }
        let loader = self.loader();
        let filled = loop {
            let ready = detached(py, || loader.next_filled(Duration::from_millis(100)))?;
            match ready {
                Some(filled) => break filled,
                None => py.check_signals()?,
            }
        };
        self.deliver(py, filled)
    }

    /// Attaches what is handed out from a delivered slot (`objects`: its arrays, or tensors
    /// made from them, held by nothing else right now); `next` returns them whenever the slot
    /// comes back, and refills the slot once nothing else holds them. For tensors, pass their
    /// `untyped_storage()`s and `torch._C._storage_Use_Count` (see `TensorCounts`).
    #[pyo3(signature = (slot, objects, storages=None, storage_use_count=None))]
    fn attach(
        &mut self,
        slot: u64,
        objects: Bound<'_, PyTuple>,
        storages: Option<Bound<'_, PyTuple>>,
        storage_use_count: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if !self.handed.contains_key(&slot) {
            return Err(Error::invalid(format!("batch slot {slot} is not handed out")).into());
        }
        let tensors = match (storages, storage_use_count) {
            (Some(storages), Some(count)) => {
                let cdata = storages
                    .iter()
                    .map(|s| Ok(s.getattr("_cdata")?.unbind()))
                    .collect::<PyResult<Vec<_>>>()?;
                let counts = Attached::tensor_counts(&objects, &cdata, &count)?;
                Some(TensorCounts {
                    _storages: storages.unbind(),
                    cdata,
                    storage_use_count: count.unbind(),
                    counts,
                })
            }
            (None, None) => None,
            _ => {
                return Err(Error::invalid(
                    "attach: give both storages and storage_use_count, or neither",
                )
                .into())
            }
        };
        if let Some(views) = self.views.get_mut(&slot) {
            views.attached = Some(Attached {
                counts: Attached::python_counts(&objects),
                array_counts: Attached::python_counts(views.arrays.bind(objects.py())),
                objects: objects.unbind(),
                tensors,
            });
        }
        Ok(())
    }

    /// Hands a delivered slot back. With `reuse`, the thread refills its memory with a later
    /// batch: only when nothing references its arrays or anything made from them (the caller
    /// checks). Without, its views are dropped and its memory is freed when the last one goes.
    /// Returns whether the slot was kept for reuse.
    fn release(&mut self, slot: u64, reuse: bool) -> PyResult<bool> {
        let Some(held) = self.handed.remove(&slot) else {
            return Err(Error::invalid(format!("batch slot {slot} is not handed out")).into());
        };
        // SAFETY: the caller has checked that nothing reads the slot any more (see above).
        let kept = reuse && unsafe { self.loader().release(held) };
        if !kept {
            self.views.remove(&slot);
        }
        Ok(kept)
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
