"""Which labelled patients are intensity outliers? Organ intensities after normalisation.

For each case of an MSD-style data set (``dataset.json``), the median normalised intensity
of every labelled organ, with the package's own MR/CT normalisation
(:func:`lrc_lightning.data.intensity.normalise`), and how many standard deviations each
case lies from the other cases, organ by organ. A patient far outside the others, fine-tuned
on alone (k = 1), teaches organ intensities that the other patients do not have.

Pass the test patients to ``--exclude``: this reads labels, and a protocol's test patients
are for its final scores only.

    python benchmarks/organ_intensities.py --data ../shared/data/chaos-t2 \
        --exclude chaos_t2_001 chaos_t2_002 chaos_t2_015 chaos_t2_021 chaos_t2_033 chaos_t2_038
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lrc_lightning.data.intensity import normalise


def organ_medians(
    image: Path, label: Path, values: list[int], modality: str
) -> tuple[list[float], float]:
    """Median normalised intensity of each label value (NaN where absent), and the share
    of the brightest 0.5% of voxels (those that set the MR upper percentile) in an organ."""
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    array = normalise(volume, modality, source=str(image))  # type: ignore[arg-type]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    medians = [float(np.median(array[labels == v])) if (labels == v).any() else float("nan")
               for v in values]  # fmt: skip
    brightest = volume >= np.percentile(volume, 99.5)
    return medians, float((labels[brightest] > 0).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with dataset.json")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="CASE",
                        help="cases not to read (a protocol's test patients)")
    parser.add_argument("--modality", default="mr", choices=("mr", "ct"))
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    root = Path(args.data)
    spec = json.loads((root / "dataset.json").read_text())
    names = {int(k): v for k, v in spec["labels"].items() if int(k) > 0}
    values = sorted(names)
    rows: dict[str, list[float]] = {}
    bright: dict[str, float] = {}
    for item in spec["training"]:
        image = root / item["image"]
        case = image.name.split(".")[0]
        if case in args.exclude:
            continue
        rows[case], bright[case] = organ_medians(image, root / item["label"], values,
                                                 args.modality)
    if len(rows) < 3:
        parser.exit(2, f"organ_intensities.py: error: {root}: {len(rows)} case(s) after "
                       "--exclude; a case's z needs at least 2 others to compare with\n")
    table = np.array(list(rows.values()))
    print(f"{len(rows)} cases (excluded: {len(args.exclude)}); median normalised intensity "
          "per organ, and (z) its distance from the other cases in their standard deviations; "
          "last column: share of the brightest 0.5% of voxels that lie in an organ")
    print("case".ljust(16) + "".join(names[v].rjust(22) for v in values) + "  bright in organs")
    result = {}
    for i, case in enumerate(rows):
        others = np.delete(table, i, axis=0)
        spread = np.nanstd(others, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            # No spread among the others (or an organ they all lack): z is undefined (NaN).
            z = np.where(spread > 0, (table[i] - np.nanmean(others, 0)) / spread, np.nan)
        result[case] = {names[v]: {"median": round(float(m), 3),
                                   "z": None if np.isnan(s) else round(float(s), 1)}
                        for v, m, s in zip(values, table[i], z, strict=True)}  # fmt: skip
        result[case]["brightest_in_organs"] = round(bright[case], 2)
        flag = "  <- outlier (|z| > 3)" if np.any(np.abs(z[~np.isnan(z)]) > 3) else ""
        cells = [f"{m:8.3f} (z {s:+5.1f})".rjust(22) for m, s in zip(table[i], z, strict=True)]
        print(case.ljust(16) + "".join(cells) + f"{bright[case]:18.2f}" + flag)
    if args.out:
        shown = " ".join(argv if argv is not None else sys.argv[1:])
        command = f"python benchmarks/organ_intensities.py {shown}"
        Path(args.out).write_text(json.dumps({"command": command, "cases": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
