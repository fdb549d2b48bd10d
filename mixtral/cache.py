"""Key/value cache for incremental decoding, full or rolling (sliding window).

Every slot of the buffer carries the absolute position of the token stored there (-1: empty), and the
attention mask is computed from those positions alone: a query at position p sees a slot holding position q
when 0 <= q <= p and, with a sliding window W, p - q < W. That one rule covers

- rows of a batch that sit at different lengths (prompts of different lengths decode side by side, each at
  its own positions, so a batch gives what each prompt gives alone);
- the rolling buffer of a sliding-window model: position q lives in slot q % capacity and memory is bounded by
  the window, not the sequence. With capacity >= W + chunk - 1 a chunk of new tokens never overwrites a key
  that one of its own queries still needs, so keys are written first and attended second, as with a full cache.

Padding tokens of a chunk (rows with fewer new tokens than others) are written to one extra scratch slot at the
end of the buffer, which is never attended.

The serving engine keeps its cache in blocks instead (`mixtral.serve.blocks`), behind the same two calls the model
makes: `advance` and `update`.
"""
from __future__ import annotations

import torch

from mixtral.config import ModelConfig
from mixtral.errors import ContextLengthError


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, max_chunk: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        """A cache for `batch_size` rows of up to `max_len` tokens each, fed at most `max_chunk` tokens a call.

        A sliding-window model gets a rolling buffer of `window + max_chunk - 1` slots (fewer if `max_len` is
        smaller); any other model gets `max_len` slots.
        """
        self.window = config.sliding_window
        self.max_len = max_len
        self.max_chunk = max_chunk
        self.rolling = self.window is not None and self.window + max_chunk - 1 < max_len
        self.capacity = self.window + max_chunk - 1 if self.rolling else max_len
        shape = (config.n_layers, batch_size, config.n_kv_heads, self.capacity + 1, config.head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=device)  # [layer, batch, kv_heads, slot, head_dim]
        self._v = torch.zeros(shape, dtype=dtype, device=device)
        self._slot_pos = torch.full((batch_size, self.capacity + 1), -1, dtype=torch.long, device=device)
        self._lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens each row has seen
        self._slots: torch.Tensor | None = None
        self._used = 0

    @property
    def batch_size(self) -> int:
        return self._k.shape[1]

    @property
    def row_lengths(self) -> list[int]:
        """How many tokens each row has been fed (the position of its next token)."""
        return self._lengths.tolist()

    @property
    def nbytes(self) -> int:
        """The memory of the key and value buffers."""
        return self._k.nbytes + self._v.nbytes

    # ---- the forward pass ----------------------------------------------------------------------------------------

    def advance(self, chunk: int, n_new: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for a chunk of `chunk` tokens per row, of which the first `n_new[b]` are real.

        Returns (positions [batch, chunk] of the new tokens, attention mask [batch, 1, chunk, slots]).
        Raises ContextLengthError when a row would grow past `max_len`.
        """
        if chunk > self.max_chunk:
            raise ValueError(f"chunk of {chunk} tokens exceeds this cache's max_chunk={self.max_chunk}")
        device = self._lengths.device
        if n_new is None:
            n_new = torch.full_like(self._lengths, chunk)
        new_lengths = self._lengths + n_new
        longest = int(new_lengths.max())
        if longest > self.max_len:
            raise ContextLengthError(f"sequence of {longest} tokens exceeds the cache's limit of {self.max_len}")
        offsets = torch.arange(chunk, device=device)
        positions = self._lengths[:, None] + offsets  # [batch, chunk]
        real = offsets < n_new[:, None]
        slots = positions % self.capacity if self.rolling else positions
        slots = torch.where(real, slots, self.capacity)  # padding goes to the scratch slot
        self._slot_pos.scatter_(1, slots, torch.where(real, positions, -1))
        self._slot_pos[:, self.capacity] = -1
        self._lengths = new_lengths
        self._slots = slots
        # Attend over the slots in use only; the scratch slot is last and always left out.
        self._used = self.capacity if self.rolling else min(longest, self.capacity)
        key_pos = self._slot_pos[:, None, : self._used]  # [batch, 1, used]
        mask = (key_pos >= 0) & (key_pos <= positions[:, :, None])
        if self.window is not None:
            mask &= positions[:, :, None] - key_pos < self.window
        # A padding query may see no key at all; let it see everything rather than produce NaN (its output is
        # never read, and NaN must not reach the MoE router).
        mask |= ~mask.any(-1, keepdim=True)
        return positions, mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's keys/values ([batch, kv_heads, chunk, head_dim]) for `layer`; return the keys and
        values to attend over, [batch, kv_heads, slots, head_dim], matching the mask from `advance`."""
        index = self._slots[:, None, :, None].expand_as(k)
        self._k[layer].scatter_(2, index, k)
        self._v[layer].scatter_(2, index, v)
        return self._k[layer, :, :, : self._used], self._v[layer, :, :, : self._used]
