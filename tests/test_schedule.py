"""The one learning-rate schedule (ferrolm.train.lr_at) gives, bit for bit, what the pretraining
(cosine) and fine-tuning (linear) schedules gave when each trainer had its own copy."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("torch")

from ferrolm.train import lr_at


def cosine_reference(step: int, lr: float, warmup: int, max_steps: int, min_lr_ratio: float) -> float:
    warmup = min(warmup, max_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def linear_reference(step: int, total_steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


lrs = st.floats(1e-7, 1.0)


@given(total=st.integers(1, 10_000), data=st.data(), lr=lrs, ratio=st.floats(0.0, 1.0))
def test_cosine_is_the_pretraining_schedule(total: int, data, lr: float, ratio: float) -> None:  # type: ignore[no-untyped-def]
    warmup = data.draw(st.integers(0, 2 * total))
    step = data.draw(st.integers(0, total + 5))
    got = lr_at(step, total, lr=lr, warmup=min(warmup, total), min_lr_ratio=ratio)
    assert got == cosine_reference(step, lr, warmup, total, ratio)


@given(total=st.integers(1, 10_000), data=st.data(), lr=lrs)
def test_linear_is_the_finetuning_schedule(total: int, data, lr: float) -> None:  # type: ignore[no-untyped-def]
    warmup = data.draw(st.integers(0, 2 * total))  # not capped: a warmup longer than the run stays so
    step = data.draw(st.integers(0, total + 5))
    assert lr_at(step, total, lr=lr, warmup=warmup, decay="linear") == linear_reference(
        step, total, warmup, lr
    )


def test_shape() -> None:
    assert lr_at(0, 100, lr=1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 100, lr=1.0, warmup=10) == 1.0  # the peak after warmup
    assert lr_at(100, 100, lr=1.0, warmup=10, min_lr_ratio=0.1) == pytest.approx(0.1)  # the floor
    assert lr_at(55, 100, lr=1.0, warmup=10, decay="linear") == pytest.approx(0.5)
