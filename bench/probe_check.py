"""What checking a remembered probe costs next to measuring it again.

    python bench/probe_check.py [--repeats 3]

On tilerun's default model: `receptive.probe_model` (the measurement a cache entry saves)
vs `receptive.reproduces` (the halo check every entry read from disk passes first), one
thread, interleaved, best of --repeats each (bench/common.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import interleaved, machine, print_ratio  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from tilerun import load_model
    from tilerun.receptive import probe_model, reproduces

    torch.set_num_threads(1)
    model = load_model()
    probe = probe_model(model)
    times = interleaved({"probe": lambda: probe_model(model), "check": lambda: reproduces(model, probe)},
                        repeats=args.repeats)
    print(machine())
    print(f"default model: {probe}")
    print_ratio(times, "check", "probe")


if __name__ == "__main__":
    main()
