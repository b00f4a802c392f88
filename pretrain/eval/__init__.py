"""Evaluation: the project's checkpoints as an lm-eval ``LM`` (``lm_eval_model``) and in-loop
evaluation of the weights being trained (``in_loop``); ``gpt-eval`` is ``pretrain/evaluate.py``."""
