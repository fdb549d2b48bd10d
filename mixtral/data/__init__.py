"""Training data: `prepare` turns text files into token shards, `TokenShards` reads them for the trainer.

The on-disk layout is described in `mixtral.data.shards`; `mixtral.data.mathgen` generates the arithmetic and
algebra question-answer pairs of the default corpus (scripts/build_corpus.py, docs/corpus.md).
"""
from __future__ import annotations

from mixtral.data.prepare import Source, prepare
from mixtral.data.shards import TokenShards, read_manifest

__all__ = ["Source", "TokenShards", "prepare", "read_manifest"]
