"""The Ray engine on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster), two actors placed by
Ray Data (SPREAD by default): every output written once, the same bytes as the local engine."""

import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from agmm_deploy.bulk import predict_images
from bulk_data import image_tree, pngs, tiny_model

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'agmm-deploy[ray]'")


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, include_dashboard=False))
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_write_every_output_once(two_nodes, tmp_path):
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    model = tiny_model(tmp_path)
    names = [f"part{i % 3}/img{i:02d}.png" for i in range(16)]
    images = image_tree(tmp_path / "images", [(name, (48 + 8 * (i % 4), 64)) for i, name in enumerate(names)])
    result = predict_images(model, [images], tmp_path / "out", engine="ray", device="cpu", actors=2,
                            progress=False)
    assert (result.written, result.failed, result.skipped) == (16, 0, 0)
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert sorted(row["output"] for row in rows) == sorted(names)  # one row per input, none twice
    assert sorted(pngs(tmp_path / "out")) == sorted(names)
    hidden = [p for p in (tmp_path / "out").rglob(".*") if p.is_file()]
    assert not hidden, hidden  # no temporary file left behind (each write renamed once), nor the run's lock
    local = predict_images(model, [images], tmp_path / "local", device="cpu", progress=False)
    assert local.written == 16 and pngs(tmp_path / "local") == pngs(tmp_path / "out")
    assert np.isclose(sum(rows[0][k] for k in rows[0] if k.startswith("fraction_")), 1.0, atol=1e-5)


def test_joining_a_cluster_leaves_no_usage_poller_in_the_driver(two_nodes, tmp_path):
    # On a joined cluster Ray Data would start a thread that polls Prometheus for ever and formats a traceback
    # each time, which on Python 3.11 races with ast.parse elsewhere in the process (ONNX export then raises
    # SystemError); the engine turns that collection off unless the user set RAY_DATA_USAGE_DISABLED.
    model = tiny_model(tmp_path)
    images = image_tree(tmp_path / "images", [(f"img{i}.png", (48, 64)) for i in range(4)])
    predict_images(model, [images], tmp_path / "out", engine="ray", device="cpu", progress=False)
    pollers = [thread.name for thread in threading.enumerate() if "usage" in thread.name]
    assert not pollers, pollers
