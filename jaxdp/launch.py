"""``jaxdp launch``: start N local processes of one multi-process JAX job (for testing on one machine).

    jaxdp launch --local-processes 2 --devices-per-process 2 -- jaxdp train --config C --out D

Each child gets ``JAXDP_COORDINATOR=127.0.0.1:<free port>``, ``JAXDP_NUM_PROCESSES=N`` and
``JAXDP_PROCESS_ID=i`` (read by :func:`jaxdp.distributed.initialize_from_env`); ``--devices-per-process K``
also gives each child K forced CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=K``,
``JAX_PLATFORMS=cpu``). A leading ``jaxdp`` in the command runs this Python's ``-m jaxdp``.

Failure behaviour: one process that exits with an error (or is killed) stops the job: the launcher terminates
the others at once (SIGTERM, then SIGKILL after ``--grace`` seconds), says which process failed, and exits with
status 1 (124 after ``--timeout``). Without the launcher (SLURM, Kubernetes), the others stop by themselves
when JAX's coordination service misses the dead process's heartbeats (``JAXDP_HEARTBEAT_TIMEOUT``).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(process_id: int, num_processes: int, port: int, devices_per_process: int | None,
              base: dict | None = None) -> dict:
    """The environment of local process ``process_id`` of ``num_processes`` (coordinator on ``port``)."""
    env = dict(os.environ if base is None else base)
    env.update(JAXDP_COORDINATOR=f"127.0.0.1:{port}", JAXDP_NUM_PROCESSES=str(num_processes),
               JAXDP_PROCESS_ID=str(process_id))
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _command(cmd: list[str]) -> list[str]:
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("launch needs a command after --, e.g. jaxdp launch --local-processes 2 -- jaxdp train "
                         "--config C --out D")
    return [sys.executable, "-m", "jaxdp"] + cmd[1:] if cmd[0] == "jaxdp" else cmd


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(cmd: list[str], num_processes: int, *, devices_per_process: int | None = None,
           port: int | None = None, timeout: float | None = None, grace: float = 10.0) -> int:
    """Run ``cmd`` as ``num_processes`` local processes of one job; the exit status of the job (see module)."""
    if num_processes < 1:
        raise ValueError(f"--local-processes must be >= 1, got {num_processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    argv = _command(list(cmd))
    port = free_port() if port is None else port
    procs = [subprocess.Popen(argv, env=child_env(i, num_processes, port, devices_per_process))
             for i in range(num_processes)]
    start = time.monotonic()
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, rc) for i, rc in enumerate(codes) if rc not in (None, 0)]
            if failed:
                i, rc = failed[0]
                print(f"jaxdp launch: process {i} {_describe(rc)}; stopping the other "
                      f"{num_processes - 1} process(es)", file=sys.stderr, flush=True)
                _stop(procs, grace)
                return 1
            if all(rc == 0 for rc in codes):
                return 0
            if timeout is not None and time.monotonic() - start > timeout:
                print(f"jaxdp launch: the job ran past --timeout {timeout:g}s; stopping all processes",
                      file=sys.stderr, flush=True)
                _stop(procs, grace)
                return 124
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs, grace)
        return 130


def _run(args) -> int:
    return launch(args.cmd, args.local_processes, devices_per_process=args.devices_per_process, port=args.port,
                  timeout=args.timeout, grace=args.grace)


def register(sub) -> None:
    p = sub.add_parser("launch", help="start N local processes of a multi-process (jax.distributed) job",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-processes", type=int, required=True, help="number of processes to start")
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="forced CPU devices per process (sets XLA_FLAGS and JAX_PLATFORMS=cpu)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=float, default=None, help="stop all processes after this many seconds")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL when stopping")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command every process runs")
    p.set_defaults(func=_run)
