"""`mixtral serve`: an OpenAI-compatible HTTP server over a continuous-batching engine.

    engine.py   the engine: a pool of KV-cache rows; requests join and leave the running batch at every step
    api.py      the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics
    metrics.py  the Prometheus text format
    cli.py      `mixtral serve`
    bench.py    `mixtral bench serve`: latency and throughput under 1..64 concurrent clients

Nothing is imported here, so that `mixtral --help` does not load FastAPI.
"""
