"""Confusion matrix, IoU and the all-reduce across real gloo processes."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agmm_deploy.metrics import ConfusionMatrix


def test_iou_by_hand_ignores_255_and_k():
    matrix = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 3, 1]])  # 255 and K=3 are not scored
    prediction = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    matrix.update(target, prediction)
    assert matrix.mat.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]
    iou = matrix.iou().tolist()
    assert iou == pytest.approx([1 / 3, 2 / 4, 0.0])
    assert matrix.miou() == pytest.approx(100 * (1 / 3 + 1 / 2 + 0) / 3)
    assert matrix.pixel_accuracy() == pytest.approx(100 * 3 / 6)
    table = matrix.table(("a", "b", "c"))
    assert "| b | 50.00 |" in table and f"**{matrix.miou():.2f}**" in table


def test_classes_never_seen_are_skipped_not_zero():
    matrix = ConfusionMatrix(4)
    matrix.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    iou = matrix.iou()
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert matrix.miou() == 100.0
    with pytest.raises(ValueError, match="differ in shape"):
        matrix.update(torch.zeros(3), torch.zeros(4))


def test_numpy_inputs_as_parity_passes_them():
    matrix = ConfusionMatrix(3)
    label = np.array([[0, 1, 255], [1, 1, 2]], np.uint8)
    matrix.update(label, np.array([[0, 1, 0], [2, 1, 2]]))
    assert matrix.pixels == 5 and matrix.mat[1, 2] == 1
    # IoU: class 0 1/1, class 1 2/3, class 2 1/2
    assert matrix.miou() == pytest.approx(100 * (1 + 2 / 3 + 1 / 2) / 3)
    empty = ConfusionMatrix(3)
    empty.update(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.int64))
    assert empty.pixels == 0 and math.isnan(empty.miou()) and math.isnan(empty.pixel_accuracy())


def test_reduce_is_a_no_op_outside_ddp():
    matrix = ConfusionMatrix(2)
    matrix.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    matrix.reduce_from_all_processes()
    assert matrix.mat.tolist() == [[1, 0], [1, 0]]


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    matrix = ConfusionMatrix(3)
    # rank 0 sees only class 0 pixels, rank 1 only class 1 and 2 pixels
    if rank == 0:
        matrix.update(torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]))
    else:
        matrix.update(torch.tensor([1, 2, 2]), torch.tensor([1, 2, 0]))
    matrix.reduce_from_all_processes()
    torch.save(matrix.mat, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_confusion_matrix_is_summed_over_ranks(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "mat")), nprocs=2, join=True)
    expected = [[2, 1, 0], [0, 1, 0], [1, 0, 1]]
    for rank in range(2):
        assert torch.load(tmp_path / f"mat.{rank}", weights_only=True).tolist() == expected
