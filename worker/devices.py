"""A node's devices: which ids its GPUs (and NPUs, …) have, for the jobs that get them.

A node agent is told its device ids (``poolq node --devices GPU=0,1``), else it asks
``nvidia-smi -L`` for its GPUs, else it numbers each device resource's whole units
0..N-1. Placement then gives each job specific devices (reserve.lua), and the agent
tells the job which (``CUDA_VISIBLE_DEVICES``, ``ASCEND_RT_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import re
import shutil
import subprocess

from poolq.model import DEVICE_VARIABLES

NVIDIA_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def discover_gpus() -> list[str]:
    """The indices ``nvidia-smi -L`` lists, or none when it is absent or fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return NVIDIA_SMI_LINE.findall(done.stdout) if done.returncode == 0 else []


def parse_devices(given: list[str]) -> dict[str, list[str]]:
    """``["GPU=0,1", "NPU=4,5"]`` (the ``--devices`` flags) -> ids by resource."""
    out: dict[str, list[str]] = {}
    for item in given:
        name, eq, ids = item.partition("=")
        if not eq or name not in DEVICE_VARIABLES:
            raise ValueError(f"--devices {item!r}: give {'|'.join(DEVICE_VARIABLES)}=id,id,…")
        out[name] = [i.strip() for i in ids.split(",") if i.strip()]
    return out


def resolve(capacity: dict[str, int], given: dict[str, list[str]], discovered_gpus: list[str]) -> dict[str, list[str]]:
    """The ids of each device resource the node has: as given, else discovered (GPUs),
    else 0..N-1 for its N whole units."""
    out = {}
    for name in DEVICE_VARIABLES:
        units = capacity.get(name, 0) // 1000
        if name in given:
            out[name] = given[name]
        elif units and name == "GPU" and discovered_gpus:
            if len(discovered_gpus) < units:
                raise ValueError(f"nvidia-smi lists {len(discovered_gpus)} GPUs, not {units}: say which with --devices")
            out[name] = discovered_gpus[:units]
        elif units:
            out[name] = [str(i) for i in range(units)]
    return out
