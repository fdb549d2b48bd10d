"""Prepared token shards: the on-disk layout `mixtral data prepare` writes, and the reader the trainer samples from.

A prepared corpus is one directory:

    DIR/manifest.json        sources, tokenizer, dtype, and documents/bytes/tokens per domain and split
    DIR/train/<domain>.bin   the domain's train documents back to back, each BOS + tokens + EOS, as flat
                             little-endian uint16 (uint32 only for a vocabulary over 65536 tokens)
    DIR/val/<domain>.bin     the same for its validation documents

Each .bin is one flat stream per domain, so a training window may cross a document boundary, as in the GPT and
Llama recipes: the BOS/EOS pair tells the model where one document ends. The manifest is written last and the
directory renamed into place, so a manifest that exists describes complete files.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mixtral.errors import InputError

MANIFEST = "manifest.json"
FORMAT = "mixtral-token-shards"
VERSION = 1
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def read_manifest(directory: str | os.PathLike) -> dict:
    """The parsed DIR/manifest.json of a prepared corpus; raises InputError naming the file if missing or invalid."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise InputError(f"prepared corpus {directory} does not exist or is not a directory "
                         f"(make one with 'mixtral data prepare')")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is missing: {directory} is not a prepared corpus "
                         f"(make one with 'mixtral data prepare')") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not a manifest of prepared token shards (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise InputError(f"{path} has version {manifest.get('version')!r}; this reader knows version {VERSION}")
    if manifest.get("dtype") not in DTYPES or not isinstance(manifest.get("splits"), dict):
        raise InputError(f"{path} is malformed: needs \"dtype\" (one of {', '.join(DTYPES)}) and \"splits\"")
    return manifest


def _draws(seed: int, step: int, n: int) -> np.ndarray:
    """n uint64 words that depend on (seed, step) only.

    SeedSequence's hash is a fixed, documented algorithm, so the words are the same across numpy versions, unlike
    Generator methods (NEP 19 allows their streams to change); a resumed run gets its batches back exactly.
    """
    return np.random.SeedSequence([seed, step]).generate_state(n, dtype=np.uint64)


class TokenShards:
    """Prepared token shards of one split: memory-mapped uint16, one flat stream per domain.

    Attributes: `directory`, `split`, `manifest` (the parsed manifest.json), `domains` (sorted names of the domains
    that have tokens in this split), `bos_id`, `eos_id`.
    """

    def __init__(self, directory: str | os.PathLike, split: str) -> None:
        """Open DIR/<split>/<domain>.bin for every domain of `split` ("train" or "val") listed in the manifest.

        Raises InputError naming the file when the manifest or a shard is missing, or a shard's size disagrees
        with the manifest (a truncated copy, a different prepare run).
        """
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.directory = Path(directory)
        self.split = split
        self.manifest = read_manifest(directory)
        dtype = DTYPES[self.manifest["dtype"]]
        tokenizer = self.manifest.get("tokenizer", {})
        self.bos_id: int | None = tokenizer.get("bos_id")
        self.eos_id: int | None = tokenizer.get("eos_id")
        self._streams: dict[str, np.ndarray] = {}
        for domain, entry in sorted(self.manifest["splits"].get(split, {}).items()):
            path = self.directory / entry["file"]
            tokens = int(entry["tokens"])
            if not path.is_file():
                raise InputError(f"token shard {path} is missing (listed in {self.directory / MANIFEST})")
            size = path.stat().st_size
            if size != tokens * dtype.itemsize:
                raise InputError(f"token shard {path} has {size} bytes but the manifest says {tokens} tokens "
                                 f"({tokens * dtype.itemsize} bytes of {self.manifest['dtype']}): truncated or "
                                 f"from another prepare run")
            if tokens:
                self._streams[domain] = np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))
        self.domains: list[str] = sorted(self._streams)

    def __repr__(self) -> str:
        counts = ", ".join(f"{d}={self.tokens(d)}" for d in self.domains)
        return f"TokenShards({str(self.directory)!r}, {self.split!r}: {counts})"

    def tokens(self, domain: str) -> int:
        """Number of tokens of `domain` in this split (BOS/EOS included)."""
        return len(self.stream(domain))

    def stream(self, domain: str) -> np.ndarray:
        """The domain's whole token stream, memory-mapped (read-only, not loaded): `[tokens]` uint16."""
        if domain not in self._streams:
            raise InputError(f"domain {domain!r} has no tokens in the {self.split} split of {self.directory} "
                             f"(domains: {', '.join(self.domains) or 'none'})")
        return self._streams[domain]

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int,
              weights: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 `[batch_size, seq_len]`, targets = inputs shifted left by one token.

        A deterministic function of (seed, step, batch_size, seq_len, weights) and the shards: no iterator state,
        so a resumed run passes the same step and gets the same batch. Each row picks a domain with probability
        proportional to `weights` (default: the domain's token count, i.e. uniform over the corpus), then a
        uniformly random window of seq_len + 1 tokens in that domain's stream. Domains shorter than one window,
        or with no tokens in this split, are not drawn. Raises InputError for a weight naming a domain the corpus
        does not have, a negative weight, or when no domain can be drawn.
        """
        if step < 0 or seed < 0 or batch_size < 1 or seq_len < 1:
            raise InputError(f"batch needs step >= 0, seed >= 0, batch_size >= 1 and seq_len >= 1; got step={step}, "
                             f"seed={seed}, batch_size={batch_size}, seq_len={seq_len}")
        domains, probs = self._probabilities(seq_len, weights)
        draws = _draws(seed, step, 2 * batch_size)
        # 53 high bits -> a uniform float in [0, 1), compared against the cumulative probabilities.
        picks = np.searchsorted(np.cumsum(probs), (draws[0::2] >> np.uint64(11)) * 2.0 ** -53, side="right")
        picks = np.minimum(picks, len(domains) - 1)  # guards cumsum rounding below 1.0
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for row, (pick, draw) in enumerate(zip(picks, draws[1::2])):
            stream = self._streams[domains[pick]]
            # Start in [0, len - seq_len - 1]; the modulo bias is below 2**-40 for any stream that fits on a disk.
            start = int(draw % np.uint64(len(stream) - seq_len))
            rows[row] = stream[start:start + seq_len + 1]
        window = torch.from_numpy(rows)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def windows(self, domain: str, seq_len: int,
                max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows of the domain's stream from its start, for validation.

        Window i is inputs = stream[i*seq_len : (i+1)*seq_len] and targets = the same shifted by one, int64
        `[seq_len]` each, so every token after the first is a target exactly once. Yields (len - 1) // seq_len
        windows, or at most `max_windows`.
        """
        if seq_len < 1:
            raise InputError(f"seq_len must be at least 1, got {seq_len}")
        stream = self.stream(domain)
        count = (len(stream) - 1) // seq_len
        if max_windows is not None:
            count = min(count, max(0, max_windows))
        for i in range(count):
            window = torch.from_numpy(stream[i * seq_len:(i + 1) * seq_len + 1].astype(np.int64))
            yield window[:-1], window[1:]

    def _probabilities(self, seq_len: int, weights: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
        known = set(self.manifest.get("domains", {})) | set(self.domains)
        if weights is None:
            weights = {d: float(self.tokens(d)) for d in self.domains}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise InputError(f"weights name domain(s) {', '.join(map(repr, unknown))} that {self.directory} does "
                             f"not have (domains: {', '.join(sorted(known))})")
        negative = sorted(d for d, w in weights.items() if not w >= 0)
        if negative:
            raise InputError(f"weights must be >= 0; got {', '.join(f'{d}={weights[d]}' for d in negative)}")
        # Domains absent from this split (e.g. no validation document) or shorter than a window cannot be drawn.
        domains = [d for d in self.domains if weights.get(d, 0) > 0 and self.tokens(d) > seq_len]
        if not domains:
            raise InputError(f"no domain of the {self.split} split of {self.directory} has a positive weight and "
                             f"more than seq_len={seq_len} tokens ({self!r})")
        probs = np.array([weights[d] for d in domains], dtype=np.float64)
        return domains, probs / probs.sum()
