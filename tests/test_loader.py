"""PackedLoader: batches rebuilt by a pure-Python reference (order, packing, labels, positions,
cu_seqlens), every window / piece once per epoch across ranks, exact and elastic resume, mixing,
determinism across threads and processes, integrity errors, fork safety, and the torch form."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import ferrolm
from ferrolm import FerrolmError, FormatError, Tokenizer
from ferrolm.data import PackedLoader, shard_corpus

T = 32  # seq_len of most tests: small, so that many documents are longer than a row


# -- data ------------------------------------------------------------------------------------


def corpus(n: int, seed: int) -> list[str]:
    """Documents of very different lengths: mostly short, some many rows long."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "中文", "👋", "don't", "123", "\n", "é", "ab"]
    docs = []
    for _ in range(n):
        k = rng.choice([rng.randint(1, 8), rng.randint(5, 40), rng.randint(40, 300)])
        docs.append(" ".join(rng.choice(words) for _ in range(k)))
    return docs


@pytest.fixture(scope="module")
def tok(hf_tokenizers) -> Tokenizer:  # type: ignore[no-untyped-def]
    return Tokenizer.from_pretrained(hf_tokenizers["gpt2"][1])


def make_shards(tok: Tokenizer, directory: Path, n: int, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(n, seed)), encoding="utf-8")
    shard_corpus(source, directory / "shards", tok, val_fraction=0.1, shard_tokens=2500, show_progress=False)
    return directory / "shards"


@pytest.fixture(scope="module")
def shards(tok, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return make_shards(tok, tmp_path_factory.mktemp("a"), 260, seed=1)


@pytest.fixture(scope="module")
def shards_b(tok, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return make_shards(tok, tmp_path_factory.mktemp("b"), 120, seed=2)


def stream(directory: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """A split's tokens back to back and its document starts, read with safetensors alone."""
    manifest = json.loads((directory / "manifest.json").read_text())
    tokens, starts, base = [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        tensors = load_file(str(directory / shard["file"]))
        tokens.append(tensors["tokens"].astype(np.int64))
        starts.append(tensors["doc_offsets"][:-1].astype(np.int64) + base)
        base += len(tensors["tokens"])
    return np.concatenate(tokens), np.concatenate(starts)


# -- a pure-Python reference -----------------------------------------------------------------

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    z = (x + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def epoch_key(seed: int, source: int, epoch: int) -> int:
    return splitmix64(splitmix64(splitmix64(seed) ^ source) ^ ((epoch * GOLDEN) & MASK64))


def feistel(n: int, key: int) -> list[int]:
    """The whole permutation, as documented in rust/loader/order.rs."""
    if n <= 1:
        return list(range(n))
    half = max(((n - 1).bit_length() + 1) // 2, 1)
    mask = (1 << half) - 1
    keys = [splitmix64((key + r * GOLDEN) & MASK64) for r in range(6)]

    def encrypt(x: int) -> int:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (splitmix64(right ^ k) & mask)
        return (left << half) | right

    out = []
    for i in range(n):
        x = encrypt(i)
        while x >= n:
            x = encrypt(x)
        out.append(x)
    return out


def pieces(start: int, length: int, t: int) -> list[tuple[int, int]]:
    """A document cut into pieces of at most t + 1 tokens, consecutive pieces sharing a token."""
    if length <= t + 1:
        return [(start, length)] if length else []
    out, pos = [], start
    while start + length - pos > t + 1:
        out.append((pos, t + 1))
        pos += t
    return [*out, (pos, start + length - pos)]


def best_fit_epoch(doc_starts: np.ndarray, n_tokens: int, key: int, t: int, buffer: int) -> list:
    """Best fit by linear scan: largest piece that fits, first arrival among equals."""
    ends = [*doc_starts[1:].tolist(), n_tokens]
    order = feistel(len(doc_starts), key)
    queue = [p for d in order for p in pieces(int(doc_starts[d]), ends[d] - int(doc_starts[d]), t)]
    queue.reverse()
    held: list[tuple[int, int]] = []
    rows = []

    def refill() -> None:
        while len(held) < buffer and queue:
            held.append(queue.pop())

    while True:
        refill()
        if not held:
            return rows
        room, row = t + 1, []
        while room:
            fits = [i for i, p in enumerate(held) if p[1] <= room]
            if not fits:
                break
            i = max(fits, key=lambda i: (held[i][1], -i))
            piece = held.pop(i)
            row.append(piece)
            room -= piece[1]
            refill()
        rows.append(row)


def reference_row(spans, tokens, doc_starts, t, pad, mask_boundaries, concat):  # type: ignore[no-untyped-def]
    """input_ids, labels, position_ids and segment lengths of one row, from its spans."""
    starts = set(doc_starts.tolist())
    row, bounds = [], []
    for start, length in spans:
        bounds.append(len(row))
        for p in range(start, start + length):
            if concat and p > start and p in starts:
                bounds.append(len(row))
            row.append(int(tokens[p]))
    used = len(row)
    if used < t + 1:
        bounds.append(used)
        row += [pad] * (t + 1 - used)
    labels = row[1:]
    for i in range(t):
        if i + 1 >= used or (mask_boundaries and (i + 1) in bounds[1:]):
            labels[i] = -100
    positions, segments = [0] * t, []
    for i, b in enumerate(bounds):
        end = min(bounds[i + 1] if i + 1 < len(bounds) else t, t)
        if b < t and end > b:
            positions[b:end] = range(end - b)
            segments.append(end - b)
    return row[:t], labels, positions, segments


def rows_of(loaders: list[PackedLoader], steps: int) -> list[np.ndarray]:
    """Global rows (input_ids, labels, position_ids side by side) of `steps` steps of all ranks."""
    out = []
    for _ in range(steps):
        for loader in loaders:
            b = next(loader)
            out += list(np.concatenate([b["input_ids"], b["labels"], b["position_ids"]], axis=1))
    return out


def loaders(shards, world, batch, **kw):  # type: ignore[no-untyped-def]
    return [
        PackedLoader(
            shards,
            batch_size=batch,
            seq_len=kw.pop("seq_len", T),
            rank=r,
            world_size=world,
            format="numpy",
            **kw,
        )
        for r in range(world)
    ]


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
@pytest.mark.parametrize("mask", [False, True])
def test_batches_equal_the_python_reference(shards, packing, mask):
    tokens, doc_starts = stream(shards)
    b, seed, buffer = 3, 5, 8
    loader = PackedLoader(
        shards, batch_size=b, seq_len=T, packing=packing, seed=seed, buffer_size=buffer,
        mask_boundary_labels=mask, format="numpy",
    )  # fmt: skip
    if packing == "concat":
        windows = (len(tokens) - 1) // T
        assert loader.rows_per_epoch == [windows]
        order = feistel(windows, epoch_key(seed, 0, 0))
        plan = [[(w * T, T + 1)] for w in order]
    else:
        plan = best_fit_epoch(doc_starts, len(tokens), epoch_key(seed, 0, 0), T, buffer)
    assert [spans for _, _, spans in loader.plan(0, len(plan))] == plan
    pad = loader.pad_id
    for step in range(len(plan) // b):
        batch = next(loader)
        assert batch["input_ids"].shape == (b, T) and batch["input_ids"].dtype == np.int64
        assert batch["cu_seqlens"].dtype == np.int32 and batch["cu_seqlens"].shape == (loader.cu_seqlens_len,)
        cu = [0]
        for r in range(b):
            ids, labels, positions, segments = reference_row(
                plan[step * b + r], tokens, doc_starts, T, pad, mask, packing == "concat"
            )
            assert batch["input_ids"][r].tolist() == ids
            assert batch["labels"][r].tolist() == labels
            assert batch["position_ids"][r].tolist() == positions
            cu += [r * T + s for s in np.cumsum(segments).tolist()]
        n = batch["num_cu_seqlens"]
        assert batch["cu_seqlens"][:n].tolist() == cu
        assert (batch["cu_seqlens"][n:] == b * T).all()
        assert batch["max_seqlen"] == max(np.diff(cu))


def test_every_window_once_per_epoch_across_ranks(shards):
    tokens, _ = stream(shards)
    windows = (len(tokens) - 1) // T
    world, b = 3, 2
    ranks = loaders(shards, world, b)
    rows = rows_of(ranks, -(-windows // (world * b)))
    starts = []
    for row in rows[:windows]:
        ids = row[:T]
        # each row is a window [k*T, k*T + T + 1)
        candidates = [k for k in range(windows) if (tokens[k * T : k * T + T] == ids).all()]
        assert candidates, "a row that is no window"
        k = candidates[0]
        assert (row[T : 2 * T] == tokens[k * T + 1 : k * T + T + 1]).all()
        starts.append(k)
    plan_starts = [spans[0][0] // T for _, _, spans in ranks[0].plan(0, windows)]
    assert starts == plan_starts
    assert sorted(plan_starts) == list(range(windows))


def test_every_piece_once_per_epoch_best_fit(shards):
    tokens, doc_starts = stream(shards)
    loader = PackedLoader(shards, batch_size=4, seq_len=T, packing="best_fit", format="numpy")
    plan = loader.plan(0, 3000)
    epoch0 = sorted(p for _, epoch, spans in plan if epoch == 0 for p in spans)
    ends = [*doc_starts[1:].tolist(), len(tokens)]
    expected = sorted(p for s, e in zip(doc_starts.tolist(), ends, strict=True) for p in pieces(s, e - s, T))
    assert epoch0 == expected
    assert any(epoch == 1 for _, epoch, _ in plan)
    # the second epoch is reshuffled
    in_order = [[p for _, e, spans in plan if e == epoch for p in spans][:50] for epoch in (0, 1)]
    assert in_order[0] != in_order[1]


@settings(max_examples=12, deadline=None)
@given(
    packing=st.sampled_from(["concat", "best_fit"]),
    mixed=st.booleans(),
    world=st.integers(1, 3),
    batch=st.integers(1, 4),
    steps=st.integers(0, 25),
    world2=st.integers(1, 3),
    batch2=st.integers(1, 4),
    seed=st.integers(0, 2**64 - 1),
)
def test_resume_is_exact_with_any_world_size(
    shards, shards_b, packing, mixed, world, batch, steps, world2, batch2, seed
):
    source = {shards: 2, shards_b: 1} if mixed else shards
    kw = dict(packing=packing, seed=seed, buffer_size=16)
    full = rows_of(loaders(source, world, batch, **kw), steps + 8)
    first = loaders(source, world, batch, **kw)
    rows_of(first, steps)
    state = first[-1].state_dict()
    assert all(loader.state_dict() == state for loader in first)
    assert state["position"] == steps * world * batch
    json.dumps(state)  # plain data
    resumed = loaders(source, world2, batch2, **kw)
    for loader in resumed:
        loader.load_state_dict(state)
    more = rows_of(resumed, -(-8 * world * batch // (world2 * batch2)))
    start = steps * world * batch
    n = min(len(more), len(full) - start)
    assert n > 0
    for a, b in zip(more[:n], full[start : start + n], strict=True):
        assert (a == b).all()


def test_load_state_before_and_after_iterating(shards):
    a = PackedLoader(shards, batch_size=2, seq_len=T, packing="best_fit", format="numpy")
    for _ in range(7):
        next(a)
    state = a.state_dict()
    expected = [next(a)["input_ids"] for _ in range(3)]
    a.load_state_dict(state)  # rewinds a running loader
    assert all((next(a)["input_ids"] == e).all() for e in expected)
    a.close()
    assert next(a)["input_ids"].shape == (2, T)  # restarts after close


def test_state_from_other_data_or_options_is_refused(shards, shards_b):
    a = PackedLoader(shards, batch_size=2, seq_len=T, format="numpy")
    next(a)
    state = a.state_dict()
    with pytest.raises(FerrolmError, match="seq_len"):
        PackedLoader(shards, batch_size=2, seq_len=T + 1, format="numpy").load_state_dict(state)
    with pytest.raises(FerrolmError, match="seed"):
        PackedLoader(shards, batch_size=2, seq_len=T, seed=1, format="numpy").load_state_dict(state)
    with pytest.raises(FerrolmError, match="fingerprint"):
        PackedLoader(shards_b, batch_size=2, seq_len=T, format="numpy").load_state_dict(state)
    with pytest.raises(FerrolmError, match="inconsistent"):
        a.load_state_dict({**state, "source_rows": [state["source_rows"][0] + 1]})


def test_mixing_has_exact_proportions(shards, shards_b):
    loader = PackedLoader({shards: 0.75, shards_b: 0.25}, batch_size=4, seq_len=T, format="numpy")
    assert loader.weights == [3, 1]
    sources = [s for s, _, _ in loader.plan(0, 4000)]
    assert sources.count(0) == 3000
    assert all(sources[i : i + 4].count(1) == 1 for i in range(0, 4000, 4))
    same = PackedLoader([shards, shards_b], weights=[3, 1], batch_size=4, seq_len=T, format="numpy")
    assert same.fingerprint == loader.fingerprint
    assert PackedLoader([shards, shards_b], batch_size=4, seq_len=T, format="numpy").weights == [1, 1]


def digest(n: int, **kw) -> str:  # type: ignore[no-untyped-def]
    loader = PackedLoader(**kw, format="numpy")
    h = hashlib.sha256()
    for _ in range(n):
        b = next(loader)
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            h.update(b[k].tobytes())
    return h.hexdigest()


def test_same_seed_same_batches_any_thread_count_or_process(shards):
    kw = dict(shards=str(shards), batch_size=4, seq_len=T, packing="best_fit", seed=3)
    ferrolm.set_num_threads(1)
    one = digest(30, **kw)
    ferrolm.set_num_threads(2)
    assert digest(30, **kw) == one
    assert digest(30, **{**kw, "seed": 4}) != one
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_loader import digest; print(digest(30, **{kw!r}))"
    env = {**os.environ, "FERROLM_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == one


def test_stats_report_padding_and_no_cropping(shards):
    bf = PackedLoader(shards, batch_size=8, seq_len=T, packing="best_fit", format="numpy")
    for _ in range(20):
        b = next(bf)
    s = bf.stats()
    assert s["rows"] == 160 and s["cropped_tokens"] == 0 and s["cropped_fraction"] == 0.0
    assert 0 <= s["padded_fraction"] < 0.1
    assert s["tokens"] + s["padded_tokens"] == 160 * (T + 1)
    assert s["segments_per_row"] >= 1
    assert (b["labels"] == -100).sum() >= 0
    concat = PackedLoader(shards, batch_size=8, seq_len=T, format="numpy")
    next(concat)
    assert concat.stats()["padded_tokens"] == 0


def test_cu_seqlens_length_is_fixed_and_sufficient(shards):
    for packing in ("concat", "best_fit"):
        loader = PackedLoader(shards, batch_size=4, seq_len=T, packing=packing, format="numpy")
        assert loader.cu_seqlens_len == 4 * loader.segments_per_row + 1
        assert loader.segments_per_row <= T
        for _ in range(50):
            b = next(loader)
            assert b["cu_seqlens"].shape == (loader.cu_seqlens_len,)
            assert b["num_cu_seqlens"] <= loader.cu_seqlens_len
            assert b["cu_seqlens"][-1] == 4 * T


# -- integrity -------------------------------------------------------------------------------


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_truncated_shard_is_named(shards, tmp_path):
    d = copy_dir(shards, tmp_path / "s")
    victim = d / "train-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.raises(FormatError, match=r"train-00001\.safetensors.*truncated"):
        PackedLoader(d, batch_size=2, seq_len=T, format="numpy")


def test_corrupted_shard_is_caught_by_its_checksum(shards, tmp_path):
    d = copy_dir(shards, tmp_path / "s")
    victim = d / "train-00000.safetensors"
    data = bytearray(victim.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 10] ^= 0x01  # token 5's low bit: still a valid id, only the checksum sees it
    victim.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"train-00000\.safetensors.*sha256"):
        PackedLoader(d, batch_size=2, seq_len=T, verify=True, format="numpy")
    lazy = PackedLoader(d, batch_size=64, seq_len=T, format="numpy")  # verify=None: on first read
    with pytest.raises(FormatError, match=r"train-00000\.safetensors.*sha256"):
        for _ in range(100):
            next(lazy)
    with pytest.raises(FormatError, match="sha256"):
        lazy.verify()
    unchecked = PackedLoader(d, batch_size=2, seq_len=T, verify=False, format="numpy")
    next(unchecked)  # nothing but the checksum would notice this change


def test_token_beyond_the_vocabulary_is_named(shards, tmp_path):
    d = copy_dir(shards, tmp_path / "s")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["vocab_size"] = 200  # the shards hold larger ids
    (d / "manifest.json").write_text(json.dumps(manifest))
    loader = PackedLoader(d, batch_size=2, seq_len=T, format="numpy")
    with pytest.raises(
        FormatError,
        match=r"train-0000\d\.safetensors: token \d+ \(byte offset \d+\) is \d+, not below the vocabulary size 200",
    ):
        next(loader)


def test_bad_doc_offsets_are_named(shards, tmp_path):
    d = copy_dir(shards, tmp_path / "s")
    victim = d / "train-00002.safetensors"
    tensors = load_file(str(victim))
    offsets = tensors["doc_offsets"].copy()
    offsets[3], offsets[4] = offsets[4], offsets[3]
    header = json.loads(victim.read_bytes()[8 : 8 + int.from_bytes(victim.read_bytes()[:8], "little")])
    save_file(
        {"tokens": tensors["tokens"], "doc_offsets": offsets}, str(victim), metadata=header["__metadata__"]
    )
    manifest = json.loads((d / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        if shard["file"] == victim.name:
            shard["bytes"] = victim.stat().st_size
            shard["sha256"] = hashlib.sha256(victim.read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=r"train-00002\.safetensors: doc_offsets\[4\]"):
        PackedLoader(d, batch_size=2, seq_len=T, format="numpy")


def test_argument_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        PackedLoader(tmp_path, batch_size=2, seq_len=T)
    with pytest.raises(FerrolmError, match="split"):
        PackedLoader(shards, batch_size=2, seq_len=T, split="test")
    with pytest.raises(FerrolmError, match="rank"):
        PackedLoader(shards, batch_size=2, seq_len=T, rank=2, world_size=2)
    with pytest.raises(FerrolmError, match="packing"):
        PackedLoader(shards, batch_size=2, seq_len=T, packing="greedy")
    with pytest.raises(FerrolmError, match="batch_size"):
        PackedLoader(shards, batch_size=0, seq_len=T)
    with pytest.raises(FerrolmError, match="fewer than seq_len"):
        PackedLoader(shards, batch_size=2, seq_len=10**7)
    with pytest.raises(FerrolmError, match="weights"):
        PackedLoader({shards: -1.0}, batch_size=2, seq_len=T)
    val = PackedLoader(shards, batch_size=2, seq_len=8, split="val", format="numpy")
    assert next(val)["input_ids"].shape == (2, 8)


# -- processes, torch ------------------------------------------------------------------------


def _child(loader: PackedLoader, queue) -> None:  # type: ignore[no-untyped-def]
    queue.put([next(loader)["input_ids"].tolist() for _ in range(3)])


def test_forked_child_continues_without_deadlock(shards):
    loader = PackedLoader(shards, batch_size=2, seq_len=T, packing="best_fit", format="numpy")
    next(loader)  # the prefetch thread is running (and likely blocked on a full queue)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(loader, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got == [next(loader)["input_ids"].tolist() for _ in range(3)]


def test_import_does_not_import_torch():
    code = "import sys, ferrolm, ferrolm.data, ferrolm.loader; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rank_and_world_size_default_to_torch_distributed(shards, monkeypatch):
    dist = types.SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, get_rank=lambda: 2, get_world_size=lambda: 5
    )
    fake = types.ModuleType("torch")
    fake.distributed = dist  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake)
    loader = PackedLoader(shards, batch_size=2, seq_len=T, format="numpy")
    assert (loader.rank, loader.world_size) == (2, 5)
    monkeypatch.delitem(sys.modules, "torch")
    assert PackedLoader(shards, batch_size=2, seq_len=T, format="numpy").world_size == 1


def test_torch_form_wraps_the_same_arrays(shards):
    torch = pytest.importorskip("torch")
    a = PackedLoader(shards, batch_size=3, seq_len=T, packing="best_fit")
    b = PackedLoader(shards, batch_size=3, seq_len=T, packing="best_fit", format="numpy")
    for _ in range(5):
        x, y = next(a), next(b)
        assert x["input_ids"].dtype == torch.int64 and x["cu_seqlens"].dtype == torch.int32
        for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert (x[key].numpy() == y[key]).all()
        assert x["input_ids"].is_pinned() == torch.cuda.is_available()
        assert isinstance(x["max_seqlen"], int) and isinstance(x["num_cu_seqlens"], int)


class _Stream:
    """The loader as a torch IterableDataset (what a user wraps for DataLoader workers)."""

    def __init__(self, loader: PackedLoader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self):  # type: ignore[no-untyped-def]
        for _ in range(self.n):
            yield next(self.loader)["input_ids"]


def test_torch_dataloader_worker_forked_from_a_running_loader(shards):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, IterableDataset

    loader = PackedLoader(shards, batch_size=2, seq_len=T, format="numpy")
    first = next(loader)["input_ids"]  # the parent's prefetch thread is running
    dataset = type("S", (_Stream, IterableDataset), {})(loader, 4)
    workers = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="fork", timeout=60)
    got = [t.numpy() for t in workers]
    assert len(got) == 4 and not (got[0] == first).all()
    assert all(
        (g == next(loader)["input_ids"]).all() for g in got
    )  # the worker continued the parent's stream
    assert torch.is_tensor(next(iter(workers)))


# -- reused batch memory ---------------------------------------------------------------------
#
# Batches live in a few slots that are refilled in place once nothing holds what they handed
# out. Every way of keeping a batch must keep it unchanged; the copies below are the truth.

HOLD_STEPS = 48  # well past every slot (queue, slots handed back together, kept free, in flight)


def _same_stream(shards, fmt, keep):  # type: ignore[no-untyped-def]
    """Takes batches while `keep(batch)` holds something of every other one; checks that what
    was kept still equals a copy taken when it was delivered."""
    loader = PackedLoader(shards, batch_size=2, seq_len=T, packing="best_fit", format=fmt, prefetch=2)
    kept = []
    for step in range(HOLD_STEPS):
        batch = next(loader)
        if step % 2 == 0:
            held = keep(batch)
            kept.append((held, [np.array(np.asarray(h), copy=True) for h in held]))
        del batch
    for held, copies in kept:
        for h, c in zip(held, copies, strict=True):
            assert (np.asarray(h) == c).all()
    loader.close()


def test_kept_numpy_batches_and_views_are_never_overwritten(shards):
    _same_stream(shards, "numpy", lambda b: [b["input_ids"], b["cu_seqlens"]])
    _same_stream(shards, "numpy", lambda b: [b["labels"][:, 1:], b["position_ids"].reshape(-1)[3:]])
    _same_stream(shards, "numpy", lambda b: [memoryview(b["input_ids"])])


def test_kept_tensors_views_and_aliases_are_never_overwritten(shards):
    pytest.importorskip("torch")
    _same_stream(shards, "torch", lambda b: [b["input_ids"].numpy(), b["cu_seqlens"].numpy()])
    _same_stream(shards, "torch", lambda b: [b["labels"][:, 1:].numpy(), b["position_ids"].view(-1).numpy()])
    # detach() and .data make new tensors on the same memory, without a Python reference to the
    # tensor handed out: only the storage's use count shows them.
    _same_stream(shards, "torch", lambda b: [b["input_ids"].detach().numpy(), b["labels"].data.numpy()])


def test_autograd_saved_inputs_are_never_overwritten(shards):
    """A forward pass saves its integer inputs for backward without a Python reference: the
    backward pass, run after many later batches, must see the batch it was given."""
    torch = pytest.importorskip("torch")
    loader = PackedLoader(shards, batch_size=2, seq_len=T, packing="concat", format="torch", prefetch=2)
    emb = torch.nn.Embedding(loader.vocab_size, 1)
    batch = next(loader)
    ids = batch["input_ids"].clone()
    loss = emb(batch["input_ids"]).sum()
    del batch
    for _ in range(HOLD_STEPS):
        next(loader)
    loss.backward()
    expected = torch.bincount(ids.reshape(-1), minlength=loader.vocab_size).to(emb.weight.grad.dtype)
    assert torch.equal(emb.weight.grad[:, 0], expected)


def test_slots_are_reused_when_nothing_is_kept(shards):
    """The point of the slots: a loop that keeps nothing cycles through a few memory blocks and
    gets the same tensor objects back (made once per slot), with every batch still correct."""
    torch = pytest.importorskip("torch")
    loader = PackedLoader(shards, batch_size=2, seq_len=T, packing="best_fit", format="torch", prefetch=2)
    reference = PackedLoader(shards, batch_size=2, seq_len=T, packing="best_fit", format="numpy")
    addresses, objects = set(), set()
    for _ in range(40):
        batch = next(loader)
        addresses.add(batch["input_ids"].data_ptr())
        objects.add(id(batch["input_ids"]))
        expected = next(reference)
        for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert (batch[key].numpy() == expected[key]).all(), key
        assert isinstance(batch[key], torch.Tensor)
    # queue (2), slots handed back together (8 for small batches), kept free and held (2 + 2)
    assert len(addresses) <= 2 + 8 + 4, addresses
    assert len(objects) == len(addresses)


def test_tensor_moved_to_shared_memory_is_not_handed_out_again(shards):
    """Sending a tensor from a DataLoader worker moves its storage to shared memory: that tensor
    no longer shows the slot, so the slot must not hand it out again (it would show old data)."""
    pytest.importorskip("torch")
    loader = PackedLoader(shards, batch_size=2, seq_len=T, packing="concat", format="torch", prefetch=2)
    reference = PackedLoader(shards, batch_size=2, seq_len=T, packing="concat", format="numpy")
    for _ in range(30):
        batch = next(loader)
        assert (batch["input_ids"].numpy() == next(reference)["input_ids"]).all()
        for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            batch[key].share_memory_()
