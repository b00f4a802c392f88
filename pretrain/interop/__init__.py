"""Checkpoints in and out of this project: any layout → one process (``load``), DeepSpeed steps →
megatron's format (``deepspeed_convert``), and the weight mapping to and from transformers
(``hf_weights``); the commands are ``pretrain/export.py`` and ``pretrain/hf_import.py``."""
