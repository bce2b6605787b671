"""AGMM loss speed and memory: ours (vectorised) against the official formulation written as loops.

    python benchmarks/loss_speed.py                  # speed at B=2, K=19, crop 512; memory at B=4, crop 721
    python benchmarks/loss_speed.py --skip-model     # without the (slow on CPU) network step
    git show main:training/losses.py > /tmp/old_losses.py
    python benchmarks/loss_speed.py --skip-model --baseline /tmp/old_losses.py   # against an earlier version

Speed: forward + backward of the loss alone, ours and the loop version, and of the network's own training
step (DeepLabV3+, paper's Cityscapes config) at the same size; target: the loss adds < 15 % to a step.
Memory: peak of the loss's forward and forward + backward at Cityscapes scale (B=4, K=19, crop 721,
feat 256 x 181 x 181), each measured in a fresh process: torch.cuda.max_memory_allocated on CUDA, the peak
resident set size on CPU (with glibc told to return freed blocks, so the peak is the tensors'). Target:
under 1 GB, where the official formulation materialises a (B, K, C, h, w) tensor of 2.5 GB.
The official formulation is ``training.reference_losses.official_loop_losses``, the one the tests check against.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agmm_deploy.model import ModelConfig, build_model  # noqa: E402
from training.losses import agmm_losses  # noqa: E402
from training.reference_losses import official_loop_losses  # noqa: E402


def make_inputs(batch, k, crop, device, seed=0, channels=256, requires_grad=True):
    """feat (B, 256, crop/4, crop/4), logits, a click-like sparse mask (0.2 % labelled, bottom padding)."""
    g = torch.Generator().manual_seed(seed)
    side = (crop + 3) // 4
    feat = torch.randn(batch, channels, side, side, generator=g).to(device).requires_grad_(requires_grad)
    logits = torch.randn(batch, k, crop, crop, generator=g).to(device).requires_grad_(requires_grad)
    mask = torch.full((batch, crop, crop), k, dtype=torch.long)
    clicked = torch.rand(batch, crop, crop, generator=g) < 0.002
    mask[clicked] = torch.randint(0, k, (int(clicked.sum()),), generator=g)
    mask[:, -crop // 8:] = 255  # crop padding
    cls_label = torch.zeros(batch, k)
    for i in range(batch):
        cls_label[i, mask[i][mask[i] < k].unique()] = 1
    return feat, logits, mask.to(device), cls_label.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def load_baseline(path):
    """``agmm_losses`` of another version of training/losses.py (a file), for a side-by-side timing."""
    spec = importlib.util.spec_from_file_location("baseline_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.agmm_losses


def time_interleaved(fns, device, repeats):
    """Best time of each function, the calls alternating so that a change in the machine's load hits all."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def loss_step(impl, feat, logits, mask, cls_label, k):
    def run():
        feat.grad = logits.grad = None
        impl(feat, logits, mask, cls_label, k)["total"].backward()
    return run


def memory_probe(impl_name, batch, k, crop, device_name):
    """Runs in a fresh process: peak bytes of the loss forward and forward + backward above its inputs."""
    device = torch.device(device_name)
    impl = agmm_losses if impl_name == "ours" else official_loop_losses
    feat, logits, mask, cls_label = make_inputs(batch, k, crop, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = impl(feat, logits, mask, cls_label, k)
        torch.cuda.synchronize()
        forward = torch.cuda.max_memory_allocated() - base
        out["total"].backward()
        torch.cuda.synchronize()
        both = torch.cuda.max_memory_allocated() - base
    else:
        def peak():
            # VmHWM belongs to this address space; ru_maxrss would carry the parent's peak across fork + exec.
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        base = peak()  # the inputs, and everything imported, are resident by now
        out = impl(feat, logits, mask, cls_label, k)
        forward = peak() - base
        out["total"].backward()
        both = peak() - base
    print(json.dumps({"forward": forward, "forward_backward": both}))


def measure_memory(impl_name, batch, k, crop, device):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}  # large blocks via mmap: freed memory is returned
    done = subprocess.run([sys.executable, __file__, "--memory-probe", impl_name, "--probe-batch", str(batch),
                           "--probe-crop", str(crop), "--device", str(device)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet50", help="network for the training-step comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-model", action="store_true", help="skip the network forward + backward timing")
    p.add_argument("--official-memory-batch", type=int, default=1,
                   help="batch for measuring the official formulation's memory (4 needs ~10 GB)")
    p.add_argument("--baseline", help="another version of training/losses.py to time against ours, interleaved "
                                      "(e.g. git show main:training/losses.py > /tmp/old_losses.py)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--probe-crop", type=int, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    k = 19
    if args.memory_probe:
        memory_probe(args.memory_probe, args.probe_batch, k, args.probe_crop, args.device)
        return
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    # --- speed at B=2, K=19, crop 512 (feat 256 x 128 x 128)
    feat, logits, mask, cls_label = make_inputs(2, k, 512, device)
    ours = agmm_losses(feat, logits, mask, cls_label, k)
    ref = official_loop_losses(feat, logits, mask, cls_label, k)
    diff = max(abs(float(ours[key].detach()) - float(ref[key].detach())) for key in ours)
    t_ours = time_call(loss_step(agmm_losses, feat, logits, mask, cls_label, k), device, args.repeats)
    t_loop = time_call(loss_step(official_loop_losses, feat, logits, mask, cls_label, k), device, args.repeats)
    print("\nAGMM loss forward + backward, B=2, K=19, crop 512, feat 256x128x128 (best of "
          f"{args.repeats}; terms agree to {diff:.1e})")
    print(f"  official formulation (loops) {t_loop * 1000:9.1f} ms")
    print(f"  ours (vectorised)            {t_ours * 1000:9.1f} ms   {t_loop / t_ours:5.1f}x faster")
    if args.baseline:
        old = load_baseline(args.baseline)
        before = old(feat, logits, mask, cls_label, k)
        agree = max(abs(float(ours[key].detach()) - float(before[key].detach())) for key in ours)
        t_new, t_old = time_interleaved([loss_step(agmm_losses, feat, logits, mask, cls_label, k),
                                         loss_step(old, feat, logits, mask, cls_label, k)], device,
                                        max(5, args.repeats))
        print(f"  --baseline {args.baseline}: {t_old * 1000:.1f} ms, ours {t_new * 1000:.1f} ms: "
              f"{t_old / t_new:.2f}x (best of {max(5, args.repeats)}, interleaved; terms agree to {agree:.1e})")
    if not args.skip_model:
        torch.manual_seed(0)
        net = build_model(ModelConfig.cityscapes(backbone=args.backbone)).to(device).train()
        images = torch.randn(2, 3, 512, 512, device=device)

        def model_step():
            net.zero_grad(set_to_none=True)
            f, z = net.forward_train(images)
            (f.float().mean() + z.float().mean()).backward()

        t_model = time_call(model_step, device, max(1, args.repeats - 1))
        print(f"  DeepLabV3+ {args.backbone} forward + backward {t_model * 1000:9.1f} ms")
        print(f"  the loss adds {100 * t_ours / t_model:.1f} % to a training step (target < 15 %); "
              f"the official formulation adds {100 * t_loop / t_model:.1f} %")
    del feat, logits, mask, cls_label, ours, ref

    # --- memory at Cityscapes scale: B=4, K=19, crop 721, feat 256 x 181 x 181
    big = 4 * k * 256 * 181 * 181 * 4
    print(f"\nPeak memory of the loss at B=4, K=19, crop 721, feat 256x181x181 (above its inputs, fresh process)")
    mine, error = measure_memory("ours", 4, k, 721, device)
    if mine:
        print(f"  ours (vectorised), B=4       forward {mine['forward'] / 2**30:5.2f} GB   forward+backward "
              f"{mine['forward_backward'] / 2**30:5.2f} GB   (target < 1 GB)")
    else:
        print(f"  ours: measurement failed: {error}")
    b = args.official_memory_batch
    official, error = measure_memory("official", b, k, 721, device)
    if official:
        print(f"  official formulation, B={b}    forward {official['forward'] / 2**30:5.2f} GB   forward+backward "
              f"{official['forward_backward'] / 2**30:5.2f} GB" + ("   (per image; it grows linearly with B)" if b < 4 else ""))
    else:
        print(f"  official formulation, B={b}: measurement failed: {error}")
    print(f"  the official (B, K, C, h, w) distance tensor alone at B=4: {big / 2**30:.2f} GB "
          f"({big / 1e9:.2f} GB decimal), plus the upsampled feat (B, 256, 721, 721): "
          f"{4 * 256 * 721 * 721 * 4 / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
