//! The only code that knows about Python: maps core types to Python classes and `Error` to
//! exceptions, releases the GIL around work that grows with its input, and keeps panics out.

mod loader;
mod shard;
mod tokenizer;
mod train;

use crate::error::Error;
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyError, PyKeyboardInterrupt, PyOSError, PyPermissionError,
    PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pyo3::create_exception!(
    ferrolm,
    FerrolmError,
    PyValueError,
    "Bad input to ferrolm: a malformed file, an invalid argument or a token that is not allowed."
);
pyo3::create_exception!(
    ferrolm,
    FormatError,
    FerrolmError,
    "A file whose content does not follow its format; the message names the file, line or field."
);
pyo3::create_exception!(
    ferrolm,
    DisallowedSpecialTokenError,
    FerrolmError,
    "The text contains a special token that the caller did not allow."
);

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        let message = error.to_string();
        match error {
            Error::Io { source, .. } => match source.kind() {
                ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
                ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
                _ => PyOSError::new_err(message),
            },
            Error::Format { .. } => FormatError::new_err(message),
            Error::Invalid(_) | Error::Regex { .. } => FerrolmError::new_err(message),
            Error::UnknownToken(_) => PyKeyError::new_err(message),
            Error::DisallowedSpecial { .. } => DisallowedSpecialTokenError::new_err(message),
            Error::Interrupted => PyKeyboardInterrupt::new_err(message),
        }
    }
}

/// Runs `f` without the GIL, turning a Rust panic into a Python exception instead of letting it
/// unwind into the interpreter.
pub(crate) fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    let outcome = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match outcome {
        Ok(result) => result.map_err(PyErr::from),
        Err(panic) => Err(panic_to_pyerr(panic)),
    }
}

/// Runs `work` on a worker thread; the caller's thread waits without the GIL and, every 50 ms,
/// checks for signals and calls `tick` (with the GIL: e.g. a progress callback). On Ctrl-C (or
/// an error from `tick`) the work is told to stop, joined, and the exception (KeyboardInterrupt)
/// is raised. A panic becomes a RuntimeError.
pub(crate) fn interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(crate::tokenizer::train::StopFn) -> crate::Result<T> + Send,
    mut tick: impl FnMut(Python<'_>) -> PyResult<()>,
) -> PyResult<T> {
    let stop = AtomicBool::new(false);
    let caller = std::thread::current();
    std::thread::scope(|scope| {
        let stop = &stop;
        let handle = scope.spawn(move || {
            let should_stop = || stop.load(Ordering::Relaxed);
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&should_stop)));
            caller.unpark();
            outcome
        });
        loop {
            if handle.is_finished() {
                break;
            }
            py.detach(|| std::thread::park_timeout(Duration::from_millis(50)));
            if let Err(error) = py.check_signals().and_then(|()| tick(py)) {
                stop.store(true, Ordering::Relaxed);
                let _ = py.detach(move || handle.join());
                return Err(error);
            }
        }
        match py.detach(move || handle.join()) {
            Ok(Ok(result)) => result.map_err(PyErr::from),
            Ok(Err(panic)) | Err(panic) => Err(panic_to_pyerr(panic)),
        }
    })
}

/// Below this many bytes of input a call is cheaper than releasing and re-taking the GIL.
const DETACH_MIN_BYTES: usize = 1024;

/// [`detached`] for work proportional to `input_bytes`: small inputs (a sentence, a word) run
/// with the GIL held, where giving it up would cost more than the work; panics are caught alike.
pub(crate) fn detached_above<T: Send>(
    py: Python<'_>,
    input_bytes: usize,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    if input_bytes >= DETACH_MIN_BYTES {
        return detached(py, f);
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(PyErr::from),
        Err(panic) => Err(panic_to_pyerr(panic)),
    }
}

/// A caught Rust panic as a Python RuntimeError (never a crash, never a PanicException).
pub(crate) fn panic_to_pyerr(panic: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    PyRuntimeError::new_err(format!(
        "internal error in ferrolm (please report it): {what}"
    ))
}

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    Ok(crate::pool::try_set_num_threads(n)?)
}

#[pyfunction]
fn get_num_threads() -> usize {
    crate::pool::num_threads()
}

/// The spelling of a pattern (a name or a regex) that Hugging Face tokenizers reads the same way.
#[pyfunction]
fn hf_pattern(name_or_regex: &str) -> PyResult<String> {
    use crate::tokenizer::{formats, pretokenize};
    Ok(formats::pattern_for_hf(pretokenize::resolve_pattern(name_or_regex)?).to_string())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FerrolmError", py.get_type::<FerrolmError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add(
        "DisallowedSpecialTokenError",
        py.get_type::<DisallowedSpecialTokenError>(),
    )?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(hf_pattern, m)?)?;
    m.add_class::<tokenizer::CoreTokenizer>()?;
    m.add_class::<shard::CoreShardWriter>()?;
    m.add_class::<loader::CoreLoader>()?;
    m.add_class::<train::CoreBpeTrainer>()?;
    m.add("GPT2_PATTERN", crate::tokenizer::pretokenize::GPT2_PATTERN)?;
    m.add(
        "CL100K_PATTERN",
        crate::tokenizer::pretokenize::CL100K_PATTERN,
    )?;
    m.add(
        "O200K_PATTERN",
        crate::tokenizer::pretokenize::O200K_PATTERN,
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
