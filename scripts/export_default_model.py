"""Turn a finished `mixtral train` run into the bundled default model: bf16 weights in the Hugging Face layout,
the loss curves, and a model card with what the run measured.

    python scripts/export_default_model.py                       # out/default -> mixtral/models/default
    python scripts/export_default_model.py --run out/default --out mixtral/models/default --checkpoint step_004000

Everything in the card is read from the run itself (its config, metrics.jsonl, the corpus manifest) or computed
here (the samples, with fixed seeds), so running this again on the same run writes the same card. The directory
is written beside its destination and renamed into place.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

import torch

import mixtral
from mixtral.data.shards import read_manifest
from mixtral.io.checkpoint import save_hf
from mixtral.io.files import atomic_directory
from mixtral.train.checkpoints import latest_checkpoint

PROMPTS = {  # one per domain of the corpus, in its language
    "code": "def parse_args(argv):\n    ",
    "en": "The command line option",
    "fr": "La commande permet de",
    "de": "Der Befehl dient dazu",
    "es": "El programa permite",
    "it": "Il comando serve a",
    "math": "What is 37 + 45?",
}


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "val"]


def samples(model, tokenizer, max_new_tokens: int) -> dict[str, str]:
    out = {}
    for domain, prompt in PROMPTS.items():
        prompt_ids = tokenizer.encode(prompt)
        ids = mixtral.generate(model, [prompt_ids], max_new_tokens, temperature=0.7, top_p=0.9, seed=0)[0]
        out[domain] = tokenizer.decode(prompt_ids + ids)  # decoded together: a piece's leading space survives
    return out


def model_card(run: Path, checkpoint: Path, model, train: list[dict], val: list[dict], corpus: dict,
               texts: dict[str, str]) -> str:
    config = json.loads((run / "train_config.json").read_text())
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * c.dim * c.hidden_dim
    active = total - c.n_layers * (c.n_experts - c.top_k) * expert
    last_val = val[-1]
    step = last_val["step"]
    tokens = last_val["tokens"]
    speed = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]
    lines = [
        "# The default model of `mixtral`",
        "",
        f"A small Mixtral ({total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active per token: {c.n_experts} "
        f"experts, top-{c.top_k}) trained by this project on 2 CPU cores, with the real 32000-token Mixtral "
        "tokenizer. It is what `mixtral generate` runs when no `--model` is given. It is small and briefly trained: "
        "it writes text with the look of its corpus (code, man pages in five languages, arithmetic), not sense.",
        "",
        "## Architecture",
        "",
        f"dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads of {c.head_dim} ({c.n_kv_heads} KV heads), expert "
        f"hidden {c.hidden_dim}, {c.n_experts} experts top-{c.top_k}, vocab {c.vocab_size}, rope_theta "
        f"{c.rope_theta:g}, no sliding window, untied output head. Weights: bf16, Hugging Face layout "
        "(`transformers.MixtralForCausalLM` loads them; a test checks the logits agree).",
        "",
        "## Training",
        "",
        f"`mixtral train configs/default.toml` ({checkpoint.name}): {step} steps of "
        f"{config['train']['batch_size']} x {config['data']['seq_len']} tokens, {tokens / 1e6:.2f}M tokens seen; "
        f"AdamW lr {config['optim']['lr']:g} (warmup {config['optim']['warmup_steps']}, cosine to "
        f"{config['optim']['min_lr']:g}), weight decay {config['optim']['weight_decay']}, clip "
        f"{config['optim']['grad_clip']}, bf16 autocast, seed {config['train']['seed']}; load balancing "
        f"{config['router']['aux_loss_coef']} ({config['router']['aux_loss_mode']}), z-loss "
        f"{config['router']['z_loss_coef']}, dropless. Median speed {speed:.0f} tokens/s.",
        "",
        "![loss curves](curves.png)",
        "",
        "## Corpus",
        "",
        "Rebuilt by `python scripts/build_corpus.py` from Debian packages and a generator (docs/corpus.md).",
        "",
        "| domain | train tokens | validation tokens |",
        "|---|---|---|",
    ]
    for domain in sorted(corpus["splits"]["train"]):
        train_tokens = corpus["splits"]["train"][domain]["tokens"]
        val_tokens = corpus["splits"].get("val", {}).get(domain, {}).get("tokens", 0)
        lines.append(f"| {domain} | {train_tokens:,} | {val_tokens:,} |")
    lines += ["", f"## Held-out loss per domain (step {step})", "", "| domain | loss (nats) | perplexity |",
              "|---|---|---|"]
    for domain, r in last_val["domains"].items():
        lines.append(f"| {domain} | {r['loss']:.3f} | {r['ppl']:.1f} |")
    lines += ["", "## Samples", "",
              "Temperature 0.7, top-p 0.9, seed 0, 48 new tokens, one prompt per domain:", ""]
    for domain, text in texts.items():
        lines += [f"**{domain}**", "", "```", text, "```", ""]
    lines.append(f"Exported {datetime.date.today().isoformat()} by `python scripts/export_default_model.py`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="out/default", help="the training run's out_dir (default: out/default)")
    parser.add_argument("--out", default="mixtral/models/default", help="where the model goes")
    parser.add_argument("--checkpoint", help="a step_NNNNNN directory of the run (default: the latest)")
    args = parser.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    checkpoint = run / "checkpoints" / args.checkpoint if args.checkpoint else latest_checkpoint(run)
    if checkpoint is None or not checkpoint.is_dir():
        print(f"error: no checkpoint in {run}", file=sys.stderr)
        return 1
    model = mixtral.load(checkpoint, dtype=torch.bfloat16, progress=False)
    tokenizer = mixtral.load_tokenizer(None)
    train, val = read_metrics(run)
    val = [v for v in val if v["step"] <= int(checkpoint.name.split("_")[1])]
    config = json.loads((run / "train_config.json").read_text())
    corpus = read_manifest(config["data"]["dir"])
    with atomic_directory(out) as tmp:
        save_hf(model, tmp, dtype=torch.bfloat16)
        shutil.copy2(run / "curves.png", tmp / "curves.png")
        shutil.copy2(tokenizer.path, tmp / "tokenizer.model")  # the Mixtral tokenizer: the directory stands alone
        with torch.inference_mode():
            texts = samples(model, tokenizer, 48)
        (tmp / "README.md").write_text(model_card(run, checkpoint, model, train, val, corpus, texts))
    print(f"wrote {out}: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
