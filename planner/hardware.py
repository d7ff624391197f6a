"""The accelerators `sf-plan` knows: dense bf16 peak, memory, HBM bandwidth and links.

Figures are the vendors' data sheets for the SXM parts in 8-GPU servers (DGX/HGX):
- h100: 989 TFLOP/s bf16 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 4 at 900 GB/s both
  directions (450 GB/s each way), one 400 Gb/s NDR InfiniBand port per GPU (50 GB/s).
- h200: the H100's compute and links, 141 GB HBM3e at 4.8 TB/s.
- a100: 312 TFLOP/s, 80 GB HBM2e at 2.0 TB/s, NVLink 3 at 600 GB/s both ways (300 each),
  one 200 Gb/s HDR port per GPU (25 GB/s).
- b200: 2,250 TFLOP/s (HGX B200, 1,000 W), 180 GB HBM3e at 8 TB/s (DGX B200: 1,440 GB and
  64 TB/s for eight), NVLink 5 at 1.8 TB/s both ways (900 each), 400 Gb/s per GPU (50 GB/s).

fp8 (`fp8_peak_flops`, dense float8 tensor-core FLOP/s, what `trainer.fp8` plans its block
matmuls at): H100 SXM and H200 1,979 TFLOP/s (the data sheets' 3,958 with sparsity, halved),
B200 4,500 (HGX B200's 9 PF sparse, halved); the A100 has no float8 tensor cores (None), so
planning fp8 on it is a ConfigError.

Bandwidths here are one direction, per GPU, in bytes per second: what a ring collective
moves through each GPU's link. `matmul_efficiency` is the fraction of peak that large bf16
GEMMs of a transformer step reach in practice (cuBLAS on these parts typically delivers
60-80% of the data-sheet peak on the shapes of 7B-400B models); it is a stated assumption of
the time model, overridable per run (`sf-plan matmul_efficiency=`).
`attention_efficiency` is the fraction of peak that attention (SDPA's FlashAttention-2
kernel, forward and backward, causal, head dim 128) reaches: about 335 TFLOP/s on an H100
SXM5 (0.35) and about 190 TFLOP/s on an A100 (0.6) in Dao 2023 ("FlashAttention-2",
figures 5-7 and the H100 benchmark); the H200 and B200 take the H100's fraction (an
assumption: no published figure for torch's kernel on them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from scaleforge.errors import ConfigError

GB = 1e9


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator and the links of its servers (bytes, FLOP/s, bytes/s)."""

    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    memory_bytes: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # one direction, per GPU, inside a node
    internode_bytes_per_s: float  # one direction, per GPU, between nodes
    matmul_efficiency: float = 0.7
    attention_efficiency: float = 0.35  # of peak_flops, SDPA's flash kernel, fwd + bwd
    fp8_peak_flops: float | None = None  # dense float8 tensor-core FLOP/s; None: no fp8


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 989e12, 80 * GB, 3.35e12, 450 * GB, 50 * GB,
                    fp8_peak_flops=1979e12),
    "h200": GpuSpec("h200", 989e12, 141 * GB, 4.8e12, 450 * GB, 50 * GB,
                    fp8_peak_flops=1979e12),
    "a100": GpuSpec("a100", 312e12, 80 * GB, 2.0e12, 300 * GB, 25 * GB,
                    attention_efficiency=0.6),
    "b200": GpuSpec("b200", 2250e12, 180 * GB, 8.0e12, 900 * GB, 50 * GB,
                    fp8_peak_flops=4500e12),
}


def gpu_spec(
    name: str,
    peak_tflops: float | None = None,
    gpu_memory_gb: float | None = None,
    nvlink_gb_per_s: float | None = None,
    internode_gb_per_s: float | None = None,
    matmul_efficiency: float | None = None,
) -> GpuSpec:
    """The table's entry for `name` with any of its figures overridden (TFLOP/s, GB, GB/s).

    Raises ConfigError for an unknown GPU or an override that is not positive (efficiency
    must lie in (0, 1]).
    """
    if name not in GPUS:
        raise ConfigError(f"gpu={name!r} is unknown; use one of {', '.join(GPUS)} (and "
                          "override its figures with peak_tflops=, gpu_memory_gb=, ...)")
    spec = GPUS[name]
    overrides = {
        "peak_tflops": peak_tflops, "gpu_memory_gb": gpu_memory_gb,
        "nvlink_gb_per_s": nvlink_gb_per_s, "internode_gb_per_s": internode_gb_per_s,
        "matmul_efficiency": matmul_efficiency,
    }
    for key, value in overrides.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if matmul_efficiency is not None and matmul_efficiency > 1:
        raise ConfigError(f"matmul_efficiency={matmul_efficiency} must lie in (0, 1]")
    return replace(
        spec,
        peak_flops=spec.peak_flops if peak_tflops is None else peak_tflops * 1e12,
        memory_bytes=spec.memory_bytes if gpu_memory_gb is None else gpu_memory_gb * GB,
        nvlink_bytes_per_s=(spec.nvlink_bytes_per_s if nvlink_gb_per_s is None
                            else nvlink_gb_per_s * GB),
        internode_bytes_per_s=(spec.internode_bytes_per_s if internode_gb_per_s is None
                               else internode_gb_per_s * GB),
        matmul_efficiency=(spec.matmul_efficiency if matmul_efficiency is None
                           else matmul_efficiency),
    )


def check_fp8_gpu(fp8: str, gpu: GpuSpec) -> None:
    """Raise ConfigError when `trainer.fp8=fp8` is planned on a GPU without float8 tensor
    cores (no `fp8_peak_flops`)."""
    if fp8 != "none" and gpu.fp8_peak_flops is None:
        with_fp8 = ", ".join(name for name, spec in GPUS.items() if spec.fp8_peak_flops)
        raise ConfigError(
            f"trainer.fp8={fp8} on gpu={gpu.name}: it has no float8 tensor cores; plan it on "
            f"one that has ({with_fp8}) or set trainer.fp8=none"
        )


def format_bytes(count: float) -> str:
    """Bytes in decimal units for reports: '1.23 GB', '456.0 MB', '12.0 kB', '512 B'."""
    for unit, size in (("TB", 1e12), ("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.{2 if unit in ('TB', 'GB') else 1}f} {unit}"
    return f"{count:.0f} B"
