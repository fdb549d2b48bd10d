"""The expert-offloading engine: a Mixtral whose experts stay on disk, read into a pool of memory slots as routing
asks for them, with an LRU cache of experts and a background loader that prefetches the next layer's experts.

Everything but the experts stays resident (attention, routers, norms, embeddings: the model `strip_experts` left).
Each MoE layer's `offload` hook (`mixtral.moe.MoE`) hands the engine the layer's real routing; the engine pins the
experts it needs in slots (reading the missing ones from the layer's `mixtral.io.experts.ExpertFile`), runs them
with `kernels.experts_add` exactly as the resident `moe_grouped` does, and unpins them. Routing always decides:
a prediction only starts reads early, so a wrong one costs bandwidth and slots, never correctness, and the
logits are bitwise those of the same model held in memory.

Policies (`POLICIES`):
- "none": no cache. The pool is scratch: every expert a layer needs is read when the layer runs and dropped when
  it is done (the baseline: how fast the disk alone gets us).
- "lru": the pool is one cache shared by all layers; a needed expert not in it is read on demand into the least
  recently used unpinned slot (mixtral-offloading's policy, with a global instead of a per-layer LRU).
- "lru+predict": "lru", plus a background read of the experts layer l+1's router chooses when applied (after
  layer l+1's ffn_norm) to layer l's hidden state, taken `predict`="before" layer l's MoE update (h after its
  attention: the reads overlap layer l's expert compute) or "after" it (more accurate: routing at l+1 sees
  nearly that h; overlaps only layer l+1's attention). Layer 0, which has no layer before it, is predicted from
  the experts it used at the previous step (a decode step's routing repeats the last token's often).
  docs/routing.md measured both on the default model's routes: recall 43-81% before, 71-89% after.

On a GPU (a model on a CUDA device) the slots are device memory: each record is read from disk into a page-aligned
pinned host buffer of the reading thread, copied into its slot on that thread's own CUDA stream (beside the model's
computation), and marked read once the copy is done, so the layer that uses it never sees half a record. The same
staged path runs on the CPU with `staged=True` (a plain copy), which is how it is tested where no GPU is.

A layer whose experts (the union over a batch's tokens) outnumber the slots runs in rounds, each expert at most
once, in expert order: the float32 sum of each token's experts is then added in the same order as in one pass.
Loads are done by `loaders` background threads (os.preadv releases the GIL) and, for the reads the running layer
waits for, by the model's thread too when no loader has started them; demand reads go ahead of prefetches in the
queue, and a demand for an expert whose read is in flight waits for that read instead of starting another. Slots
being read or used by the running layer are pinned: never evicted.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from functools import partial

import torch

from mixtral import kernels
from mixtral.errors import CheckpointError, InputError
from mixtral.io.experts import PAGE, ExpertFile, aligned_buffer
from mixtral.model import Transformer
from mixtral.moe import sort_by_expert

log = logging.getLogger("mixtral")

POLICIES = ("none", "lru", "lru+predict")
PREDICT = ("before", "after")
COUNTERS = ("steps", "tokens", "needed", "hits", "prefetch_hits", "demand_loads", "prefetch_loads",
            "loads_in_vain", "prefetches_dropped", "rounds", "bytes_read", "stall_seconds", "read_seconds")


class _Slot:
    """One record's worth of pool memory and what it holds."""
    __slots__ = ("memory", "key", "views", "loading", "pins", "last_use", "prefetched", "error")

    def __init__(self, memory: torch.Tensor):
        self.memory = memory  # uint8 [record_bytes], page-aligned
        self.key: tuple[int, int] | None = None  # (layer, expert) held or being read
        self.views = None  # (w13, w2) viewing `memory`, once read
        self.loading = False
        self.pins = 0  # > 0 while the running layer uses it
        self.last_use = 0
        self.prefetched = False  # read by a prediction and not used since
        self.error: BaseException | None = None


class Engine:
    """Runs a model's MoE layers from expert files through a pool of `budget_bytes` of slots (see the module
    docstring). Made by `attach`; `close()` (or leaving a `with` block) stops the loader threads, removes the
    hooks and closes the files."""

    def __init__(self, model: Transformer, files: list[ExpertFile], budget_bytes: int, *,
                 policy: str = "lru+predict", predict: str = "before", loaders: int = 1,
                 prefetch_limit: int | None = None, staged: bool = False):
        config = model.config
        self.model, self.files, self.policy, self.predict = model, list(files), policy, predict
        self.n_layers, self.n_experts, self.top_k = config.n_layers, config.n_experts, config.top_k
        self.record_bytes = max(f.record_bytes for f in self.files)
        self.slot_count = min(budget_bytes // self.record_bytes, self.n_layers * self.n_experts)
        # Predict at most one layer's share of the pool (and at least a token's top_k): for a prefill chunk the
        # union of guesses is most of the experts, and reading them all would push out what later layers need.
        self.prefetch_limit = prefetch_limit or max(self.top_k, self.slot_count // self.n_layers)
        self.dtype = model.tok_embeddings.weight.dtype
        self.device = model.tok_embeddings.weight.device
        self.staged = staged or self.device.type != "cpu"
        if self.staged:  # slots on the model's device, filled through each reading thread's host buffer
            self._pool = torch.empty(self.slot_count * self.record_bytes, dtype=torch.uint8, device=self.device)
        else:
            self._pool = aligned_buffer(self.slot_count * self.record_bytes)
        self._local = threading.local()  # a staged reader's host buffer and copy stream
        self._slots = [_Slot(self._pool[i * self.record_bytes:(i + 1) * self.record_bytes])
                       for i in range(self.slot_count)]
        self._table: dict[tuple[int, int], _Slot] = {}
        self._cond = threading.Condition()
        self._demand: collections.deque[_Slot] = collections.deque()
        self._prefetch: collections.deque[tuple[int, int, int]] = collections.deque()  # (layer, expert, epoch)
        self._epoch = [0] * self.n_layers  # MoE calls of each layer so far: a prefetch is for the next one only
        self._protected: set[tuple[int, int]] = set()  # the running layer's experts: prefetches evict none
        self._tick = 0
        self._last_experts: list[list[int]] = [[] for _ in range(self.n_layers)]
        self._hidden: torch.Tensor | None = None  # "before": h after the running layer's attention
        self._stats = dict.fromkeys(COUNTERS, 0)
        self._closed = False
        self._hooks = []
        for i, layer in enumerate(model.layers):
            layer.moe.offload = partial(self.run_experts, i)
            if policy == "lru+predict" and predict == "before":
                self._hooks.append(layer.ffn_norm.register_forward_pre_hook(self._keep_hidden))
            elif policy == "lru+predict":
                self._hooks.append(layer.register_forward_hook(partial(self._after_layer, i)))
        self._threads = [threading.Thread(target=self._loader, name=f"mixtral-offload-{i}", daemon=True)
                         for i in range(loaders)]
        for thread in self._threads:
            thread.start()

    # ---- the public side ---------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """A snapshot of the counters since the last `reset_stats`: steps (forward passes) and tokens (rows, padding
        included) seen by layer 0; needed (distinct experts each layer call used, summed) = hits (in the cache) +
        prefetch_hits (there, or on the way, because a prediction read it) + demand_loads (read while the layer
        waited); prefetch_loads (reads a prediction started), loads_in_vain (of those, the ones evicted or not
        used by the layer they were for), prefetches_dropped (never started: stale, or no free slot); rounds;
        bytes_read; stall_seconds (the model waiting for reads); read_seconds (the loaders reading). Plus
        hit_rate and, per step, demand_loads_per_step and bytes_read_per_step."""
        with self._cond:
            s = dict(self._stats)
        s["hit_rate"] = (s["hits"] + s["prefetch_hits"]) / s["needed"] if s["needed"] else 0.0
        s["demand_loads_per_step"] = s["demand_loads"] / s["steps"] if s["steps"] else 0.0
        s["bytes_read_per_step"] = s["bytes_read"] / s["steps"] if s["steps"] else 0.0
        s["slots"], s["record_bytes"] = self.slot_count, self.record_bytes
        return s

    def drain(self) -> None:
        """Wait until no read is queued or in flight (the statistics then hold still)."""
        with self._cond:
            while self._demand or self._prefetch or any(slot.loading for slot in self._slots):
                self._cond.wait(0.01)  # a loader dropping stale prefetches notifies no one

    def reset_stats(self) -> None:
        with self._cond:
            self._stats = dict.fromkeys(COUNTERS, 0)

    def close(self) -> None:
        """Stop the loader threads, detach from the model (its MoE layers then have no experts) and close the
        expert files. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        for hook in self._hooks:
            hook.remove()
        for layer in self.model.layers:
            layer.moe.offload = None
        for file in self.files:
            file.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    # ---- one MoE layer -----------------------------------------------------------------------------------------

    def run_experts(self, layer: int, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The MoE hook: y [tokens, dim] for x [tokens, dim] routed to `experts` with gate `weights`
        [tokens, top_k], what `moe_grouped` computes, the experts taken from the pool."""
        a = sort_by_expert(weights, experts, self.n_experts)
        pending = list(a.slices())
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        with self._cond:
            if self._closed:
                raise InputError("this offloading engine is closed")
            self._epoch[layer] += 1
            if layer == 0:
                self._stats["steps"] += 1
                self._stats["tokens"] += len(x)
            self._stats["needed"] += len(pending)
            self._protected = {(layer, e) for e, _ in pending}
        self._last_experts[layer] = [e for e, _ in pending]
        predicted = self.policy != "lru+predict" or self.predict != "before"
        got: list[_Slot] = []
        try:
            while pending:
                got = self._acquire(layer, [e for e, _ in pending])
                if not predicted:  # this layer's reads are queued first: now the next layer's may follow
                    self._predict_next(layer, self._hidden)
                    predicted = True
                self._wait(got)
                kernels.experts_add(out, x, a.token_of, a.gates,
                                    [(*slot.views, s) for slot, (_, s) in zip(got, pending)])
                pending = pending[len(got):]
                self._release(got)
                got = []
        finally:
            self._release(got)  # after a failed read (or an interrupt): unpinned, the failed slots emptied
            with self._cond:
                self._protected = set()
                self._hidden = None
                for slot in self._slots:
                    if slot.key is not None and slot.key[0] == layer and slot.prefetched and not slot.loading:
                        self._stats["loads_in_vain"] += 1  # read for this call of the layer, which did not use it
                        slot.prefetched = False
        return out.to(x.dtype)

    def _acquire(self, layer: int, pending: list[int]) -> list[_Slot]:
        """Pin slots for the longest prefix of `pending` (the layer's experts still to run, ascending) that the
        pool can hold at once, at least one; start demand reads for those not there. Returns the slots, in order."""
        got: list[_Slot] = []
        with self._cond:
            for e in pending:
                slot = self._slot_for((layer, e), first=not got)
                if slot is None:
                    break
                slot.pins += 1
                slot.last_use = self._next_tick()
                got.append(slot)
            self._stats["rounds"] += 1
        return got

    def _slot_for(self, key: tuple[int, int], first: bool) -> _Slot | None:
        """The slot of `key` (lock held): in the cache (a hit), read or being read by a prediction (a prefetch
        hit), or a victim it is given (a demand read, queued). None when the only slots left hold this round's
        experts; the `first` of a round may take a slot holding a later round's expert instead."""
        while True:
            slot = self._table.get(key)
            if slot is not None:
                self._stats["prefetch_hits" if slot.prefetched else "hits"] += 1
                slot.prefetched = False
                return slot
            victim = self._victim(protect=True) or (self._victim(protect=False) if first else None)
            if victim is not None:
                self._stats["demand_loads"] += 1
                slot = self._assign(victim, key, prefetched=False)
                self._demand.append(slot)
                self._cond.notify_all()
                return slot
            if not first and not any(s.loading and not s.pins for s in self._slots):
                return None
            # The other slots are being read by prefetches: wait for one to finish (loaders never wait for us).
            self._stall(self._cond.wait)

    def _victim(self, protect: bool) -> _Slot | None:
        """A slot to read into (lock held): a free one, else the least recently used one that is neither pinned nor
        being read, nor (with `protect`) holding an expert the running layer needs."""
        best = None
        for slot in self._slots:
            if slot.pins or slot.loading or (protect and slot.key in self._protected):
                continue
            if slot.key is None:
                return slot
            if best is None or slot.last_use < best.last_use:
                best = slot
        return best

    def _assign(self, slot: _Slot, key: tuple[int, int], *, prefetched: bool) -> _Slot:
        """Give `slot` to `key` (lock held), evicting what it held."""
        if slot.key is not None:
            del self._table[slot.key]
            if slot.prefetched:
                self._stats["loads_in_vain"] += 1  # evicted before the layer it was read for used it
        slot.key, slot.views, slot.loading, slot.prefetched, slot.error = key, None, True, prefetched, None
        slot.last_use = self._next_tick()
        self._table[key] = slot
        return slot

    def _wait(self, got: list[_Slot]) -> None:
        """Wait until every slot of `got` is read, reading those no loader has started here (two thread switches
        fewer per demand read than waiting for a loader); raise the error of a read that failed."""
        while True:
            with self._cond:
                mine = [slot for slot in got if slot in self._demand]
                for slot in mine:
                    self._demand.remove(slot)
            if not mine:
                break
            start = time.perf_counter()
            for slot in mine:
                self._read(slot)
            with self._cond:
                self._stats["stall_seconds"] += time.perf_counter() - start
        with self._cond:
            while any(slot.loading for slot in got):
                self._stall(self._cond.wait)
            failed = [slot for slot in got if slot.error is not None]
            if failed:
                raise failed[0].error

    def _release(self, got: list[_Slot]) -> None:
        with self._cond:
            for slot in got:
                slot.pins -= 1
                if not slot.loading and (slot.error is not None or (self.policy == "none" and slot.pins == 0)):
                    self._drop(slot)

    def _drop(self, slot: _Slot) -> None:
        """Empty `slot` (lock held)."""
        if slot.key is not None:
            del self._table[slot.key]
        slot.key, slot.views, slot.prefetched, slot.error = None, None, False, None

    def _stall(self, wait) -> None:
        start = time.perf_counter()
        wait()
        self._stats["stall_seconds"] += time.perf_counter() - start

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    # ---- prediction --------------------------------------------------------------------------------------------

    def _keep_hidden(self, module, args) -> None:
        """ffn_norm's forward pre-hook ("before"): its input is h after the layer's attention."""
        self._hidden = args[0]

    def _after_layer(self, layer: int, module, args, output) -> None:
        """A block's forward hook ("after"): its output is h after the layer's MoE update."""
        self._predict_next(layer, output[0])

    def _predict_next(self, layer: int, h: torch.Tensor | None) -> None:
        """Queue the reads of what layer+1 will need, from layer's hidden state h [..., dim]; after the last layer,
        of layer 0's experts of this step (for the next one)."""
        if layer + 1 < self.n_layers:
            if h is not None:
                self.prefetch(layer + 1, self.guess(layer + 1, h))
        else:
            self.prefetch(0, self._last_experts[0][:self.prefetch_limit])

    @torch.no_grad()
    def guess(self, layer: int, h: torch.Tensor) -> list[int]:
        """The experts layer `layer` is predicted to need, most wanted first (at most `prefetch_limit`): its router
        applied after its ffn_norm to h [..., dim], the hidden state of the layer before. Called directly, not
        through the modules' __call__, so the prediction runs no hooks."""
        block = self.model.layers[layer]
        x = block.ffn_norm.forward(h.reshape(-1, h.shape[-1]))
        chosen = torch.topk(block.moe.router_logits(x).float(), self.top_k, dim=-1).indices
        counts = torch.bincount(chosen.reshape(-1), minlength=self.n_experts)
        ranked = torch.argsort(counts, descending=True, stable=True)[:self.prefetch_limit]
        return [int(e) for e in ranked if counts[e] > 0]

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Queue background reads of `experts` of `layer` for that layer's next call (dropped once it starts)."""
        with self._cond:
            epoch = self._epoch[layer]
            self._prefetch.extend((layer, int(e), epoch) for e in experts if (layer, int(e)) not in self._table)
            self._cond.notify_all()

    # ---- the loader threads ------------------------------------------------------------------------------------

    def _loader(self) -> None:
        while True:
            with self._cond:
                slot = self._next_read()
                if slot is None:
                    return
            self._read(slot)

    def _read(self, slot: _Slot) -> None:
        """Read the record of `slot.key` into it (lock not held), then mark it read or failed."""
        layer, e = slot.key
        start = time.perf_counter()
        try:
            file = self.files[layer]
            if self.staged:
                self._staged_read(file, e, slot.memory)
            else:
                file.read_into(e, slot.memory)
            views, error = file.views(slot.memory, self.dtype), None
        except BaseException as exc:  # handed to the waiting layer (demand) or logged (prefetch)
            views, error = None, exc
        with self._cond:
            self._stats["read_seconds"] += time.perf_counter() - start
            slot.loading, slot.views = False, views
            if error is None:
                self._stats["bytes_read"] += self.files[layer].record_bytes
            elif slot.pins:
                slot.error = error
            else:
                log.warning("offload: prefetch of expert %d of layer %d failed: %s", e, layer, error)
                self._drop(slot)
            self._cond.notify_all()

    def _staged_read(self, file: ExpertFile, e: int, memory: torch.Tensor) -> None:
        """Read record `e` of `file` into this thread's host buffer, then copy it into `memory` (a slot on the
        model's device): on a GPU on this thread's stream, waited for here, so that the buffer can take the next
        read and the slot is whole once marked read."""
        local = self._local
        if getattr(local, "buffer", None) is None:
            local.buffer = host_buffer(self.record_bytes, pinned=self.device.type == "cuda")
            local.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        file.read_into(e, local.buffer)
        source = local.buffer[:len(memory)]
        if local.stream is None:
            memory.copy_(source)
            return
        with torch.cuda.stream(local.stream):
            memory.copy_(source, non_blocking=True)
        local.stream.synchronize()

    def _next_read(self) -> _Slot | None:
        """The next slot to read into (lock held), waiting for work; None once closed. Demand reads first; a
        prefetch is dropped when its layer has started since it was asked for or no slot is free for it."""
        while not self._closed:
            if self._demand:
                return self._demand.popleft()
            if self._prefetch:
                layer, e, epoch = self._prefetch.popleft()
                if epoch != self._epoch[layer] or (layer, e) in self._table:
                    continue
                victim = self._victim(protect=True)
                if victim is None:
                    self._stats["prefetches_dropped"] += 1
                    continue
                self._stats["prefetch_loads"] += 1
                return self._assign(victim, (layer, e), prefetched=True)
            self._cond.wait()
        return None


def host_buffer(nbytes: int, *, pinned: bool) -> torch.Tensor:
    """A uint8 host buffer of `nbytes` starting on a page, as O_DIRECT reads need: page-locked (CUDA's pinned
    memory, which copies to a GPU asynchronously) with `pinned`, else `aligned_buffer`'s."""
    if not pinned:
        return aligned_buffer(nbytes)
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=True)
    start = -raw.data_ptr() % PAGE
    return raw[start:start + nbytes]


def check_files(model: Transformer, files: list[ExpertFile]) -> None:
    """Raise InputError unless `files` are one per MoE layer of `model`, CheckpointError naming the file when one
    does not fit the model's config."""
    config = model.config
    if config.n_experts < 2:
        raise InputError("offloading needs a mixture-of-experts model; this one is dense (one expert per layer)")
    if len(files) != config.n_layers:
        raise InputError(f"offloading needs one expert file per layer: {config.n_layers} layers, {len(files)} files")
    shapes = {"w13": (2 * config.hidden_dim, config.dim), "w2": (config.dim, config.hidden_dim)}
    for layer, file in enumerate(files):
        if file.n_experts != config.n_experts:
            raise CheckpointError(f"{file.path}: {file.n_experts} experts; the model has {config.n_experts}")
        if file.layer != layer:
            raise CheckpointError(f"{file.path}: holds layer {file.layer}, given as layer {layer}")
        for name, shape in shapes.items():
            entry = file.matrices[name]
            if (entry["out_features"], entry["in_features"]) != shape:
                raise CheckpointError(f"{file.path}: {name} is [{entry['out_features']}, {entry['in_features']}], "
                                      f"the model's is {list(shape)}")
