"""Training: `mixtral train CONFIG.toml`.

    config.py   TrainConfig: a TOML file + `--section.key value` overrides; dense baselines from an MoE config
    losses.py   chunked cross-entropy, load-balancing loss (= transformers'), router z-loss, routing metrics
    trainer.py  the loop, validation per domain, metrics JSONL + PNG, atomic checkpoints that resume exactly
    cli.py      `add_train_parser`, registered on the `mixtral` command

    from mixtral.train.config import load_config
    from mixtral.train.trainer import train
    train(load_config("configs/tiny.toml", ["--data.dir", "data/prepared"]))
"""
