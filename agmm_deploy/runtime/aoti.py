"""An AOTInductor package (.pt2) written by agmm-export --runtime aoti, run with torch._inductor.aoti_load_package.

A package is compiled for one device (its kernels are C++/OpenMP for the CPU or Triton/CUDA for a GPU) and one
precision; the runner refuses another device with a sentence rather than fail inside the library. Its inputs
and logits are float32 whatever the precision inside (agmm_deploy.export.aoti.CastModel). On the CPU the
kernels run on torch's OpenMP threads (torch.set_num_threads).
"""

from __future__ import annotations

from pathlib import Path

import torch

from agmm_deploy.contract import AOTI_METADATA_KEY, read_aoti_metadata, read_aoti_package_metadata
from agmm_deploy.runtime.base import DEFAULT_MAX_BATCH, Runner, resolve_device


def missing(device: str) -> str | None:
    """None when a package can run here on ``device``; torch is all it needs (no compiler at load time)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "an AOTInductor CUDA package needs a CUDA GPU, and torch.cuda.is_available() is False here"
    return None


# AOTInductor records the instruction set a CPU package was compiled for (AOTI_CPU_ISA); torch names the one it
# runs on (torch.backends.cpu.get_cpu_capability()) in the same words.
CPU_ISA_RANK = {"DEFAULT": 0, "NO AVX": 0, "AVX2": 1, "AVX512": 2}


def cpu_isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


class AOTIRunner(Runner):
    """An AOTInductor package on the device it was compiled for; logits stay on that device."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        self.path = Path(path)
        self.meta, self.fields = read_aoti_metadata(self.path)
        package = read_aoti_package_metadata(self.path)
        # AOTInductor's own record of what it compiled for; ours says the same unless the file was tampered with.
        target = package.get("AOTI_DEVICE_KEY", self.fields.get("device", "cpu"))
        asked = target if device == "auto" else device
        if asked != target:
            raise ValueError(f"{self.path.name} is an AOTInductor package compiled for {target}, and a package "
                             f"runs only on the device it was compiled for; got device={device!r}. Run it with "
                             f"device={target!r}, or export one for {asked} (agmm-export --runtime aoti --device "
                             f"{asked})")
        if target == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{self.path.name} is an AOTInductor package for CUDA, and "
                               "torch.cuda.is_available() is False on this machine; run it on a GPU machine, or "
                               "export a CPU one (agmm-export --precision fp32 --runtime aoti --device cpu)")
        isa = package.get("AOTI_CPU_ISA", "")
        if target == "cpu" and CPU_ISA_RANK.get(isa, 0) > CPU_ISA_RANK.get(cpu_isa(), 0):
            # CPU kernels are compiled with -march=native: a package from an AVX-512 machine would die on an
            # illegal instruction here rather than raise.
            raise RuntimeError(f"{self.path.name} was compiled for {isa} CPUs, and this CPU has {cpu_isa()}; "
                               "export the package on a machine like the one that runs it")
        self.device = torch.device(resolve_device(target))
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        try:
            self.model = torch._inductor.aoti_load_package(
                str(self.path), device_index=self.device.index if self.device.index is not None else -1)
        except RuntimeError as err:
            built = self.fields.get("versions", {}).get("torch", "?")
            kind = f"compute capability {package.get('AOTI_COMPUTE_CAPABILITY')}" if target == "cuda" else isa
            raise RuntimeError(f"torch could not load the AOTInductor package {self.path} ({err}); a package runs "
                               f"with the torch that compiled it (torch {built}, here {torch.__version__}) on the "
                               f"kind of device it was compiled for ({target}, {kind}). Re-export it with "
                               "agmm-export --runtime aoti on a machine like this one") from None
        if self.model.get_metadata().get(AOTI_METADATA_KEY) is None:
            raise ValueError(f"{self.path.name}: the compiled library carries no agmm-deploy metadata; re-export it")
        self.backend = f"aoti-{self.device.type}"
        self.precision = self.fields.get("precision", "fp32")
        self.input_size = tuple(self.meta.input_size)
        self.dynamic_hw = False  # shapes other than the batch are compiled in
        dynamic_batch = self.fields.get("dynamic_batch", True)
        self.max_batch = int(self.fields.get("max_batch") or DEFAULT_MAX_BATCH) if dynamic_batch else 1

    def precision_used(self) -> str:
        """e.g. fp16 (float32 kept in head.b4,classifier) is reported as fp16,fp32=head.b4+classifier."""
        kept = self.fields.get("keep_fp32") or []
        return f"{self.precision},fp32={'+'.join(kept)}" if kept else self.precision

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32, non_blocking=True).contiguous()
        with torch.inference_mode():
            return self.model(x)


load = AOTIRunner
read_metadata = read_aoti_metadata
