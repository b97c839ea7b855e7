"""Out-of-sample check of `neuron-fleet predict`: published inf2 figures NOT in its calibration.

`bench/predict_holdout.json` holds published, cited records in the schema of
inf2-published.json that the packaged model never saw (sources and how each value was read:
the records' `notes` and bench/predict_holdout.md). This script predicts each one with the
packaged fit, exactly as `neuron-fleet predict --records FILE` does (same model, same
extrapolation warnings), and prints the error per kind and metric, then one line per record.
Nothing is fitted here.

Usage: python bench/predict_holdout.py [--records FILE]
(output kept in bench/results/predict_holdout.txt)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.predict.records import kind_of, load_records, target
from supervisor.predict.replay import ape, packaged_model, predict_record, record_warnings

HERE = Path(__file__).resolve().parent
METRICS = ("ttft_s", "itl_ms", "output_tok_per_s")
UNITS = {"ttft_s": "s", "itl_ms": "ms", "output_tok_per_s": "tok/s"}


def source_of(record: dict) -> str:
    """The record's source family: the part of its id before the first '/'."""
    return str(record["id"]).split("/", 1)[0]


def table(errors: dict[tuple[str, str], list[float]]) -> list[str]:
    lines = ["| kind | metric | records | MAPE | median APE |", "|---|---|---:|---:|---:|"]
    for (kind, metric), values in sorted(errors.items()):
        lines.append(
            f"| {kind} | {metric} | {len(values)} | {statistics.fmean(values):.1f} % "
            f"| {statistics.median(values):.1f} % |"
        )
    return lines


def fmt(value: float) -> str:
    return f"{value:.3g}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", default=str(HERE / "predict_holdout.json"))
    args = parser.parse_args()
    records = load_records(args.records)
    model = packaged_model()
    errors: dict[tuple[str, str], list[float]] = defaultdict(list)
    lines: list[str] = []
    for record in records:
        warnings = record_warnings(model, record)
        predicted, measured = predict_record(model, record), target(record)
        errs = ape(predicted, measured)
        kind = kind_of(record)
        for metric, value in errs.items():
            errors[(kind, metric)].append(value)
            errors[(f"{kind}/{source_of(record)}", metric)].append(value)
            if not warnings:
                errors[(f"{kind}, no extrapolation warning", metric)].append(value)
        parts = [
            f"{metric} {fmt(measured[metric])} vs {fmt(predicted[metric])} {UNITS[metric]}"
            f" ({predicted[metric] / measured[metric] - 1:+.0%})"
            for metric in METRICS
            if metric in errs
        ]
        line = f"- {record['id']}: " + "; ".join(parts)
        if warnings:
            line += " [extrapolating: " + "; ".join(warnings) + "]"
        lines.append(line)
    print(f"{len(records)} out-of-sample records from {args.records}, packaged model")
    print("(measured vs predicted; APE = |predicted - measured| / measured)\n")
    print("\n".join(table(errors)))
    print("\nPer record (measured vs predicted, predicted/measured - 1):")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
