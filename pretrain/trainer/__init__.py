"""The one training loop (``loop.Trainer``) and what it owns: how a run starts in its run dir
(``startup``), the resume guards (``resume_checks``, ``source_changes``), the skip policy,
preemption, metrics and MFU, the preflight, and the commands' process setup (``process``)."""
