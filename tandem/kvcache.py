"""Host-side bookkeeping for a slot-shaped KV cache: arrays, per-row lengths and shape buckets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tandem.errors import ContextFullError

MIN_ATTEND = 16  # the smallest attended-length bucket


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): the shape buckets compiled functions are keyed on."""
    return 1 << max(0, (max(n, minimum) - 1).bit_length())


def buckets(largest: int, minimum: int = 1, cap: int | None = None) -> list[int]:
    """Every bucket from bucket(minimum) up to bucket(largest), each clipped to `cap` (the shapes to compile ahead)."""
    out, b = [], bucket(minimum)
    while b <= bucket(largest):
        out.append(b if cap is None else min(b, cap))
        b *= 2
    return sorted(set(out))


class KVCache:
    """Keys and values (L per-layer buffers [R, K, S, H]) plus lengths [R]: slot r attends to positions < lengths[r].

    Blocks are padded to a power of two along T and along B (rows from different sessions run as one call), and the
    attended length is bucketed the same way (at least 16 slots), so a few compiled shapes serve every call. Padding
    sits after the real tokens, so causal attention keeps it from touching real positions; its writes land beyond the
    row's length (or past the cache's end, where they are dropped) and the next call overwrites them.

    A call runs in one of two layouts. *Gathered*: the block's rows are its sessions' slots, in any order, and each
    layer copies those rows' attended prefixes out of the pool. *Whole pool* (when the block fills most of the pool
    or its contexts are long; `pool_call`): the block is laid out by slot, R rows with the slots not in the call as
    padding, and attention reads each layer's buffer in place, with no copy. The buffers are per layer so that a
    layer's pool is a whole array: a slice of one stacked buffer would be copied anyway.
    """

    # A whole-pool call reads every slot's full context in place, but also runs every layer on the padding rows of
    # the slots not in the call; a gathered call copies the rows' attended prefixes out of the pool first. Measured on
    # this CPU (SmolLM2, 16 slots of 256 positions, a step in ms, gathered -> whole pool):
    #   16 rows over 256: 219 -> 133 (1 token), 272 -> 195 (2), 396 -> 291 (4), 582 -> 478 (8);
    #   16 rows over 128: 152 -> 137 (1 token), 189 -> 190 (2), 301 -> 316 (4);
    #   8 rows over 256:  135 -> 125 (1 token), 127 -> 194 (2), 224 -> 290 (4).
    # So a call reads the whole pool when that reads at most this many times the positions the gathered call would.
    pool_read_ratio: float = 1.0

    def __init__(
        self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: jnp.dtype
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k: tuple[jax.Array, ...] = tuple(jnp.zeros(shape, dtype) for _ in range(n_layers))
        self.v: tuple[jax.Array, ...] = tuple(jnp.zeros(shape, dtype) for _ in range(n_layers))
        self.lengths = np.zeros(batch, dtype=np.int32)
        self.batch, self.max_len = batch, max_len

    def rows(self, rows: Sequence[int] | None) -> np.ndarray:
        """The selected slots as an int32 array (all slots when None)."""
        if rows is None:
            return np.arange(self.batch, dtype=np.int32)
        out = np.asarray(rows, dtype=np.int32)
        if (
            out.ndim != 1
            or out.size == 0
            or out.min() < 0
            or out.max() >= self.batch
            or np.unique(out).size != out.size
        ):
            raise ValueError(f"rows must be distinct slots in [0, {self.batch}), got {rows}")
        return out

    def pad_block(
        self, block: np.ndarray, rows: np.ndarray, sizes: np.ndarray | None = None, dtype: type = np.int32
    ) -> np.ndarray:
        """Pads a [B, T, ...] block for `rows` to [bucket(B), bucket(T), ...] after checking each row has room.

        Args:
            block: [B, T, ...] row b's first sizes[b] entries are real (ragged blocks are padded by the caller).
            rows: [B] the slots.
            sizes: [B] real tokens per row (default: T for every row).
            dtype: the padded block's dtype.
        """
        if block.ndim < 2 or block.shape[0] != rows.shape[0]:
            raise ValueError(f"block must be [{rows.shape[0]}, T, ...] for rows {rows.tolist()}, got {block.shape}")
        b, t = block.shape[:2]
        sizes = np.full(b, t) if sizes is None else np.asarray(sizes)
        full = self.lengths[rows] + sizes > self.max_len
        if full.any():
            i = int(np.argmax(full))
            raise ContextFullError(
                f"context full: {int(self.lengths[rows[i]])} cached + {int(sizes[i])} new tokens exceed max_len "
                f"{self.max_len}"
            )
        padded = np.zeros((bucket(b), bucket(t), *block.shape[2:]), dtype)
        padded[:b, :t] = block
        return padded

    def padded_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots [bucket(B)], lengths [bucket(B)]) for a call over `rows`, padded to the batch bucket.

        A padding row reads rows[0]'s slot and claims a full context (length max_len), so its writes land past the
        cache's end and are dropped: it can never touch a live session.
        """
        b = bucket(rows.shape[0])
        slots = np.full(b, rows[0], np.int32)
        slots[: rows.shape[0]] = rows
        lengths = np.full(b, self.max_len, np.int32)
        lengths[: rows.shape[0]] = self.lengths[rows]
        return slots, lengths

    def pool_call(self, rows: np.ndarray) -> bool:
        """Whether a call over `rows` reads the whole pool in place rather than gathering its rows (`reads_pool`)."""
        return self.reads_pool(bucket(rows.shape[0]), self.attend_len(rows))

    def reads_pool(self, batch: int, attend_len: int) -> bool:
        """Whether a call of `batch` padded rows attending `attend_len` positions runs over the whole pool (see the
        class docstring): when the pool's R * S positions are at most `pool_read_ratio` times the positions the
        gathered call would copy."""
        return self.batch * self.max_len <= self.pool_read_ratio * batch * attend_len

    def pool_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots [R], lengths [R]) of a whole-pool call over `rows`: every slot in order; those not in the call are
        padding that claims a full context, so their writes are dropped."""
        lengths = np.full(self.batch, self.max_len, np.int32)
        lengths[rows] = self.lengths[rows]
        return np.arange(self.batch, dtype=np.int32), lengths

    def apply(
        self,
        fn: Callable[..., tuple[Any, ...]],
        params: object,
        block: np.ndarray,
        rows: Sequence[int] | None,
        *,
        sizes: np.ndarray | None = None,
        dtype: type = np.int32,
        attends: bool = True,
        **static: object,
    ) -> tuple[np.ndarray, np.ndarray, list[jax.Array]]:
        """Runs one jitted block call over this cache and keeps the cache it returns.

        `fn(params, padded_block, rows, lengths, k, v, **static)` must return its outputs followed by the updated
        (k, v). With `attends`, the attended-length bucket is passed as `attend_len`, or None for a whole-pool call
        (`pool_call`), whose block has the pool's R rows laid out by slot. Otherwise the call runs on the padded batch
        (see `pad_block` and `padded_rows`). fn's outputs have one row per padded row, of bucket(T) tokens.

        Returns:
            (the selected slots [B], the rows of fn's outputs that hold them [B], fn's outputs before the cache).
        """
        slots = self.rows(rows)
        padded = self.pad_block(block, slots, sizes, dtype)
        if attends and self.pool_call(slots):
            static["attend_len"] = None
            by_slot = np.zeros((self.batch, *padded.shape[1:]), dtype)
            by_slot[slots] = padded[: slots.shape[0]]
            padded, out_rows = by_slot, slots
            pad_slots, pad_lengths = self.pool_rows(slots)
        else:
            if attends:
                static["attend_len"] = self.attend_len(slots)
            out_rows = np.arange(slots.shape[0])
            pad_slots, pad_lengths = self.padded_rows(slots)
        *out, self.k, self.v = fn(
            params, padded, jnp.asarray(pad_slots), jnp.asarray(pad_lengths), self.k, self.v, **static
        )
        return slots, out_rows, out

    def attend_len(self, rows: np.ndarray) -> int:
        """Cache slots the next call reads: a bucket covering the longest selected row."""
        return min(bucket(int(self.lengths[rows].max()), MIN_ATTEND), self.max_len)

    def attend_buckets(self) -> list[int]:
        """Every attended length a call over this cache can use (the shapes to compile ahead)."""
        return buckets(self.max_len, MIN_ATTEND, cap=self.max_len)

    def padding_rows(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots [b], lengths [b]) of a call of padding rows only (compiling a shape ahead): each claims a full
        context, so its writes land past the cache's end and no slot changes."""
        return np.zeros(b, np.int32), np.full(b, self.max_len, np.int32)

    def advance(self, row: int, n: int) -> None:
        """Keeps n more slots of `row` (the first n tokens of the last block)."""
        self.lengths[row] += n

    def truncate(self, row: int, length: int) -> None:
        """Forgets every slot >= length in `row` (rollback)."""
        self.lengths[row] = min(int(self.lengths[row]), length)
