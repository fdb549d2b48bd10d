"""Turn the instruct-tuning runs (SFT, then DPO) of the default model into the bundled instruct model, with a model
card that measures base -> SFT -> DPO on the held-out tasks.

    mixtral data tasks --out data/tasks
    mixtral finetune sft configs/finetune/instruct-sft.toml
    mixtral finetune dpo configs/finetune/instruct-dpo.toml
    python scripts/export_instruct_model.py          # -> mixtral/models/default-instruct (+ results.json)

What the card reports, for each of the base model, the SFT model and the DPO model:
- task accuracy: greedy replies to the held-out questions of data/tasks/eval_val.jsonl, checked as each task says
  (`mixtral.eval.evaluate_chat`), per task;
- preference accuracy: the share of held-out pairs (data/tasks/dpo_val.jsonl) whose chosen reply the model finds
  more probable than the rejected one (its own log-probabilities, no reference model).
Everything is computed here from the runs and the task files, so running it again writes the same numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import mixtral
from mixtral.eval import evaluate_chat, read_chat_tasks
from mixtral.finetune.trainer import pair_logprobs, read_pairs
from mixtral.io.files import atomic_directory, write_json, write_text
from mixtral.io.loading import load_model_and_tokenizer

SAMPLES = ["What is 48 + 27?", "What is 93 - 58?", "Calculate 7 + 65.", "What does the command `ls` do?",
           "What does the command `grep` do?", "Is 17 prime?"]


def task_accuracy(model, tokenizer, tasks_file: Path) -> dict[str, float]:
    tasks = read_chat_tasks(tasks_file)
    names = [json.loads(line).get("task", "all") for line in tasks_file.read_text().splitlines() if line.strip()]
    result = evaluate_chat(model, tokenizer, tasks, max_new_tokens=48, batch_size=32, progress=True)
    right, count = defaultdict(int), defaultdict(int)
    for name, ok in zip(names, (r.correct for r in result.records)):
        right[name] += ok
        count[name] += 1
    return {name: right[name] / count[name] for name in sorted(count)} | {"all": result.accuracy}


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs_file: Path, batch: int = 32) -> float:
    pairs, _ = read_pairs(str(pairs_file), tokenizer, 512)
    wins = 0
    for start in tqdm(range(0, len(pairs), batch), desc="preferences", leave=False):
        chosen, rejected, _, _ = pair_logprobs(model, pairs[start:start + batch])
        wins += int((chosen > rejected).sum())
    return wins / len(pairs)


def replies(model, tokenizer) -> dict[str, str]:
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in SAMPLES]
    return dict(zip(SAMPLES, mixtral.complete(model, tokenizer, prompts, 32)))


def table(results: dict[str, dict]) -> str:
    names = list(next(iter(results.values()))["tasks"])
    lines = ["| model | " + " | ".join(names) + " | preference accuracy |",
             "|---" * (len(names) + 2) + "|"]
    for model, r in results.items():
        lines.append(f"| {model} | " + " | ".join(f"{100 * r['tasks'][n]:.1f}%" for n in names)
                     + f" | {100 * r['preference']:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="the model the SFT run started from")
    parser.add_argument("--sft", type=Path, default=Path("out/instruct-sft"), help="the SFT run's out_dir")
    parser.add_argument("--dpo", type=Path, default=Path("out/instruct-dpo"), help="the DPO run's out_dir")
    parser.add_argument("--tasks", type=Path, default=Path("data/tasks"), help="what `mixtral data tasks` wrote")
    parser.add_argument("--out", type=Path, default=Path("mixtral/models/default-instruct"))
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite OUT/README.md from OUT/results.json, evaluating nothing")
    args = parser.parse_args(argv)
    if args.card_only:
        saved = json.loads((args.out / "results.json").read_text())
        write_text(args.out / "README.md",
                   card(saved["results"], saved["samples"], saved["sft"], saved["dpo"], saved["tasks"]))
        return 0

    results, samples = {}, {}
    for name, path in (("base", args.base), ("SFT", args.sft / "model"), ("SFT + DPO", args.dpo / "model")):
        model, tokenizer = load_model_and_tokenizer(str(path), dtype="float32", progress=False)
        print(f"{name}: {path}", file=sys.stderr)
        results[name] = {"model": str(path), "tasks": task_accuracy(model, tokenizer, args.tasks / "eval_val.jsonl"),
                         "preference": preference_accuracy(model, tokenizer, args.tasks / "dpo_val.jsonl")}
        samples[name] = replies(model, tokenizer)
        print(json.dumps(results[name]), file=sys.stderr)

    sft_config = json.loads((args.sft / "finetune_config.json").read_text())
    dpo_config = json.loads((args.dpo / "finetune_config.json").read_text())
    manifest = json.loads((args.tasks / "manifest.json").read_text())
    with atomic_directory(args.out) as tmp:
        for name in ("config.json", "model.safetensors", "tokenizer.model"):
            shutil.copyfile(args.dpo / "model" / name, tmp / name)
        shutil.copyfile(args.sft / "curves.png", tmp / "sft-curves.png")
        shutil.copyfile(args.dpo / "curves.png", tmp / "dpo-curves.png")
        write_json(tmp / "results.json", {"results": results, "samples": samples, "tasks": manifest,
                                          "sft": sft_config, "dpo": dpo_config})
        write_text(tmp / "README.md", card(results, samples, sft_config, dpo_config, manifest))
    print(table(results))
    return 0


def card(results: dict, samples: dict, sft: dict, dpo: dict, manifest: dict) -> str:
    s, d = sft, dpo
    sample_lines = []
    for question in SAMPLES:
        cells = (repr(samples[m][question].strip())[1:-1].replace("|", "\\|") for m in samples)
        sample_lines.append(f"| {question} | " + " | ".join(cells) + " |")
    return f"""# The instruct model of `mixtral`

The bundled default model (`mixtral/models/default`, 42.7M parameters, 8 experts, top-2) after instruction
tuning as the paper made Mixtral-Instruct: supervised fine-tuning, then Direct Preference Optimization. It is what
`mixtral chat` and `mixtral generate --chat` run without `--model`. It answers the kinds of questions it was tuned
on (arithmetic, what a command does); it is a 42.7M model trained on 2 CPU cores, not an assistant.

## Held-out results

Task accuracy: greedy replies to held-out questions (operands, commands and questions never seen in training),
checked exactly (`mixtral eval chat data/tasks/eval_val.jsonl`). Preference accuracy: the share of held-out
preference pairs whose chosen reply the model itself finds more probable than the rejected one.

{table(results)}

Counts: {', '.join(f"{t} {n}" for t, n in manifest['counts']['eval_val.jsonl'].items())} questions; one question is
0.1 points of "all", so DPO's gain over SFT is a few questions. add_sub is two numbers from 0 to 99 added or
subtracted, add_sub_3 the same from 100 to 999 (far fewer in training), math mathgen's short-answer questions; command
and function ask what a man page's command or C function does, and a held-out name was never asked about in tuning,
so those answers can only come from what the model read in pretraining.

## Recipe

```
mixtral data tasks --out data/tasks --seed {manifest.get('seed', 0)}
mixtral finetune sft configs/finetune/instruct-sft.toml
mixtral finetune dpo configs/finetune/instruct-dpo.toml
python scripts/export_instruct_model.py
```

1. SFT: {'full fine-tuning' if s['lora']['rank'] == 0 else f"LoRA rank {s['lora']['rank']}"} of `{s['model']['path']}`,
   {s['train']['steps']} steps of {s['train']['batch_size']} packed rows of {s['data']['seq_len']} tokens, AdamW lr
   {s['optim']['lr']} (warmup {s['optim']['warmup_steps']}, cosine to {s['optim']['min_lr']}), {s['train']['dtype']}
   autocast; the loss on the assistant's tokens only. Router frozen.
2. DPO: LoRA rank {d['lora']['rank']} (alpha {d['lora']['alpha']}) on the attention projections and every expert
   of the SFT model, beta {d['dpo']['beta']}, the reference the same model with its adapters off, an SFT term on the
   chosen replies of weight {d['dpo'].get('sft_weight', 0.0)}, {d['train']['steps']} steps of
   {d['train']['batch_size']} pairs, lr {d['optim']['lr']}; adapters merged. Without the SFT term the same run
   lowered the probability of the end of the reply with the rest of both replies, and greedy answers ran on past
   the number (docs/finetuning.md).

![SFT curves](sft-curves.png)
![DPO curves](dpo-curves.png)

## Samples (greedy)

| question | {' | '.join(samples)} |
|---{'|---' * len(samples)}|
{chr(10).join(sample_lines)}

Exported {datetime.date.today().isoformat()} by `python scripts/export_instruct_model.py`; the numbers are also in
`results.json`.
"""


if __name__ == "__main__":
    sys.exit(main())
