"""Checkpoints in and out of this project: any layout → one process (``load``), DeepSpeed steps →
megatron's format (``deepspeed_convert``), the weight mapping to and from transformers
(``hf_weights``) and a transformers dir's safetensors files, checked and read tensor by tensor
(``safetensors_source``); the commands are ``pretrain/export.py`` and ``pretrain/hf_import.py``."""
