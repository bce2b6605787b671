"""The official Cityscapes evaluation of saved predictions: ``python -m training.cityscapes_eval PREDS --data-root R``.

    python -m training.evaluate runs/city/best.pt --data-root data/cityscapes --save-png preds/ --png-ids official
    python -m training.cityscapes_eval preds/ --data-root data/cityscapes

Runs cityscapesscripts' ``evalPixelLevelSemanticLabeling`` (its ground-truth search, its matching of
``<city>_<seq>_<frame>*.png`` predictions, its confusion matrix and class IoU) on ``gtFine/<split>/*/
*_gtFine_labelIds.png``. Its command line (``csEvalPixelLevelSemanticLabeling``) stops on NumPy >= 2.4, where
``np.in1d`` is gone, in the instance-level score it adds to each image; here its functions run with that score off
(``evalInstLevelScore = False``), which changes nothing in the class IoU and the mIoU. Predictions must hold
labelIds (``--png-ids official``): train-id predictions score near zero there without any error.
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from agmm_deploy.datasets import DataError
from training.cli import run_cli


@dataclass
class OfficialResult:
    """The official script's figures, in percent: mIoU over the 19 evaluated classes (NaN ones skipped, as the
    script does) and each class's IoU (NaN where a class is absent from ground truth and predictions)."""

    miou: float
    iou: dict[str, float]
    images: int


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="cityscapesscripts' evalPixelLevelSemanticLabeling on saved labelId "
                                            "predictions (training.evaluate --save-png DIR --png-ids official)",
                                allow_abbrev=False)
    p.add_argument("predictions", type=Path, help="folder of <city>_<seq>_<frame>*.png labelId predictions")
    p.add_argument("--data-root", type=Path, required=True, help="Cityscapes root holding gtFine/")
    p.add_argument("--split", default="val")
    return p


def main(argv: list[str] | None = None) -> OfficialResult:
    args = get_args_parser().parse_args(argv)
    result = official_cityscapes_miou(args.predictions, args.data_root, args.split)
    for name, value in result.iou.items():
        print(f"{name:<14} {'n/a' if math.isnan(value) else f'{value:6.2f}'}")
    print(f"official mIoU {result.miou:.2f} over {result.images} images (cityscapesscripts "
          "evalPixelLevelSemanticLabeling, instance-level score off)")
    return result


def official_cityscapes_miou(predictions: str | Path, data_root: str | Path, split: str = "val") -> OfficialResult:
    """Class IoU and mIoU of the labelId PNGs in ``predictions`` as cityscapesscripts computes them.

    Raises DataError with the script's own message when it finds no ground truth, no or several predictions for
    an image, or a prediction of the wrong size (the script would print it and exit).
    """
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    ground_truth = sorted(Path(data_root).glob(f"gtFine/{split}/*/*_gtFine_labelIds.png"))
    if not ground_truth:
        raise DataError(f"no {Path(data_root) / 'gtFine' / split}/<city>/*_gtFine_labelIds.png: the official "
                        "evaluation reads labelIds ground truth (cityscapesscripts' createTrainIdLabelImgs writes "
                        "the train ids from the same gtFine polygons)")
    if not Path(predictions).is_dir():
        raise DataError(f"{predictions} is not a folder; expected the --save-png folder of training.evaluate")
    args = official.args  # the script's functions read this module-level object
    saved = dict(vars(args))
    args.predictionPath, args.predictionWalk = str(predictions), None
    args.evalInstLevelScore = False  # needs instanceIds files, and np.in1d (gone in NumPy 2.4)
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    log = StringIO()
    try:
        with redirect_stdout(log):  # the script prints its errors ("ERROR: ...") and then calls sys.exit
            pairs = [official.getPrediction(args, str(gt)) for gt in ground_truth]
            scores = official.evaluateImgLists(pairs, [str(gt) for gt in ground_truth], args)
        classes = {name: score for name, score in scores["classScores"].items()
                   if not official.name2label[name].ignoreInEval}
        miou = official.getScoreAverage(classes, args)
    except SystemExit:
        message = log.getvalue().strip().splitlines()
        raise DataError(f"cityscapesscripts: {message[-1] if message else 'stopped'}") from None
    finally:
        vars(args).clear()
        vars(args).update(saved)
    return OfficialResult(miou=100 * miou, iou={name: 100 * v for name, v in classes.items()},
                          images=len(ground_truth))


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: exit code 0, or 2 with one sentence for an error the user can fix."""
    return run_cli(main, argv, (DataError,))


if __name__ == "__main__":
    sys.exit(cli())
