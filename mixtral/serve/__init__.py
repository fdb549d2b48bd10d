"""`mixtral serve`: an OpenAI-compatible HTTP server over a continuous-batching engine.

    engine.py      the engine: requests join and leave the running batch at every step, admitted by KV memory
    blocks.py      the KV cache in blocks: block tables, the free list, prefix caching, copy-on-write forks
    schemas.py     the request and error bodies (strict pydantic models)
    structured.py  response_format: a JSON Schema (or any JSON object) as a grammar that masks each sampled token
    openai.py      OpenAI's response shapes: completions and chat completions, whole or as server-sent events
    app.py         the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics
    metrics.py     the Prometheus text format
    cli.py         `mixtral serve`

The benchmark that drives the server (`mixtral bench serve`) is `mixtral.bench.serve`. Nothing is imported here,
so that `mixtral --help` does not load FastAPI.
"""
