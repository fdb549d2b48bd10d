"""Fine-tuning a Mixtral: low-rank adapters (`lora`) on attention and on every expert, over float or quantized
(QLoRA) base weights; the SFT and DPO objectives (`losses`); conversations encoded with the replies as the
learned tokens (`data`)."""
