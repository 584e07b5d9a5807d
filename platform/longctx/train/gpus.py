"""What we know about each GPU model: its exact CUDA device name, dense bf16 tensor-core peak and memory.

    spec = gpu_by_name(torch.cuda.get_device_name())   # exact lookup; None for a device not listed here
    spec = gpu_by_kind("h100")                          # the `--gpu` / `train.gpu_type` names

Peaks are NVIDIA's datasheet bf16 tensor-core figures *without* 2:4 sparsity (half the headline "with sparsity"
number). Lookup is by the exact name CUDA reports, never by substring: "H100" alone would give an H100 PCIe (756
TFLOP/s) or NVL (835) the SXM peak (989), and "L4" would match an L40 or L40S. A device not listed (including MIG
slices, which report "... MIG 1g.10gb") gets None: MFU is then not reported rather than reported wrong.

`memory_gib` is the total capacity CUDA reports (`torch.cuda.get_device_properties(0).total_memory`, as printed in
CUDA out-of-memory messages), a little below the marketing size; None where we have no such figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    kind: str
    """Short name (`--gpu`, `train.gpu_type`)."""
    names: tuple[str, ...]
    """Exact `torch.cuda.get_device_name()` strings of this model."""
    peak_bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    memory_gib: float | None
    """Total device memory CUDA reports, GiB."""


GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("h100", ("NVIDIA H100 80GB HBM3",), 989e12, 79.11),             # SXM5; 1,979 TF with sparsity
    GpuSpec("h100-pcie", ("NVIDIA H100 PCIe",), 756e12, None),             # 1,513 with sparsity
    GpuSpec("h100-nvl", ("NVIDIA H100 NVL",), 835e12, None),               # 1,671 with sparsity
    GpuSpec("gh200", ("NVIDIA GH200 480GB",), 989e12, None),
    GpuSpec("h200", ("NVIDIA H200",), 989e12, 139.8),                      # SXM; 141 GB HBM3e
    GpuSpec("h200-nvl", ("NVIDIA H200 NVL",), 835e12, None),
    GpuSpec("a100-80gb", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"), 312e12, 79.25),
    GpuSpec("a100-40gb", ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"), 312e12, 39.39),
    GpuSpec("l40s", ("NVIDIA L40S",), 362e12, 44.42),                      # 733 with sparsity
    GpuSpec("l40", ("NVIDIA L40",), 181e12, None),                         # 362 with sparsity
    GpuSpec("l4", ("NVIDIA L4",), 121e12, None),                           # 242 with sparsity
    GpuSpec("a10", ("NVIDIA A10",), 125e12, None),                         # 250 with sparsity
)
"""NOTE: the A10G (AWS g5) is not listed: NVIDIA publishes no datasheet peak for it."""

PLAN_KINDS = ("h100", "h200", "a100-80gb", "a100-40gb", "l40s")
"""GPU kinds `longctx plan --gpu` and `train.gpu_type` accept (those with a known memory size)."""

RESOURCE_MARKERS = {"gpu_h100": "h100", "gpu_a100": "a100-40gb"}
"""Custom resources of the shipped cluster configs (`train.resources_per_worker`) -> the GPU kind of that pool
(cluster/aws.yaml and gcp.yaml: p5.48xlarge / a3-highgpu-8g = H100 80GB; p4d.24xlarge / a2-highgpu-8g = A100 40GB)."""


def gpu_by_name(name: str) -> GpuSpec | None:
    """The spec of the device CUDA calls `name` (exact match), or None."""
    name = name.strip()
    return next((g for g in GPUS if name in g.names), None)


def gpu_by_kind(kind: str) -> GpuSpec:
    """The spec of a short name (`h100`, `a100-40gb`, ...); ValueError naming the known ones."""
    for g in GPUS:
        if g.kind == kind:
            return g
    raise ValueError(f"unknown GPU type {kind!r}; known: {', '.join(g.kind for g in GPUS)}")
