"""ferrolm: Rust-accelerated language-model training.

The public names live here; the Rust extension is the private ``ferrolm._core``. Importing
ferrolm does not import torch.
"""

from importlib import metadata as _metadata

from ferrolm._core import (
    DisallowedSpecialTokenError,
    FerrolmError,
    FormatError,
    get_num_threads,
    set_num_threads,
)
from ferrolm.tokenizer import Tokenizer

# One source of truth: Cargo.toml's version, which maturin writes into the package metadata
# (pyproject.toml declares the version dynamic). The extension module carries the same value; it
# is only the answer when ferrolm runs from files copied without their metadata.
try:
    __version__ = _metadata.version("ferrolm")
except _metadata.PackageNotFoundError:
    from ferrolm._core import __version__

__all__ = [
    "DisallowedSpecialTokenError",
    "FerrolmError",
    "FormatError",
    "Tokenizer",
    "__version__",
    "get_num_threads",
    "set_num_threads",
]
