"""How long loading the embedded model takes: the one-time GGUF conversion vs every later load.

    python benchmarks/loading.py            # prints a markdown row for benchmarks/RESULTS.md

Uses a fresh cache folder so the first load really converts.
"""

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    os.environ["TESTTIME_CACHE"] = tempfile.mkdtemp(prefix="testtime-bench-")
    from testtime.loading import load_model_and_tokenizer

    start = time.perf_counter()
    load_model_and_tokenizer("smollm2-135m")
    first = time.perf_counter() - start
    later = []
    for _ in range(3):
        start = time.perf_counter()
        load_model_and_tokenizer("smollm2-135m")
        later.append(time.perf_counter() - start)
    print(f"| smollm2-135m | {first:.1f} s (GGUF -> HF folder, once) | {min(later):.2f} s (best of 3) "
          f"| {platform.processor() or platform.machine()}, {os.cpu_count()} cores |")


if __name__ == "__main__":
    main()
