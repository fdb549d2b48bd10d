"""Build the corpus of the default model from what Debian's package manager installs, then prepare token shards.

Nothing but the package registries is reachable where the model is trained, so every domain comes from a Debian
package (or, for mathematics, from `mixtral.data.mathgen`):

    code  the Python standard library's source              libpython3.X-stdlib
    en    the Python documentation (HTML -> text),           python3-doc
          the Linux man-pages project (rendered with man),   manpages, manpages-dev
          the Debian Administrator's Handbook (en-US)        debian-handbook
    fr    man pages translated to French (rendered),         manpages-fr
    de    ... German, es Spanish, it Italian,                manpages-de, manpages-es, manpages-it
          and the Handbook, the Debian Reference, the        debian-handbook, debian-reference-XX,
          New Maintainers' Guide, the Debian FAQ, the        maint-guide-XX, debian-faq-XX (no es),
          Installation Guide and the Developer's Reference   installation-guide-ARCH,
          in that language                                   developers-reference-XX (no es)
    math  generated question-answer pairs                    mixtral.data.mathgen

Each source's files are taken in a fixed pseudo-random order (a hash of their names) until its byte cap, so a
cap keeps a spread of the source rather than its alphabetical beginning. Long prose texts are cut into parts of
about 64 kB at paragraph breaks, so that the validation split (a hash per file) draws from every book. The raw
text goes to RAW/<domain>/<source>/..., then `mixtral data prepare` writes the shards to OUT and RAW/sizes.json
records documents, bytes and tokens per domain and source (docs/corpus.md).

    python scripts/build_corpus.py                          # data/raw -> data/corpus
    python scripts/build_corpus.py --no-install --jobs 1    # packages already there; one man process at a time
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from mixtral.data import mathgen
from mixtral.data.prepare import Source, format_summary, prepare

LANGUAGES = {"fr": "fr-FR", "de": "de-DE", "es": "es-ES", "it": "it-IT"}  # domain -> Handbook folder

ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip() or "amd64"

PACKAGES = ["python3", "python3-doc", "man-db", "groff-base", "manpages", "manpages-dev", "debian-handbook",
            f"installation-guide-{ARCH}", *(f"manpages-{lang}" for lang in LANGUAGES),
            *(f"debian-reference-{lang}" for lang in LANGUAGES), *(f"maint-guide-{lang}" for lang in LANGUAGES),
            *(f"debian-faq-{lang}" for lang in ("fr", "de", "it")),
            *(f"developers-reference-{lang}" for lang in ("fr", "de", "it"))]

MB = 10 ** 6
MATH_BYTES = 8 * MB  # byte caps of the other sources are in `plan`
PART_CHARS = 64_000  # prose is cut into parts of about this many characters at paragraph breaks
MAN_WIDTH = 1000  # wide enough that a paragraph renders as one line, as prose is written


# ---- what one document is --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One input document: `load()` returns its text, or None to skip it (not UTF-8, an alias man page, empty)."""
    name: str  # unique within its source; becomes the file name
    load: Callable[[], str | None]
    split: bool = True  # cut long texts into parts (prose); code files stay whole


def _read_text(path: Path) -> str | None:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few stdlib test files are Latin-1 on purpose
        return None


def file_items(paths: list[Path], root: Path, split: bool = True) -> list[Item]:
    return [Item(str(p.relative_to(root)), lambda p=p: _read_text(p), split) for p in paths]


# ---- HTML -> text ----------------------------------------------------------------------------------------------

class HTMLText(HTMLParser):
    """The visible text of an HTML page: block elements on their own lines, <pre> kept verbatim, the rest with its
    whitespace collapsed. Elements whose class or id is in `skip` are left out (navigation, sidebars, the "¶"
    links); with `main` set, only the text inside the element with that class or role is kept."""

    BLOCKS = {"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt",
              "dd", "pre", "table", "tr", "blockquote", "br", "hr", "figure", "figcaption", "caption", "header",
              "footer", "nav", "aside", "main", "body"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "wbr"}
    HIDDEN = {"script", "style", "head", "noscript", "template", "svg"}

    def __init__(self, skip: frozenset[str] = frozenset(), main: str | None = None) -> None:
        super().__init__(convert_charrefs=True)
        self.skip, self.main = skip, main
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, hidden, inside main)
        self.out: list[str] = []
        self.pre = 0

    def _state(self) -> tuple[bool, bool]:
        return self.stack[-1][1:] if self.stack else (False, self.main is None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        hidden, inside = self._state()
        names = {a for k, v in attrs if k in ("class", "id", "role") and v for a in v.split()}
        hidden = hidden or tag in self.HIDDEN or bool(names & self.skip)
        inside = inside or (self.main is not None and self.main in names)
        if tag in self.BLOCKS:
            self._newline()
        if tag in self.VOID:
            return
        if tag == "pre":
            self.pre += 1
        self.stack.append((tag, hidden, inside))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCKS:
            self._newline()
        if not any(t == tag for t, _, _ in self.stack):
            return  # a stray end tag
        while self.stack:
            t, _, _ = self.stack.pop()
            if t == "pre":
                self.pre -= 1
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        hidden, inside = self._state()
        if hidden or not inside:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.out or self.out[-1].endswith("\n"):
                data = data.lstrip(" ")
        if data:
            self.out.append(data)

    def _newline(self) -> None:
        if self.out and not self.pre:
            self.out[-1] = self.out[-1].rstrip(" ")
        self.out.append("\n")

    def text(self) -> str:
        lines = (line.rstrip() for line in "".join(self.out).split("\n"))
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def html_text(path: Path, skip: frozenset[str], main: str | None = None) -> str | None:
    source = _read_text(path)
    if source is None:
        return None
    parser = HTMLText(skip, main)
    parser.feed(source)
    parser.close()
    text = parser.text()
    return text if text.strip() else None


# ---- man pages -> text -----------------------------------------------------------------------------------------

def render_man(path: Path) -> str | None:
    """A man page as plain UTF-8 text, as `man` shows it, without the header and footer lines; None for an alias
    page (".so other.1") or one that fails to render."""
    with gzip.open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b".so ") and len(head) < 200:
        return None
    env = {k: v for k, v in os.environ.items() if k not in ("MAN_KEEP_FORMATTING", "MANOPT", "MANROFFOPT")}
    env.update(LC_ALL="C.UTF-8", MANWIDTH=str(MAN_WIDTH))
    try:
        # --nh --nj: no hyphenation, no justification, so words are whole and single-spaced.
        result = subprocess.run(["man", "--nh", "--nj", "-E", "UTF-8", "-l", str(path)], env=env,
                                capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    try:
        lines = [line.rstrip() for line in result.stdout.decode("utf-8").split("\n")]
    except UnicodeDecodeError:
        return None
    while lines and not lines[-1]:
        lines.pop()
    lines = lines[1:-1]  # the "NAME(1)   title   NAME(1)" header and the "version  date  NAME(1)" footer
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text.strip() else None


def package_files(package: str, pattern: str) -> list[Path]:
    """The regular files (not links) a Debian package installed whose path matches `pattern`, sorted."""
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    regex = re.compile(pattern)
    return sorted(Path(p) for p in listing.split("\n")
                  if regex.search(p) and os.path.isfile(p) and not os.path.islink(p))


def man_items(packages: list[str]) -> list[Item]:
    paths = [p for package in packages for p in package_files(package, r"^/usr/share/man/.*\.gz$")]
    return [Item(str(p.relative_to("/usr/share/man")), lambda p=p: render_man(p)) for p in paths]


# ---- the sources -----------------------------------------------------------------------------------------------

def python_stdlib() -> list[Item]:
    stdlib = subprocess.run(["/usr/bin/python3", "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    root = Path(stdlib)
    paths = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts))
    return file_items(paths, root, split=False)


SPHINX_SKIP = frozenset({"headerlink", "related", "sphinxsidebar", "footer", "mobile-nav", "menu-wrapper",
                         "inline-search", "version_switcher_placeholder", "language_switcher_placeholder"})
HANDBOOK_SKIP = frozenset({"banner", "docnav", "navheader", "navfooter", "indexterm"})


def python_docs() -> list[Item]:
    root = next(Path("/usr/share/doc").glob("python3.*/html"))
    skip_names = re.compile(r"^(genindex.*|py-modindex|search|contents|download|copyright|changelog)\.html$")
    paths = sorted(p for p in root.rglob("*.html")
                   if not p.relative_to(root).parts[0].startswith("_") and not skip_names.match(p.name))
    return [Item(str(p.relative_to(root)), lambda p=p: html_text(p, SPHINX_SKIP, main="main")) for p in paths]


def handbook(folder: str) -> list[Item]:
    root = Path("/usr/share/doc/debian-handbook/html") / folder
    paths = sorted(p for p in root.glob("*.html") if p.name != "index.html")
    return [Item(p.name, lambda p=p: html_text(p, HANDBOOK_SKIP)) for p in paths]


def text_item(path: str) -> list[Item]:
    p = Path(path)
    return [Item(p.name.removesuffix(".gz"), lambda: _read_text(p))] if p.is_file() else []


def plan() -> dict[str, list[tuple[str, Callable[[], list[Item]], float | None]]]:
    """domain -> [(source name, its items, byte cap or None for all)]: the corpus, in one place."""
    domains: dict[str, list[tuple[str, Callable[[], list[Item]], float | None]]] = {
        "code": [("python-stdlib", python_stdlib, 14 * MB)],
        "en": [("python-docs", python_docs, 7 * MB),
               ("man-pages", lambda: man_items(["manpages", "manpages-dev"]), 5 * MB),
               ("debian-handbook", lambda: handbook("en-US"), 2 * MB)],
    }
    for lang, folder in LANGUAGES.items():
        domains[lang] = [
            ("man-pages", lambda lang=lang: man_items([f"manpages-{lang}"]), 8 * MB),
            ("debian-handbook", lambda folder=folder: handbook(folder), None),
            ("debian-reference", lambda lang=lang: text_item(f"/usr/share/debian-reference/"
                                                             f"debian-reference.{lang}.txt.gz"), None),
            ("maint-guide", lambda lang=lang: text_item(f"/usr/share/doc/maint-guide-{lang}/"
                                                        f"maint-guide.{lang}.txt.gz"), None),
            ("debian-faq", lambda lang=lang: text_item(f"/usr/share/doc/debian/FAQ/debian-faq.{lang}.txt.gz"), None),
            ("installation-guide", lambda lang=lang: text_item(f"/usr/share/doc/installation-guide-{ARCH}/{lang}/"
                                                               f"install.{lang}.txt.gz"), None),
            ("developers-reference", lambda lang=lang: text_item(f"/usr/share/developers-reference/{lang}/"
                                                                 f"developers-reference.txt.gz"), None),
        ]
    return domains


# ---- building --------------------------------------------------------------------------------------------------

def install(packages: list[str]) -> None:
    """apt-get install the packages that dpkg does not list as installed."""
    status = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *packages],
                            capture_output=True, text=True).stdout
    installed = {line.split()[0] for line in status.splitlines() if line.split()[1:2] == ["ii"]}
    missing = [p for p in packages if p not in installed]
    if not missing:
        return
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    if prefix and shutil.which("sudo") is None:
        sys.exit(f"error: not root and no sudo; install these first: apt-get install {' '.join(missing)}")
    print(f"installing {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*prefix, "apt-get", "update", "-q"], check=True, env=env)
    subprocess.run([*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True,
                   env=env)


def _order(items: list[Item], source: str) -> list[Item]:
    return sorted(items, key=lambda it: hashlib.blake2b(f"{source}\0{it.name}".encode(), digest_size=8).digest())


def split_parts(text: str, size: int = PART_CHARS) -> list[str]:
    """`text` cut at paragraph breaks into parts of about `size` characters; the parts joined are `text`."""
    parts, start, length = [], 0, len(text)
    while start < length:
        end = start + size
        if end >= length:
            parts.append(text[start:])
            break
        cut = text.find("\n\n", end)
        cut = length if cut < 0 else cut + 2
        parts.append(text[start:cut])
        start = cut
    return parts


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__"))


def collect(source: str, items: list[Item], cap: float | None, directory: Path, jobs: int) -> dict[str, int]:
    """Load items in the source's hash order and write them as text files under `directory` until `cap` bytes.

    Returns {"items", "files", "bytes", "skipped"}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stats = {"items": 0, "files": 0, "bytes": 0, "skipped": 0}
    ordered = _order(items, source)
    with ThreadPoolExecutor(jobs) as pool:
        for start in range(0, len(ordered), 4 * jobs):
            chunk = ordered[start:start + 4 * jobs]
            for item, text in zip(chunk, pool.map(lambda it: it.load(), chunk)):
                if cap is not None and stats["bytes"] >= cap:
                    return stats
                if text is None or not text.strip():
                    stats["skipped"] += 1
                    continue
                parts = split_parts(text) if item.split else [text]
                base = _file_name(item.name)
                for i, part in enumerate(parts):
                    name = f"{base}.txt" if len(parts) == 1 else f"{base}.part{i:03d}.txt"
                    (directory / name).write_text(part, encoding="utf-8")
                stats["items"] += 1
                stats["files"] += len(parts)
                stats["bytes"] += len(text.encode("utf-8"))
    return stats


def build_raw(raw: Path, jobs: int, seed: int, only: set[str] | None) -> dict[str, dict[str, dict[str, int]]]:
    """Write RAW/<domain>/<source>/*.txt (and RAW/math/mathgen.jsonl); returns the stats per domain and source."""
    sizes: dict[str, dict[str, dict[str, int]]] = {}
    for domain, sources in plan().items():
        if only and domain not in only:
            continue
        shutil.rmtree(raw / domain, ignore_errors=True)
        for source, items, cap in sources:
            start = time.perf_counter()
            stats = collect(source, items(), cap, raw / domain / source, jobs)
            sizes.setdefault(domain, {})[source] = stats
            print(f"{domain:<5} {source:<17} {stats['items']:>6} documents {stats['bytes'] / MB:>7.2f} MB "
                  f"({stats['skipped']} skipped) in {time.perf_counter() - start:.0f} s", flush=True)
    if not only or "math" in only:
        (raw / "math").mkdir(parents=True, exist_ok=True)
        documents, nbytes = mathgen.write_jsonl(raw / "math" / "mathgen.jsonl", seed, max_bytes=MATH_BYTES)
        sizes["math"] = {"mathgen": {"items": documents, "files": 1, "bytes": nbytes, "skipped": 0}}
        print(f"math  {'mathgen':<17} {documents:>6} documents {nbytes / MB:>7.2f} MB", flush=True)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/corpus", help="prepared shards (default: data/corpus)")
    parser.add_argument("--raw", default="data/raw", help="raw text, one folder per domain (default: data/raw)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="man/HTML conversions run at once (default: min(4, cores))")
    parser.add_argument("--seed", type=int, default=0, help="seed of the math generator (default: 0)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install missing packages")
    parser.add_argument("--skip-raw", action="store_true", help="reuse RAW as it is; only prepare the shards")
    parser.add_argument("--domains", help="comma-separated domains to rebuild in RAW (default: all)")
    # 2%, not prepare's 1%: with ~200 documents in the smallest domain, 1% would leave a few thousand tokens.
    parser.add_argument("--val-fraction", type=float, default=0.02, help="held-out share (default: 0.02)")
    args = parser.parse_args(argv)
    raw, out = Path(args.raw), Path(args.out)
    sizes_path = raw / "sizes.json"
    if not args.skip_raw:
        if not args.no_install:
            install(PACKAGES)
        only = set(args.domains.split(",")) if args.domains else None
        sizes = json.loads(sizes_path.read_text()) if only and sizes_path.is_file() else {}
        sizes.update(build_raw(raw, max(1, args.jobs), args.seed, only))
    elif sizes_path.is_file():
        sizes = json.loads(sizes_path.read_text())
    else:
        sys.exit(f"error: --skip-raw needs a built {raw} ({sizes_path} is missing)")
    domains = sorted(d for d in sizes if (raw / d).is_dir())
    sources = [Source(d, str(raw / d / "**" / ("*.jsonl" if d == "math" else "*.txt"))) for d in domains]
    manifest = prepare(sources, out, val_fraction=args.val_fraction, force=True, progress=sys.stderr.isatty())
    for domain in domains:
        sizes[domain]["_tokens"] = manifest["domains"][domain]
    raw.mkdir(parents=True, exist_ok=True)
    sizes_path.write_text(json.dumps(sizes, indent=2) + "\n")
    print(format_summary(manifest))
    print(f"wrote {out} (shards) and {sizes_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
