"""`python -m tiny_models DIR`: build the embedded tiny models into DIR (llm/, svd/, t2v/, llm-overflow/).

They are randomly initialised (fixed seeds): structurally real, so they load through the same code as
real checkpoints, but they produce noise. Real deployments point the servers at real model folders.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tiny_models.llm import build_llm, build_overflow_llm
from tiny_models.video import build_svd, build_text_to_video


def main(argv: list[str] | None = None) -> int:
    """Build every tiny model."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "models")
    for name, build in (
        ("llm", build_llm),
        ("llm-overflow", build_overflow_llm),
        ("svd", build_svd),
        ("t2v", build_text_to_video),
    ):
        start = time.perf_counter()
        build(out / name)
        print(f"built {out / name} in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
