"""The decoding ceiling (benchmarks/ceiling.py): one pass per unsure position, one per block at least."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import ceiling  # noqa: E402


def test_a_block_takes_a_pass_per_unsure_position_and_at_least_one():
    # Generated positions 14..25 in blocks of 8 aligned to position 0: [14, 16), [16, 24), [24, 26).
    unsure = np.array([0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    assert ceiling.fewest_passes(unsure, 14, 8) == 1 + 3 + 1
    assert ceiling.fewest_passes(np.zeros(16, bool), 16, 8) == 2  # sure everywhere: one pass per block
    assert ceiling.fewest_passes(np.ones(8, bool), 16, 8) == 8  # every position a choice: one per pass


def test_the_ceiling_pools_tokens_over_passes_at_each_threshold():
    docs = [(np.zeros(24, np.int32), 16)]  # one document: a block of 8 generated positions
    confidence = [np.array([0.95, 0.6, 0.95, 0.8, 0.95, 0.95, 0.95, 0.95])]
    assert ceiling.ceiling(confidence, docs, 0.5)["tokens_per_forward_ceiling"] == 8.0
    assert ceiling.ceiling(confidence, docs, 0.7)["tokens_per_forward_ceiling"] == 8.0  # one unsure: one pass
    assert ceiling.ceiling(confidence, docs, 0.9)["tokens_per_forward_ceiling"] == 4.0
    assert ceiling.ceiling(confidence, docs, 0.9)["unsure_per_document"] == 2
