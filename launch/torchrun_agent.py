"""torchrun for launch/torchrun.sh: stop signals reach the ranks, once, and they get time to save.

Two things differ from a plain ``torchrun``:

* SIGUSR1 (slurm's ``--signal`` warning) joins the signals torchrun passes on to its
  workers (``--signals_to_handle``), and the grace period before torchrun kills them
  (``--shutdown_timeout``) is long enough for a checkpoint (``SHUTDOWN_TIMEOUT``, 900 s).
* it dies with the launcher that started it (``kill -9`` of ``launch/torchrun.sh``), and the ranks
  die with it: an orphaned torchrun would train on, and a relaunch would make two writers.
* torchrun turns a signal into an exception; a second one (slurm signals every process
  of a job step, and the launcher forwards what it gets) would interrupt its wait for
  the workers and leave them unsupervised. Repeats are ignored here.
* when an elastic job's membership changes (a node joins), torchrun stops its ranks with its
  own fixed 30 s grace (``LocalElasticAgent._stop_workers``), not ``--shutdown_timeout``: a
  checkpoint that takes longer would be killed and the job would go back to the one before.
  The grace is ``--shutdown_timeout`` here too.
"""

from __future__ import annotations

import os
import sys

PARENT = os.getppid()  # read first: if the launcher is already gone, die_with_parent sees it


def _once(handler):  # noqa: ANN001, ANN202 - torchrun's private signal handler
    seen: list[int] = []

    def handle(signum, frame):  # noqa: ANN001, ANN202
        if seen:
            return
        seen.append(signum)
        handler(signum, frame)

    return handle


def stop_with_shutdown_timeout() -> None:
    """``_stop_workers`` (a membership change's restart) waits ``--shutdown_timeout`` for the ranks' save."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    if not (hasattr(LocalElasticAgent, "_stop_workers") and hasattr(LocalElasticAgent, "_shutdown")):
        return  # another torch: its own behaviour

    def _stop_workers(self, worker_group):  # noqa: ANN001, ANN202 - torchrun's private method
        self._shutdown(timeout=getattr(self, "_shutdown_timeout", 30))

    LocalElasticAgent._stop_workers = _stop_workers


def main() -> None:
    from parallel import process_hygiene

    process_hygiene.die_with_parent(PARENT)  # the launcher's shell started us from its only thread
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing import api

    if hasattr(api, "_terminate_process_handler"):
        api._terminate_process_handler = _once(api._terminate_process_handler)
    stop_with_shutdown_timeout()
    args = sys.argv[1:]
    options = {o for action in run.get_args_parser()._actions for o in action.option_strings}
    if "--signals_to_handle" in options and not any(a.startswith("--signals_to_handle") for a in args):
        args = ["--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", *args]
    if "--shutdown_timeout" in options and not any(a.startswith("--shutdown_timeout") for a in args):
        args = ["--shutdown_timeout", os.environ.get("SHUTDOWN_TIMEOUT", "900"), *args]
    run.main(args)


if __name__ == "__main__":
    main()
