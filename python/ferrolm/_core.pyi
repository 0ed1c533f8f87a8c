"""Type stubs for the Rust extension ``ferrolm._core`` (checked by ``mypy.stubtest``)."""

import os
from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "CL100K_PATTERN",
    "GPT2_PATTERN",
    "O200K_PATTERN",
    "CoreShardWriter",
    "CoreTokenizer",
    "DisallowedSpecialTokenError",
    "FerrolmError",
    "FormatError",
    "__version__",
    "get_num_threads",
    "hf_pattern",
    "set_num_threads",
]

__version__: str
GPT2_PATTERN: str
CL100K_PATTERN: str
O200K_PATTERN: str

class FerrolmError(ValueError): ...
class FormatError(FerrolmError): ...
class DisallowedSpecialTokenError(FerrolmError): ...

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def hf_pattern(name_or_regex: str) -> str: ...

@final
class CoreTokenizer:
    @staticmethod
    def load(path: str | os.PathLike[str], pattern: str | None = None) -> CoreTokenizer: ...
    @staticmethod
    def load_tiktoken(
        path: str | os.PathLike[str],
        pattern: str | None = None,
        special_tokens: list[tuple[str, int]] | None = None,
    ) -> CoreTokenizer: ...
    @staticmethod
    def from_json(text: str) -> CoreTokenizer: ...
    @staticmethod
    def from_parts(
        tokens: list[tuple[bytes, int]],
        merges: list[tuple[int, int]] | None,
        special_tokens: list[tuple[str, int]],
        pattern: str,
        whole_piece_first: bool = False,
        add_prefix_space: bool = False,
    ) -> CoreTokenizer: ...
    def to_json(self) -> str: ...
    def to_tiktoken(self) -> str: ...
    def save_json(self, path: str | os.PathLike[str]) -> None: ...
    def save_tiktoken(self, path: str | os.PathLike[str]) -> None: ...
    def encode_ordinary(self, text: str) -> list[int]: ...
    def encode(self, text: str, allowed: list[int], disallowed: list[int]) -> list[int]: ...
    def encode_to_numpy(
        self, text: str, allowed: list[int], disallowed: list[int]
    ) -> npt.NDArray[np.uint32]: ...
    def encode_batch(
        self, texts: list[str], allowed: list[int], disallowed: list[int], num_threads: int | None = None
    ) -> list[list[int]]: ...
    def encode_batch_numpy(
        self, texts: list[str], allowed: list[int], disallowed: list[int], num_threads: int | None = None
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]: ...
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def token_bytes(self, id: int) -> bytes: ...
    def token_to_id(self, token: str) -> int: ...
    def id_to_token(self, id: int) -> str: ...
    def ordinary_id(self, token: bytes) -> int | None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def special_tokens(self) -> list[tuple[str, int]]: ...
    @property
    def pattern(self) -> str: ...
    @property
    def pattern_name(self) -> str | None: ...
    @property
    def is_rank_based(self) -> bool: ...

@final
class CoreShardWriter:
    def __new__(
        cls,
        output_dir: str | os.PathLike[str],
        tokenizer: CoreTokenizer,
        tokenizer_json: str,
        *,
        val_fraction: float,
        shard_tokens: int,
        seed: int,
        bos: int | None,
        eos: int | None,
        dtype: str,
        resume: bool,
        num_threads: int | None = None,
    ) -> CoreShardWriter: ...
    def add_documents(self, documents: list[str]) -> None: ...
    def add_file(
        self,
        path: str | os.PathLike[str],
        *,
        text_field: str,
        text_split: str,
        delimiter: str | None = None,
        strict_lines: bool = False,
        strict_utf8: bool = False,
    ) -> tuple[int, int]: ...
    @property
    def tokens_so_far(self) -> int: ...
    @property
    def documents_read(self) -> int: ...
    def count_bad_lines(self, n: int) -> None: ...
    def finish(self, inputs: list[tuple[str, int, int]]) -> str: ...
