"""One call for every backend: normalised float32 images (N, 3, H, W) in, float32 logits (N, K, H, W) out.

``load_runner(path)`` picks the runner from the file: a checkpoint (.pt/.pth) runs in PyTorch eager, an .onnx
file in ONNX Runtime (CUDA when the session really gets it, else CPU), an .engine in TensorRT. All runners share
the attributes ``meta``, ``backend``, ``precision``, ``input_size``, ``max_batch`` and ``dynamic_hw``, split
batches larger than ``max_batch`` and refuse inputs of the wrong shape with a message saying what fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from agmm_deploy.contract import ModelMeta
from agmm_deploy.transforms import (SLIDING_OVERLAP, Letterbox, letterbox, normalize, pad_value, sliding_window_tiles,
                                   unletterbox)

DEFAULT_MAX_BATCH = 8
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch.cuda.is_available() is False on this machine; "
                           "use device='cpu' or 'auto'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class _Runner:
    """Shared input checking and batch splitting; subclasses implement ``_run`` on one chunk."""

    meta: ModelMeta
    backend: str
    precision: str = "fp32"
    input_size: tuple[int, int]
    max_batch: int = DEFAULT_MAX_BATCH
    dynamic_hw: bool = True
    path: Path

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def _check(self, images: np.ndarray) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != 3:
            shape = getattr(images, "shape", type(images).__name__)
            raise ValueError(f"{self.backend} runner expects normalised float32 images shaped (N, 3, H, W); got "
                             f"{shape}. Use agmm_deploy.transforms.normalize on uint8 RGB images.")
        if not self.dynamic_hw and tuple(images.shape[2:]) != tuple(self.input_size):
            h, w = self.input_size
            raise ValueError(f"{self.path.name} was exported for {h}x{w} inputs; got {images.shape[2]}x"
                             f"{images.shape[3]}. Letterbox or tile the image to {h}x{w}, or re-export with "
                             "--dynamic-hw.")
        return np.ascontiguousarray(images, dtype=np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, K, H, W) float32 for normalised images (N, 3, H, W) float32."""
        images = self._check(images)
        chunks = [self._run(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        """Class ids (N, H, W) uint8: the argmax of the logits."""
        return self(images).argmax(axis=1).astype(np.uint8)

    def _run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        h, w = self.input_size
        return (f"{type(self).__name__}({self.path.name}, backend={self.backend}, precision={self.precision}, "
                f"input={h}x{w}{'+dynamic' if self.dynamic_hw else ''}, max_batch={self.max_batch})")


class TorchRunner(_Runner):
    """PyTorch eager on a checkpoint (ours, or a raw official state dict with backbone/num_classes/dataset)."""

    def __init__(self, path: str | Path, device: str = "auto", *, max_batch: int = DEFAULT_MAX_BATCH,
                 backbone: str | None = None, num_classes: int | None = None, dataset: str | None = None,
                 classes: tuple[str, ...] | None = None, model: torch.nn.Module | None = None,
                 meta: ModelMeta | None = None) -> None:
        from agmm_deploy.checkpoint import load_model

        self.path = Path(path)
        self.device = torch.device(_resolve_device(device))
        if model is None:
            loaded = load_model(self.path, backbone=backbone, num_classes=num_classes, dataset=dataset,
                                classes=classes)
            model, meta = loaded.model, loaded.meta
        assert meta is not None, "a model passed in needs its meta"
        self.model = model.eval().to(self.device)
        self.meta = meta
        self.backend = "pytorch" if self.device.type == "cpu" else "pytorch-cuda"
        self.input_size = tuple(meta.input_size)
        self.max_batch = max_batch

    def _run(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(images).to(self.device))
        return logits.float().cpu().numpy()


def cpu_session_options(threads: int | None = None,
                        mem_pattern: bool = True) -> "onnxruntime.SessionOptions":  # noqa: F821
    """ONNX Runtime CPU settings that make it faster than PyTorch eager on this model (figures below).

    Measured on DeepLabV3+ R50 at 512x1024, batch 1, 2 shared cores (median of 3, noisy): these options 1.50 s;
    ORT defaults 2.21 s; ORT_ENABLE_BASIC instead of ALL 3.20 s; arena + memory pattern off 1.58 s; spinning on
    1.52 s. So:
    - ORT_ENABLE_ALL is what matters: conv + BN + ReLU fusion and the NCHWc blocked layout transform.
    - intra-op threads = PyTorch's thread count (physical cores), one inter-op thread, sequential execution: the
      graph is a chain, so parallel branches only add contention.
    - Memory arena and memory-pattern planning on: repeated calls at one shape reuse the same buffers.
    - No spin-waiting: no gain measured, and spinning threads steal cycles from other work on shared cores.
    - ``mem_pattern=False`` for serving, where the batch size changes from call to call: a pattern is planned per
      input shape, and each new mix of shapes grows the arena (R18 512x512, 30 calls at random batch 1..8 after
      warm-up: RSS 1313 -> 1733 MiB with it, flat at 1276 MiB without).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = mem_pattern
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
    return options


class OnnxRunner(_Runner):
    """ONNX Runtime; ``backend`` says which execution provider the session really got."""

    def __init__(self, path: str | Path, device: str = "auto", *, threads: int | None = None,
                 mem_pattern: bool = True) -> None:
        import onnxruntime as ort

        from agmm_deploy.contract import read_onnx_metadata

        self.path = Path(path)
        self.meta, self.fields = read_onnx_metadata(self.path)
        device = _resolve_device(device)
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            # onnxruntime-gpu finds the CUDA/cuDNN libraries shipped with torch's wheels once they are loaded.
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            # use_tf32=0: an fp32 model runs in fp32 (TF32 tensor cores keep a 10-bit mantissa).
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": torch.cuda.current_device(),
                                                            "use_tf32": "0"}))
        self.session = ort.InferenceSession(str(self.path), sess_options=cpu_session_options(threads, mem_pattern),
                                            providers=providers)
        got = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in got:
            raise RuntimeError(f"ONNX Runtime could not use CUDA for {self.path.name} (session providers: {got}); "
                               "check that onnxruntime-gpu matches the installed CUDA/cuDNN, or use device='cpu'")
        self.backend = "onnxruntime-cuda" if "CUDAExecutionProvider" in got else "onnxruntime-cpu"
        self.precision = self.fields.get("precision", "fp32")
        self.input_size = tuple(self.meta.input_size)
        self.dynamic_hw = bool(self.fields.get("dynamic_hw", False))
        dynamic_batch = self.fields.get("dynamic_batch", True)
        self.max_batch = int(self.fields.get("max_batch") or DEFAULT_MAX_BATCH) if dynamic_batch else 1
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {self.input_name: images})[0]

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        """Class ids (N, H, W) uint8, from the in-graph ``labels`` output when the model has one."""
        if "labels" not in self.output_names:
            return super().predict_labels(images)
        images = self._check(images)
        return np.concatenate([self.session.run(["labels"], {self.input_name: images[i:i + self.max_batch]})[0]
                               for i in range(0, len(images), self.max_batch)]).astype(np.uint8)


class TensorRTRunner(_Runner):
    """A serialized TensorRT engine executed with torch CUDA tensors as I/O buffers (TensorRT >= 10 API)."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        from agmm_deploy.contract import read_engine_sidecar
        from agmm_deploy.export.tensorrt import TensorRTUnavailable, import_tensorrt, tensorrt_missing

        missing = tensorrt_missing(f"running the TensorRT engine {Path(path).name}")
        if missing or device == "cpu":
            raise TensorRTUnavailable((missing or f"{Path(path).name} is a TensorRT engine, which cannot run on "
                                       "device='cpu'") + ".")
        trt = import_tensorrt()
        self.path = Path(path)
        self.meta, self.fields = read_engine_sidecar(self.path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.path}; engines only run with the TensorRT "
                               "version and GPU model that built them. Rebuild it with agmm-export --trt.")
        self.context = self.engine.create_execution_context()
        self.backend = "tensorrt"
        self.precision = self.fields.get("precision", "fp32")
        self.input_size = tuple(self.meta.input_size)
        self.dynamic_hw = bool(self.fields.get("dynamic_hw", False))
        self.max_batch = int(self.fields.get("max_batch") or 1)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if n != self.input_name]
        pairs = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
                 "UINT8": torch.uint8, "INT8": torch.int8, "BOOL": torch.bool}
        self._torch_dtype = {getattr(trt.DataType, name): dtype for name, dtype in pairs.items()
                             if hasattr(trt.DataType, name)}
        self._trt = trt

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = super()._check(images)
        profile = self.fields.get("profile")
        if profile and self.dynamic_hw:
            (_, _, min_h, min_w), (_, _, max_h, max_w) = profile["min"], profile["max"]
            h, w = images.shape[2:]
            if not (min_h <= h <= max_h and min_w <= w <= max_w):
                raise ValueError(f"{self.path.name} was built for {min_h}..{max_h} x {min_w}..{max_w} inputs; got "
                                 f"{h}x{w}. Tile or resize the image, or rebuild with other --dynamic-hw bounds.")
        return images

    def _run(self, images: np.ndarray) -> np.ndarray:
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(images).to(self.device, non_blocking=True)
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = self._torch_dtype[self.engine.get_tensor_dtype(name)]
                outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to execute {self.path.name} on input {tuple(x.shape)}")
            logits = outputs["logits"].float().cpu()  # synchronises with the stream
        return logits.numpy()


def load_runner(path: str | Path, device: str = "auto", **kwargs: Any) -> _Runner:
    """The runner for a checkpoint (.pt/.pth/.ckpt), an .onnx file or a TensorRT engine (.engine/.plan/.trt).

    Args:
        device: auto (CUDA when available) | cpu | cuda.
        kwargs: for checkpoints: backbone=, num_classes=, dataset=, classes= (raw official state dicts), max_batch=;
            for ONNX: threads=, mem_pattern=.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist; expected a checkpoint (.pt/.pth), an .onnx file "
                                "or a TensorRT .engine")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxRunner(path, device, **kwargs)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTRunner(path, device, **kwargs)
    if suffix in CHECKPOINT_SUFFIXES:
        return TorchRunner(path, device, **kwargs)
    raise ValueError(f"cannot tell the format of {path} from its suffix {suffix!r}; expected one of .onnx, "
                     f"{', '.join(ENGINE_SUFFIXES)}, {', '.join(CHECKPOINT_SUFFIXES)}")


def batch_image_scores(runner: _Runner, images: list[np.ndarray], *,
                       overlap: float = SLIDING_OVERLAP) -> list[np.ndarray]:
    """Class probabilities for uint8 RGB images of any sizes, the model run on all of them together.

    An image that fits the model input is letterboxed (resized to fit, padded with the colour that normalises
    to 0) and its logits are mapped back before the softmax. A larger image (along either axis) is cut into
    input-size tiles by ``sliding_window_tiles`` (official overlap 2/3; tiles past a short axis padded bottom/right)
    and the tiles' softmax is averaged where they overlap, as in the official sliding-window evaluation.
    The canvases and tiles of all images go through the runner in chunks of ``runner.max_batch``.

    Args:
        runner: any runner (see ``load_runner``).
        images: uint8 RGB arrays (H_i, W_i, 3).
        overlap: sliding-window overlap for images larger than the model input.
    Returns:
        One float32 array (K, H_i, W_i) per image; it sums to 1 over K.
    """
    return _batch_scores(runner, images, overlap=overlap, softmax_whole=True)


def segment_images(runner: _Runner, images: list[np.ndarray], *,
                   overlap: float = SLIDING_OVERLAP) -> list[np.ndarray]:
    """Class ids (H_i, W_i) uint8 for uint8 RGB images of any sizes: the argmax of ``batch_image_scores``.

    Letterboxed images skip the softmax (it does not change the argmax, and on a CPU server it costs about
    as much as the argmax itself), so serving pays only for what the label map needs.
    """
    scores = _batch_scores(runner, images, overlap=overlap, softmax_whole=False)
    return [s.argmax(axis=0).astype(np.uint8) for s in scores]


def _batch_scores(runner: _Runner, images: list[np.ndarray], *, overlap: float,
                  softmax_whole: bool) -> list[np.ndarray]:
    """batch_image_scores / segment_images; ``softmax_whole=False`` leaves letterboxed images as logits."""
    if not 0 <= overlap < 1:  # checked here too: images that fit the input never reach the tiling
        raise ValueError(f"overlap={overlap} is invalid; expected 0 <= overlap < 1 (the official value is 2/3)")
    meta = runner.meta
    th, tw = runner.input_size
    fill = pad_value(meta.mean)
    # One runner input per entry: (image index, uint8 (th, tw, 3) canvas or tile, where its output goes).
    inputs: list[tuple[int, np.ndarray, Letterbox | tuple[int, int, int, int]]] = []
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape = getattr(image, "shape", type(image).__name__)
            dtype = getattr(image, "dtype", "")
            raise ValueError(f"image {index} is {shape} {dtype}; expected a uint8 RGB array (H, W, 3), e.g. from "
                             "agmm_deploy.transforms.read_image")
        h, w = image.shape[:2]
        if h <= th and w <= tw:
            canvas, box = letterbox(image, (th, tw), fill=fill)
            inputs.append((index, canvas, box))
            continue
        for y1, y2, x1, x2 in sliding_window_tiles(h, w, (th, tw), overlap):
            tile = image[y1:y2, x1:x2]
            if tile.shape[:2] != (th, tw):  # the image is shorter than the tile along one axis
                padded = np.empty((th, tw, 3), dtype=np.uint8)
                padded[:] = np.asarray(fill, dtype=np.uint8)
                padded[:y2 - y1, :x2 - x1] = tile
                tile = padded
            inputs.append((index, tile, (y1, y2, x1, x2)))

    results: list[np.ndarray | None] = [None] * len(images)
    counts: dict[int, np.ndarray] = {}  # tiled images: how many tiles covered each pixel (H, W)
    for start in range(0, len(inputs), runner.max_batch):
        chunk = inputs[start:start + runner.max_batch]
        logits = runner(normalize(np.stack([item[1] for item in chunk]), meta.mean, meta.std))  # (B, K, th, tw)
        for (index, _, place), scores in zip(chunk, logits):
            if isinstance(place, Letterbox):
                restored = unletterbox(scores, place)
                results[index] = _softmax(restored) if softmax_whole else restored
                continue
            y1, y2, x1, x2 = place
            if results[index] is None:
                h, w = images[index].shape[:2]
                results[index] = np.zeros((meta.num_classes, h, w), dtype=np.float32)
                counts[index] = np.zeros((h, w), dtype=np.float32)
            results[index][:, y1:y2, x1:x2] += _softmax(scores)[:, :y2 - y1, :x2 - x1]
            counts[index][y1:y2, x1:x2] += 1
    for index, count in counts.items():
        results[index] /= count[None]
    return results


def image_scores(runner: _Runner, image: np.ndarray, *, overlap: float = SLIDING_OVERLAP) -> np.ndarray:
    """Class probabilities (K, H, W) float32 for one uint8 RGB image (H, W, 3) of any size (see batch_image_scores)."""
    return batch_image_scores(runner, [image], overlap=overlap)[0]


def segment_image(runner: _Runner, image: np.ndarray, *, overlap: float = SLIDING_OVERLAP) -> np.ndarray:
    """Class ids (H, W) uint8 for one uint8 RGB image of any size (see segment_images)."""
    return segment_images(runner, [image], overlap=overlap)[0]


def _softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


__all__ = ["load_runner", "TorchRunner", "OnnxRunner", "TensorRTRunner", "cpu_session_options",
           "batch_image_scores", "image_scores", "segment_images", "segment_image"]
