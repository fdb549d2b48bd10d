"""lm-evaluation-harness adapter: `lm_eval --model mixtral` runs the paper's benchmarks on our model.

Importing this module registers `MixtralLM` as the harness' model "mixtral"; the harness does not import it by
itself, so run it through `mixtral eval harness -- <lm_eval arguments>` or `python -m mixtral.eval.harness
<lm_eval arguments>`, which import it first and then run lm_eval's own command line. Model arguments
(`--model_args`): pretrained (a checkpoint directory, "default" or a preset), tokenizer, dtype, quantize,
batch_size, max_length (longest row the model reads, default the model's context capped at DEFAULT_MAX_LENGTH).

The three request types, all through this package's own code paths:
- loglikelihood: context + continuation in one row, the continuation's tokens scored (`score_rows`), rows
  batched longest first; a row longer than max_length + 1 tokens keeps its end.
- loglikelihood_rolling: a document cut into the harness' own disjoint rolling windows
  (`get_rolling_token_windows` + `make_disjoint_window`), each token scored once, the windows of many documents
  batched together.
- generate_until: greedy (or sampling with do_sample) through the KV cache (`mixtral.generate.stream`), requests
  with the same generation settings batched, each row stopping at </s>, a stop string of `until` or
  max_gen_toks; the batch ends once every row has.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mixtral.errors import InputError
from mixtral.eval.scoring import score_rows
from mixtral.generate import TextStream, stream
from mixtral.io.loading import DEFAULT_MODEL, load_model_and_tokenizer
from mixtral.io.tokenizer import Tokenizer
from mixtral.model import Transformer

log = logging.getLogger("mixtral")

# Rows longer than this are not worth the quadratic attention on a CPU unless asked for (max_length=...).
DEFAULT_MAX_LENGTH = 4096
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
# generate_until's gen_kwargs that we act on; the harness' tasks also pass these, which change nothing here.
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}
IGNORED_GEN_KWARGS = {"num_beams", "repetition_penalty"}


def parse_batch_size(value: Any) -> int:
    """lm_eval's batch_size (an int, a digit string, or "auto"/"auto:N", which mean DEFAULT_BATCH_SIZE here)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise InputError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise InputError(f"batch_size must be >= 1, got {size}")
    return size


def run_device(device: str) -> torch.device:
    """Where the model runs when lm_eval names `device`. Its command line names "cuda:0" unless told otherwise; on
    a machine without CUDA that default means the CPU (said once, as a warning)."""
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s is not available (no CUDA here); the model runs on the CPU", device)
        return torch.device("cpu")
    return chosen


@register_model("mixtral")
class MixtralLM(TemplateLM):
    """A `mixtral` model behind lm-evaluation-harness' LM interface (module docstring)."""

    def __init__(self, pretrained: str | Transformer = DEFAULT_MODEL, tokenizer: str | Tokenizer | None = None,
                 dtype: str | None = None, quantize: str | None = None, batch_size: int | str | None = None,
                 max_length: int | str | None = None, device: str | None = None,
                 **unused: Any) -> None:
        """Load `pretrained` with its tokenizer as `mixtral generate` does, or wrap a loaded Transformer (then
        `tokenizer` must be its Tokenizer). `device`: where the model runs (`run_device`; default: where it is).
        Raises InputError for a bad batch_size or max_length, and the loaders' errors for a model that cannot be
        loaded."""
        super().__init__()
        for key in sorted(k for k, v in unused.items() if v is not None and k != "max_batch_size"):
            log.warning("lm_eval model argument %s=%r is not used by the mixtral model", key, unused[key])
        if isinstance(pretrained, Transformer):
            if not isinstance(tokenizer, Tokenizer):
                raise InputError("a loaded model needs its Tokenizer object as tokenizer=")
            self.model, self.tokenizer = pretrained, tokenizer
        else:
            self.model, self.tokenizer = load_model_and_tokenizer(str(pretrained), tokenizer=tokenizer, dtype=dtype,
                                                                  quantize=quantize, progress=sys.stderr.isatty())
        if device is not None:
            self.model.to(run_device(device))
        self.model.eval()
        self.batch_size = parse_batch_size(batch_size)
        context = self.model.config.context_len
        self.max_length = int(max_length) if max_length is not None else min(context, DEFAULT_MAX_LENGTH)
        if not 1 <= self.max_length <= context:
            raise InputError(f"max_length must be in [1, {context}] (the model's context), got {self.max_length}")

    # ---- tokens --------------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context and the first rolling window condition on: BOS, as every document starts in
        # training.
        return self.tokenizer.bos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---- likelihoods ---------------------------------------------------------------------------------------------

    def score(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring",
              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether every continuation token was the argmax) of each (context ids,
        continuation ids) pair, batched longest first. A row over max_length + 1 tokens keeps its last ones. An
        empty continuation has log-probability 0 and is greedy."""
        rows, n_scored = [], []
        for context, continuation in pairs:
            assert context, "lm_eval gives an empty context the prefix token"
            row = (context + continuation)[-(self.max_length + 1):]
            rows.append(row)
            n_scored.append(min(len(continuation), len(row) - 1))
        order = sorted((i for i in range(len(rows)) if n_scored[i]), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        for first in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch", disable=disable_tqdm):
            batch = order[first:first + self.batch_size]
            scores = score_rows(self.model, [rows[i] for i in batch], [n_scored[i] for i in batch])
            for i, s in zip(batch, scores):
                results[i] = (float(s.logprobs.double().sum()), bool(s.greedy.all()))
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self.score([(context, continuation) for _, context, continuation in requests],
                             "loglikelihood", disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for pair in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                  max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(pair))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ----------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        results: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for members in groups.values():
            settings = generation_settings(requests[members[0]].args[1], self.eot_token_id)
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for first in range(0, len(members), self.batch_size):
                batch = members[first:first + self.batch_size]
                texts = self.generate([requests[i].args[0] for i in batch], **settings)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def generate(self, contexts: Sequence[str], until: Sequence[str], max_gen_toks: int,
                 **sampling: Any) -> list[str]:
        """The continuation of each context (encoded with BOS, cut from the left to leave room for max_gen_toks),
        ending before the first stop string of `until`, at </s> or after max_gen_toks tokens."""
        room = min(self.max_length, self.model.config.context_len) - max_gen_toks
        if room < 1:
            raise InputError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length="
                             f"{self.max_length}")
        prompts = [self.tok_encode(context)[-room:] for context in contexts]
        texts = [TextStream(self.tokenizer, until, context=prompt) for prompt in prompts]
        pieces: list[list[str]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for tokens in stream(self.model, prompts, max_gen_toks, eos_id=self.eot_token_id, **sampling):
            for i, token in enumerate(tokens):
                if token is None or done[i]:
                    continue
                if token == self.eot_token_id:
                    done[i] = True
                    continue
                pieces[i].append(texts[i].push(token))
                done[i] = texts[i].stopped
            if all(done):
                break  # the rows still decoding would only produce text after their stop string
        return ["".join(p) + (t.finish() if not t.stopped else "") for p, t in zip(pieces, texts)]


def generation_settings(gen_kwargs: dict[str, Any], eos_id: int) -> dict[str, Any]:
    """`MixtralLM.generate`'s keyword arguments from a request's gen_kwargs: `until` (a string or a list), greedy
    unless do_sample (then temperature, default 1, top_p, top_k, seed), max_gen_toks. Raises InputError for an
    option we do not know, so a task never runs with settings other than its own."""
    unknown = sorted(set(gen_kwargs) - GEN_KWARGS - IGNORED_GEN_KWARGS)
    if unknown:
        raise InputError(f"generate_until options not supported by the mixtral model: {', '.join(unknown)} "
                         f"(supported: {', '.join(sorted(GEN_KWARGS))})")
    if gen_kwargs.get("num_beams", 1) != 1:
        raise InputError("beam search (num_beams > 1) is not supported by the mixtral model")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    settings: dict[str, Any] = {"until": until, "max_gen_toks": int(gen_kwargs.get("max_gen_toks",
                                                                                   DEFAULT_MAX_GEN_TOKS))}
    if gen_kwargs.get("do_sample"):
        settings.update(temperature=float(gen_kwargs.get("temperature", 1.0)),
                        top_p=float(gen_kwargs.get("top_p", 1.0)), top_k=gen_kwargs.get("top_k"),
                        seed=gen_kwargs.get("seed"))
    return settings


def run_lm_eval(argv: Sequence[str]) -> int:
    """Run lm_eval's command line with `argv` (e.g. ["--model", "mixtral", "--tasks", "hellaswag"]), this module
    imported so that "mixtral" is a registered model. Returns 0, or argparse's exit code."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(run_lm_eval(sys.argv[1:]))
