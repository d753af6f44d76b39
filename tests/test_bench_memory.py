"""The tensor-memory counter behind `bench dp-step`: exact on allocations we can count by
hand, views and in-place results not counted twice, the backward pass included."""

from __future__ import annotations

import torch

from scalemix.bench.memory import TensorMemory

MB = 2**20


def test_counts_every_storage_once_from_creation_to_free():
    before = torch.zeros(4 * MB // 4)  # existed before: not counted
    with TensorMemory() as mem:
        a = torch.ones(MB // 4)  # 1 MB (float32)
        b = torch.ones(2 * MB // 4)  # 2 MB: 3 alive
        v = b[10:].view(-1, 2)  # a view: no new storage
        b.add_(1)  # in place: nothing new
        before.mul_(2)
        del a  # 2 alive
        c = torch.empty(MB // 4, dtype=torch.float64)  # 2 MB: 4 alive, the peak
        del b, v, c
    assert mem.peak_bytes == 4 * MB
    assert mem.live_bytes == 0


def test_sees_what_autograd_saves_and_frees():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(512, 256)
    with TensorMemory() as mem:
        h = torch.tanh(x @ w)  # x @ w (512 KB) and tanh's output, saved for backward
        loss = (h * h).sum()
        loss.backward()
        del h, loss
    assert mem.peak_bytes >= 2 * 512 * 256 * 4  # at least the two saved activations
    assert mem.live_bytes == w.grad.nbytes  # all that is left: the gradient
