"""Evaluation: perplexity with sliding windows, accuracy on chat tasks, and an lm-evaluation-harness adapter.

`perplexity` scores one token sequence; `corpus_perplexity` a prepared corpus per domain; `text_perplexity` text
files. `evaluate_chat` replies greedily to `ChatTask`s (read with `read_chat_tasks`) and checks each reply.
`mixtral.eval.harness` (imported on its own: it needs lm_eval) registers the model "mixtral" with lm_eval.
"""
from mixtral.eval.chat import CHECKERS, ChatRecord, ChatResult, ChatTask, evaluate_chat, read_chat_tasks
from mixtral.eval.perplexity import (PerplexityResult, combine, corpus_perplexity, perplexity, sliding_windows,
                                     text_perplexity)
from mixtral.eval.scoring import RowScore, score_rows

__all__ = ["CHECKERS", "ChatRecord", "ChatResult", "ChatTask", "PerplexityResult", "RowScore", "combine",
           "corpus_perplexity", "evaluate_chat", "perplexity", "read_chat_tasks", "score_rows", "sliding_windows",
           "text_perplexity"]
