"""A description of the machine a run measured: CPU model, cores, load, framework versions."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess

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


def describe(device):
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "lscpu": lscpu(),
        "versions": versions(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    if device == "cuda":
        info["gpu"] = gpu_name()
    return info


def gpu_name():
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


def threads():
    """Intra-op thread counts the frameworks use (torch) where known."""
    out = {}
    if importlib.util.find_spec("torch") is not None:
        import torch

        out["torch_threads"] = torch.get_num_threads()
    return out
