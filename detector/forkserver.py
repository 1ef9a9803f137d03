"""`python -m detector.forkserver FD`: import torch and the detector once, then fork a process per cell.

Every cell is `python -m detector.run CELL_DIR`, and every such process spends 4-6 s importing torch,
torchvision (torch._dynamo through torchvision.ops) and the detector before its first step: on the
2-core smoke matrix about a tenth of the 30 cells' time, on a GPU a large share of a short cell. This
server pays that once per `harness run`: it imports what `detector.run` needs, then serves requests
on the socket FD that the harness (`harness.execute.forked`) passed it, forking one child per cell.
The child is the cell's process as `python -m detector.run` would make it: its own session, the
cell's output file as stdout and stderr, stdin from /dev/null, `sys.argv` as `-m` sets it, then
`runpy.run_module(..., run_name="__main__")` and the interpreter's exit (atexit handlers, exit code).

The pattern is multiprocessing's forkserver; its machinery (pickled process objects, the main module
imported again in every child, stdin closed) fits a Python function, not a command with its own
session, output file and exit code reported to a parent that never imports torch.

Safe to fork because nothing here runs a tensor operation, so no OpenMP pool and no CUDA context
exist yet (CUDA is initialised lazily, in the child). The harness forks only when the cell's whole
environment equals the one this server started with: environment variables read at import
(OMP_NUM_THREADS by libgomp, for one) then have the values a fresh process would read.

Protocol (AF_UNIX SOCK_SEQPACKET, one JSON object per message):
- server -> harness, once: `{"ready": true, "pid": P}` after the imports.
- harness -> server: `{"id": K, "module": M, "args": [...]}` with SCM_RIGHTS file descriptors: the
  first is the cell's output file, the others (the cell's lock) stay open in the child.
- server -> harness: `{"id": K, "pid": P}` once forked, `{"id": K, "exit": CODE}` once reaped
  (CODE as `subprocess.Popen.returncode`: negative for a signal).
The server exits when the harness closes its end (or dies: SIGTERM by PR_SET_PDEATHSIG); a child
still running then gets SIGTERM from its own PR_SET_PDEATHSIG, as a cell does when the harness dies.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import re
import runpy
import selectors
import signal
import socket
import sys
import traceback
from typing import Any

# What `detector.run` imports at its top and inside `run_cell`: torch, torchvision, pycocotools,
# OpenCV and the detector's modules.
PRELOAD = (
    "detector.run",
    "detector.data.coco",
    "detector.data.coco_eval",
    "detector.model.faster_rcnn",
    "detector.model.weights",
)
MAX_MESSAGE = 1 << 16
MAX_FDS = 8
REAP_EVERY_S = 0.1
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode())


def _set_pdeathsig() -> None:
    """SIGTERM this process when its parent dies, even by SIGKILL (Linux PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _run_child(sock: socket.socket, module: str, args: list[str], fds: list[int], server: int) -> None:
    """In the forked child: become the cell's process, run the module as `__main__`, exit. Never returns."""
    code = 1
    try:
        os.setsid()  # its own process group: the harness stops the cell's tree with one killpg
        _set_pdeathsig()
        if os.getppid() != server:  # the server died between fork and prctl
            os._exit(1)
        sock.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        os.close(fds[0])  # fds[1:]: the cell's lock, held open for the child's life
        sys.argv = [module, *args]  # run_module(alter_sys=True) puts the module's file first
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:  # the interpreter's rules for sys.exit(x)
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            # As the interpreter does: die by SIGINT, so that the parent sees the signal.
            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what the interpreter runs at exit (torch's, logging's); os._exit skips them
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not change the exit code
                pass
        os._exit(code & 0xFF)


def serve(sock: socket.socket) -> None:
    """Fork a child per request, report each child's pid and exit code; return when the harness
    closes its end (its cells have ended by then; if not, their PR_SET_PDEATHSIG stops them)."""
    children: dict[int, int] = {}  # pid -> request id
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    server = os.getpid()
    while True:
        if selector.select(timeout=REAP_EVERY_S):
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
            if not data:
                return
            request = json.loads(data)
            module, args = str(request["module"]), [str(a) for a in request["args"]]
            if not _MODULE.fullmatch(module) or not fds:
                _send(sock, {"id": request["id"], "error": f"bad request: module {module!r}, {len(fds)} fds"})
                for fd in fds:
                    os.close(fd)
                continue
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # or the child would write the server's pending output again
            pid = os.fork()
            if pid == 0:
                _run_child(sock, module, args, fds, server)
            for fd in fds:
                os.close(fd)
            children[pid] = request["id"]
            _send(sock, {"id": request["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            _send(sock, {"id": children.pop(pid), "exit": os.waitstatus_to_exitcode(status)})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m detector.forkserver FD (a connected AF_UNIX SOCK_SEQPACKET socket)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))
    _set_pdeathsig()
    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    if torch.cuda.is_initialized():  # a CUDA context does not survive fork; never serve from one
        print("detector.forkserver: CUDA was initialised while importing; refusing to fork", file=sys.stderr)
        return 1
    _send(sock, {"ready": True, "pid": os.getpid()})
    serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
