"""agmm_deploy.inference: the one letterbox / sliding-window implementation (torch, any device)."""

import numpy as np
import pytest
import torch

from agmm_deploy.constants import IMAGENET_MEAN, IMAGENET_STD
from agmm_deploy.inference import Tiles, chunks, input_count, run_slices, sliding_window_scores
from agmm_deploy.transforms import normalize, sliding_window_tiles


def _windows(h, w, size=(64, 64), k=3, **kwargs):
    image = torch.from_numpy(np.random.default_rng(h * w).integers(0, 256, (3, h, w), dtype=np.uint8))
    return Tiles(image, size, k, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs)


def test_letterbox_input_is_normalised_and_padded_with_exact_zeros():
    tiles = _windows(30, 60)
    assert tiles.letterboxed and tiles.count == 1 and tiles.resized == (32, 64)
    x = tiles.inputs(0, 1)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    assert (x[0, :, 32:, :] == 0).all() and (x[0, :, :32, :] != 0).any()  # the padding is the mean colour, exactly
    # An image of the input size is normalised exactly as transforms.normalize does (same bits).
    exact = _windows(64, 64)
    expected = normalize(exact.image.permute(1, 2, 0).numpy(), IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_array_equal(exact.inputs(0, 1).numpy(), expected)


@pytest.mark.parametrize("original", [(30, 60), (20, 10), (64, 40), (7, 3)])
def test_letterboxed_logits_map_back_pixel_for_pixel(original):
    h, w = original
    tiles = _windows(h, w)
    rh, rw = tiles.resized
    logits = torch.full((1, 3, 64, 64), 1e6)  # padding: any leak shows up as a huge value
    logits[0, 0, :rh, :rw] = torch.arange(rw, dtype=torch.float32)[None, :]  # x ramp over the resized image
    logits[0, 1, :rh, :rw] = torch.arange(rh, dtype=torch.float32)[:, None]  # y ramp
    logits[0, 2, :rh, :rw] = torch.where(torch.arange(rw) < rw / 2, -1.0, 1.0)[None, :]  # left / right halves
    tiles.add(0, logits)
    restored = tiles._sum.numpy()
    assert restored.shape == (3, h, w) and np.abs(restored).max() < max(rh, rw)
    # Bilinear with pixel centres aligned (x_src = (x + 0.5) * rw / w - 0.5): a ramp stays an exact ramp.
    expected_x = np.clip((np.arange(w) + 0.5) * rw / w - 0.5, 0, rw - 1)
    expected_y = np.clip((np.arange(h) + 0.5) * rh / h - 0.5, 0, rh - 1)
    np.testing.assert_allclose(restored[0], np.broadcast_to(expected_x, (h, w)), atol=1e-3)
    np.testing.assert_allclose(restored[1], np.broadcast_to(expected_y[:, None], (h, w)), atol=1e-3)
    seam, columns = w / 2, np.arange(w) + 0.5
    assert (restored[2][:, columns < seam - 1] < 0).all() and (restored[2][:, columns > seam + 1] > 0).all()
    labels = tiles.labels()
    assert labels.dtype == torch.uint8 and labels.shape == (h, w)
    assert torch.equal(labels, tiles.scores().argmax(0).to(torch.uint8))


@pytest.mark.parametrize("size", [(40, 50), (64, 64), (100, 150), (30, 150), (1, 5000), (1000, 1)])
def test_input_count_is_known_from_the_size_alone(size):
    assert input_count(*size, (64, 64)) == _windows(*size).count
    if max(size) > 64:
        assert input_count(*size, (64, 64)) == len(sliding_window_tiles(*size, (64, 64)))


def test_chunks_split_the_inputs_of_many_images_in_order():
    images = [_windows(30, 20, (48, 64)), _windows(100, 150, (48, 64)), _windows(48, 64, (48, 64))]  # 1 + 25 + 1
    batches = list(chunks(images, 4))
    assert [sum(b - a for _, a, b in batch) for batch in batches] == [4] * 6 + [3]
    assert batches[0][0] == (images[0], 0, 1) and batches[0][1] == (images[1], 0, 3)
    assert batches[-1][-1] == (images[2], 0, 1)


def test_tiles_average_the_softmax_and_every_slice_order_gives_the_same_scores():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(x):
        return conv(x)

    image = torch.randn(1, 3, 37, 90)
    whole = sliding_window_scores(forward, image, (16, 32), 4, tiles_per_batch=100)
    one_by_one = sliding_window_scores(forward, image, (16, 32), 4, tiles_per_batch=1)
    torch.testing.assert_close(whole, one_by_one)
    torch.testing.assert_close(whole.sum(1), torch.ones(1, 37, 90))
    # Brute force over the same tiles.
    total, covered = torch.zeros(4, 37, 90), torch.zeros(37, 90)
    for y1, y2, x1, x2 in sliding_window_tiles(37, 90, (16, 32)):
        with torch.no_grad():
            total[:, y1:y2, x1:x2] += torch.softmax(conv(image[:, :, y1:y2, x1:x2]), 1)[0]
        covered[y1:y2, x1:x2] += 1
    torch.testing.assert_close(whole[0], total / covered, rtol=1e-5, atol=1e-6)


def test_run_slices_hands_each_image_its_own_logits():
    images = [_windows(30, 20, (48, 64)), _windows(100, 150, (48, 64))]  # 1 + 25 inputs
    calls = []

    def forward(x):
        calls.append(len(x))
        return x[:, :1].repeat(1, 3, 1, 1) * torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1)

    for batch in chunks(images, 8):
        run_slices(forward, batch)
    assert calls == [8, 8, 8, 2] and all(w.done for w in images)
    assert images[1].labels().shape == (100, 150)


@pytest.mark.gpu
def test_cuda_and_cpu_give_the_same_labels():
    """Tiles are cut identically on both devices; a letterboxed image is resized as uint8 on a CPU (faster there)
    and as float on CUDA, which moves the odd near-tie pixel of a random-weight model."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    rng = np.random.default_rng(0)
    for (h, w), agreement in [((150, 230), 0.999), ((40, 50), 0.99)]:  # tiled / letterboxed
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        labels = []
        for device in ("cpu", "cuda"):
            tiles = Tiles(image.to(device), (64, 64), 5, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            net = conv.to(device)
            with torch.no_grad():
                for batch in chunks([tiles], 8):
                    run_slices(net, batch)
            labels.append(tiles.labels().cpu())
        assert (labels[0] == labels[1]).float().mean() > agreement, (h, w)
