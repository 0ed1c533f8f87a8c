//! A background thread that builds one rank's batches ahead of the training loop.
//!
//! The consumer keeps the position of the last batch it *delivered*; the thread owns its cursor
//! and queues finished batches (`depth` batches ahead, see [`Shared`] for the hand-off), each in
//! a reusable [`Slot`]. Fork safety: the thread, the queue, the free slots and their locks belong
//! to the process that started them. A forked child
//! notices the different process id, forgets (never drops, never joins) what it inherited and
//! starts its own thread from the delivered position, so it cannot wait on a lock that a parent
//! thread held at fork time.

use super::pack::RowScratch;
use super::{assemble_batch, parallel_batch, Batch, BatchStats, Cursor, Dataset, Position};
use crate::error::{Error, Result};
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

/// A batch's output vectors.
#[derive(Debug, Default)]
pub struct Buffers {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub cu_seqlens: Vec<i32>,
}

impl Buffers {
    /// Where each vector's memory is (a refill must leave these unchanged: views point there).
    fn addresses(&self) -> [usize; 4] {
        [
            self.input_ids.as_ptr() as usize,
            self.labels.as_ptr() as usize,
            self.position_ids.as_ptr() as usize,
            self.cu_seqlens.as_ptr() as usize,
        ]
    }
}

static NEXT_SLOT_ID: AtomicU64 = AtomicU64::new(0);

/// One batch's output memory, allocated once and refilled in place, so that the arrays viewing
/// it (numpy, torch) are made once per slot instead of once per batch: making them was most of
/// the training loop's cost per step (a cold `torch.from_numpy` costs 10-15 us).
///
/// Ownership protocol, which is what makes the `UnsafeCell` sound: a slot is always in exactly
/// one place: the free list, the producer (filling it), the ready queue, or the consumer (handed
/// out). Only the producer writes, and only while it holds the slot; the vectors never grow after
/// the first fill (same batch shape every time), so their memory never moves. The consumer
/// returns a slot with [`Loader::release`] only when nothing reads its memory any more (the Python
/// layer checks every reference to its arrays and tensors first).
pub struct Slot {
    id: u64,
    buffers: UnsafeCell<Buffers>,
}

// SAFETY: see the ownership protocol above: one holder at a time writes or reads.
unsafe impl Sync for Slot {}

impl Slot {
    fn new() -> Arc<Slot> {
        Arc::new(Slot {
            // Unique in the process (also across loaders and forks), so a view cached for one
            // slot can never be mistaken for another's.
            id: NEXT_SLOT_ID.fetch_add(1, Ordering::Relaxed),
            buffers: UnsafeCell::new(Buffers::default()),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The slot's vectors, for making views of them.
    ///
    /// # Safety
    /// The caller holds the slot (it was delivered and not released): no one writes meanwhile.
    pub unsafe fn buffers(&self) -> &Buffers {
        &*self.buffers.get()
    }

    /// # Safety
    /// The caller holds the slot and nothing else reads it (the producer while filling it).
    #[allow(clippy::mut_from_ref)]
    unsafe fn buffers_mut(&self) -> &mut Buffers {
        &mut *self.buffers.get()
    }
}

/// Released slots waiting to be refilled. `take` and `give` never block on a lock (`try_lock`:
/// a contended list just means a fresh or dropped slot), so neither side can hold up the other,
/// and a forked child, which gets a new list, never touches a lock a parent thread held.
struct FreeList {
    limit: usize,
    slots: Mutex<Vec<Arc<Slot>>>,
}

impl FreeList {
    fn take(&self) -> Arc<Slot> {
        self.slots
            .try_lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_else(Slot::new)
    }

    /// Keeps `slot` for reuse unless the list is full; says whether it was kept.
    fn give(&self, slot: Arc<Slot>) -> bool {
        match self.slots.try_lock() {
            Ok(mut free) if free.len() < self.limit => {
                free.push(slot);
                true
            }
            _ => false,
        }
    }

    fn ids(&self) -> Vec<u64> {
        self.slots
            .try_lock()
            .map(|free| free.iter().map(|s| s.id).collect())
            .unwrap_or_default()
    }
}

/// A filled slot and what describes its batch (the batch's vectors are in the slot).
pub struct Filled {
    pub slot: Arc<Slot>,
    pub batch: Batch,
}

/// The hand-off between the thread and the consumer.
///
/// Taking a ready batch costs the consumer no system call: the thread is never woken by the
/// consumer. When the queue is full it naps and looks again (naps adapt to the consumer's
/// pace, 20 us to 2 ms, so it wakes about once per batch taken); the queue then still holds
/// `depth - 1` batches, so a nap never starves the consumer. Only a consumer that finds the
/// queue empty sleeps, and the thread wakes it after its next batch (the consumer is waiting
/// anyway, so the wake costs it no time it could have used). Measured in a training loop
/// (3 ms of other work per step, 2 cores), the previous bounded channel cost the consumer a
/// futex wake of the blocked thread on every batch, plus the lock hand-over that followed.
struct Shared {
    depth: usize,
    ready: Mutex<VecDeque<Result<Filled>>>,
    stop: AtomicBool,
    /// The thread has exited (after queueing its error, if any).
    finished: AtomicBool,
    consumer_waiting: AtomicBool,
    waiter: Mutex<Option<Thread>>,
}

impl Shared {
    fn pop(&self) -> Option<Result<Filled>> {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    fn len(&self) -> usize {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Queues an item and wakes a waiting consumer.
    fn push(&self, item: Result<Filled>) {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(item);
        if self.consumer_waiting.load(Ordering::SeqCst) {
            self.push_wake();
        }
    }

    /// Wakes a waiting consumer (it looks at the queue and at `finished` again).
    fn push_wake(&self) {
        self.consumer_waiting.store(false, Ordering::SeqCst);
        if let Some(thread) = self
            .waiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            thread.unpark();
        }
    }

    /// Waits (napping) until the queue has room; false when told to stop.
    fn wait_for_room(&self, nap: &mut Duration) -> bool {
        let mut naps = 0;
        while self.len() >= self.depth {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::park_timeout(*nap);
            naps += 1;
            if naps > 1 {
                *nap = (*nap * 2).min(MAX_NAP);
            }
        }
        if naps == 1 {
            // Room after one nap: the consumer is quicker than the nap; shorten it.
            *nap = (*nap * 3 / 4).max(MIN_NAP);
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

/// Slot memory a consumer may keep out between two hand-backs (see [`release_batches`]).
const RELEASE_BYTES: usize = 8 << 20;

/// How many batches of `batch_size x seq_len` a consumer takes between two hand-backs of its
/// slots: checking whether a slot is still held costs the training loop's thread a few calls
/// into torch, which are slow when its caches are cold (each step's other work evicts them),
/// so small batches check every few steps, all slots at once (about one cold pass per check),
/// at the price of a few more slots in memory (at most [`RELEASE_BYTES`] of them).
pub fn release_batches(batch_size: usize, seq_len: usize) -> usize {
    let slot_bytes = batch_size * seq_len * 3 * std::mem::size_of::<i64>();
    (RELEASE_BYTES / slot_bytes.max(1)).clamp(1, 8)
}

const MIN_NAP: Duration = Duration::from_micros(20);
const MAX_NAP: Duration = Duration::from_millis(2);

struct Running {
    pid: u32,
    shared: Arc<Shared>,
    handle: JoinHandle<()>,
}

/// Fills `slot` with a batch (through `fill`, which gets the slot's vectors and returns the
/// batch holding them) and puts the vectors back; their memory must not have moved.
fn refill(slot: &Slot, fill: impl FnOnce(Buffers) -> Result<Batch>) -> Result<Batch> {
    // SAFETY: the producer holds the slot (taken from the free list or new).
    let buffers = unsafe { slot.buffers_mut() };
    let before = buffers.addresses();
    let fresh = buffers.input_ids.is_empty();
    let mut batch = fill(std::mem::take(buffers))?;
    *buffers = Buffers {
        input_ids: std::mem::take(&mut batch.input_ids),
        labels: std::mem::take(&mut batch.labels),
        position_ids: std::mem::take(&mut batch.position_ids),
        cu_seqlens: std::mem::take(&mut batch.cu_seqlens),
    };
    // Views made of a delivered slot point at this memory: a refill that moved it would leave
    // them reading freed memory. Batches of one loader all have one shape, so it never moves.
    assert!(
        fresh || buffers.addresses() == before,
        "a refilled batch slot moved its memory"
    );
    Ok(batch)
}

/// The thread's loop: batches from `from` on, until told to stop.
fn produce(
    dataset: Arc<Dataset>,
    from: &Position,
    (rank, batch_size, world_size): (usize, usize, usize),
    shared: &Shared,
    free: &FreeList,
) -> Result<()> {
    let stop = &shared.stop;
    let mut cursor = Cursor::new(dataset.clone(), from, Some(stop))?;
    let mut nap = MIN_NAP;
    if !parallel_batch(batch_size * dataset.seq_len(), batch_size) {
        while shared.wait_for_room(&mut nap) {
            let slot = free.take();
            let batch = refill(&slot, |buffers| {
                cursor.next_batch(rank, batch_size, world_size, buffers)
            })?;
            shared.push(Ok(Filled { slot, batch }));
        }
        return Ok(());
    }
    // Large batches: plan step k + 1 (sequential: the packers) while the pool assembles step k.
    let mut scratch = RowScratch::new(dataset.seq_len());
    let mut plan = cursor.plan_batch(rank, batch_size, world_size);
    while shared.wait_for_room(&mut nap) {
        let slot = free.take();
        let mut next = None;
        let batch = refill(&slot, |buffers| {
            let (batch, planned) = crate::pool::install(None, || {
                rayon::join(
                    || assemble_batch(&dataset, &plan, buffers, &mut scratch),
                    || cursor.plan_batch(rank, batch_size, world_size),
                )
            });
            next = Some(planned);
            batch
        })?;
        shared.push(Ok(Filled { slot, batch }));
        plan = next.expect("planned with the batch");
    }
    Ok(())
}

/// One rank's view of the global row stream, with prefetching.
pub struct Loader {
    dataset: Arc<Dataset>,
    pub rank: usize,
    pub batch_size: usize,
    pub world_size: usize,
    depth: usize,
    delivered: Position,
    stats: BatchStats,
    running: Option<Running>,
    free: Arc<FreeList>,
    free_pid: u32,
    /// Counts thread starts (a consumer that caches views of slots prunes them when it changes).
    pub generation: u64,
}

impl Loader {
    pub fn new(
        dataset: Arc<Dataset>,
        rank: usize,
        batch_size: usize,
        world_size: usize,
        depth: usize,
    ) -> Result<Loader> {
        if batch_size == 0 || world_size == 0 {
            return Err(Error::invalid(format!(
                "batch_size and world_size must be positive, got {batch_size} and {world_size}"
            )));
        }
        if rank >= world_size {
            return Err(Error::invalid(format!(
                "rank must be in [0, world_size): got rank={rank}, world_size={world_size}"
            )));
        }
        let tokens = batch_size as u64 * dataset.seq_len() as u64;
        if tokens > i32::MAX as u64 {
            return Err(Error::invalid(format!(
                "batch_size * seq_len = {tokens} does not fit the int32 cu_seqlens"
            )));
        }
        let delivered = Position::start(dataset.sources.len());
        let depth = depth.max(1);
        let dataset_seq_len = dataset.seq_len();
        Ok(Loader {
            dataset,
            rank,
            batch_size,
            world_size,
            depth,
            delivered,
            stats: BatchStats::default(),
            running: None,
            free: Self::free_list(depth + release_batches(batch_size, dataset_seq_len)),
            free_pid: crate::pool::process_id(),
            generation: 0,
        })
    }

    /// Room for the slots a consumer hands back at once (`slots` of them) plus two (the batch
    /// it holds and the one before).
    fn free_list(slots: usize) -> Arc<FreeList> {
        Arc::new(FreeList {
            limit: slots + 2,
            slots: Mutex::new(Vec::new()),
        })
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// How many batches a consumer may take between two hand-backs of its slots (see
    /// [`release_batches`]).
    pub fn release_batches(&self) -> usize {
        release_batches(self.batch_size, self.dataset.seq_len())
    }

    /// The position after the last delivered batch (what a checkpoint saves).
    pub fn position(&self) -> &Position {
        &self.delivered
    }

    /// Totals over the batches delivered by this loader object.
    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Continues from `position` (the next batch is the one after it).
    pub fn seek(&mut self, position: Position) -> Result<()> {
        let expected = self.dataset.schedule.counts_before(position.global);
        let got: Vec<u64> = position.sources.iter().map(|p| p.rows).collect();
        if got != expected {
            return Err(Error::invalid(format!(
                "inconsistent loader state: position {} implies source rows {expected:?}, the state says {got:?}",
                position.global
            )));
        }
        self.stop();
        self.delivered = position;
        Ok(())
    }

    /// A forked child gets a free list of its own (a parent thread may hold the inherited one).
    fn own_free_list(&mut self) {
        if self.free_pid != crate::pool::process_id() {
            self.free = Self::free_list(self.depth + self.release_batches());
            self.free_pid = crate::pool::process_id();
        }
    }

    fn start(&mut self) {
        self.own_free_list();
        self.generation += 1;
        let shared = Arc::new(Shared {
            depth: self.depth,
            ready: Mutex::new(VecDeque::with_capacity(self.depth + 1)),
            stop: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            consumer_waiting: AtomicBool::new(false),
            waiter: Mutex::new(None),
        });
        let (dataset, from, free) = (
            self.dataset.clone(),
            self.delivered.clone(),
            self.free.clone(),
        );
        let theirs = shared.clone();
        let (rank, batch_size, world_size) = (self.rank, self.batch_size, self.world_size);
        let handle = std::thread::Builder::new()
            .name(format!("ferrolm-loader-{rank}"))
            .spawn(move || {
                let shared = theirs;
                let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let geometry = (rank, batch_size, world_size);
                    produce(dataset, &from, geometry, &shared, &free)
                }));
                let failure = match work {
                    Ok(Ok(())) => None,
                    Ok(Err(error)) => Some(error),
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("unknown panic");
                        Some(Error::invalid(format!(
                            "internal error in the ferrolm loader thread (please report it): {what}"
                        )))
                    }
                };
                if let Some(error) = failure {
                    shared.push(Err(error));
                }
                shared.finished.store(true, Ordering::SeqCst);
                // A consumer waiting for a batch learns that none will come.
                shared.push_wake();
            })
            .expect("the loader thread starts");
        self.running = Some(Running {
            pid: crate::pool::process_id(),
            shared,
            handle,
        });
    }

    /// Forgets a thread inherited through `fork` (it does not exist in this process).
    fn forget_if_forked(&mut self) {
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.pid != crate::pool::process_id())
        {
            std::mem::forget(self.running.take());
        }
    }

    /// The next batch in its slot, waiting at most `timeout` (None when it is not ready yet; call
    /// again). A zero timeout only looks. Hand the slot back with [`Loader::release`] when done.
    pub fn next_filled(&mut self, timeout: Duration) -> Result<Option<Filled>> {
        self.forget_if_forked();
        if self.running.is_none() {
            self.start();
        }
        let shared = self.running.as_ref().expect("started above").shared.clone();
        if timeout.is_zero() {
            // Only a look (the consumer's fast path): no clock read, no wait.
            return match shared.pop() {
                Some(item) => self.accept(item).map(Some),
                None => Ok(None),
            };
        }
        let deadline = std::time::Instant::now() + timeout;
        let item = loop {
            if let Some(item) = shared.pop() {
                break item;
            }
            if shared.finished.load(Ordering::SeqCst) {
                // Everything it queued came before `finished`: look once more.
                match shared.pop() {
                    Some(item) => break item,
                    None => {
                        self.stop();
                        return Err(Error::invalid(
                            "the ferrolm loader thread ended without a batch (please report it)",
                        ));
                    }
                }
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            *shared.waiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::thread::current());
            shared.consumer_waiting.store(true, Ordering::SeqCst);
            // A batch queued between the look above and the flag would not wake us: look again.
            if let Some(item) = shared.pop() {
                shared.consumer_waiting.store(false, Ordering::SeqCst);
                break item;
            }
            if !shared.finished.load(Ordering::SeqCst) {
                std::thread::park_timeout(deadline - now);
            }
        };
        self.accept(item).map(Some)
    }

    /// Records a taken item (the position after it, its stats); an error stops the thread.
    fn accept(&mut self, item: Result<Filled>) -> Result<Filled> {
        match item {
            Ok(filled) => {
                self.delivered = filled.batch.position.clone();
                self.stats.add(&filled.batch.stats);
                Ok(filled)
            }
            Err(error) => {
                self.stop();
                Err(error)
            }
        }
    }

    /// The next batch, waiting at most `timeout` (None when it is not ready yet; call again).
    /// The batch owns its vectors (its slot is not reused).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Batch>> {
        Ok(self.next_filled(timeout)?.map(|filled| {
            let mut batch = filled.batch;
            // SAFETY: delivered and never released, so the thread no longer touches it.
            let buffers = std::mem::take(unsafe { filled.slot.buffers_mut() });
            batch.input_ids = buffers.input_ids;
            batch.labels = buffers.labels;
            batch.position_ids = buffers.position_ids;
            batch.cu_seqlens = buffers.cu_seqlens;
            batch
        }))
    }

    /// The next batch (blocking).
    pub fn next_batch(&mut self) -> Result<Batch> {
        loop {
            if let Some(batch) = self.next_timeout(Duration::from_secs(3600))? {
                return Ok(batch);
            }
        }
    }

    /// Hands a delivered slot back for refilling; says whether it was kept (a full free list
    /// drops it, and views of a dropped slot can be let go).
    ///
    /// # Safety
    /// Nothing may read the slot's memory from now on until it is delivered again: the thread
    /// overwrites it with a later batch.
    pub unsafe fn release(&mut self, slot: Arc<Slot>) -> bool {
        self.own_free_list();
        self.free.give(slot)
    }

    /// The ids of the slots kept for reuse (as far as the list can be read without waiting).
    pub fn free_ids(&self) -> Vec<u64> {
        self.free.ids()
    }

    /// Stops the thread without waiting for it (it exits at its next batch or nap). Batches it
    /// had queued are dropped with their slots.
    fn stop(&mut self) {
        self.forget_if_forked();
        if let Some(running) = self.running.take() {
            running.shared.stop.store(true, Ordering::Relaxed);
            running.handle.thread().unpark();
        }
    }

    /// Stops the thread and waits until it has exited.
    pub fn close(&mut self) {
        self.forget_if_forked();
        if let Some(running) = self.running.take() {
            running.shared.stop.store(true, Ordering::Relaxed);
            running.handle.thread().unpark();
            let _ = running.handle.join();
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop();
    }
}
