"""The benchmarks of `mixtral bench`: one module per benchmark, each a function of typed arguments that prints its
table and returns a result dict; `cli` holds their parser (`add_bench_parser`), `harness` what they share.

    moe               one MoE layer, ours vs transformers' MixtralSparseMoeBlock (`mixtral bench moe`)
    e2e               load + prefill + decode of a model, ours vs transformers (`mixtral bench e2e`)
    serve             `mixtral serve` under 1..64 concurrent clients (`mixtral bench serve`)
    load_memory       peak memory while loading, ours vs transformers (`mixtral bench load-memory`)
    quant_accuracy    int8/int4: accuracy, and the kernels' times (`mixtral bench quant-accuracy`)
    train_throughput  a training step, ours vs transformers (`mixtral bench train-throughput`)
    profile_step      where a decode step and a prefill spend their time (`mixtral bench profile`)
    gemv              one expert's linear layer at 1-16 rows, every candidate (`mixtral bench gemv`)
    cold_gemv         GEMV from a cold cache: prefetch and 2 MB pages (`mixtral bench cold-gemv`)
    amx_experts       a layer's experts on AMX, amx.c vs the path without it (`mixtral bench amx-experts`)
    batch_invariant   decode and prefill with the batch-invariant mode off and on (`mixtral bench batch-invariant`)
    structured        response_format's grammar libraries side by side on Mixtral's tokenizer (`mixtral bench
                      structured`)

The package sits above the rest of mixtral (it may import the server's metrics parser); only `mixtral.cli` imports
it.
"""
