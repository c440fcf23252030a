"""Host-side bookkeeping for a slot-shaped KV cache: arrays, per-row lengths and shape buckets; the prefix cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tandem.errors import ContextFullError

MIN_ATTEND = 64  # the smallest attended-length bucket
# Most padded tokens (batch bucket x block bucket) one call runs: long prompts that arrive together are prefilled in
# several calls, so the largest compiled prefill is 2,048 tokens, not max_batch x max_len (and its logits 0.4 GB).
MAX_CALL_TOKENS = 2048


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): the shape buckets compiled functions are keyed on."""
    return 1 << max(0, (max(n, minimum) - 1).bit_length())


def rows_per_call(block: int) -> int:
    """Most rows one call of `block`-token blocks takes (a power of two): its padded tokens stay within
    MAX_CALL_TOKENS."""
    return max(1, MAX_CALL_TOKENS // bucket(block))


def buckets(largest: int, minimum: int = 1, cap: int | None = None) -> list[int]:
    """Every bucket from bucket(minimum) up to bucket(largest), each clipped to `cap` (the shapes to compile ahead)."""
    out, b = [], bucket(minimum)
    while b <= bucket(largest):
        out.append(b if cap is None else min(b, cap))
        b *= 2
    return sorted(set(out))


class KVCache:
    """Keys and values plus lengths [R]: slot r attends to positions < lengths[r].

    Blocks are padded to a power of two along T and along B (rows from different sessions run as one call), and the
    attended length is bucketed the same way (at least 64 positions), so a few compiled shapes serve every call. Padding
    sits after the real tokens, so causal attention keeps it from touching real positions; its writes land beyond the
    row's length (or past the cache's end, where they are dropped) and the next call overwrites them.

    Layout: per layer, one buffer [R, K, S_j, H] per *segment* of positions, the segments ending at the attended-length
    buckets (64, 128, 256, ... max_len; `layers.KVBuffers`). A call attending A positions reads the segments up
    to A whole: XLA on this CPU runs a product over a whole buffer in place, but copies any slice of one first, and
    the copy cost more than the attention. Measured on SmolLM2 with 16 slots of 256 positions, a step of 16 rows of
    one token took 211 ms over 200 cached positions with one [L, R, K, S, H] buffer sliced and gathered, 133 ms read
    in place (139 -> 102 ms over 100 positions; 8 rows of 2 tokens over 200: 156 -> 132 ms, gathered both times).

    A call runs in one of two ways. *Gathered*: the block's rows are its sessions' slots, in any order, and each
    layer copies those rows' parts of the attended segments (each a contiguous block) out of the pool. *Whole pool*
    (when the padded batch is the whole pool; `pool_call`): the block is laid out by slot, R rows with the slots not
    in the call as padding, and attention reads the segments in place, with no copy. The fixed-order attention
    kernel (the CPU primary, `kernels.attention`) reads each row's slot in place either way, so its gathered
    calls copy nothing either.

    That kernel reads only each row's own length and writes the block itself (`kernels.attention_write`), so a cache
    served by it (`attend_all`) passes the whole cache to every call: one attended length, one compiled program per
    batch and block bucket instead of one per attended length too, and only two segments per layer (the first, which
    the prefix cache copies, and the rest), so a call passes and returns fewer buffers. Each program XLA:CPU compiles
    holds hundreds of memory maps, and a process may hold only `vm.max_map_count` of them (docs/deployment.md, "Warm
    start")."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype,
        attend_all: bool = False,
    ) -> None:
        """attend_all: every call attends the whole cache (the fixed-order kernel's calls; see the class docstring)."""
        self.batch, self.max_len, self.attend_all = batch, max_len, False
        # the segments: every attended length's end, or with attend_all the first one's and the cache's
        ends = self.attend_buckets()
        if attend_all:
            ends = sorted({ends[0], max_len})
        sizes = np.diff([0, *ends])

        def buffers() -> tuple[tuple[jax.Array, ...], ...]:
            return tuple(
                tuple(jnp.zeros((batch, n_kv_heads, int(s), head_dim), dtype) for s in sizes) for _ in range(n_layers)
            )

        self.k: tuple[tuple[jax.Array, ...], ...] = buffers()
        self.v: tuple[tuple[jax.Array, ...], ...] = buffers()
        self.lengths = np.zeros(batch, dtype=np.int32)
        self.attend_all = attend_all

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

    def pool_call(self, n_rows: int) -> bool:
        """Whether a call over `n_rows` rows reads the whole pool in place rather than gathering its rows: when its
        padded batch is the whole pool anyway (see the class docstring). With fewer rows, the whole pool would run every
        layer on the other slots too (measured with the earlier single-buffer layout, 8 rows of 16 slots over 256
        positions: 127 ms gathered, 194 ms over the whole pool, for 2 tokens a row)."""
        return bucket(n_rows) >= self.batch

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
        extra: dict[str, np.ndarray] | None = None,
        **static: object,
    ) -> tuple[np.ndarray, np.ndarray, list[jax.Array]]:
        """Runs one jitted block call over this cache and keeps the cache it returns.

        `fn(params, padded_block, rows, lengths, k, v, **static)` must return its outputs followed by the updated
        (k, v). With `attends`, the attended-length bucket is passed as `attend_len` and whether the call reads the
        whole pool (`pool_call`; its block is then the pool's R rows laid out by slot) as `whole_pool`. Otherwise the
        call runs on the padded batch (see `pad_block` and `padded_rows`). fn's outputs have one row per padded row, of
        bucket(T) tokens. `extra` holds more per-token inputs [B, T, ...] (float32), padded and laid out like the block
        and passed to fn by name.

        Returns:
            (the selected slots [B], the rows of fn's outputs that hold them [B], fn's outputs before the cache).
        """
        slots = self.rows(rows)
        padded = self.pad_block(block, slots, sizes, dtype)
        more = {name: self.pad_block(a, slots, sizes, np.float32) for name, a in (extra or {}).items()}
        if attends:
            static["attend_len"] = self.attend_len(slots)
            static["whole_pool"] = self.pool_call(slots.shape[0])
        if static.get("whole_pool"):

            def by_slot(a: np.ndarray) -> np.ndarray:
                out = np.zeros((self.batch, *a.shape[1:]), a.dtype)
                out[slots] = a[: slots.shape[0]]
                return out

            padded, out_rows = by_slot(padded), slots
            more = {name: by_slot(a) for name, a in more.items()}
            pad_slots, pad_lengths = self.pool_rows(slots)
        else:
            out_rows = np.arange(slots.shape[0])
            pad_slots, pad_lengths = self.padded_rows(slots)
        # Host arrays go to the jitted call as they are: it copies them in its own fast path, where jnp.asarray would
        # dispatch an eager conversion per array (~45 us each on the 2-core CPU; a call makes two).
        *out, self.k, self.v = fn(params, padded, pad_slots, pad_lengths, self.k, self.v, **more, **static)
        return slots, out_rows, out

    def attend_len(self, rows: np.ndarray, ahead: int = 0) -> int:
        """Cache slots the next call reads: a bucket covering the longest selected row, plus `ahead` positions the
        call itself writes before it reads them (a drafting round's fed tokens and drafts); with attend_all, every
        slot."""
        return self.attend_bucket(int(self.lengths[rows].max()) + ahead)

    def attend_bucket(self, n: int) -> int:
        """The attended length a call reading n positions uses."""
        return self.max_len if self.attend_all else min(bucket(n, MIN_ATTEND), self.max_len)

    def attend_buckets(self) -> list[int]:
        """Every attended length a call over this cache can use (the shapes to compile ahead)."""
        if self.attend_all:
            return [self.max_len]
        return buckets(max(self.max_len, MIN_ATTEND), MIN_ATTEND, cap=self.max_len)

    def padding_rows(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots [b], lengths [b]) of a call of padding rows only (compiling a shape ahead): each claims a full
        context, so its writes land past the cache's end and no slot changes."""
        return np.zeros(b, np.int32), np.full(b, self.max_len, np.int32)

    def warm(self, fn: Any, *args: Any, run: bool, **static: Any) -> None:
        """Compiles the jitted `fn` for a call of padding rows (`padding_rows`) ahead of serving. With `run` it also
        runs it once, so its first request finds jit's dispatch warm too, and keeps the cache `fn` returns as its last
        two outputs (no slot changed, but the call donated the old buffers)."""
        if run:
            *_, self.k, self.v = fn(*args, **static)
        else:
            fn.lower(*args, **static).compile()

    def advance(self, row: int, n: int) -> None:
        """Keeps n more slots of `row` (the first n tokens of the last block)."""
        self.lengths[row] += n

    def truncate(self, row: int, length: int) -> None:
        """Forgets every slot >= length in `row` (rollback)."""
        self.lengths[row] = min(int(self.lengths[row]), length)


def _copy_rows(
    dst: tuple[jax.Array, ...], src: tuple[jax.Array, ...], to: jax.Array, at: jax.Array
) -> tuple[jax.Array, ...]:
    """dst[i][to] = src[i][at] for every buffer i: one row of each [rows, K, S, H] buffer (dst donated)."""
    return tuple(d.at[to].set(s[at]) for d, s in zip(dst, src, strict=True))


_copy_rows_jit = jax.jit(_copy_rows, donate_argnums=0)


class PrefixCache:
    """Prompts' first positions kept across sessions, so a prompt that starts like an earlier one (a chat template's
    system prompt, a shared instruction) prefills only the rest.

    Each of `rows` rows holds the first segment (positions < 64) of one earlier prompt's keys and values in every
    layer, the tokens they belong to, and the states a prefill returns for them ([S, n_taps, D], on the host). A new
    prompt takes the row it shares the longest common prefix with, up to one token short of the whole prompt (its
    last token must run to give the next one): the row's positions are copied into the prompt's slot, which then
    holds `m` cached positions. Positions of the row past m come along and lie beyond the slot's length, where they
    are never read and the prefill of the rest overwrites them. A prefilled prompt then takes over the row it shared
    a prefix with, or, sharing none, the least recently used row (`save`).

    A cached position's keys and values are those the earlier prefill computed. The same position computed in a
    differently shaped call (another batch or block bucket) may differ in the last bits, exactly as a prompt's cold
    prefill already does when it shares a batch with other prompts.
    """

    def __init__(self, cache: KVCache, rows: int, state_shape: tuple[int, ...]) -> None:
        """
        Args:
            cache: the pool the rows copy from and to.
            rows: prompts kept (each costs the first segment of every layer's keys and values).
            state_shape: (n_taps, D) of the states a prefill returns per position.
        """
        if rows < 1:
            raise ValueError(f"a prefix cache needs at least one row, got {rows}")
        self.size = cache.k[0][0].shape[2]  # positions a row keeps: the first segment's
        self.k = tuple(jnp.zeros((rows, *layer[0].shape[1:]), layer[0].dtype) for layer in cache.k)
        self.v = tuple(jnp.zeros((rows, *layer[0].shape[1:]), layer[0].dtype) for layer in cache.v)
        self.tokens: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(rows)]
        self.states = np.zeros((rows, self.size, *state_shape), np.float32)
        self._used = [0] * rows  # when each row was last saved or read (a counter), for LRU
        self._shared = [0] * rows  # the longest prefix reused from each row
        self._clock = 0
        self.hits = 0  # prefills that found a shared prefix
        self.reused = 0  # positions they did not compute
        # Compile both copies now (a start-up step): slot 0 to row 0 and back, which leaves slot 0 as it was.
        self._from_pool(cache, 0, 0)
        self._into_pool(cache, 0, 0)

    def match(self, prompt: np.ndarray) -> tuple[int, int]:
        """(row, m): the row sharing the longest prefix with `prompt`, and how many positions of it to reuse (at most
        len(prompt) - 1; m = 0: none)."""
        best, best_m = 0, 0
        limit = min(prompt.size - 1, self.size)
        for row, tokens in enumerate(self.tokens):
            n = min(limit, tokens.size)
            differ = np.flatnonzero(tokens[:n] != prompt[:n])
            m = int(differ[0]) if differ.size else n
            if m > best_m:
                best, best_m = row, m
        return best, best_m

    def load(self, cache: KVCache, row: int, slot: int, m: int) -> np.ndarray:
        """Copies the row into `slot` and makes it hold m cached positions; returns their states [m, n_taps, D]."""
        self._into_pool(cache, row, slot)
        cache.lengths[slot] = m
        self._touch(row)
        if m:
            self.hits += 1
            self.reused += m
            self._shared[row] = max(self._shared[row], m)
        return self.states[row, :m].copy()  # a later save may reuse the row before the caller is done

    def save(self, cache: KVCache, slot: int, prompt: np.ndarray, states: np.ndarray) -> None:
        """Keeps the first positions of the prompt just prefilled in `slot`, unless a row already holds all of them:
        in the row it shares the longest prefix with, if it shares at least as much as any prompt reused from that
        row (a family of prompts with one system prompt keeps one row, which goes on serving that prefix), or else in
        the least recently used row.

        Args:
            cache: the pool, with the prompt's positions written.
            slot: the prompt's slot.
            prompt: [n] its tokens.
            states: [>= min(n, size), n_taps, D] the states of its first positions.
        """
        n = min(prompt.size, self.size)
        if n and any(t.size >= n and np.array_equal(t[:n], prompt[:n]) for t in self.tokens):
            return
        row, shared = self.match(prompt)
        if not shared or shared < self._shared[row]:  # a new family, or one that would lose a reused prefix
            row = int(np.argmin(self._used))
            self._shared[row] = 0
        self._from_pool(cache, slot, row)
        self.tokens[row] = prompt[:n].copy()
        self.states[row, :n] = states[:n]
        self._touch(row)

    def _from_pool(self, cache: KVCache, slot: int, row: int) -> None:
        """Copies the slot's first segment of every layer into the row."""
        layers = len(self.k)
        copied = _copy_rows_jit((*self.k, *self.v), _first_segments(cache), np.int32(row), np.int32(slot))
        self.k, self.v = copied[:layers], copied[layers:]

    def _into_pool(self, cache: KVCache, row: int, slot: int) -> None:
        """Copies the row into the slot's first segment of every layer (the pool's buffers are donated)."""
        layers = len(self.k)
        first = _copy_rows_jit(_first_segments(cache), (*self.k, *self.v), np.int32(slot), np.int32(row))
        cache.k = tuple((s, *layer[1:]) for s, layer in zip(first[:layers], cache.k, strict=True))
        cache.v = tuple((s, *layer[1:]) for s, layer in zip(first[layers:], cache.v, strict=True))

    def _touch(self, row: int) -> None:
        self._clock += 1
        self._used[row] = self._clock


def _first_segments(cache: KVCache) -> tuple[jax.Array, ...]:
    """Every layer's first segment [R, K, S_0, H], keys then values."""
    return (*(layer[0] for layer in cache.k), *(layer[0] for layer in cache.v))
