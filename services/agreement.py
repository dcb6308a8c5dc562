"""How far a candidate's answer for one study agrees with the champion's (shadow evidence).

Each task gives a headline `agreement` in [0, 1] (what a promotion gate's floor and the Prometheus
histogram use) and the measures a reviewer reads beside it:
  segmentation    Dice per region (WT, TC, ET) on the study's own grid, volume difference per region (mL);
                  headline: Dice of the whole tumour
  classification  per marker: label agreement (0/1) and the difference of the positive-class
                  probability; headline: the share of markers whose labels agree
  survival        risk-group agreement (0/1) and the risk-score difference; headline: the group agreement
  localization    tumour found by both (0/1) and the distance between the centroids (voxels of the
                  input grid); headline: found-agreement, 0 when the centroids are more than
                  LOCALIZATION_TOLERANCE_VOX apart
"""

from __future__ import annotations

import math

from imaging.labels import REGIONS, region_mask
from imaging.metrics import dice
from imaging.study import CLASS_LABELS

LOCALIZATION_TOLERANCE_VOX = 10.0


def agreement(task: str, champion: dict, candidate: dict) -> dict[str, float]:
    """`champion` and `candidate`: the task's postprocessed results for the same study."""
    a, b = champion["section"], candidate["section"]
    if task == "segmentation":
        out = {f"dice_{r}": round(dice(region_mask(champion["mask"].data, r), region_mask(candidate["mask"].data, r)), 4) for r in REGIONS}
        for region in REGIONS:
            out[f"volume_diff_ml_{region}"] = round(float(b["volumes_ml"].get(region, 0.0)) - float(a["volumes_ml"].get(region, 0.0)), 3)
        return {"agreement": out["dice_WT"], **out}
    if task == "classification":
        out: dict[str, float] = {}
        for marker, (_, positive) in CLASS_LABELS.items():
            out[f"{marker}_agree"] = float(a[marker]["label"] == b[marker]["label"])
            out[f"{marker}_prob_diff"] = round(b[marker]["probabilities"][positive] - a[marker]["probabilities"][positive], 4)
        labels = [v for k, v in out.items() if k.endswith("_agree")]
        return {"agreement": sum(labels) / len(labels), **out}
    if task == "survival":
        group = float(a["risk_group"] == b["risk_group"])
        return {"agreement": group, "risk_group_agree": group, "risk_diff": round(b["risk_score"] - a["risk_score"], 4)}
    if task == "localization":
        found = float(a["found"] == b["found"])
        distance = math.dist(a["centroid_vox"], b["centroid_vox"]) if a["found"] and b["found"] else None
        close = found if distance is None else float(found and distance <= LOCALIZATION_TOLERANCE_VOX)
        return {"agreement": close, "found_agree": found, **({"centroid_distance_vox": round(distance, 2)} if distance is not None else {})}
    raise ValueError(f"unknown task {task!r}")
