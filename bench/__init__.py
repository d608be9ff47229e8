"""GPU benchmarks. The servers' allocator setting applies here too, before torch touches CUDA."""

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
