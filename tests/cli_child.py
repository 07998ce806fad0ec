"""The body of one ``python -m monai.bundle ...`` command that ``conftest.run_bundle`` runs in a process forked
from a server which imported torch, MONAI and synth7t once (``multiprocessing``'s forkserver), so a test pays the
command's work and not the ~10 s of interpreter start-up and imports each time. The command itself runs as from
the shell: its own process, working directory, environment and ``sys.argv``, the multiprocessing start method the
caller asks for (by default none chosen: the platform's default, as in a new interpreter, not the server's
forkserver, which a test asks for on purpose), ``monai.bundle``'s ``__main__`` (fire
parses the arguments), stdout and stderr at the file-descriptor level, and the interpreter's exit semantics (status 0;
``SystemExit``'s code, or its message on stderr and status 1; an uncaught exception's traceback and status 1).
"""

import multiprocessing
import os
import runpy
import sys
import traceback


def run_command(
    arguments: list, cwd: str, environment: dict, stdout_path: str, stderr_path: str, start_method: str | None = None
) -> None:
    """Run ``python -m monai.bundle <arguments>`` in this (forked) process, then leave it with the command's
    exit status, without returning. ``start_method``: the multiprocessing start method the command finds chosen
    (``None``: the platform's default, as from the shell)."""
    multiprocessing.set_start_method(start_method, force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environment)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["monai.bundle", *arguments]  # run_module puts the module's path first, as `python -m` does
    status = 0
    try:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    except SystemExit as exit_request:
        if exit_request.code is None or isinstance(exit_request.code, int):
            status = exit_request.code or 0
        else:
            print(exit_request.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: B036 -- the interpreter's own top level: report any uncaught exception
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
