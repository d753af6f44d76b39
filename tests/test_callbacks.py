"""The run's observers (train/callbacks.py): what they tell the reader, and that they
stay outside what the run computes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scalemix.train.callbacks import Interrupted, StopAfter, clipping_note


def test_the_clipping_note_speaks_only_when_most_steps_clip_every_example():
    assert clipping_note([], 1.5) is None
    assert clipping_note([(0.4, 1.2), (1.0, 3.0), (0.6, 1.4)], 1.5) is None  # 1 of 3 steps
    note = clipping_note([(1.0, 20.0), (1.0, 98.0), (0.5, 3.0), (1.0, 40.0)], 1.5)
    assert note is not None
    assert "3 of 4 steps" in note and "C = 1.5" in note and "Usual under DP-SGD" in note


def test_stop_after_checkpoints_then_stops_only_before_the_last_step():
    saved = []
    tr = SimpleNamespace(step=3, total_steps=5, save_checkpoint=lambda: saved.append(3))
    with pytest.raises(Interrupted):
        StopAfter(3).after_checkpoint(tr)
    assert saved == [3]  # the checkpoint is written first, as a crash after it would find
    tr.step = 5  # the run ended: nothing to stop
    StopAfter(3).after_checkpoint(tr)
    assert saved == [3]
