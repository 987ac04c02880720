"""Columnar helpers shared by the purchase models: input checks and collapsing of repeated rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray: TypeAlias = NDArray[np.float64]
IndexArray: TypeAlias = NDArray[np.intp]

# Grid detection allows for the rounding left by subtracting a common fractional offset (e.g. T measured to an
# as_of instant that is not at midnight); codes beyond this span would make the presence table too large.
_GRID_TOLERANCE = 1e-9
_MAX_GRID_SPAN = 1 << 24


def as_float_vector(values: ArrayLike) -> FloatArray:
    """Flatten to a contiguous float64 vector (a scalar becomes a one-element vector)."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))


@dataclass(frozen=True, slots=True)
class Levels:
    """Distinct values of a column (ascending) and the position of every entry among them."""

    values: FloatArray
    codes: IndexArray


def factorize(column: FloatArray) -> Levels:
    """Distinct values and codes of a finite column.

    Day-based summaries put frequencies and times on a unit grid (possibly shifted by a common fraction), where
    integer arithmetic replaces the sort that np.unique needs; that keeps collapsing 10M rows cheap.
    """
    if column.size == 0:
        return Levels(np.empty(0, dtype=np.float64), np.empty(0, dtype=np.intp))
    low = float(column.min())
    offsets = column - low
    steps = np.rint(offsets)
    span = float(steps.max())
    tolerance = _GRID_TOLERANCE * (1.0 + abs(low) + span)
    if span < _MAX_GRID_SPAN and bool(np.all(np.abs(offsets - steps) <= tolerance)):
        step_codes = steps.astype(np.intp)
        present = np.zeros(int(span) + 1, dtype=bool)
        present[step_codes] = True
        compact = np.cumsum(present, dtype=np.intp) - 1
        return Levels(low + np.flatnonzero(present).astype(np.float64), compact[step_codes])
    values, codes = np.unique(column, return_inverse=True)
    return Levels(values.astype(np.float64), codes.reshape(-1).astype(np.intp))


@dataclass(frozen=True, slots=True)
class CollapsedRows:
    """Distinct rows of several columns with the summed weight of the input rows each one stands for."""

    levels: tuple[FloatArray, ...]
    codes: tuple[IndexArray, ...]
    weights: FloatArray

    def column(self, index: int) -> FloatArray:
        """Values of one column for every collapsed row."""
        return self.levels[index][self.codes[index]]

    @property
    def n_rows(self) -> int:
        return int(self.weights.size)


def collapse_rows(columns: Sequence[FloatArray], weights: FloatArray | None) -> CollapsedRows:
    """Group identical rows (rows come out sorted by the first column, then the second, ...)."""
    factors = [factorize(column) for column in columns]
    sizes = [max(len(factor.values), 1) for factor in factors]
    n_input = columns[0].size if columns else 0
    if n_input == 0:
        empty = np.empty(0, dtype=np.intp)
        return CollapsedRows(tuple(f.values for f in factors), tuple(empty for _ in factors), np.empty(0, np.float64))
    if prod(sizes) < (1 << 62):
        key = np.zeros(n_input, dtype=np.int64)
        for factor, size in zip(factors, sizes, strict=True):
            key *= size
            key += factor.codes
        if weights is None:
            unique_keys, counts = np.unique(key, return_counts=True)
            summed = counts.astype(np.float64)
        else:
            order = np.argsort(key, kind="stable")
            sorted_keys = key[order]
            starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
            summed = np.add.reduceat(weights[order], starts)
            unique_keys = sorted_keys[starts]
        decoded: list[IndexArray] = []
        remainder = unique_keys
        for size in reversed(sizes):
            decoded.append((remainder % size).astype(np.intp))
            remainder = remainder // size
        codes = tuple(reversed(decoded))
    else:
        order = np.lexsort([factor.codes for factor in reversed(factors)])
        sorted_codes = [factor.codes[order] for factor in factors]
        changed = np.zeros(n_input, dtype=bool)
        changed[0] = True
        for sorted_column in sorted_codes:
            changed[1:] |= sorted_column[1:] != sorted_column[:-1]
        starts = np.flatnonzero(changed)
        row_weights = np.ones(n_input) if weights is None else weights
        summed = np.add.reduceat(row_weights[order], starts)
        codes = tuple(sorted_column[starts] for sorted_column in sorted_codes)
    return CollapsedRows(tuple(f.values for f in factors), codes, summed.astype(np.float64))


def stratified_subset(collapsed: CollapsedRows, max_rows: int) -> CollapsedRows:
    """Every k-th collapsed row with weights scaled to the full total, as a cheap deterministic warm start."""
    if collapsed.n_rows <= max_rows:
        return collapsed
    stride = -(-collapsed.n_rows // max_rows)
    picked = slice(0, None, stride)
    weights = collapsed.weights[picked]
    scaled = weights * (collapsed.weights.sum() / weights.sum())
    return CollapsedRows(collapsed.levels, tuple(codes[picked] for codes in collapsed.codes), scaled)
