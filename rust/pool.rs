//! The one thread pool behind every parallel call.
//!
//! Sized by `FERROLM_NUM_THREADS` (default: all cores) and resizable at run time. A child made by
//! `fork` (torch DataLoader workers) inherits the parent's pool object but none of its threads, so
//! the pool remembers the process id that built it and a child silently builds its own: no hang,
//! no warning, nothing for the user to set.

use crate::error::{Error, Result};
use rayon::ThreadPool;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most threads a pool may have: 64 per core (at least 256). More only costs memory and
/// start-up time (each pool is kept for reuse), and a typo like 100000 would stall, then fail.
pub fn max_threads() -> usize {
    (64 * cores()).max(256)
}

/// Checks a thread count given by a user (`what` names the argument): 0 means all cores.
pub fn check_num_threads(n: i64, what: &str) -> Result<usize> {
    let max = max_threads();
    if n < 0 || n as u64 > max as u64 {
        return Err(Error::invalid(format!(
            "{what}={n}: expected 0 (all cores) to {max} (64 threads per core on this machine, at least 256)"
        )));
    }
    Ok(n as usize)
}

static PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn forget_pid() {
    PID.store(0, Ordering::Relaxed);
}

/// This process's id without a system call per look (the loader's consumer asks on every
/// batch whether it was forked): cached, and forgotten in a forked child by an atfork handler.
pub fn process_id() -> u32 {
    static HANDLER: Once = Once::new();
    HANDLER.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic (async-signal-safe).
        unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) };
    });
    match PID.load(Ordering::Relaxed) {
        0 => {
            let pid = std::process::id();
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

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
        .map(|n| n.min(max_threads()))
        .unwrap_or_else(cores)
}

fn with_pools<R>(f: impl FnOnce(&mut Pools) -> R) -> R {
    let mut guard = POOLS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = process_id();
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

/// Sets the default number of threads from a user's value: 0 means all cores; a negative value or
/// one above [`max_threads`] is an error saying the bound.
pub fn try_set_num_threads(n: i64) -> Result<()> {
    set_num_threads(check_num_threads(n, "num_threads")?);
    Ok(())
}

/// Sets the default number of threads (0 means all cores; cut to [`max_threads`]).
pub fn set_num_threads(n: usize) {
    let n = if n == 0 {
        cores()
    } else {
        n.min(max_threads())
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
/// A size above [`max_threads`] is cut to it (callers check user input with [`check_num_threads`]).
pub fn install<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> R {
    let size = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(num_threads)
        .min(max_threads());
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

    #[test]
    fn thread_counts_are_checked() {
        for bad in [-1, i64::MIN, (max_threads() + 1) as i64, 100_000] {
            let e = check_num_threads(bad, "num_threads")
                .unwrap_err()
                .to_string();
            assert!(e.contains(&max_threads().to_string()), "{e}");
            assert!(try_set_num_threads(bad).is_err());
        }
        assert_eq!(check_num_threads(0, "n").unwrap(), 0);
        assert_eq!(
            install(Some(usize::MAX), rayon::current_num_threads),
            max_threads()
        );
    }
}
