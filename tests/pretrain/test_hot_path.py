"""The GPU hot path (issue 14): no host-device sync per micro step; the stop flag polled every N steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data import MicroBatch
from pretrain.preemption import AUTO_POLL_EVERY_STEPS_GPU, poll_every_steps
from pretrain.step import train_step


class _Output:
    def __init__(self, loss):
        self.loss = loss


class FakeEngine:
    """Forward returns a loss tensor that needs a gradient; backward and step count their calls."""

    device = torch.device("cpu")

    def __init__(self):
        self.weight = torch.ones((), requires_grad=True)
        self.micro_steps = 0

    def __call__(self, **inputs):
        return _Output(self.weight * (inputs["input_ids"].sum() % 7 + 1).float())  # tensor ops only: no read

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.micro_steps += 1

    def was_step_applied(self):
        return True


def _batches():
    rng = np.random.default_rng(0)
    while True:
        yield MicroBatch(input_ids=rng.integers(0, 100, (2, 8)), sample_indices=np.arange(2), document_starts=[[0], [0]])


@pytest.mark.parametrize("accumulation", [1, 4])
def test_one_device_read_per_optimizer_step_whatever_the_accumulation(monkeypatch, accumulation):
    reads = []
    for name in ("item", "__float__", "tolist", "cpu", "numpy", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    engine, batches = FakeEngine(), _batches()
    for step in range(1, 4):
        loss, applied = train_step(engine, batches, lambda mb: {"input_ids": torch.from_numpy(mb.input_ids)}, accumulation)
        assert applied and isinstance(loss, float)
        assert engine.micro_steps == step * accumulation
        assert reads == ["item"] * step, reads  # the summed loss, read once per optimizer step


def test_stop_flag_polled_every_step_on_cpu_and_every_10_on_gpu():
    assert poll_every_steps(0, "cpu") == 1
    assert poll_every_steps(0, "cuda") == AUTO_POLL_EVERY_STEPS_GPU == 10
    assert poll_every_steps(4, "cuda") == 4 and poll_every_steps(3, "cpu") == 3
