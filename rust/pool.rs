//! The one thread pool behind every parallel call.
//!
//! Sized by `FERROLM_NUM_THREADS` (default: all cores) and resizable at run time. A child made by
//! `fork` (torch DataLoader workers) inherits the parent's pool object but none of its threads, so
//! the pool remembers the process id that built it and a child silently builds its own: no hang,
//! no warning, nothing for the user to set.

use rayon::ThreadPool;
use std::sync::{Arc, Mutex};

struct Pools {
    pid: u32,
    default_size: usize,
    by_size: Vec<(usize, Arc<ThreadPool>)>,
}

static POOLS: Mutex<Option<Pools>> = Mutex::new(None);

fn default_size_from_env() -> usize {
    std::env::var("FERROLM_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn with_pools<R>(f: impl FnOnce(&mut Pools) -> R) -> R {
    let mut guard = POOLS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = std::process::id();
    if guard.as_ref().is_none_or(|pools| pools.pid != pid) {
        // Threads of a parent process do not exist in a forked child: leak the dead pools
        // rather than join threads that will never answer.
        if let Some(old) = guard.take() {
            std::mem::forget(old.by_size);
        }
        *guard = Some(Pools {
            pid,
            default_size: default_size_from_env(),
            by_size: Vec::new(),
        });
    }
    f(guard.as_mut().expect("initialised above"))
}

/// The number of threads a parallel call uses when the caller does not say.
pub fn num_threads() -> usize {
    with_pools(|p| p.default_size)
}

/// Sets the default number of threads (0 means all cores).
pub fn set_num_threads(n: usize) {
    let n = if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n
    };
    with_pools(|p| p.default_size = n);
}

fn pool(size: usize) -> Arc<ThreadPool> {
    with_pools(|p| {
        if let Some((_, pool)) = p.by_size.iter().find(|(s, _)| *s == size) {
            return pool.clone();
        }
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(size)
                .thread_name(|i| format!("ferrolm-{i}"))
                .build()
                .expect("a thread pool can be built"),
        );
        p.by_size.push((size, pool.clone()));
        pool
    })
}

/// Runs `f` inside a pool of `num_threads` (None: the default size); rayon calls in `f` use it.
pub fn install<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> R {
    let size = threads.filter(|&n| n > 0).unwrap_or_else(num_threads);
    pool(size).install(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn install_uses_the_requested_size() {
        assert_eq!(install(Some(3), rayon::current_num_threads), 3);
        let sum: u64 = install(Some(2), || (0..1000u64).into_par_iter().sum());
        assert_eq!(sum, 499_500);
    }
}
