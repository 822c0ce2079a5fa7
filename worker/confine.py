"""The kernel's side of the sandbox (worker/sandbox.py): a process confines itself, for good, to the
files it is given, with no network, and with resource limits. Linux only; no privileges needed.

- Landlock (Linux 5.13+, when the kernel enables the "landlock" LSM): every file-system access
  outside the granted paths is refused, and so, from ABI 4 (Linux 6.7), are TCP bind/connect,
  and from ABI 6 (Linux 6.12), abstract Unix sockets and signals to processes outside the sandbox.
  A Landlock domain also cannot ptrace or read /proc/PID/environ of processes outside it.
- seccomp: ``socket`` (so no network of any kind, on any kernel), io_uring (which could open
  sockets without the socket syscall), ptrace, process_vm_readv/writev and truncate-by-path fail
  with EPERM.
- rlimits: CPU seconds, address space, no core dumps.

Both Landlock and seccomp act on the calling thread and what it starts later, so ``confine``
must run while the process has one thread: before torch or anything else starts threads.
Landlock and seccomp are reached through ctypes, as the standard library has neither.
"""

import ctypes
import errno
import os
import platform
import resource
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Landlock, from <linux/landlock.h>. The syscall numbers are the same on every architecture.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# The rights each ABI knows about; handling all of them means refusing all that are not granted.
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1,
                    5: (1 << 16) - 1}
# Rights that make sense on a file (rather than a directory) in a rule.
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

READ = FS_READ_FILE | FS_READ_DIR | FS_EXECUTE
DEVICE = FS_READ_FILE | FS_WRITE_FILE | FS_IOCTL_DEV
EVERYTHING = (1 << 16) - 1

# What every engine process reads besides Python and its packages (given by the caller): shared
# libraries, CPU and memory facts, and what the NVIDIA driver reads while CUDA starts.
SYSTEM_READ = ("/usr/lib", "/usr/lib64", "/usr/local/lib", "/lib", "/lib64", "/etc/ld.so.cache",
               "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/sys", "/proc/cpuinfo",
               "/proc/meminfo", "/proc/stat", "/proc/devices", "/proc/sys/kernel", "/proc/sys/vm",
               "/proc/driver/nvidia", "/proc/driver/nvidia-uvm", "/dev/urandom", "/dev/random")
# Its own /proc entries, also to write: CUDA names its threads in /proc/self/task/TID/comm (and
# fails to start when it cannot). Granted from inside the process, so "self" is this process.
OWN_PROC = "/proc/self"
# Devices it may also write: the bit buckets, and the GPUs (CUDA talks to them with ioctls).
DEVICE_PREFIXES = ("nvidia", "dri")
DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/full")

# seccomp, from <linux/seccomp.h>, <linux/filter.h> and <linux/audit.h>.
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_PDEATHSIG = 38, 22, 1
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
X32_SYSCALL_BIT = 0x40000000
# Per architecture: its audit id, and the numbers of the syscalls the filter refuses (socket,
# io_uring_setup/enter/register, ptrace, process_vm_readv/writev, truncate).
SECCOMP_TARGETS = {
    "x86_64": (0xC000003E, (41, 425, 426, 427, 101, 310, 311, 76)),
    "aarch64": (0xC00000B7, (198, 425, 426, 427, 117, 270, 271, 45)),
}

# Elsewhere (macOS) these syscall numbers mean other things: nothing here is called there.
LINUX = sys.platform == "linux"
libc = ctypes.CDLL(None, use_errno=True)
if LINUX:
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel's header
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


@dataclass
class Confinement:
    """What ``confine`` managed to apply; ``missing`` says what it could not, and why."""

    landlock_abi: int = 0  # 0: no Landlock
    seccomp: bool = False
    rlimits: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Files and network both confined: what BAERASE_SANDBOX_REQUIRED asks for."""
        return self.landlock_abi >= 1 and self.seccomp

    def describe(self) -> str:
        parts = []
        if self.landlock_abi:
            extras = [name for abi, name in ((4, "TCP"), (6, "abstract sockets and signals"))
                      if self.landlock_abi >= abi]
            parts.append(f"Landlock ABI {self.landlock_abi} (files" + "".join(f", {e}" for e in extras) + ")")
        if self.seccomp:
            parts.append("seccomp (no sockets)")
        parts += self.rlimits
        text = ", ".join(parts) or "nothing"
        return text + ("; missing: " + "; ".join(self.missing) if self.missing else "")


def landlock_abi() -> tuple[int, str]:
    """The kernel's Landlock ABI version (0: none) and, when 0, why."""
    if not LINUX:
        return 0, f"Landlock exists only on Linux, not on {sys.platform}"
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi >= 0:
        return int(abi), ""
    code = ctypes.get_errno()
    reasons = {errno.ENOSYS: "the kernel has no Landlock (Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK)",
               errno.EOPNOTSUPP: "Landlock is built in but not enabled (add landlock to the lsm= boot parameter)",
               errno.EPERM: "a seccomp profile refuses the Landlock syscalls (Docker before 23.0?)"}
    return 0, reasons.get(code, f"landlock_create_ruleset failed: {os.strerror(code)}")


def confine(read: list[Path], write: list[Path], memory_bytes: int | None = None,
            cpu_time_s: float | None = None) -> Confinement:
    """Confines this process (and what it starts) to reading ``read`` and the system files the
    engine needs, and writing ``write``; refuses sockets; applies the limits. Irreversible."""
    result = Confinement()
    set_rlimits(result, memory_bytes, cpu_time_s)
    if not LINUX:
        result.missing.append(f"Landlock and seccomp exist only on Linux, not on {sys.platform}")
        return result
    # Both Landlock and seccomp filters need this without CAP_SYS_ADMIN; it also keeps setuid
    # programs from gaining privileges.
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        result.missing.append(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
        return result
    apply_landlock(result, read, write)
    apply_seccomp(result)
    return result


def set_rlimits(result: Confinement, memory_bytes: int | None, cpu_time_s: float | None) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not dump the model's memory
    if cpu_time_s:
        seconds = max(1, int(cpu_time_s))
        # SIGXCPU at the soft limit (ends the process), SIGKILL a little later if it is caught.
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 5))
        result.rlimits.append(f"{seconds} CPU seconds")
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        result.rlimits.append(f"{memory_bytes / 1024**3:.1f} GiB address space")


def apply_landlock(result: Confinement, read: list[Path], write: list[Path]) -> None:
    abi, why = landlock_abi()
    if abi == 0:
        result.missing.append(why)
        return
    handled_fs = FS_RIGHTS_BY_ABI[min(abi, 5)]
    attr = RulesetAttr(handled_fs, 0, 0)
    size = 8  # ABI 1-3 know only handled_access_fs
    if abi >= 4:
        attr.handled_access_net, size = NET_BIND_TCP | NET_CONNECT_TCP, 16  # no TCP rule: none at all
    if abi >= 6:
        attr.scoped, size = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL, 24
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        result.missing.append(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
        return
    try:
        grants = [(Path(p), READ) for p in SYSTEM_READ] + [(p, READ) for p in read]
        grants.append((Path(OWN_PROC), READ | FS_WRITE_FILE))
        grants += [(p, EVERYTHING) for p in write] + [(Path(p), DEVICE) for p in DEVICE_FILES]
        grants += [(p, DEVICE) for p in gpu_devices()]
        for path, rights in grants:
            add_path_rule(ruleset, path, rights & handled_fs)
    except OSError as e:  # nothing is restricted yet: say so rather than half-apply the rules
        os.close(ruleset)
        result.missing.append(str(e))
        return
    try:
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            result.missing.append(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
            return
    finally:
        os.close(ruleset)
    result.landlock_abi = abi


def add_path_rule(ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:  # absent on this system (/lib64, /proc/driver/nvidia, ...): nothing to grant
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        rule = PathBeneathAttr(rights, fd)
        if libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                        ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def gpu_devices() -> list[Path]:
    dev = Path("/dev")
    try:
        return [p for p in dev.iterdir() if p.name.startswith(DEVICE_PREFIXES)]
    except OSError:
        return []


def apply_seccomp(result: Confinement) -> None:
    target = SECCOMP_TARGETS.get(platform.machine())
    if target is None:
        result.missing.append(f"seccomp filter: no syscall table for {platform.machine()}")
        return
    try:
        deny_syscalls(target[1])
    except OSError as e:
        result.missing.append(f"seccomp filter: {e.strerror}")
        return
    result.seccomp = True


def deny_syscalls(numbers: tuple[int, ...]) -> None:
    """Makes these syscalls (by this architecture's numbers) fail with EPERM in this process and
    all it starts, for good."""
    arch = SECCOMP_TARGETS[platform.machine()][0]
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    # A classic BPF program over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}.
    # Syscalls of another ABI (i386 through int 0x80, x32) are refused outright: their numbers
    # differ, so the checks below would not catch their socket().
    program = [(BPF_LD_W_ABS, 0, 0, 4),  # arch
               (BPF_JEQ_K, 1, 0, arch),
               (BPF_RET_K, 0, 0, deny),
               (BPF_LD_W_ABS, 0, 0, 0),  # nr
               (BPF_JGE_K, len(numbers) + 1, 0, X32_SYSCALL_BIT)]
    program += [(BPF_JEQ_K, len(numbers) - i, 0, nr) for i, nr in enumerate(numbers)]
    program += [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, deny)]
    filters = (SockFilter * len(program))(*(SockFilter(*instruction) for instruction in program))
    fprog = SockFprog(len(program), filters)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
            PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.cast(ctypes.byref(fprog), ctypes.c_void_p).value, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def die_with_parent(parent_pid: int) -> None:
    """Asks the kernel to kill this process when its parent dies (a worker killed by Celery's hard
    time limit, or by the OOM killer), so that no engine runs on unsupervised."""
    if not LINUX:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)
