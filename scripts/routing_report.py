"""Regenerate the routing analysis of docs/routing.md on a model (default: the bundled default model).

Runs, in order, what `mixtral routes` offers, and writes everything the docs page shows into OUT:

    WORK/routes.npz, live.npz   routes on the held-out split of the corpus, and on live decoding (a few MB:
                                kept out of the docs)
    report/                     report.json, results.md and the plots of the held-out routes
    live-report/                the same for live decoding
    ablation.json               held-out loss per domain with each expert removed
    tokens.html, tokens.png     the token colouring page and its screenshot in headless Chromium

    python scripts/build_corpus.py           # data/corpus, once
    python scripts/routing_report.py         # -> docs/routing/ (about 10 minutes on 2 cores)
    python scripts/routing_report.py --model ./Mixtral-8x7B-v0.1 --out out/routing-8x7b --tokens-per-domain 4096

The screenshot needs Chromium (`apt-get install chromium`); without it the step is skipped with a note.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def mixtral(*args: str) -> None:
    cmd = [sys.executable, "-m", "mixtral", *args]
    print("+ mixtral " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def screenshot(page: Path, png: Path, width: int = 1100, height: int = 1500) -> bool:
    """Render `page` with headless Chromium into `png`; False (and a note) when no Chromium is installed."""
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("note: no chromium on PATH; skipping the screenshot (apt-get install chromium)", file=sys.stderr)
        return False
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()],
                   check=True, capture_output=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model to analyse (default: the bundled default model)")
    parser.add_argument("--corpus", default="data/corpus", help="prepared corpus (default: data/corpus)")
    parser.add_argument("--out", default="docs/routing", help="output directory (default: docs/routing)")
    parser.add_argument("--work", default="out/routing", help="where the route files go (default: out/routing)")
    parser.add_argument("--tokens-per-domain", default="16384", help="held-out tokens per domain (default: 16384)")
    parser.add_argument("--html-layers", default=None, help="layers of the token page (default: first, middle, last)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model = ["--model", args.model]
    mixtral("routes", "record", *model, "--corpus", args.corpus, "--tokens-per-domain", args.tokens_per_domain,
            "--out", str(work / "routes.npz"))
    mixtral("routes", "record", *model, "--corpus", args.corpus, "--generate", "64", "--prompt-len", "32",
            "--prompts-per-domain", "4", "--out", str(work / "live.npz"))
    mixtral("routes", "ablate", *model, "--corpus", args.corpus, "--out", str(out / "ablation.json"))
    mixtral("routes", "report", str(work / "routes.npz"), "--out", str(out / "report"),
            "--ablation", str(out / "ablation.json"))
    mixtral("routes", "report", str(work / "live.npz"), "--out", str(out / "live-report"))
    html = ["--layers", args.html_layers] if args.html_layers else []
    mixtral("routes", "html", str(work / "routes.npz"), "--out", str(out / "tokens.html"), "--max-tokens", "120",
            "--domain", "code", "--domain", "en", "--domain", "fr", "--domain", "math", *html)
    if screenshot(out / "tokens.html", out / "tokens.png"):
        print(f"wrote {out / 'tokens.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
