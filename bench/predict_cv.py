"""Leave-one-group-out cross-validation of `neuron-fleet predict` on inf2-published.json.

Honest by construction: every held-out record is predicted by a model fitted without its
whole group.
- static batch: hold out one batch size, one tp, one input length at a time (static refit);
- served: hold out one load level at a time (static + serving terms refit without it).

Prints mean absolute percentage error per metric and kind against the issue's goals.
Usage: python bench/predict_cv.py [--data FILE] [--write]   (--write refreshes the fit
shipped in supervisor/predict/fitted-model.json from the full data.) Every held-out
prediction and its error goes to bench/results/predict_cv_records.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.predict.records import kind_of, load_of, load_records, target
from supervisor.predict.replay import ape, fit, predict_record
from supervisor.predict.timing import (
    EXCLUDED_FAMILIES,
    TimingModel,
    model_to_json,
)

GOALS = {
    ("static", "ttft_s"): 15,
    ("static", "itl_ms"): 10,
    ("static", "output_tok_per_s"): 15,
    ("served", "ttft_s"): 30,
    ("served", "itl_ms"): 20,
    ("served", "output_tok_per_s"): 20,
}


def load_level(record: dict) -> str:
    load = load_of(record)
    if load.kind == "synchronous" or (load.kind == "concurrency" and load.value <= 2):
        return "1-2 clients"
    if load.kind == "throughput" or (load.kind == "concurrency" and load.value >= 256):
        return "saturated"
    level = load.value if load.kind == "concurrency" else load.value * 30  # ~clients in flight
    if level <= 16:
        return "low"
    if level <= 60:
        return "mid"
    return "high"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", help="records file (default: the packaged copy)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    records = load_records(args.data)
    started = time.monotonic()
    errors: dict[tuple[str, str], list[float]] = defaultdict(list)
    precise: dict[tuple[str, str], list[float]] = defaultdict(list)
    static = [r for r in records if kind_of(r) == "static"]
    rows: list[tuple[str, str, str, float, float, float]] = []
    for field in ("batch_size", "tp", "input_tokens"):
        for value in sorted({r[field] for r in static}):
            held = [r for r in static if r[field] == value]
            model = TimingModel.fit_static([r for r in records if r not in held])
            for r in held:
                predicted, measured = predict_record(model, r), target(r)
                for metric, v in ape(predicted, measured).items():
                    rows.append((r["id"], f"{field}={value}", metric, measured[metric],
                                 predicted[metric], v))  # fmt: skip
                    errors[(f"static/{field}", metric)].append(v)
                    errors[("static", metric)].append(v)
                    if not (metric == "ttft_s" and target(r)["ttft_s"] < 0.5):
                        precise[("static", metric)].append(v)
    excluded = [r for r in records if str(r.get("model_family", "")).lower() in EXCLUDED_FAMILIES]
    served = [r for r in records if kind_of(r) == "served" and r not in excluded]
    for level in sorted({load_level(r) for r in served}):
        held = [r for r in served if load_level(r) == level]
        model = fit([r for r in records if r not in held])
        for r in held:
            predicted, measured = predict_record(model, r), target(r)
            tool = "llmperf" if load_of(r).kind == "concurrency" else "guidellm"
            for metric, v in ape(predicted, measured).items():
                errors[("served", metric)].append(v)
                errors[(f"served/{level}", metric)].append(v)
                errors[(f"served/{tool}", metric)].append(v)
                rows.append((r["id"], level, metric, measured[metric], predicted[metric], v))
    print(f"leave-one-group-out over {len(records)} records ({time.monotonic() - started:.0f} s)")
    print("| kind | metric | records | MAPE | median APE | goal |")
    print("|---|---|---:|---:|---:|---:|")
    for key in sorted(errors):
        v = sorted(errors[key])
        goal = GOALS.get(key)
        mark = "" if goal is None else (" ✓" if sum(v) / len(v) <= goal else " ✗")
        print(
            f"| {key[0]} | {key[1]} | {len(v)} | {sum(v) / len(v):.1f} % | "
            f"{v[len(v) // 2]:.1f} % | {'' if goal is None else f'<= {goal} %'}{mark} |"
        )
    for key in sorted(precise):
        v = sorted(precise[key])
        print(
            f"| static, measured TTFT >= 0.5 s | {key[1]} | {len(v)} | "
            f"{sum(v) / len(v):.1f} % | {v[len(v) // 2]:.1f} % | |"
        )
    out_csv = Path(__file__).resolve().parent / "results" / "predict_cv_records.csv"
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "held_out_group", "metric", "measured", "predicted", "ape_pct"])
        for row in rows:
            writer.writerow([*row[:3], f"{row[3]:.6g}", f"{row[4]:.6g}", f"{row[5]:.1f}"])
    full = fit([r for r in records if r not in excluded])
    for r in excluded:  # out of the fit (inf2-published.md: inconsistent); shown, not scored
        e = ape(predict_record(full, r), target(r))
        print(f"excluded {r['id']}: " + ", ".join(f"{k} {v:.0f} %" for k, v in e.items()))
    if args.write:
        out = Path(__file__).resolve().parents[1] / "supervisor/predict/fitted-model.json"
        out.write_text(json.dumps(model_to_json(full), indent=1, sort_keys=True) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
