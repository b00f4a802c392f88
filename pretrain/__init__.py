"""The GPT model, the tasks, the one Trainer and the commands around them."""

from conf.cli import quiet_third_party

quiet_third_party()
