//! A background thread that builds one rank's batches ahead of the training loop.
//!
//! The consumer keeps the position of the last batch it *delivered*; the thread owns its cursor
//! and sends finished batches through a bounded channel (`depth` batches ahead). Fork safety: the
//! thread, the channel and its locks belong to the process that started them. A forked child
//! notices the different process id, forgets (never drops, never joins) what it inherited and
//! starts its own thread from the delivered position, so it cannot wait on a lock that a parent
//! thread held at fork time.

use super::pack::RowScratch;
use super::{assemble_batch, parallel_batch, Batch, BatchStats, Cursor, Dataset, Position};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A batch's output vectors, kept for reuse.
#[derive(Debug, Default)]
pub struct Buffers {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub cu_seqlens: Vec<i32>,
}

/// Output buffers handed back by the consumer (e.g. when numpy frees a batch's arrays) and reused
/// by the thread. Fresh multi-megabyte vectors for every batch would cost a page fault per 4 KiB
/// whenever the allocator returns them to the system, which measured up to 3x slower.
/// `give` never blocks (`try_lock`; a contended or full pool simply frees) and does nothing in a
/// forked child, so the pool can never hold up or deadlock the consumer.
pub struct BufferPool {
    pid: u32,
    limit: usize,
    free: Mutex<Vec<Buffers>>,
}

impl BufferPool {
    pub fn new(limit: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            pid: std::process::id(),
            limit,
            free: Mutex::new(Vec::new()),
        })
    }

    /// A used set of vectors when one is available, else empty ones.
    pub fn take(&self) -> Buffers {
        let mut buffers = self
            .free
            .try_lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_default();
        // The token vectors keep their length: every element is overwritten.
        buffers.cu_seqlens.clear();
        buffers
    }

    pub fn give(&self, buffers: Buffers) {
        if self.pid != std::process::id() {
            return;
        }
        if let Ok(mut free) = self.free.try_lock() {
            if free.len() < self.limit {
                free.push(buffers);
            }
        }
    }
}

struct Running {
    pid: u32,
    rx: Receiver<Result<Batch>>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

/// The thread's loop: batches from `from` on, until `stop` or the consumer hangs up.
fn produce(
    dataset: Arc<Dataset>,
    from: &Position,
    (rank, batch_size, world_size): (usize, usize, usize),
    stop: &AtomicBool,
    pool: &BufferPool,
    tx: &SyncSender<Result<Batch>>,
) -> Result<()> {
    let mut cursor = Cursor::new(dataset.clone(), from, Some(stop))?;
    if !parallel_batch(batch_size * dataset.seq_len(), batch_size) {
        while !stop.load(Ordering::Relaxed) {
            let batch = cursor.next_batch(rank, batch_size, world_size, pool.take())?;
            if tx.send(Ok(batch)).is_err() {
                break;
            }
        }
        return Ok(());
    }
    // Large batches: plan step k + 1 (sequential: the packers) while the pool assembles step k.
    let mut scratch = RowScratch::new(dataset.seq_len());
    let mut plan = cursor.plan_batch(rank, batch_size, world_size);
    while !stop.load(Ordering::Relaxed) {
        let buffers = pool.take();
        let (batch, next) = crate::pool::install(None, || {
            rayon::join(
                || assemble_batch(&dataset, &plan, buffers, &mut scratch),
                || cursor.plan_batch(rank, batch_size, world_size),
            )
        });
        if tx.send(Ok(batch?)).is_err() {
            break;
        }
        plan = next;
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
    pool: Arc<BufferPool>,
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
        Ok(Loader {
            dataset,
            rank,
            batch_size,
            world_size,
            depth: depth.max(1),
            delivered,
            stats: BatchStats::default(),
            running: None,
            pool: BufferPool::new(depth.max(1) + 2),
        })
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Where the buffers of delivered batches may be returned for reuse.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
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

    fn start(&mut self) {
        if self.pool.pid != std::process::id() {
            self.pool = BufferPool::new(self.depth + 2);
        }
        let pool = self.pool.clone();
        let (tx, rx) = mpsc::sync_channel(self.depth);
        let stop = Arc::new(AtomicBool::new(false));
        let (dataset, from, flag) = (self.dataset.clone(), self.delivered.clone(), stop.clone());
        let (rank, batch_size, world_size) = (self.rank, self.batch_size, self.world_size);
        let handle = std::thread::Builder::new()
            .name(format!("ferrolm-loader-{rank}"))
            .spawn(move || {
                let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let geometry = (rank, batch_size, world_size);
                    produce(dataset, &from, geometry, &flag, &pool, &tx)
                }));
                let failure = match work {
                    Ok(Ok(())) => return,
                    Ok(Err(error)) => error,
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("unknown panic");
                        Error::invalid(format!(
                            "internal error in the ferrolm loader thread (please report it): {what}"
                        ))
                    }
                };
                let _ = tx.send(Err(failure));
            })
            .expect("the loader thread starts");
        self.running = Some(Running {
            pid: std::process::id(),
            rx,
            stop,
            handle,
        });
    }

    /// Forgets a thread inherited through `fork` (it does not exist in this process).
    fn forget_if_forked(&mut self) {
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.pid != std::process::id())
        {
            std::mem::forget(self.running.take());
        }
    }

    /// The next batch, waiting at most `timeout` (None when it is not ready yet; call again).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Batch>> {
        self.forget_if_forked();
        if self.running.is_none() {
            self.start();
        }
        let running = self.running.as_ref().expect("started above");
        match running.rx.recv_timeout(timeout) {
            Ok(Ok(batch)) => {
                self.delivered = batch.position.clone();
                self.stats.add(&batch.stats);
                Ok(Some(batch))
            }
            Ok(Err(error)) => {
                self.stop();
                Err(error)
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                self.stop();
                Err(Error::invalid(
                    "the ferrolm loader thread ended without a batch (please report it)",
                ))
            }
        }
    }

    /// The next batch (blocking).
    pub fn next_batch(&mut self) -> Result<Batch> {
        loop {
            if let Some(batch) = self.next_timeout(Duration::from_secs(3600))? {
                return Ok(batch);
            }
        }
    }

    /// Stops the thread without waiting for it (it exits at its next batch).
    fn stop(&mut self) {
        self.forget_if_forked();
        if let Some(running) = self.running.take() {
            running.stop.store(true, Ordering::Relaxed);
            drop(running.rx);
        }
    }

    /// Stops the thread and waits until it has exited.
    pub fn close(&mut self) {
        self.forget_if_forked();
        if let Some(running) = self.running.take() {
            running.stop.store(true, Ordering::Relaxed);
            drop(running.rx);
            let _ = running.handle.join();
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop();
    }
}
