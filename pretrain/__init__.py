"""The GPT model, the tasks, the one Trainer and the commands around them."""

import parallel  # noqa: F401  (first: megatron's fusions compile at first use, parallel/lazy_fusions.py)
from conf.cli import quiet_third_party

quiet_third_party()
