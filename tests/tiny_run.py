"""A tiny comparison run (seconds), shared by the tests that damage, kill or distribute one."""
from comparison import records
from comparison.cli import main

TINY = ["--width", "0.0625", "--limit-train", "64", "--limit-test", "32", "--batch-size", "16",
        "--pretrain-epochs", "1", "--steps", "1", "--epochs-per-step", "1", "--sparsities", "0.9",
        "--methods", "dense,actuallysparse", "--latency-repeats", "1", "--probe-memory", "false",
        "--threads", "1", "--seeds", "0", "--no-plots", "--no-progress"]
# Metrics that do not depend on timing or on the machine: a recovered, resumed or distributed run
# must give exactly these.
DETERMINISTIC = {"test_accuracy", "test_loss", "achieved_sparsity", "nonzero_weights", "stored_bytes",
                 "pruned_layers_bytes", "optimizer_state_bytes", "train_loss", "step_target_sparsity"}


def run_tiny(out, *extra) -> int:
    """``python -m comparison run`` of the tiny grid into ``out``; returns the exit status."""
    return main(["run", *TINY, "--out", str(out), *extra])


def deterministic(directory) -> list[tuple]:
    """The timing-independent observations of a results directory, sorted."""
    table = records.load_table(directory, echo=lambda text: None)
    table = table[table.metric.isin(DETERMINISTIC)]
    return sorted(zip(table.method, table.target_sparsity, table.step, table.metric, table.value.round(6)))
