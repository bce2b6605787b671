"""train_one_epoch across real gloo processes: a non-finite loss on one rank stops every rank together."""

import datetime
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.engine import train_one_epoch
from training.logger import RunLogger


class TinyNet(nn.Module):
    """(feat, logits) like TrainForward(DeepLabV3Plus), from one conv: enough for DDP's gradient all-reduce."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        logits = self.conv(x)
        return logits, logits


def _worker(rank, world, init_file, out_dir):
    # A short timeout: without the fix rank 0 would wait in the gradient all-reduce for a rank that has left.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = (torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 2), torch.arange(2))
    loader = [batch] * 3

    def loss_fn(feat, logits, mask, cls_label):
        total = logits.mean()
        if rank == 1 and scheduler.last_epoch == 1:  # the second step diverges on rank 1 only
            total = total * float("nan")
        return {"total": total}

    try:
        # log_every=1: the losses reach the host (and are checked) every step, before its update
        logger = RunLogger(Path(out_dir), is_main=False, log_every=1)
        train_one_epoch(model, loss_fn, optimizer, loader, scheduler, torch.device("cpu"), 0, logger, total_steps=3)
        outcome = "finished"
    except FloatingPointError as err:
        outcome = f"FloatingPointError at step {scheduler.last_epoch}: {err}"
    except Exception as err:  # e.g. the gloo timeout of a rank left waiting
        outcome = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    # DDP's reducer still holds the step that never reached backward(); free it before the process group,
    # and leave together, or gloo may abort at teardown ("terminate called without an active exception").
    del model, optimizer, scheduler
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_nan_loss_on_one_rank_raises_on_every_rank(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    for outcome in outcomes:
        assert outcome.startswith("FloatingPointError at step 1: non-finite loss at epoch 0, step 1"), outcome
    assert "{'total': nan} averaged over ranks" in outcomes[0]
