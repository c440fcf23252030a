"""The services' side of running as a child process of `tandemrpc.launch.ServeStack` (`tandem serve`, `tandem demo`, the
end-to-end tests): each service calls `die_with_parent()` first thing, so a killed parent leaves no model server
behind. The launcher sets `PARENT_ENV` for its children; this module holds both so the services need not import the
launcher (an application).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1

PARENT_ENV = "TANDEM_DIE_WITH_PARENT"  # set by ServeStack for its children: the pid whose death should stop them


def die_with_parent() -> None:
    """Asks Linux to SIGTERM this process when its parent dies, if `PARENT_ENV` names the parent (a no-op otherwise).

    ServeStack (tandemrpc.launch) sets the variable for the services it starts, and each service calls this first thing,
    which keeps a killed `tandem serve` or test run from leaving three model servers behind. It is done here rather
    than in a `preexec_fn`: a preexec_fn makes `subprocess` fork() instead of vfork(), and gRPC's fork handlers in a
    parent that has gRPC loaded then sometimes killed the child before its exec ("epoll_wait error: Bad file
    descriptor", abort; seen once in a full test run here, and reported as grpc/grpc#43055). Linux ties this to the
    parent *thread*: start the stack from a thread that outlives it (the main thread, normally).
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
