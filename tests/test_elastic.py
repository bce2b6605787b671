"""Training on a real cluster, on the CPU with gloo: mid-epoch checkpoints and exact resumes after kill -9 and
SIGTERM, torchrun's restarts after a lost rank, two nodes on one machine, a node that never joins, a full disk
during a mid-epoch save, non-finite weights never written, and what a resume says about changed settings."""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agmm_deploy.checkpoint import read_checkpoint
from training import preemption, run, synthetic
from training.config import ConfigError
from training.engine import poly_factor
from training.preemption import EXIT_PREEMPTED, StopSignals
from training.resume import resume_point

REPO = Path(__file__).resolve().parents[1]
PREEMPTED = "checkpoint written: rerun the same command to continue"


@pytest.fixture(scope="module")
def city_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("city")
    synthetic.generate("cityscapes", root, num_train=8, num_val=2, height=48, width=96, seed=0, progress=False)
    return root


def tiny_args(root, out, *extra):
    return ["--dataset", "cityscapes", "--clicks", "20", "--data-root", str(root), "--out", str(out),
            "--pretrained", "none", "--backbone", "resnet18", "--crop-size", "32", "--batch-size", "2", "--workers",
            "0", "--device", "cpu", "--max-val-images", "2", "--eval-mode", "center", "--log-every", "1", *extra]


def training(root, out, *extra):
    return [sys.executable, "-m", "training.run", *tiny_args(root, out, *extra)]


def torchrun(*launch):
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "training.run"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def metrics_by_step(out):
    records = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["step"] not in records, f"step {record['step']} logged twice"
        records[record["step"]] = record
    return records


def wait_for(condition, proc, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


def logged_step(out, step):
    path = Path(out) / "metrics.jsonl"
    return lambda: path.is_file() and f'"step": {step},' in path.read_text()


@pytest.mark.slow
def test_kill_9_and_sigterm_mid_epoch_then_resume_reproduce_the_straight_run_step_for_step(city_root, tmp_path):
    flags = ("--epochs", "3", "--eval-every", "3", "--save-every", "2")  # 12 steps, 4 per epoch
    straight = tmp_path / "straight"
    subprocess.run(training(city_root, straight, *flags), env=env(), check=True, capture_output=True, timeout=300)

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(training(city_root, out, *flags), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for((out / "last.pt").is_file, proc, 240, "the first mid-epoch checkpoint")
    proc.kill()  # kill -9: no handler runs
    assert proc.wait() == -9
    killed = read_checkpoint(out / "last.pt")
    assert killed["mid_epoch"] and killed["epoch"] == 0 and killed["step"] == 2, killed["step"]
    assert killed["epoch_images"] == 2 * killed["step"] and killed["world_size"] == 1

    # the same command with --resume auto, stopped by SIGTERM in epoch 1: exit 75 and one line
    proc = subprocess.Popen(training(city_root, out, *flags, "--resume", "auto"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(logged_step(out, 6), proc, 240, "step 6")
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_PREEMPTED, output[-2000:]
    stopped = read_checkpoint(out / "last.pt")
    assert 6 <= stopped["step"] < 12 and stopped["mid_epoch"]
    log = (out / "train.log").read_text()
    assert log.count(PREEMPTED) == 1
    assert f"preempted at step {stopped['step']} (SIGTERM), {PREEMPTED}" in log
    assert f"resumed from {out / 'last.pt'}: step {killed['step']}, image {killed['step'] * 2} of epoch 0" in log

    done = subprocess.run(training(city_root, out, *flags, "--resume", "auto"), env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    expected, got = metrics_by_step(straight), metrics_by_step(out)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in range(1, 13):  # the very same batches, dropout draws and updates, across both interruptions
        for key in ("total", "seg", "cls", "proto", "gmm", "lr"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)
    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(out / "last.pt")
    assert a["step"] == b["step"] == 12 and not b["mid_epoch"]
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_second_signal_exits_at_once_but_a_repeated_notice_does_not(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", lambda code: exits.append(code))
    clock = [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
    before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: ray.init (an earlier test module) sets one
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM" and exits == []
        clock[0] += 0.5  # torchrun forwarding the same notice, or a scheduler signalling the whole group
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == []
        clock[0] += preemption.SAME_NOTICE_S + 1
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is before  # restored


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_within_10_s_and_the_rerun_continues(city_root, tmp_path):
    out = tmp_path / "ddp"
    command = torchrun("--standalone", "--nproc-per-node", "2") + tiny_args(
        city_root, out, "--epochs", "10", "--max-steps", "12", "--eval-every", "100", "--save-every", "0")
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(logged_step(out, 2), proc, 240, "step 2")
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both workers
    signalled = time.time()
    # The workers exit 75; torchrun, signalled itself, ends with its own SignalException: exit code 1.
    assert proc.wait(timeout=60) == 1
    assert time.time() - signalled < 10
    ckpt = read_checkpoint(out / "last.pt")
    assert ckpt["mid_epoch"] and ckpt["world_size"] == 2 and 2 <= ckpt["step"] < 12
    log = (out / "train.log").read_text()
    assert log.count(PREEMPTED) == 1 and f"preempted at step {ckpt['step']} (SIGTERM)" in log  # rank 0 alone

    done = subprocess.run(command + ["--resume", "auto"], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert read_checkpoint(out / "last.pt")["step"] == 12
    assert sorted(metrics_by_step(out)) == list(range(1, 13))
    assert "parameters identical on all 2 ranks: True" in (out / "train.log").read_text()


@pytest.mark.slow
def test_max_restarts_resumes_by_itself_after_one_rank_is_killed(city_root, tmp_path):
    out = tmp_path / "elastic"
    command = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1") + tiny_args(
        city_root, out, "--epochs", "4", "--eval-every", "100", "--save-every", "1", "--resume", "auto")
    # Without it torchrun's restarted workers may read the previous attempt's gloo addresses from the store it
    # shares with them and fail to connect (pytorch/pytorch#135712); docs/training-cluster.md says so too.
    restartable = {**env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(command, env=restartable, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for((out / "last.pt").is_file, proc, 240, "the first checkpoint")
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    rank1 = next(pid for pid in workers if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(int(rank1), signal.SIGKILL)
    assert proc.wait(timeout=300) == 0  # torchrun restarted both workers, which resumed from last.pt
    log = (out / "train.log").read_text()
    assert f"resumed from {out / 'last.pt'}: step " in log
    assert read_checkpoint(out / "last.pt")["step"] == 8 and sorted(metrics_by_step(out)) == list(range(1, 9))
    assert "parameters identical on all 2 ranks: True" in log


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_to_the_weights_of_one_node(city_root, tmp_path):
    flags = ("--epochs", "2", "--max-steps", "3")  # 2 processes x batch 2: 2 steps per epoch
    one = tmp_path / "one_node"
    subprocess.run(torchrun("--standalone", "--nproc-per-node", "2") + tiny_args(city_root, one, *flags), env=env(),
                   check=True, capture_output=True, timeout=300)
    two = tmp_path / "two_nodes"
    port = 29400 + os.getpid() % 500
    nodes = [subprocess.Popen(torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                       "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                       "--rdzv-id", "two-nodes") + tiny_args(city_root, two, *flags),
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    for node in nodes:
        output = node.communicate(timeout=300)[0]
        assert node.returncode == 0, output[-3000:]
    a, b = read_checkpoint(one / "last.pt"), read_checkpoint(two / "last.pt")
    assert a["step"] == b["step"] == 3 and b["world_size"] == 2
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert b["miou"] == pytest.approx(a["miou"])
    log = (two / "train.log").read_text()
    # both validation images (one per node) in the matrix: 2 x 32 x 32 centre-crop pixels, all-reduced
    assert log.count("epoch 1 validation, mode center") == 1 and "2048 labelled pixels" in log
    assert log.count("epoch 0 done") == 1 and "parameters identical on all 2 ranks: True" in log
    assert sorted(p.name for p in two.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl",
                                                     "tensorboard", "train.log"]
    assert len(list((two / "tensorboard").iterdir())) == 1 and sorted(metrics_by_step(two)) == [1, 2, 3]


def test_a_node_that_never_joins_stops_the_other_within_the_rendezvous_timeout(city_root, tmp_path):
    port = 29900 + os.getpid() % 90
    started = time.time()
    alone = subprocess.run([sys.executable, "-m", "training.launch", "--nnodes", "2", "--nproc-per-node", "1",
                            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lonely",
                            "--rdzv-conf", "join_timeout=5", "-m", "training.run",
                            *tiny_args(city_root, tmp_path / "alone", "--epochs", "1")],
                           env=env(), capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2, alone.stderr[-2000:]
    assert alone.stderr.strip().splitlines()[-1] == (
        f"error: the rendezvous at 127.0.0.1:{port} (--rdzv-id lonely) timed out after 5 s with fewer than --nnodes "
        "2 node(s) joined. Start the same command on the other nodes (same --rdzv-endpoint and --rdzv-id), or set "
        "--rdzv-conf join_timeout=SECONDS")
    assert time.time() - started < 5 + 60  # the timeout plus the start-up, never a hang
    assert not (tmp_path / "alone").exists()  # no worker started


def _limit_file_size(limit):
    def limit_in_child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_in_child


def test_a_full_disk_during_a_mid_epoch_save_keeps_the_previous_last_pt(city_root, tmp_path):
    out = tmp_path / "run"
    assert run.cli(tiny_args(city_root, out, "--epochs", "1", "--max-steps", "1")) == 0
    before = hashlib.sha256((out / "last.pt").read_bytes()).hexdigest()
    # Files may grow to 1 MiB (logs, metrics, TensorBoard), a checkpoint (134 MB) cannot: the disk is "full".
    resumed = subprocess.run(training(city_root, out, "--epochs", "1", "--max-steps", "3", "--save-every", "1",
                                      "--resume", "auto"), env=env(), capture_output=True, text=True, timeout=300,
                             preexec_fn=_limit_file_size(1 << 20))
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    error = resumed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: could not write {out / 'last.pt'} (")  # torch.save's EFBIG
    assert error.endswith("the last complete checkpoint is kept")
    assert hashlib.sha256((out / "last.pt").read_bytes()).hexdigest() == before
    assert read_checkpoint(out / "last.pt")["step"] == 1
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("lr, steps, what", [("1e38", "1", "holds NaN or Inf"),  # exited 0 with Inf in both files
                                              ("1e6", "2", "reaches 1.15e+12, beyond 1e+06")])  # kept 1.8e24
def test_diverged_weights_are_never_written_and_the_run_ends_with_one_sentence(city_root, tmp_path, capsys, lr,
                                                                              steps, what):
    out = tmp_path / "run"
    assert run.cli(tiny_args(city_root, out, "--lr", lr, "--epochs", "1", "--max-steps", steps)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: the weights after step {steps} diverged: ") and what in error, error
    assert error.endswith("they were not written, the last checkpoint is kept. Lower --lr")
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_resume_uses_a_changed_lr_and_says_so_and_refuses_a_changed_crop_size(city_root, tmp_path):
    out = tmp_path / "run"
    run.main(tiny_args(city_root, out, "--epochs", "1", "--lr", "0.01"))  # 4 steps
    run.main(tiny_args(city_root, out, "--epochs", "2", "--lr", "0.02", "--resume", "auto"))
    log = (out / "train.log").read_text()
    assert "--lr 0.02 differs from the checkpoint's 0.01: using 0.02 from its step on" in log
    assert "--epochs 2 differs from the checkpoint's 1: using 2 from its step on" in log
    records = metrics_by_step(out)
    assert records[4]["lr"] == pytest.approx(0.01 * poly_factor(3, 4))
    assert records[5]["lr"] == pytest.approx(0.02 * poly_factor(4, 8))  # the new base on the new 8-step schedule
    with pytest.raises(ConfigError, match=r"changes --crop-size 64 \(the checkpoint's run: 32\)\. Drop those flags "
                                          r"to continue it, or train a new run in another --out"):
        run.main(tiny_args(city_root, out, "--epochs", "3", "--resume", "auto", "--crop-size", "64"))


def test_a_resume_with_another_process_count_keeps_the_global_batch_or_names_the_batch_size():
    ckpt = {"step": 6, "epoch": 1, "mid_epoch": True, "epoch_images": 8, "world_size": 2, "args": {"batch_size": 4}}
    point, note = resume_point(ckpt, "last.pt", world_size=4, batch_size=2)
    assert (point.epoch, point.start_image, point.step) == (1, 8, 6)
    assert note.startswith("the checkpoint was written by 2 process(es) x --batch-size 4; these 4 x 2 train the "
                           "same 8 images per step, so the LR schedule continues at step 6 and epoch 1 at image 8")
    assert resume_point(ckpt, "last.pt", world_size=2, batch_size=4) == (point, None)
    with pytest.raises(ConfigError, match=r"2 process\(es\) x --batch-size 4 = 8 images per step, this run has 1 x 4 "
                                          r"= 4; .* Use --batch-size 8 to continue it"):
        resume_point(ckpt, "last.pt", world_size=1, batch_size=4)
    with pytest.raises(ConfigError, match=r"Use a process count that divides 8 to continue it"):
        resume_point(ckpt, "last.pt", world_size=3, batch_size=2)
    end_of_epoch = {**ckpt, "mid_epoch": False}
    assert resume_point(end_of_epoch, "last.pt", world_size=2, batch_size=4)[0].epoch == 2
