"""Parity of exported artifacts with PyTorch: logit differences, argmax agreement and, on labelled images, mIoU.

Gates by precision (issue 4; docs/algorithm.md "Reference figures"; each is overridable):

=========  ============================================  ===================  ===============
precision  logits allclose, per element                  argmax agreement     mIoU delta
=========  ============================================  ===================  ===============
fp32       |diff| <= 1e-4 + 1e-5 * max|ref| of its       >= 99.9 %            <= 0.1 (labels)
           image + 1e-3 * |ref|
tf32       -                                             >= 99 %              <= 0.1 (labels)
fp16       -                                             >= 99 %              <= 0.1 (labels)
bf16       -                                             >= 99 %              <= 0.1 (labels)
int8       -                                             -                    <= 1.0 (labels)
=========  ============================================  ===================  ===============

Why the fp32 gate has a term in the image's largest logit (``atol_rel``): an fp32 convolution summed in another
order (ONNX Runtime's kernels against PyTorch's) differs by rounding errors proportional to the magnitudes summed,
not to the result, so a logit near 0 in a map whose scale is hundreds carries the error of that scale, which
atol alone (1e-4) does not cover. Measured, each at 100 % argmax agreement: DeepLabV3+ R50 briefly trained,
logits up to |436|, missed atol/rtol alone by 1.1e-3; R101 with random weights, |903|, max|diff| 3.7e-3 (4.1e-6
of the scale); ResNet-18 with its classifier scaled to |439|, 4.3e-4 (1e-6). 1e-5 of the scale is about 84 fp32
ulps of the largest logit, 2.4x the worst of these. A wrong export sits far above it: the same ResNet-18 with
only its classifier's weights rounded to fp16 is 5.9x over it, at 100 % argmax agreement.

``--atol``/``--rtol`` keep their meaning: either one makes the fp32 gate numpy's allclose(rtol, atol), the scale
term dropped (atol_rel 0) unless ``atol_rel`` is given too. ``parity.json`` records the gates,
``reference_abs_max`` and each backend's ``tolerance_used`` (its worst logit's |diff| / that logit's tolerance;
at most 1 passes); the table prints the formula and the same number.

A gate that needs labels is reported as "not checked" when only generated inputs are available.

``--parity-images DIR`` layout: image files (.png/.jpg/.jpeg/.bmp/.webp) in ``DIR`` or ``DIR/images``; optional
labels as ``DIR/labels/<image stem>.png`` holding class ids (255 = ignore, e.g. gtFine labelTrainIds).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image

from agmm_deploy.constants import IGNORE_INDEX, IMAGE_SUFFIXES
from agmm_deploy.contract import write_json_atomic
from agmm_deploy.contract import ModelMeta
from agmm_deploy.metrics import ConfusionMatrix
from agmm_deploy.transforms import (check_image_header, letterbox, normalize, pad_value, read_image,
                                   read_image_header)


# No trained DeepLabV3+ we measured has a logit beyond |903| (R101, random weights; trained ones stay under |500|).
# Beyond 1e4 the weights are absurd (a diverged run, weights scaled by 1e30), and a scale-relative tolerance
# would pass differences of 1e23: parity fails there whatever the tolerance, as it does for NaN and Inf logits.
MAX_LOGIT = 1e4


@dataclass(frozen=True)
class Gates:
    """Thresholds one backend must meet; None = not checked."""

    rtol: float | None = None
    atol: float | None = None
    atol_rel: float | None = None  # times the largest |reference logit| of the image, added to atol
    min_agreement: float | None = None  # fraction of pixels whose argmax equals PyTorch's
    max_miou_delta: float | None = None  # |mIoU(backend) - mIoU(pytorch)| in points (0..100)

    def override(self, **values: float | None) -> "Gates":
        """These gates with the given non-None values replacing theirs.

        An atol or rtol asks for numpy's allclose with it: the scale term drops out (atol_rel=0) unless given
        too, and an atol alone brings rtol=0 along (and the reverse) where the gate had none.
        """
        values = {k: v for k, v in values.items() if v is not None}
        if "atol" in values and "rtol" not in values and self.rtol is None:
            values["rtol"] = 0.0
        if "rtol" in values and "atol" not in values and self.atol is None:
            values["atol"] = 0.0
        if ("atol" in values or "rtol" in values) and "atol_rel" not in values and self.atol_rel is not None:
            values["atol_rel"] = 0.0
        return dataclasses.replace(self, **values)

    def allclose_checked(self) -> bool:
        return self.rtol is not None and self.atol is not None

    def tolerance(self, reference: np.ndarray) -> np.ndarray:
        """What each logit may differ by: atol + atol_rel * max|ref| of its image + rtol * |ref|.

        Shape:
            reference (B, K, H, W) -> (B, K, H, W) float32.
        """
        magnitude = np.abs(reference)
        scale = magnitude.max(axis=(1, 2, 3), keepdims=True)  # (B, 1, 1, 1): each image's largest logit
        return self.atol + (self.atol_rel or 0.0) * scale + self.rtol * magnitude

    def formula(self) -> str:
        """e.g. '0.0001 + 1e-05 * max|ref| of the image + 0.001 * |ref|'."""
        scale = f" + {self.atol_rel:g} * max|ref| of the image" if self.atol_rel else ""
        return f"{self.atol:g}{scale} + {self.rtol:g} * |ref|"

    def describe_allclose(self) -> str:
        """e.g. 'rtol=0.001, atol=0.0001, atol_rel=1e-05 of max|ref| per image'."""
        words = f"rtol={self.rtol:g}, atol={self.atol:g}"
        return words + (f", atol_rel={self.atol_rel:g} of max|ref| per image" if self.atol_rel else "")


DEFAULT_GATES = {
    "fp32": Gates(rtol=1e-3, atol=1e-4, atol_rel=1e-5, min_agreement=0.999, max_miou_delta=0.1),
    "tf32": Gates(min_agreement=0.99, max_miou_delta=0.1),
    "fp16": Gates(min_agreement=0.99, max_miou_delta=0.1),
    "bf16": Gates(min_agreement=0.99, max_miou_delta=0.1),
    "int8": Gates(max_miou_delta=1.0),
}


def gates_for(precision: str, **overrides: float | None) -> Gates:
    """The default parity gates of ``precision`` (fp32 | fp16 | int8), with any field replaced.

    Args:
        overrides: Gates fields (rtol, atol, atol_rel, min_agreement, max_miou_delta); None keeps the
            default. An atol or rtol makes the gate numpy's allclose (atol_rel 0 unless given).
    Returns:
        Gates.
    """
    if precision not in DEFAULT_GATES:
        raise ValueError(f"precision={precision!r} has no parity gates; expected one of {sorted(DEFAULT_GATES)}")
    return DEFAULT_GATES[precision].override(**overrides)


@dataclass
class BackendParity:
    """One backend compared with the PyTorch reference."""

    backend: str
    precision: str
    artifact: str
    gates: Gates
    max_abs_diff: float = 0.0
    mean_abs_diff: float = 0.0
    allclose: bool | None = None
    tolerance_used: float | None = None  # max over logits of |diff| / tolerance; <= 1 passes
    argmax_agreement: float = 0.0
    miou: float | None = None
    miou_delta: float | None = None
    seconds: float = 0.0
    nonfinite_logits: int = 0  # NaN / Inf values among this backend's logits
    abs_max: float = 0.0  # its largest finite |logit|
    failures: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityResult:
    """All backends against PyTorch on the same inputs."""

    reference: str
    source: str
    num_images: int
    input_size: tuple[int, int]
    labelled: bool
    reference_miou: float | None
    reference_seconds: float
    backends: list[BackendParity]
    reference_abs_max: float = 0.0  # the logits' scale, over all images (fp32's atol_rel uses each image's own)
    reference_nonfinite: int = 0  # NaN / Inf values among the reference's logits

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.backends)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        for entry, backend in zip(data["backends"], self.backends):
            entry["passed"] = backend.passed
        return data

    def write_json(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    def table(self) -> str:
        """The parity table printed by agmm-export."""
        h, w = self.input_size
        lines = [f"Parity on {self.num_images} {self.source} image(s) at {h}x{w} against {self.reference} "
                 f"(logits up to |{self.reference_abs_max:.3g}|)",
                 f"mode: every image letterboxed to {h}x{w}, one pass; mIoU on that canvas (labels resized to it), "
                 "to compare backends, not the served mIoU (python -m training.evaluate --mode served)"]
        lines += [f"allclose {b.precision}: |diff| <= {b.gates.formula()} per logit; in brackets the worst "
                  "logit's |diff| / its tolerance (at most 1 passes)"
                  for b in {b.precision: b for b in self.backends if b.gates.allclose_checked()}.values()]
        header = (f"{'backend':<18} {'precision':<9} {'max|diff|':>10} {'mean|diff|':>10} {'allclose':>12} "
                  f"{'argmax agree':>12} {'mIoU':>7} {'ΔmIoU':>7} {'time s':>7}  result")
        lines += [header, "-" * len(header)]
        ref_miou = _fmt(self.reference_miou, "{:.2f}")
        lines.append(f"{self.reference:<18} {'fp32':<9} {'-':>10} {'-':>10} {'-':>12} {'-':>12} {ref_miou:>7} "
                     f"{'-':>7} {self.reference_seconds:>7.1f}  reference")
        for b in self.backends:
            allclose = "-" if b.allclose is None else (f"{'yes' if b.allclose else 'NO'} "
                                                       f"({_fmt(b.tolerance_used, '{:.2g}', 'inf')})")
            lines.append(
                f"{b.backend:<18} {b.precision:<9} {b.max_abs_diff:>10.2e} {b.mean_abs_diff:>10.2e} {allclose:>12} "
                f"{100 * b.argmax_agreement:>11.3f}% {_fmt(b.miou, '{:.2f}'):>7} "
                f"{_fmt(b.miou_delta, '{:+.2f}'):>7} {b.seconds:>7.1f}  {'PASS' if b.passed else 'FAIL'}")
        for b in self.backends:
            for failure in b.failures:
                lines.append(f"  FAIL {b.backend} {b.precision}: {failure}")
            for unchecked in b.unchecked:
                lines.append(f"  not checked {b.backend} {b.precision}: {unchecked}")
        lines.append(f"parity {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else spec.format(value)


def check_parity(reference: Any, candidates: Sequence[Any], images: np.ndarray,
                 labels: np.ndarray | None = None, *, gates: dict[str, Gates] | None = None,
                 batch_size: int = 1, source: str = "generated", progress: bool = False) -> ParityResult:
    """Runs every runner on the same images, chunk by chunk, and checks each candidate against the reference.

    Only running statistics are kept (no full logit tensors), so memory stays at one chunk per backend.

    Args:
        reference: the PyTorch runner (any callable runner with ``backend``/``meta``).
        candidates: runners to check (any backend of agmm_deploy.runtime); their ``precision`` selects the gates.
        images: normalised float32 (N, 3, H, W).
        labels: optional class ids (N, H, W) (255 = ignore); enables the mIoU columns and gates.
        gates: per-precision gates (default DEFAULT_GATES).
        batch_size: images per call (exercises a dynamic batch when > 1).
        source: words for the table ("generated", the folder name).
    Returns:
        ParityResult; ``.passed`` says whether every gate held.
    """
    gates = {**DEFAULT_GATES, **(gates or {})}
    num_classes = reference.meta.num_classes
    results = [BackendParity(backend=c.backend, precision=c.precision, artifact=str(getattr(c, "path", "")),
                             gates=gates[c.precision]) for c in candidates]
    ref_matrix = ConfusionMatrix(num_classes)
    matrices = [ConfusionMatrix(num_classes) for _ in candidates]
    worst = [0.0] * len(candidates)  # max |diff| / tolerance so far
    abs_sums = [0.0] * len(candidates)
    agree = [0] * len(candidates)
    ref_seconds, ref_abs_max, ref_nonfinite = 0.0, 0.0, 0
    chunks = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="parity", unit="batch", leave=False)
    for start in chunks:
        batch = images[start:start + batch_size]
        t0 = time.perf_counter()
        ref_logits = reference(batch)  # (B, K, H, W)
        ref_seconds += time.perf_counter() - t0
        ref_pred = ref_logits.argmax(1)
        ref_finite = np.isfinite(ref_logits)
        ref_nonfinite += int(ref_finite.size - ref_finite.sum())
        ref_abs_max = max(ref_abs_max, _finite_abs_max(ref_logits, ref_finite))
        if labels is not None:
            ref_matrix.update(labels[start:start + batch_size], ref_pred)
        for i, (candidate, result) in enumerate(zip(candidates, results)):
            t0 = time.perf_counter()
            logits = candidate(batch).astype(np.float32)
            result.seconds += time.perf_counter() - t0
            if logits.shape != ref_logits.shape:
                raise ValueError(f"{candidate.backend} returned logits {logits.shape}; the reference returned "
                                 f"{ref_logits.shape}")
            finite = np.isfinite(logits)
            result.nonfinite_logits += int(finite.size - finite.sum())
            result.abs_max = max(result.abs_max, _finite_abs_max(logits, finite))
            # Differences over the logits finite on both sides: NaN would vanish in max() (max(0.0, nan) is 0)
            # and an Inf makes every statistic Inf; the non-finite ones fail on their own below.
            diff = np.where(finite & ref_finite, np.abs(logits - ref_logits), 0.0)
            result.max_abs_diff = max(result.max_abs_diff, float(diff.max()))
            abs_sums[i] += float(diff.sum(dtype=np.float64))
            g = result.gates
            if g.allclose_checked():
                # A zero tolerance (--atol 0 --rtol 0) asks for equality: any difference is infinitely over.
                # (Non-finite reference logits make tolerances NaN; they fail on their own below.)
                with np.errstate(divide="ignore", invalid="ignore"):
                    tolerance = g.tolerance(ref_logits)
                    ratio = np.where(diff > 0, diff / tolerance, 0.0)
                worst[i] = max(worst[i], float(ratio.max()))
            pred = logits.argmax(1)
            agree[i] += int((pred == ref_pred).sum())
            if labels is not None:
                matrices[i].update(labels[start:start + batch_size], pred)
    pixels = images.shape[0] * images.shape[2] * images.shape[3]
    # Labels holding only 255 / unlabelled pixels score nothing: the mIoU is then undefined, not 0.
    scored = labels is not None and ref_matrix.pixels > 0
    ref_miou = ref_matrix.miou() if scored else None
    for i, result in enumerate(results):
        g = result.gates
        values = pixels * num_classes
        result.failures += _sanity_failures(f"the reference ({reference.backend})", ref_nonfinite, ref_abs_max, values)
        result.failures += _sanity_failures(result.backend, result.nonfinite_logits, result.abs_max, values)
        result.mean_abs_diff = abs_sums[i] / (pixels * num_classes)
        result.argmax_agreement = agree[i] / pixels
        if g.allclose_checked():
            result.allclose = worst[i] <= 1.0
            result.tolerance_used = worst[i] if np.isfinite(worst[i]) else None  # strict JSON has no inf
            if not result.allclose:
                result.failures.append(f"logits not allclose ({g.describe_allclose()}); "
                                       f"max|diff| = {result.max_abs_diff:.3e} with logits up to "
                                       f"|{ref_abs_max:.3g}|, {_fmt(result.tolerance_used, '{:.3g}x', 'inf x')} "
                                       "the tolerance at the worst logit")
        if g.min_agreement is not None and result.argmax_agreement < g.min_agreement:
            result.failures.append(f"argmax agreement {100 * result.argmax_agreement:.3f}% < "
                                   f"{100 * g.min_agreement:g}%")
        if scored:
            result.miou = matrices[i].miou()
            result.miou_delta = result.miou - ref_miou
            if g.max_miou_delta is not None and abs(result.miou_delta) > g.max_miou_delta:
                result.failures.append(f"|mIoU delta| {abs(result.miou_delta):.3f} > {g.max_miou_delta:g} points")
        elif g.max_miou_delta is not None:
            needs = ("labelled --parity-images" if labels is None
                     else "labels with class pixels (these hold only 255 / unlabelled pixels)")
            result.unchecked.append(f"mIoU delta <= {g.max_miou_delta:g} needs {needs}")
    return ParityResult(reference=reference.backend, source=source, num_images=int(images.shape[0]),
                        input_size=(int(images.shape[2]), int(images.shape[3])), labelled=labels is not None,
                        reference_miou=ref_miou, reference_seconds=ref_seconds, backends=results,
                        reference_abs_max=ref_abs_max, reference_nonfinite=ref_nonfinite)


def _finite_abs_max(logits: np.ndarray, finite: np.ndarray) -> float:
    return float(np.abs(np.where(finite, logits, 0.0)).max(initial=0.0))


def _sanity_failures(backend: str, nonfinite: int, abs_max: float, total: int) -> list[str]:
    """The failures no tolerance can pass: NaN / Inf logits, or logits beyond MAX_LOGIT (absurd weights)."""
    failures = []
    if nonfinite:
        failures.append(f"{backend} logits hold {nonfinite} NaN/Inf value(s) of {total}: the weights (or the "
                        "input) are not finite, and argmax of NaN is class 0 on every backend alike, so nothing "
                        "here can be compared")
    if abs_max > MAX_LOGIT:
        failures.append(f"{backend} logits reach |{abs_max:.3g}|, beyond the sane scale {MAX_LOGIT:g} "
                        "(MAX_LOGIT): the weights are absurd (a diverged run?) and a tolerance relative to that "
                        "scale would pass any difference")
    return failures


def check_artifacts(reference: Any, paths: Sequence[str | Path], images: np.ndarray,
                    labels: np.ndarray | None = None, *, device: str = "auto", batch_size: int = 1,
                    source: str = "generated", progress: bool = False,
                    **overrides: float | None) -> ParityResult:
    """check_parity of every artifact file against the reference, each loaded by the runtime table.

    Args:
        reference: the PyTorch runner the artifacts were exported from.
        paths: the artifacts (ONNX models, engines, ...), loaded with ``agmm_deploy.runtime.load_runner``.
        device: where they run (auto | cpu | cuda); an artifact whose backend does not run there (an engine
            with device='cpu') runs where its backend does.
        overrides: Gates fields replacing the defaults of every precision (rtol, atol, atol_rel, min_agreement,
            max_miou_delta); None keeps the default; an atol or rtol makes fp32's gate numpy's allclose.
    Returns:
        ParityResult.
    """
    from agmm_deploy.runtime import backend_for, load_runner

    candidates = [load_runner(path, device if device in ("auto", *backend_for(path).devices) else "auto")
                  for path in paths]
    gates = {precision: gates_for(precision, **overrides) for precision in DEFAULT_GATES}
    return check_parity(reference, candidates, images, labels, gates=gates, batch_size=batch_size, source=source,
                        progress=progress)


FAILED_SUFFIX = ".failed"


def set_aside(paths: Sequence[str | Path]) -> list[Path]:
    """Renames artifacts that failed their parity gates to ``<name>.failed``, with the files that travel with them
    (an engine's sidecar, an OpenVINO IR's .bin).

    No backend reads the ``.failed`` suffix, so neither a server (AGMM_MODEL, the model store) nor agmm-bench
    on the folder can pick the artifact up as if it were deployable; it stays on disk for inspection.

    Returns:
        The new paths, in the order given.
    """
    from agmm_deploy.contract import companion_files, sidecar_path

    moved = []
    for path in map(Path, paths):
        target = path.with_name(path.name + FAILED_SUFFIX)
        for companion in companion_files(path):
            # The sidecar keeps its <artifact>.json name (model.engine.failed.json); the .bin gets .failed.
            companion.replace(sidecar_path(target) if companion == sidecar_path(path)
                              else companion.with_name(companion.name + FAILED_SUFFIX))
        path.replace(target)
        moved.append(target)
    return moved


def generated_images(meta: ModelMeta, count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Seeded stand-ins for photos: smooth colour fields plus texture, as uint8 (N, H, W, 3).

    Pure noise would put most logits near a tie and make argmax agreement meaningless; smooth regions give
    the network structures to segment, as real images do.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    out = np.empty((count, h, w, 3), dtype=np.uint8)
    for i in range(count):
        coarse = rng.uniform(0, 255, size=(max(2, h // 32), max(2, w // 32), 3)).astype(np.float32)
        smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        texture = rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
        out[i] = np.clip(smooth + texture, 0, 255).astype(np.uint8)
    return out


def load_parity_images(folder: str | Path, meta: ModelMeta, size: tuple[int, int],
                       limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None, list[Path]]:
    """Images (letterboxed to ``size`` and normalised) and, when every image has one, their labels.

    Returns:
        (images float32 (N, 3, H, W), labels uint8 (N, H, W) with 255 in the padding, or None, image paths).
    """
    folder = Path(folder)
    image_dir = folder / "images" if (folder / "images").is_dir() else folder
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) \
        if image_dir.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in "
                                f"{image_dir}; expected DIR/*.png|jpg or DIR/images/*, labels in DIR/labels/")
    paths = paths[:limit] if limit else paths
    label_dir = folder / "labels"
    label_paths = [label_dir / f"{p.stem}.png" for p in paths]
    have_labels = label_dir.is_dir() and all(p.is_file() for p in label_paths)
    if label_dir.is_dir() and not have_labels:
        missing = [p.name for p in label_paths if not p.is_file()]
        raise FileNotFoundError(f"{label_dir} lacks labels for {len(missing)} image(s), e.g. {missing[:3]}; "
                                "expected one <image stem>.png per image (or no labels folder at all)")
    canvases, labels = [], []
    for path, label_path in zip(paths, label_paths):
        image = read_image(path)
        canvas, box = letterbox(image, size, fill=pad_value(meta.mean))
        canvases.append(canvas)
        if have_labels:
            # Priced by its header like the images (a label PNG claiming 30000x30000 is refused, not decoded).
            header = read_image_header(label_path.read_bytes(), str(label_path))
            check_image_header(header, str(label_path))
            label = np.asarray(Image.open(label_path, formats=[header.format]))
            if label.ndim != 2 or label.shape != image.shape[:2]:
                raise ValueError(f"label {label_path} is {label.shape}; expected a single-channel map of the image "
                                 f"size {image.shape[:2]}")
            rh, rw = box.resized
            resized = cv2.resize(label.astype(np.uint8), (rw, rh), interpolation=cv2.INTER_NEAREST)
            padded = np.full(size, IGNORE_INDEX, dtype=np.uint8)
            padded[:rh, :rw] = resized
            labels.append(padded)
    images = normalize(np.stack(canvases), meta.mean, meta.std)
    return images, (np.stack(labels) if have_labels else None), paths
