"""``jaxdp train`` (the real CLI) in which process 1 dies by SIGKILL right after the checkpoint of step
``JAXDP_TEST_DIE_AFTER_STEP`` is written (all processes first wait until it is on disk). Test helper only:
``tests/test_multi_process.py`` runs it under ``jaxdp launch`` to check that a restart resumes."""
from __future__ import annotations

import os
import signal
import sys

from jaxdp import distributed as dist

dist.initialize_from_env()

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxdp.cli import main  # noqa: E402
from jaxdp.train import trainer as trainer_lib  # noqa: E402

DIE_AFTER = int(os.environ["JAXDP_TEST_DIE_AFTER_STEP"])
_save = trainer_lib.DPTrainer._save


def save_then_die(self) -> None:
    _save(self)
    if int(self.state.step) == DIE_AFTER:
        multihost_utils.sync_global_devices("checkpoint written")
        if jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGKILL)


trainer_lib.DPTrainer._save = save_then_die
sys.exit(main(sys.argv[1:]))
