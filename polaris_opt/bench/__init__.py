"""`polaris-opt bench`: time models side by side, interleaved, each in a worker process of its own.

- inputs.py: the models' declared inputs, checked to agree; --batch and --shape parsed.
- feeds.py: the arrays of each batch, random or from an .npz, made once for every model.
- models.py: each model read once (size, inputs, ai.polaris ops) and paired with a runtime.
- plan.py: all of the above from the command line's words, checked before anything runs.
- process.py / worker.py / runner.py: a worker process per contender, turns A B A B ..., timing
  inside the worker.
- stats.py / document.py: percentiles, the result rows and the --json document.

This module stays light (the CLI imports it for its defaults while building `--help`).
"""

from __future__ import annotations

# 10 warm-up runs, and at least 0.1 s of them (runner.WARMUP_SECONDS): a fresh session's first
# run took 2-60x its steady time on the zoo models (ONNX Runtime allocates, the polaris runtime
# builds kernels), and runs 2-10 up to 1.6-8x on the digits models; resnet_s, mobilenetv2_s
# and transformer_s settled within about 1.2x by the 5th run (benchmarks/bench_bench.py).
DEFAULT_WARMUP = 10
# 200 runs: p90 rests on the 20 slowest, so a slow burst of a few runs does not move it, and a
# default bench of two small zoo models still takes 1.0-1.4 s whole (digits_mlp against itself;
# resnet_s against mobilenetv2_s at batch 1), 3.2-3.6 s at batch 1 and 8.
DEFAULT_RUNS = 200
