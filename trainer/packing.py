"""Packing a chunk of documents into fixed-length rows: pure numpy, one Python step per piece.

A document longer than a row is split into row-length pieces (never dropped). Pieces are
placed best-fit decreasing: longest first, each into the open row with the least room that
still fits it, so rows come out nearly full (best-fit decreasing uses at most 11/9 of the
optimal row count, plus one). Everything but the placement loop is vectorised.
"""

from __future__ import annotations

import bisect

import numpy as np


def split_pieces(lengths_D: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents laid end to end -> (start_P, length_P) of their pieces of at most row_len tokens."""
    pieces_D = -(-lengths_D // row_len)
    doc_P = np.repeat(np.arange(len(lengths_D)), pieces_D)
    first_piece_D = np.cumsum(pieces_D) - pieces_D
    index_in_doc_P = np.arange(len(doc_P)) - first_piece_D[doc_P]
    doc_start_D = np.cumsum(lengths_D) - lengths_D
    length_P = np.minimum(row_len, lengths_D[doc_P] - index_in_doc_P * row_len)
    return doc_start_D[doc_P] + index_in_doc_P * row_len, length_P


def best_fit_decreasing(length_P: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Places pieces (each <= row_len) into rows: (row_P, offset_P, segment_P, rows).

    segment_P numbers the pieces of a row 1, 2, ... from its start (0 is left for padding)."""
    row_P, offset_P, segment_P = (np.empty(len(length_P), np.int64) for _ in range(3))
    used: list[int] = []  # tokens placed in each row
    count: list[int] = []  # pieces placed in each row
    open_rows: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the best fit
    lengths = length_P.tolist()
    for piece in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        length = lengths[piece]
        at = bisect.bisect_left(open_rows, (length, -1))
        if at == len(open_rows):
            row = len(used)
            used.append(0)
            count.append(0)
        else:
            row = open_rows.pop(at)[1]
        row_P[piece], offset_P[piece] = row, used[row]
        used[row] += length
        count[row] += 1
        segment_P[piece] = count[row]
        if used[row] < row_len:
            bisect.insort(open_rows, (row_len - used[row], row))
    return row_P, offset_P, segment_P, len(used)


def fill_with_eos(rows: dict[str, np.ndarray], eos_id: int) -> dict[str, np.ndarray]:
    """Packed rows whose last piece ends a document (its last token is `eos_id`) with the padding
    after it turned into more EOS of that document: same segment, positions counting on. Pure."""
    tokens, segments, positions = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
    row_len = tokens.shape[1]
    used_R = (segments != 0).sum(1)  # pieces fill a row from its start
    last_R = np.maximum(used_R - 1, 0)
    ended_R = (used_R > 0) & (used_R < row_len) & (np.take_along_axis(tokens, last_R[:, None], 1)[:, 0] == eos_id)
    index_L = np.arange(row_len)
    fill_RL = ended_R[:, None] & (index_L[None] >= used_R[:, None])
    after_RL = index_L[None] - last_R[:, None]
    return {"tokens": np.where(fill_RL, eos_id, tokens).astype(np.int32),
            "tokens_segment_ids": np.where(fill_RL, np.take_along_axis(segments, last_R[:, None], 1),
                                           segments).astype(np.int32),
            "tokens_positions": np.where(fill_RL, np.take_along_axis(positions, last_R[:, None], 1) + after_RL,
                                         positions).astype(np.int32)}


def pack(documents: list[np.ndarray], row_len: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Documents (1-D token arrays) -> {tokens, tokens_segment_ids, tokens_positions}, each [R, row_len]
    int32, zero-padded. Every token lands in exactly one row; `rng` permutes the rows (so a batch
    is not all long-document rows) and None keeps them in placement order."""
    lengths_D = np.fromiter((len(d) for d in documents), np.int64, len(documents))
    flat = np.concatenate(documents).astype(np.int32) if documents else np.zeros(0, np.int32)
    start_P, length_P = split_pieces(lengths_D, row_len)
    row_P, offset_P, segment_P, rows = best_fit_decreasing(length_P, row_len)
    if rng is not None:
        row_P = rng.permutation(rows)[row_P]
    # Pieces are contiguous in `flat`: token t of piece p goes to row_P[p] * row_len + offset_P[p] + t.
    position_T = np.arange(len(flat)) - np.repeat(start_P, length_P)
    destination_T = np.repeat(row_P * row_len + offset_P, length_P) + position_T
    out = {key: np.zeros(rows * row_len, np.int32)
           for key in ("tokens", "tokens_segment_ids", "tokens_positions")}
    out["tokens"][destination_T] = flat
    out["tokens_segment_ids"][destination_T] = np.repeat(segment_P, length_P)
    out["tokens_positions"][destination_T] = position_T
    return {key: value.reshape(rows, row_len) for key, value in out.items()}
