"""The decode batch's KV cache: fixed rows and columns, allocated once, all rows ending at one column.

Storage per layer is (rows, key/value heads, capacity, head dim), allocated when the scheduler starts,
so a decoding step has the same shapes and addresses every time (what CUDA graphs need) and the cache
the precision plan reserved is the cache that exists. Row i holds sequence i of the batch; its
`length` tokens sit right-aligned in columns [end - length, end), so one write column (`end`) serves
every row and a step writes each row's new key and value at the same column. A boolean mask marks the
real tokens; each row keeps its own position ids, so left padding changes nothing in its numbers.

Invariant: end == the longest row's length. A row that joins longer than that shifts the others to the
right; when the longest row leaves, the others shift back to the left. Either is one copy of the used
columns, and only happens when the batch changes.

The model sees this object as its cache: `update()` stores one step's keys and values at the write
column and returns the first `width` columns of the first `batch` rows (`bind` sets both), views of
the same storage each time.

`inputs` holds what the next step reads, on the device: each row's next token, each row's position
and the write column. A step's sampled tokens go there on the device (`advance`), and the positions
and column move on by one there too, so a step can be launched before the host has seen the previous
step's tokens. Only a change of the batch writes from the host: a joining row's first token (`add`),
and the positions and column of the new layout (`add`, `keep`); tokens move with their rows (`keep`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SlotCache:
    """Static KV storage for continuous batching (see the module docstring).

    Args:
        rows: Sequences decoded together at most.
        capacity: Tokens per sequence at most (the engine's context).
        layers: (key/value heads, head dim, dtype) of each layer's keys and values.
        device: Where the storage lives.

    """

    def __init__(
        self,
        rows: int,
        capacity: int,
        layers: Sequence[tuple[int, int, torch.dtype]],
        device: torch.device,
    ) -> None:
        self.rows, self.capacity, self.device = rows, capacity, device
        self.keys = [torch.zeros(rows, h, capacity, d, dtype=t, device=device) for h, d, t in layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        # What the model reads each step: token ids, position ids, the write column (index 2 * rows).
        self.inputs = torch.zeros(2 * rows + 1, dtype=torch.long, device=device)
        self.lengths: list[int] = []
        self.end = 0
        self._batch, self._width = rows, capacity

    # -- what the model calls ------------------------------------------------------------------------
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one step's keys and values at the write column; return the bound views."""
        column = self.inputs[2 * self.rows :]
        keys, values = self.keys[layer_idx][: self._batch], self.values[layer_idx][: self._batch]
        keys.index_copy_(2, column, key_states)
        values.index_copy_(2, column, value_states)
        return keys[:, :, : self._width], values[:, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns in use (transformers asks when it is not given positions)."""
        return self.end

    # -- one step --------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Rows in use: rows [0, active) hold the batch, in order."""
        return len(self.lengths)

    def bind(self, batch: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fix the rows and columns the next forward passes see; returns (input ids, positions, mask)."""
        self._batch, self._width = batch, width
        ids = self.inputs[:batch].view(batch, 1)
        positions = self.inputs[self.rows : self.rows + batch].view(batch, 1)
        return ids, positions, self.mask[:batch, None, None, :width]

    def open_column(self) -> int:
        """Mark the write column as real for every row; returns the columns the step must attend to."""
        self.mask[: self.active, self.end] = True
        return self.end + 1

    def advance(self, tokens: torch.Tensor) -> None:
        """After a step: every row is one token longer, and `tokens` (one per row) are its next inputs.

        Args:
            tokens: The rows' next tokens, on the device (written there without synchronising).

        """
        self.inputs[: len(tokens)].copy_(tokens)
        self.inputs[self.rows :].add_(1)  # positions and write column (free rows' feed only noise)
        self.end += 1
        self.lengths = [n + 1 for n in self.lengths]

    # -- the batch changes ---------------------------------------------------------------------------
    def add(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], token: int) -> None:
        """Append a prefilled sequence as the next row.

        Args:
            layers: Per layer, (keys, values) of shape (1, key/value heads, length, head dim).
            token: The sequence's next token (the one its prefill sampled).

        """
        if self.active == self.rows:
            raise RuntimeError("every decode slot is in use")
        length = layers[0][0].shape[2]
        if length > self.capacity:
            raise ValueError(f"{length} tokens do not fit a slot of {self.capacity}")
        if length > self.end:
            self._shift(length - self.end)
        row, start = self.active, self.end - length
        for (keys, values), (new_keys, new_values) in zip(
            zip(self.keys, self.values, strict=True), layers, strict=True
        ):
            keys[row].zero_()  # what a former occupant left must not meet a zero weight as NaN
            values[row].zero_()
            keys[row, :, start : self.end] = new_keys[0]
            values[row, :, start : self.end] = new_values[0]
        self.mask[row] = False
        self.mask[row, start : self.end] = True
        self.inputs[row] = token
        self.lengths.append(length)
        self._write_positions()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (ascending), packed to the front in this order."""
        for new, old in enumerate(rows):
            if new != old:
                for storage in (*self.keys, *self.values):
                    storage[new, :, : self.end] = storage[old, :, : self.end]
                self.mask[new] = self.mask[old]
                self.inputs[new] = self.inputs[old]  # the row's next token
        self.lengths = [self.lengths[i] for i in rows]
        longest = max(self.lengths, default=0)
        if longest < self.end:
            self._shift(longest - self.end)
        self._write_positions()

    def clear(self) -> None:
        """Forget every row."""
        self.lengths, self.end = [], 0

    def nbytes(self) -> int:
        """Bytes of the storage."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def _write_positions(self) -> None:
        """Write each row's position (its length) and the write column into `inputs`, from the host."""
        values = torch.tensor([*self.lengths, *[0] * (self.rows - self.active), self.end])
        if self.device.type == "cuda":
            values = values.pin_memory()  # an asynchronous copy; the host allocator keeps it until done
        self.inputs[self.rows :].copy_(values, non_blocking=True)

    def _shift(self, delta: int) -> None:
        """Move every row's used columns by delta (right if positive), so that end becomes end + delta."""
        rows, used = self.active, max(self.lengths, default=0)
        new_end = self.end + delta
        if rows and used:
            src, dst = slice(self.end - used, self.end), slice(new_end - used, new_end)
            for storage in (*self.keys, *self.values):
                storage[:rows, :, dst] = storage[:rows, :, src].clone()
            moved = self.mask[:rows, src].clone()
            self.mask[:rows] = False
            self.mask[:rows, dst] = moved
        self.end = new_end
