"""One trainer for pretraining, SFT and DPO: launch modes, schedules, precision, checkpoints, logs, signals.

Entry point of every stage script: ``trainer.run(task, argv=None)`` (or ``Trainer(args, task).train()``);
the ``Task`` interface is documented in ``trainer/tasks.py``.
"""

from .tasks import LMTask, PretrainTask, SFTTask, Task
from .trainer import Trainer, run

__all__ = ["Task", "LMTask", "PretrainTask", "SFTTask", "Trainer", "run"]
