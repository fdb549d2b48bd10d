"""Training: `mixtral train CONFIG.toml`.

    config.py   TrainConfig: a TOML file + `--section.key value` overrides; dense baselines from an MoE config
    losses.py   chunked cross-entropy, load-balancing loss (= transformers'), router z-loss, routing metrics
    trainer.py      the loop: AdamW, schedule, clipping, bf16 autocast, validation per domain
    checkpoints.py  atomic checkpoints (weights, optimizer, RNG) that resume exactly
    metrics.py      metrics JSONL and the PNG of the curves
    cli.py      `add_train_parser`, registered on the `mixtral` command

    from mixtral.train.config import load_config
    from mixtral.train.trainer import train
    train(load_config("configs/tiny.toml", ["--data.dir", "data/prepared"]))
"""
