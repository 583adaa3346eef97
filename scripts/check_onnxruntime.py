#!/usr/bin/env python3
"""Loads every pruned ONNX model that the tests exported and runs it in onnxruntime.

Each case folder (written by the Rust test `tract_ort_export` when ZIPLM_ORT_DIR is set)
holds `model.onnx` (as ziplm emitted it, unchanged) and `case.json` with the inputs and
tract's output on them. The script fails when onnxruntime cannot load or run a model,
or when its output differs from tract's by more than 1e-4.

Usage: python3 scripts/check_onnxruntime.py DIR
"""
import json
import pathlib
import sys

import numpy as np
import onnxruntime as ort


def main(root: str) -> int:
    cases = sorted(p for p in pathlib.Path(root).iterdir() if (p / "case.json").exists())
    if not cases:
        print(f"no cases in {root}", file=sys.stderr)
        return 1
    worst = 0.0
    for case in cases:
        spec = json.loads((case / "case.json").read_text())
        sess = ort.InferenceSession(str(case / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {}
        for inp in spec["inputs"]:
            arr = np.array(inp["data"], dtype=np.dtype(inp["dtype"])).reshape(inp["shape"])
            feeds[inp["name"]] = arr
        out = sess.run(None, feeds)[0]
        expected = np.array(spec["output"], dtype=np.float32).reshape(spec["output_shape"])
        if out.shape != expected.shape:
            print(f"{case.name}: onnxruntime shape {out.shape}, tract {expected.shape}", file=sys.stderr)
            return 1
        diff = float(np.abs(out - expected).max())
        worst = max(worst, diff)
        status = "ok" if diff <= 1e-4 else "MISMATCH"
        print(f"{case.name}: onnxruntime {ort.__version__} loads and runs it; max |ort - tract| = {diff:.2e} {status}")
        if diff > 1e-4:
            return 1
    print(f"{len(cases)} models checked in onnxruntime, worst difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
