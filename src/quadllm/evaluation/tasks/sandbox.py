"""Run untrusted Python (model-written code) in a separate, confined process.

:func:`run_python` writes the program into a fresh temporary directory and runs this file as a
script in a new Python process (``python -I -B sandbox.py CONFIG``), in its own session and
process group, with stdin on ``/dev/null`` and stdout/stderr going to size-capped files. Before
the program runs, that process confines itself (Linux; each step falls back when not permitted):

- **network**: a new network namespace (``unshare(CLONE_NEWNET)``, what ``unshare --net`` does;
  only a loopback that is down), and seccomp refuses ``socket``/``socketpair``; where neither is
  possible an audit hook refuses every ``socket.*`` event (a Python-level block);
- **processes**: seccomp refuses ``fork``/``vfork``/``clone`` (threads stay allowed), namespace,
  mount, ptrace, module and reboot calls, and signals to any process but itself; without seccomp
  ``RLIMIT_NPROC`` is set to 0 (which does not bind root);
- **files**: a new mount namespace in which every mount is read-only except the temporary
  directory (``mount_setattr``, Linux >= 5.12), then a ``chroot`` into a root that holds only the
  Python installation, the shared libraries, ``/dev/null``, ``/dev/urandom`` and that directory
  (``fs``: ``python-only``; ``read-only`` where the new root cannot be built);
- **resources**: ``RLIMIT_AS`` (memory, default 1 GiB), ``RLIMIT_CPU`` (the time limit, in CPU
  seconds), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core dumps.

The parent waits at most the wall-clock limit, then kills the whole process group, and always
deletes the directory. What the confinement achieved is reported in ``SandboxResult.isolation``.
This file imports only the standard library: it is also the child's entry point.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

PROGRAM = "program.py"
_REPORT = "sandbox.json"
_DONE = ".done"
_STDOUT, _STDERR = "stdout.txt", "stderr.txt"
_EXIT_CALLED = 3  # exit status when the program raised SystemExit before finishing

#: Statuses of a run: the program finished; an ``AssertionError`` ended it; any other exception,
#: a crash or an early exit; the time limit (wall clock or CPU); a ``MemoryError``.
STATUSES = ("passed", "failed", "error", "timeout", "memory")


@dataclass
class SandboxResult:
    """Outcome of one :func:`run_python` call."""
    status: str  # one of STATUSES
    returncode: int | None  # negative: killed by that signal
    detail: str  # one line: why it did not pass ("" when it passed)
    stdout: str  # tails, truncated to max_output characters
    stderr: str
    seconds: float
    isolation: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ------------------------------------------------------------------------------- parent side


def run_python(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, cpu_seconds: float | None = None,
               max_output: int = 2000, max_file_mb: int = 16, isolation: str = "auto",
               python: str | None = None) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a confined child process (see the module docstring).

    ``timeout``: wall-clock seconds before the process group is killed; ``cpu_seconds``: CPU
    limit (default: ``timeout``); ``memory_mb``: address-space limit; ``max_output``: characters
    kept of the end of stdout and of stderr; ``isolation``: ``"auto"`` (every layer the system
    permits) or ``"fallback"`` (only the portable ones: resource limits and the audit hook, what
    a system without namespaces and seccomp gets; for tests). Never raises for anything the
    program does.
    """
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError("timeout and memory_mb must be positive")
    if isolation not in ("auto", "fallback"):
        raise ValueError(f"isolation must be 'auto' or 'fallback', got {isolation!r}")
    cpu = max(1, int(-(-(cpu_seconds if cpu_seconds is not None else timeout) // 1)))
    work = tempfile.mkdtemp(prefix="quadllm-sandbox-")
    try:
        with open(os.path.join(work, PROGRAM), "w", encoding="utf-8") as fh:
            fh.write(source)
        config = {"cpu": cpu, "memory": memory_mb << 20, "fsize": max_file_mb << 20, "isolation": isolation,
                  "program": PROGRAM}
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        t0 = time.monotonic()
        with open(os.path.join(work, _STDOUT), "wb") as out, open(os.path.join(work, _STDERR), "wb") as err:
            proc = subprocess.Popen([python or sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(config)],
                                    cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                    start_new_session=True, close_fds=True)
        if hasattr(os, "waitid"):
            timed_out = _wait_unreaped(proc.pid, t0 + timeout)
        else:  # macOS: wait() reaps the leader, so a reused group id could in principle be hit
            try:
                proc.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
        try:  # the leader is still unreaped, so its group id cannot have been reused
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        rc = proc.wait()
        seconds = time.monotonic() - t0
        stdout, stderr = _tail(os.path.join(work, _STDOUT), max_output), _tail(os.path.join(work, _STDERR), max_output)
        isolation = _read_report(os.path.join(work, _REPORT))
        done = os.path.exists(os.path.join(work, _DONE))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    status, detail = classify(rc, timed_out, done, stderr, timeout)
    return SandboxResult(status, None if timed_out else rc, detail, stdout, stderr, seconds, isolation)


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits (leaving it unreaped) or ``deadline``; True if the deadline came first."""
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        now = time.monotonic()
        if now >= deadline:
            return True
        time.sleep(min(delay, deadline - now))
        delay = min(2 * delay, 0.05)
    return False


def _tail(path: str, limit: int) -> str:
    """The last ``limit`` characters (about) of a file, marked when cut."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 4 * limit))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    if len(text) > limit or size > 4 * limit:
        return f"[... {size} bytes, truncated]\n" + text[-limit:]
    return text


def _read_report(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            report = json.load(fh)
        return {k: str(v) for k, v in report.items()} if isinstance(report, dict) else {}
    except (OSError, ValueError):
        return {}


def classify(returncode: int | None, timed_out: bool, done: bool, stderr: str, timeout: float) -> tuple[str, str]:
    """``(status, detail)`` of a finished run (see :data:`STATUSES`)."""
    if timed_out:
        return "timeout", f"wall-clock limit of {timeout:g} s"
    if returncode == 0 and done:
        return "passed", ""
    if returncode is not None and returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return "timeout", f"CPU time limit ({name})"
        return "error", f"killed by {name}"
    if returncode == _EXIT_CALLED:
        return "error", "the program called exit() before its tests finished"
    if returncode == 0:
        return "error", "the program ended the process (os._exit) before its tests finished"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if last.startswith("MemoryError"):
        return "memory", last
    if last.startswith("AssertionError"):
        return "failed", last
    return "error", last or f"exit status {returncode}"


# -------------------------------------------------------------------------------- child side

# Linux system call numbers (x86_64 / aarch64), and each architecture's AUDIT_ARCH value.
_DENIED = ("fork", "vfork", "tkill", "socket", "socketpair", "unshare", "setns", "mount", "umount2",
           "pivot_root", "chroot", "ptrace", "process_vm_writev", "pidfd_open", "pidfd_send_signal",
           "rt_sigqueueinfo", "rt_tgsigqueueinfo", "mount_setattr", "open_tree", "move_mount", "fsopen",
           "fsconfig", "fsmount", "fspick", "io_uring_setup", "bpf", "perf_event_open", "reboot",
           "kexec_load", "init_module", "finit_module", "delete_module")
_SYSCALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, dict(
        clone=56, clone3=435, fork=57, vfork=58, kill=62, tkill=200, tgkill=234, socket=41, socketpair=53,
        unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161, ptrace=101,
        process_vm_writev=311, pidfd_open=434, pidfd_send_signal=424, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297,
        mount_setattr=442, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        io_uring_setup=425, bpf=321, perf_event_open=298, reboot=169, kexec_load=246, init_module=175,
        finit_module=313, delete_module=176)),
    "aarch64": (0xC00000B7, dict(
        clone=220, clone3=435, kill=129, tkill=130, tgkill=131, socket=198, socketpair=199, unshare=97,
        setns=268, mount=40, umount2=39, pivot_root=41, chroot=51, ptrace=117, process_vm_writev=271,
        pidfd_open=434, pidfd_send_signal=424, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, mount_setattr=442,
        open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, io_uring_setup=425,
        bpf=280, perf_event_open=241, reboot=142, kexec_load=104, init_module=105, finit_module=273,
        delete_module=106)),
}
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET, _CLONE_THREAD = 0x00020000, 0x10000000, 0x40000000, 0x00010000


def seccomp_filter(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The classic-BPF seccomp program (``(code, jt, jf, k)`` rows) the child installs: refuse
    the calls in ``_DENIED``, ``clone`` unless it makes a thread (``clone3`` gets ENOSYS so the C
    library falls back to ``clone``), and ``kill``/``tgkill`` aimed at any process but ``pid``."""
    audit_arch, nr = _SYSCALLS[machine]
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    arg0, me, neg_me = 16, pid & 0xFFFFFFFF, (-pid) & 0xFFFFFFFF  # low 32 bits of args[0]
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    if machine == "x86_64":  # x32 system calls
        prog += [(jset, 0, 1, 0x40000000), (ret, 0, 0, eperm)]
    for name in _DENIED:
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, enosys)]
    prog += [(jeq, 0, 4, nr["clone"]), (ld, 0, 0, arg0), (jset, 0, 1, _CLONE_THREAD), (ret, 0, 0, allow),
             (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 6, nr["kill"]), (ld, 0, 0, arg0), (jeq, 3, 0, 0), (jeq, 2, 0, me), (jeq, 1, 0, neg_me),
             (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    prog += [(jeq, 0, 4, nr["tgkill"]), (ld, 0, 0, arg0), (jeq, 0, 1, me), (ret, 0, 0, allow), (ret, 0, 0, eperm)]
    return prog + [(ret, 0, 0, allow)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return ctypes, libc


def _namespaces(work: str) -> tuple[str, str]:
    """Enter new network and mount namespaces; make every mount but ``work`` read-only."""
    try:
        ctypes, libc = _libc()
    except (OSError, AttributeError, ImportError):
        return "none", "writable"
    for flags in (_CLONE_NEWNS | _CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET, _CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            break
    else:
        return "none", "writable"
    net = "netns"
    if not flags & _CLONE_NEWNS:
        return net, "writable"
    ms_rec, ms_private, ms_bind, at_recursive, rdonly = 0x4000, 0x40000, 0x1000, 0x8000, 1
    w = os.path.realpath(work).encode()

    def setattr_(path: bytes, recursive: bool, set_: int, clear: int) -> bool:
        attr = (ctypes.c_uint64 * 4)(set_, clear, 0, 0)
        args = [ctypes.c_long(-100), ctypes.c_char_p(path), ctypes.c_long(at_recursive if recursive else 0)]
        return libc.syscall(ctypes.c_long(442), *args, attr, ctypes.c_long(32)) == 0

    ok = (libc.mount(None, b"/", None, ms_rec | ms_private, None) == 0
          and libc.mount(w, w, None, ms_bind | ms_rec, None) == 0
          and setattr_(b"/", True, rdonly, 0) and setattr_(w, True, 0, rdonly))
    os.chdir(work)  # the old working directory lies on the (now read-only) mount below the bind
    if not ok:
        return net, "writable"
    return net, "python-only" if _hide_the_rest(libc, w) else "read-only"


def visible_paths() -> list[str]:
    """What the program may see: the Python installation (prefixes, the interpreter's directory,
    every directory on ``sys.path``) and the shared libraries, none inside another."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(sys.executable),
                  "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", *sys.path}
    dirs = sorted({os.path.realpath(p) for p in candidates if p and os.path.isdir(p)} | {
        os.path.abspath(p) for p in candidates if p and os.path.isdir(p)})
    return [d for d in dirs if d != "/" and not any(d.startswith(q.rstrip("/") + "/") for q in dirs if q != d)]


def _hide_the_rest(libc, work: bytes) -> bool:
    """``chroot`` into a new root holding only :func:`visible_paths`, ``/dev/null``,
    ``/dev/urandom`` and the program's own directory (bind mounts, read-only but that directory),
    so the program cannot read the machine's files (``/etc/shadow``, keys, tokens under the
    home directory). False, with nothing changed, where the mounts are refused."""
    ms_bind, ms_rec = 0x1000, 0x4000
    root = os.path.join(work.decode(), ".root")
    os.mkdir(root, 0o755)
    if libc.mount(b"tmpfs", root.encode(), b"tmpfs", 0, b"size=64k,mode=0755") != 0:
        return False
    for path in [*visible_paths(), work.decode()]:
        target = root + path
        os.makedirs(target, exist_ok=True)
        flags = ms_bind | (0 if path == work.decode() else ms_rec)  # not the new root inside the directory
        if libc.mount(path.encode(), target.encode(), None, flags, None) != 0:
            return False
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("/dev/null", "/dev/urandom"):
        open(root + dev, "w").close()
        if libc.mount(dev.encode(), (root + dev).encode(), None, ms_bind, None) != 0:
            return False
    ms_remount, ms_rdonly = 0x20, 0x1
    if libc.mount(b"tmpfs", root.encode(), b"tmpfs", ms_remount | ms_rdonly, b"size=64k,mode=0755") != 0:
        return False  # the new root itself read-only: only the program's directory takes writes
    os.chroot(root)
    os.chdir(work)
    return True


def _seccomp() -> bool:
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if sys.platform != "linux" or machine not in _SYSCALLS:
        return False
    rows = seccomp_filter(machine, os.getpid())

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    prog = (SockFilter * len(rows))(*[SockFilter(*r) for r in rows])
    fprog = SockFprog(len(rows), prog)
    libc = ctypes.CDLL(None, use_errno=True)
    ul = ctypes.c_ulong
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, ul(1), ul(0), ul(0), ul(0)) != 0:
        return False
    return libc.prctl(pr_set_seccomp, ul(seccomp_mode_filter), ctypes.byref(fprog), ul(0), ul(0)) == 0


def _block_sockets_hook(event: str, args: Any) -> None:
    if event.startswith("socket."):
        raise PermissionError(f"network access is disabled in the sandbox ({event})")


def _limit(res: int, soft: int, hard: int) -> None:
    """Lower a resource limit (never above the current hard limit)."""
    cur = resource.getrlimit(res)[1]
    if cur != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur), min(hard, cur)
    try:
        resource.setrlimit(res, (soft, hard))
    except (ValueError, OSError):
        pass


def _child_main(config: dict[str, Any]) -> None:
    work = os.getcwd()
    full = config["isolation"] == "auto"
    try:
        net, fs = _namespaces(work) if full else ("none", "writable")
    except Exception:  # noqa: BLE001 - any failure only means less isolation, which is reported
        net, fs = "none", "writable"
    for res, value in ((resource.RLIMIT_AS, config["memory"]), (resource.RLIMIT_FSIZE, config["fsize"]),
                       (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
        _limit(res, value, value)
    _limit(resource.RLIMIT_CPU, config["cpu"], config["cpu"] + 1)
    try:
        seccomp = full and _seccomp()
    except Exception:  # noqa: BLE001
        seccomp = False
    if not seccomp:
        _limit(resource.RLIMIT_NPROC, 0, 0)
    if seccomp:
        net = "netns+seccomp" if net == "netns" else "seccomp"
    if net == "none":
        sys.addaudithook(_block_sockets_hook)
        net = "audit-hook"
    report = {"net": net, "fs": fs, "processes": "seccomp" if seccomp else "rlimit-nproc"}
    with open(_REPORT, "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    with open(config["program"], encoding="utf-8") as fh:
        code = compile(fh.read(), config["program"], "exec")
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        print(f"SystemExit({exc.code!r}) raised by the program", file=sys.stderr)
        sys.stderr.flush()
        os._exit(_EXIT_CALLED)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(_DONE, "w"):
        pass
    os._exit(0)


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
