"""The README's first hour, run as printed: the commands between its first-hour markers, in order, in a shell
whose PATH starts with this interpreter's folder (the activated .venv), with data/example, runs/example and port
3000 moved to a temporary folder and a free port. README and test cannot drift: the test reads the README."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.launch import free_port, stop_server

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- first-hour:begin -->", "<!-- first-hour:end -->"


def first_hour_commands(readme: Path = REPO / "README.md") -> list[str]:
    """The shell lines of the README's first-hour block: comments and the code fence left out."""
    text = readme.read_text()
    assert text.count(BEGIN) == text.count(END) == 1, "README.md needs one first-hour block between its markers"
    block = text.split(BEGIN)[1].split(END)[0]
    lines = [line.strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "```"))]


@pytest.mark.slow
def test_the_readme_first_hour_runs_as_printed(tmp_path):
    commands = first_hour_commands()
    verbs = [re.sub(r"^\w+=\S+ ", "", c).split()[0:3] for c in commands]
    assert [v[:3] if v[0] == "python" else v[:2] for v in verbs] == [
        ["python", "-m", "training.synthetic"], ["python", "-m", "training.run"],
        ["python", "-m", "training.evaluate"], ["agmm-export", "runs/example/last.pt"],
        ["agmm-predict", "runs/example/export/model.onnx"], ["bentoml", "serve"], ["until", "curl"],
        ["curl", "-sS"], ["kill", "%1"]], "the README's first hour changed: update this test's expectations"

    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "BENTOML_DO_NOT_TRACK": "True", "OMP_NUM_THREADS": "2"}
    data, runs = tmp_path / "data", tmp_path / "runs"
    server = None
    outputs = []
    try:
        for command in commands:
            line = (command.replace("data/example", str(data)).replace("runs/example", str(runs))
                    .replace("3000", str(port)))
            if line == "kill %1":  # the job started with '&' in the README's shell
                stop_server(server)
                server = None
            elif line.endswith("&"):
                server = subprocess.Popen(["bash", "-c", line[:-1]], cwd=REPO, env=env, start_new_session=True,
                                          stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT)
            else:
                # `until curl .../readyz` waits for the server; give its start-up (model load, warm-up) time.
                done = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=600)
                log = (tmp_path / "serve.log").read_text() if (tmp_path / "serve.log").exists() else ""
                assert done.returncode == 0, \
                    f"$ {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\nserver log:\n{log[-2000:]}"
                outputs.append(done.stdout)
    finally:
        if server is not None:
            stop_server(server)

    train_log = (runs / "train.log").read_text()
    assert "validation, mode served" in train_log and (runs / "last.pt").is_file() and (runs / "best.pt").is_file()
    assert "mode served (crop 64)" in outputs[2] and "mIoU" in outputs[2]
    assert "parity PASSED" in outputs[3] and (runs / "export" / "model.onnx").is_file()
    predicted = sorted(p.name for p in (runs / "predicted").glob("val_*[0-9].png"))
    assert predicted == [f"val_0000{i}.png" for i in range(4)]
    image = Image.open(data / "val" / "images" / "val_00000.png")
    mask = Image.open(runs / "mask.png")
    assert mask.size == image.size and int(np.asarray(mask).max()) < 4  # four classes in classes.txt
    # The served mask is agmm-predict's for the same model and image.
    assert np.array_equal(np.asarray(mask), np.asarray(Image.open(runs / "predicted" / "val_00000.png")))
