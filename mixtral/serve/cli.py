"""`mixtral serve`: the OpenAI-compatible server, registered on the `mixtral` command by `add_serve_parser`.

FastAPI and uvicorn are imported when the command runs, not when the parser is built, so `mixtral --help` and the
other commands do not pay for them.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from mixtral.errors import InputError
from mixtral.io.loading import load_model_and_tokenizer

SERVE_EPILOG = """\
Loads the model once and serves it until Ctrl-C, batching all requests in flight together (continuous batching):
each engine step admits waiting requests, prefills their prompts in chunks, and decodes one token for every
running request in one forward. The KV cache (--kv-cache-memory, allocated at start) is handed out in blocks of
16 tokens as sequences grow, so it holds as many sequences as fit at their actual lengths (at most --max-batch);
full blocks are shared by prompts that start with the same tokens (prefix caching: a system prompt, earlier turns
of a chat, the n choices of one prompt are computed once). Requests beyond it wait in a queue of --max-queue
sequences, and beyond that get HTTP 429 with Retry-After. The model is called by the name given as --model unless
--served-model-name says otherwise. Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
GET /health, GET /metrics (Prometheus). With --api-key (or $MIXTRAL_API_KEY, or --api-key-file) every request
but GET /health needs `Authorization: Bearer KEY`; others get 401. See docs/serving.md.

examples:
  mixtral serve                                            # the bundled default model on 127.0.0.1:8000
  mixtral serve --model ./Mixtral-8x7B-Instruct-v0.1 --dtype bfloat16 --kv-cache-memory 4GB --max-seq-len 8192
  mixtral serve --batch-invariant                          # a request's output never depends on the others
  torchrun --nproc-per-node 2 -m mixtral serve --model ./Mixtral-8x7B-Instruct-v0.1 --parallel.ep 2
  MIXTRAL_API_KEY=sk-... mixtral serve --host 0.0.0.0                # reachable from other machines: use a key
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "default", "prompt": "The capital of France is", "max_tokens": 16}'
"""


def add_serve_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `serve` on the subparsers of the `mixtral` command; `parents` as `mixtral.cli.shared_parents`
    makes them (the model options are those of `mixtral generate`)."""
    p = subparsers.add_parser("serve", parents=[parents["verbose"], parents["model"], parents["weights"],
                                                parents["parallel"]],
                              help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a model over an OpenAI-compatible HTTP API (completions, chat, "
                                          "streaming) with continuous batching.",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EPILOG)
    http = p.add_argument_group("HTTP")
    http.add_argument("--served-model-name", metavar="NAME",
                      help="the name clients pass as \"model\" (default: the --model argument as given)")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000,
                      help="port to listen on; 0 picks a free one, printed at start (default: 8000)")
    http.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                      help="largest request body accepted; larger gets 413 (default: 1 MiB)")
    http.add_argument("--no-access-log", action="store_true", help="do not log a line per request")
    http.add_argument("--api-key", action="append", default=[], metavar="KEY",
                      help="require `Authorization: Bearer KEY` on every request but GET /health (repeatable; "
                           f"also ${API_KEY_ENV}, and --api-key-file); without any key the server is open")
    http.add_argument("--api-key-file", metavar="FILE",
                      help="more keys, one a line (blank lines and lines starting with # are skipped)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--kv-cache-memory", metavar="SIZE",
                        help="memory of the KV cache, e.g. 4GB or 512MiB: sequences are admitted while it holds "
                             "them at their actual lengths (default: what --max-batch sequences of --max-seq-len "
                             "tokens take, at most 4 GiB)")
    engine.add_argument("--max-batch", type=int, default=64, metavar="N",
                        help="sequences decoded together at most (default: 64)")
    engine.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                        help="tokens per sequence, prompt and completion together (default: the model's context, "
                             "capped at 4096)")
    engine.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="sequences waiting to run at most; beyond, requests get 429 (default: 256)")
    engine.add_argument("--no-prefix-caching", action="store_true",
                        help="compute every prompt in full, even when an earlier one started with the same tokens "
                             "(the n choices of one prompt still share its prefill)")
    engine.add_argument("--batch-invariant", action="store_true",
                        help="make each sequence's logits independent of the others in its batch, bitwise, so a "
                             "request gets the same output alone or under load (slower; see docs/serving.md)")
    engine.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                        help="prompt tokens per row prefilled in one step; longer prompts take several steps, so "
                             "running requests keep decoding meanwhile (default: 256)")
    engine.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads of the engine (default: torch's choice, one per core)")
    p.set_defaults(run=cmd_serve)
    return p


# Sequences of this length are enough for most chats; a longer context is one flag away.
DEFAULT_MAX_SEQ_LEN = 4096


API_KEY_ENV = "MIXTRAL_API_KEY"


def read_api_keys(given: list[str], path: str | None) -> list[str]:
    """The keys of --api-key, of $MIXTRAL_API_KEY and of --api-key-file, in that order, without duplicates.
    Raises InputError for an empty key or a file that cannot be read or holds none (naming the file, never a key)."""
    keys = list(given)
    if os.environ.get(API_KEY_ENV):
        keys.append(os.environ[API_KEY_ENV])
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--api-key-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise InputError(f"--api-key-file {path}: no keys in it (one a line; # starts a comment)")
        keys += found
    if any(not k.strip() or any(c.isspace() for c in k.strip()) for k in keys):
        raise InputError("an API key is empty or has spaces in it (--api-key, $MIXTRAL_API_KEY or --api-key-file)")
    return list(dict.fromkeys(k.strip() for k in keys))


def _interrupt(signum, frame) -> None:
    """SIGTERM: stop the server as Ctrl-C does."""
    raise KeyboardInterrupt


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). Raises OSError (address in use, no such host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from mixtral.config import parse_size
    from mixtral.serve.app import DEFAULT_MAX_BODY, create_app
    from mixtral.serve.engine import Engine

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_batch", "max_seq_len", "max_queue", "prefill_chunk", "threads", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    api_keys = read_api_keys(args.api_key, args.api_key_file)
    kv_memory = None if args.kv_cache_memory is None else parse_size(args.kv_cache_memory, "--kv-cache-memory")
    main = os.environ.get("RANK", "0") == "0"  # under torchrun (--parallel.ep) only rank 0 serves HTTP
    sock = bind(args.host, args.port) if main else None  # before loading: a port in use fails in a second

    def serve(model, tokenizer) -> int:
        max_seq_len = args.max_seq_len or min(model.config.context_len, DEFAULT_MAX_SEQ_LEN)
        engine = Engine(model, tokenizer, max_batch=args.max_batch, max_seq_len=max_seq_len,
                        max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, kv_cache_memory=kv_memory,
                        prefix_caching=not args.no_prefix_caching, batch_invariant=args.batch_invariant)
        engine.warm_up()
        name = args.served_model_name or args.model
        app = create_app(engine, name, max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY, api_keys=api_keys)
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="info", access_log=not args.no_access_log, timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        # The HTTP server gets a thread of its own and the engine keeps this one, the thread that loaded the model
        # (why: Engine.run). Ctrl-C and SIGTERM interrupt the engine here, which cancels what runs, then the HTTP
        # server drains and stops.
        http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mixtral-http", daemon=True)
        previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() \
            else None
        try:
            pool = engine.pool
            print(f"serving {name} on http://{host}:{port} (KV cache {engine.cache_bytes / 2 ** 20:.0f} MiB: "
                  f"{pool.n_blocks * pool.block_size} tokens, sequences of up to {engine.max_seq_len}, "
                  f"{engine.max_batch} at once; prefix caching {'on' if engine.prefix_caching else 'off'}"
                  f"{'; batch-invariant' if engine.batch_invariant else ''}; queue {engine.max_queue}; "
                  f"{torch.get_num_threads()} threads; "
                  f"{f'{len(api_keys)} API key(s) required' if api_keys else 'no API key required'})",
                  file=sys.stderr, flush=True)
            http.start()
            try:
                engine.run(keep_going=http.is_alive)
            except KeyboardInterrupt:
                return 0
            print("mixtral serve: the HTTP server stopped on its own (see its log above)", file=sys.stderr)
            return 1
        finally:
            engine.stop()
            server.should_exit = True
            if http.is_alive():
                http.join(10)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    try:
        if args.parallel_ep != 1 or os.environ.get("WORLD_SIZE", "1") != "1":
            from mixtral.config import parse_dtype
            from mixtral.parallel import inference

            return inference.run(args.model, args.parallel_ep, serve, program="serve", tokenizer=args.tokenizer,
                                 dtype=parse_dtype(args.dtype), quantize=args.quantize, max_memory=args.max_memory,
                                 progress=sys.stderr.isatty(), timeout=args.parallel_timeout)
        model, tokenizer = load_model_and_tokenizer(args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                                                    quantize=args.quantize, progress=sys.stderr.isatty(),
                                                    max_memory=args.max_memory, offload_policy=args.offload_policy,
                                                    offload_dir=args.offload_dir)
        return serve(model, tokenizer)
    finally:
        if sock is not None:
            sock.close()
