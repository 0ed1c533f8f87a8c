"""ferrolm: Rust-accelerated language-model training.

The public names live here; the Rust extension is the private ``ferrolm._core``. Importing
ferrolm does not import torch.
"""

from ferrolm._core import (
    DisallowedSpecialTokenError,
    FerrolmError,
    FormatError,
    __version__,
    get_num_threads,
    set_num_threads,
)
from ferrolm.tokenizer import Tokenizer

__all__ = [
    "DisallowedSpecialTokenError",
    "FerrolmError",
    "FormatError",
    "Tokenizer",
    "__version__",
    "get_num_threads",
    "set_num_threads",
]
