"""Evaluation: the project's checkpoints as an lm-eval ``LM`` (``lm_eval_model``), in-loop evaluation
of the weights being trained (``in_loop``), a fine-tuned checkpoint's classifier head
(``classifier``) and ``limit``'s seeded document sample (``samples``); ``gpt-eval`` is
``pretrain/evaluate.py``."""
