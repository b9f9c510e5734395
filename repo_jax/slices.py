"""The machines a config can name (``slice:``): chips (JAX devices) and HBM per chip.

Cloud TPU names as ``gcloud compute tpus tpu-vm create --accelerator-type`` takes them: v5e is
``v5litepod-N`` (N chips of 16 GiB), v5p-N and v4-N count TensorCores (2 per chip: v5p-8 is 4
chips of 95 GiB), v6e-N counts chips (32 GiB each). GPUs: one host of N cards. ``python -m
repo_jax.plan`` checks each phase of a run against them; a run on another device count says so.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Slice:
    """A machine a config can name (``slice:``): chips (JAX devices) and HBM per chip (GiB)."""

    chips: int
    hbm_gib: float
    what: str


SLICES = {
    "v5litepod-1": Slice(1, 16, "TPU v5e, 1 chip"),
    "v5litepod-4": Slice(4, 16, "TPU v5e, 4 chips"),
    "v5litepod-8": Slice(8, 16, "TPU v5e, 8 chips"),
    "v5litepod-16": Slice(16, 16, "TPU v5e, 16 chips (4 hosts)"),
    "v5p-8": Slice(4, 95, "TPU v5p, 4 chips"),
    "v5p-16": Slice(8, 95, "TPU v5p, 8 chips (2 hosts)"),
    "v6e-4": Slice(4, 32, "TPU v6e, 4 chips"),
    "v6e-8": Slice(8, 32, "TPU v6e, 8 chips"),
    "v4-8": Slice(4, 32, "TPU v4, 4 chips"),
    "1xH100": Slice(1, 80, "one H100 80 GB"),
    "8xH100": Slice(8, 80, "8 x H100 80 GB"),
    "8xH200": Slice(8, 141, "8 x H200 141 GB"),
    "cpu": Slice(1, 16, "a laptop CPU (16 GiB of memory assumed)"),
}
COMPARE = ("v5litepod-8", "v5p-8", "8xH100")  # besides the config's own slice
