"""Run under .venv-brats: official BraTS metrics for prediction/reference pairs, printed as JSON.

Usage: python brats_metrics.py PRED_DIR REF_DIR  (files with the same name are a pair; labels in the
BraTS 2023 convention, ET = 3, which is what the `gli` configuration expects).
"""

import json
import sys
from pathlib import Path

from brats_evaluation import config_path, evaluate_single_exam
from panoptica import Panoptica_Evaluator


def main() -> None:
    pred_dir, ref_dir = Path(sys.argv[1]), Path(sys.argv[2])
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    out = {}
    for pred in sorted(pred_dir.glob("*.nii.gz")):
        result = evaluate_single_exam(
            prediction_filepath=str(pred), reference_filepath=str(ref_dir / pred.name),
            subject_identifier=pred.name, evaluator=evaluator,
        )
        out[pred.name] = {
            region.upper(): {"dice": float(result[region]["global_bin_dsc"]), "hd95": float(result[region]["global_bin_hd95"])}
            for region in ("wt", "tc", "et")
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
