"""Child-process entry point: load a saved model in a fresh interpreter, run inference, report memory.

Run by :func:`comparison.metrics.probe_process_memory` as
``python -m comparison.probe MODEL_FILE --batch-size N ...``; prints one JSON object.
A fresh process is the only honest way to see what loading and running a model costs: the
parent's memory already holds every model, copy and optimizer of the run.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import resource
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; 0 where unavailable)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS high-water mark at the current size (Linux >= 4.0); False if impossible.

    Importing torch has a transient peak far above what the process keeps; without the reset,
    the peak would measure the import, not the model.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or since start, ``ru_maxrss``)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comparison.probe", description=__doc__)
    parser.add_argument("model_file", help="a whole model saved with torch.save(model)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-shape", default="3,32,32", help="per-sample shape, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preimport", default="", help="comma-separated modules to import before the baseline")
    args = parser.parse_args(argv)

    import torch

    from comparison.device import synchronize

    for module in filter(None, args.preimport.split(",")):
        importlib.import_module(module)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(d) for d in args.input_shape.split(","))
    x = torch.zeros(args.batch_size, *shape)
    # Everything so far (interpreter, torch, the methods' libraries, the input) is the baseline.
    gc.collect()
    peak_was_reset = reset_peak_rss()
    rss_before_load = current_rss_bytes()
    model = torch.load(args.model_file, map_location=device, weights_only=False)
    model.eval()
    with torch.inference_mode():
        model(x.to(device))
    result = {
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_load_bytes": rss_before_load,
        "peak_was_reset": peak_was_reset,
    }
    if device.type == "cuda":
        synchronize(device)
        result["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
