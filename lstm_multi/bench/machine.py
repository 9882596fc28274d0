"""A description of the machine a run measured: CPU model, cores, load, framework versions."""

from __future__ import annotations

import os
import platform
import subprocess
import time

#: package -> the distributions that may provide it
VERSIONED = {
    name: (name,) for name in ("numpy", "torch", "jax", "jaxlib", "flax", "equinox", "keras")
}
VERSIONED["cupy"] = ("cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x")


def lscpu():
    """lscpu's fields of interest, or {} where there is no lscpu."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    wanted = (
        "Model name",
        "CPU(s)",
        "Thread(s) per core",
        "Core(s) per socket",
        "Socket(s)",
        "L2 cache",
        "L3 cache",
        "Hypervisor vendor",
    )
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def versions():
    """Installed versions, read from package metadata (importing keras would fix its backend)."""
    from importlib import metadata

    out = {}
    for name, dists in VERSIONED.items():
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def usable_cores():
    """The cores this process may run on (its CPU affinity: taskset, a container's
    cpuset), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe(device):
    """The machine, as the parent sees it without importing a framework (the torch process
    adds its threads and, on CUDA, the GPU's name)."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "lscpu": lscpu(),
        "versions": versions(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def gpu_name():
    """The first CUDA device's name, through torch (in the torch process), or None."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


#: a share of the cores that other processes may use before the run says the machine is busy
BUSY_SHARE = 0.25


def busy_at_start(loadavg, cores):
    """A line saying the machine is busy when the 1-minute load average before the run
    (when nothing of it runs yet) is over BUSY_SHARE of the cores, else None."""
    if not loadavg or loadavg[0] <= BUSY_SHARE * cores:
        return None
    return (
        f"machine busy: load average {loadavg[0]:.2f} on {cores} core(s) before the run; "
        "times will be noisy (rows spreading over the limit are measured again, and marked "
        "noisy if they still spread)"
    )


def slowdown(loadavg, cores):
    """How much longer a run should take at this load: one thread of ours among
    ``loadavg[0]`` others gets ``cores / (load + 1)`` of a core, so (load + 1) / cores,
    at least 1."""
    if not loadavg:
        return 1.0
    return max(1.0, (loadavg[0] + 1.0) / cores)


def busy_during(others_share, where):
    """A line saying other processes took more than BUSY_SHARE of the cores during a
    group of rows (``others_share``, from ``CpuSampler``), else None."""
    if others_share is None or others_share <= BUSY_SHARE:
        return None
    return f"machine busy: other processes used {others_share:.0%} of the cores during {where}"


def _cpu_busy_seconds():
    """Seconds of CPU time every process has used since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
    values = [int(v) for v in fields[1:9]]
    busy = sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """The share of the cores other processes used between ``start`` and ``others_share``:
    (CPU time of every process - this process's) / (wall time x cores). Linux only
    (/proc/stat); None elsewhere."""

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.start()

    def start(self):
        self._wall, self._all, self._own = time.time(), _cpu_busy_seconds(), _own_seconds()

    def others_share(self):
        total = _cpu_busy_seconds()
        if total is None or self._all is None:
            return None
        wall = time.time() - self._wall
        if wall <= 0:
            return None
        others = (total - self._all) - (_own_seconds() - self._own)
        return min(max(others / (wall * self.cores), 0.0), 1.0)


def _own_seconds():
    times = os.times()
    return times.user + times.system
