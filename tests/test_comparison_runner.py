"""The runner: identical data for every method, cached baselines, resume, failures recorded per cell."""

import json

import pytest
import torch

from actuallysparse import functional
from comparison import records, runner
from comparison.config import RunConfig
from comparison.data import load_dataset
from comparison.metrics import Measurement
from comparison.records import COLUMNS, Cell

STEPS = 2
EXPECTED_METRICS = {
    "step_target_sparsity", "achieved_sparsity", "nonzero_weights", "layers_stored_dense", "test_accuracy",
    "test_loss", "test_eval_s", "stored_bytes", "stored_bytes_masks", "stored_bytes_values", "pruned_layers_bytes",
    "optimizer_state_bytes", "latency_batch1_ms", "latency_batch16_ms", "checkpoint_bytes",
    "elapsed_s", "training_s", "flops", "theoretical_speedup", "compression_ratio", "measured_speedup",
    "measured_speedup_batch1",
}
TRAINING_METRICS = {"train_loss", "train_step_ms", "finetune_s", "measured_speedup_train_step"}


def tiny_config(out, **changes):
    settings = dict(width=0.0625, limit_train=64, limit_test=32, batch_size=16, pretrain_epochs=1, steps=STEPS,
                    epochs_per_step=1, sparsities=(0.9,), seeds=(0,), latency_repeats=1, threads=1, out=str(out))
    settings.update(changes)
    return RunConfig(**settings)


def _fake_probe(model, **kwargs):
    # The child process costs seconds per call; test_comparison_metrics checks the real one.
    return [Measurement("peak_rss_bytes", 1.0, "bytes"), Measurement("model_rss_bytes", 1.0, "bytes")]


@pytest.fixture(autouse=True)
def no_child_process(monkeypatch):
    monkeypatch.setattr(runner, "probe_process_memory", _fake_probe)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", limit_train=64, limit_test=32)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = tiny_config(out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "probe_process_memory", _fake_probe)
        result = runner.run(config, progress=False, echo=lambda text: None)
    return config, result


def test_planned_cells_run_dense_once_per_seed():
    config = RunConfig(methods=("dense", "nni"), sparsities=(0.5, 0.9), seeds=(0, 1))
    assert runner.planned_cells(config) == [
        Cell("dense", 0.0, 0), Cell("nni", 0.5, 0), Cell("nni", 0.9, 0),
        Cell("dense", 0.0, 1), Cell("nni", 0.5, 1), Cell("nni", 0.9, 1),
    ]


def test_every_method_sees_identical_batches_and_starts_from_the_same_baseline(tmp_path, data):
    config = tiny_config(tmp_path)
    device = torch.device("cpu")
    baseline = runner.load_or_train_baseline(config, 0, data, device=device, out_dir=tmp_path, progress=False)
    environment = {key: "x" for key in records.ENVIRONMENT_COLUMNS}
    seen, start_accuracy = {}, {}
    for method in ("dense", "actuallysparse", "nni", "torch-prune"):
        batches = []
        rows = runner.run_cell(
            config, Cell(method, 0.0 if method == "dense" else 0.9, 0), baseline, data, environment,
            device=device, threads=1, scratch_dir=tmp_path, progress=False,
            on_batch=lambda images, labels: batches.append((images.clone(), labels.clone())),
        )
        assert not [row for row in rows if row["metric"] == records.FAILED_METRIC]
        seen[method] = batches
        start_accuracy[method] = next(r["value"] for r in rows if r["metric"] == "test_accuracy" and r["step"] == 0)
    reference = seen["dense"]
    assert len(reference) == STEPS * (64 // 16)
    for method, batches in seen.items():
        assert len(batches) == len(reference), method
        for (x, y), (x_ref, y_ref) in zip(batches, reference):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref), method
    # Consecutive epochs get different orders (the check above is not trivially true).
    assert not torch.equal(reference[0][1], reference[4][1])
    assert len(set(start_accuracy.values())) == 1, start_accuracy


def test_sparse_from_scratch_trains_through_the_baseline_s_batches_at_its_target(tmp_path, data):
    from comparison.data import train_batches

    config = tiny_config(tmp_path, pretrain_epochs=2, sparsities=(0.8,))
    device = torch.device("cpu")
    payload = runner.baseline_payload(config, 0, data, device=device, out_dir=tmp_path, progress=False)
    assert payload["pretrain_s"] > 0
    environment = {key: "x" for key in records.ENVIRONMENT_COLUMNS}
    seen = {}
    for method in ("dense", "set", "rigl"):
        batches = []
        rows = runner.run_cell(
            config, Cell(method, 0.0 if method == "dense" else 0.8, 0), payload["state_dict"], data, environment,
            device=device, threads=1, scratch_dir=tmp_path, progress=False, pretrain_s=payload["pretrain_s"],
            on_batch=lambda images, labels: batches.append((images.clone(), labels.clone())))
        assert not [row for row in rows if row["metric"] == records.FAILED_METRIC], method
        values = {(row["metric"], row["step"]): row["value"] for row in rows}
        seen[method] = batches, values
    _, dense = seen["dense"]
    assert dense[("training_s", 0)] == payload["pretrain_s"]
    pretraining = [batch for epoch in range(2) for batch in train_batches(data.train, 16, 0, "pretrain", epoch)]
    for method in ("set", "rigl"):
        batches, values = seen[method]
        # the baseline's pretraining batches, then the fine-tuning batches every pruning cell sees
        assert len(batches) == len(pretraining) + len(seen["dense"][0])
        for (x, y), (x_ref, y_ref) in zip(batches, pretraining + seen["dense"][0]):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref), method
        for step in range(STEPS + 1):
            assert values[("achieved_sparsity", step)] == pytest.approx(0.8, abs=0.01), (method, step)
        assert [values[("step_target_sparsity", step)] for step in range(1, STEPS + 1)] == [0.8] * STEPS
        times = [values[("training_s", step)] for step in range(STEPS + 1)]
        assert times[0] == 0 and all(b > a for a, b in zip(times, times[1:])), times
        # a random initialisation, not the pretrained baseline
        assert values[("test_loss", 0)] != dense[("test_loss", 0)]


def test_run_writes_the_table_with_every_metric_per_step(finished_run):
    config, result = finished_run
    assert set(result.statuses.values()) == {"finished"} and len(result.statuses) == 6
    table = records.load_table(result.table_path)
    assert list(table.columns) == list(COLUMNS)
    assert (table["run_id"] == config.run_id).all() and (table["dataset"] == "digits").all()
    assert (table["threads"] == 1).all() and table["torch_version"].iloc[0] == torch.__version__
    for (method, target), cell in table.groupby(["method", "target_sparsity"]):
        assert sorted(cell["step"].unique()) == list(range(STEPS + 1))
        for step, rows in cell.groupby("step"):
            metrics = set(rows["metric"])
            assert EXPECTED_METRICS <= metrics, (method, step, EXPECTED_METRICS - metrics)
            # the fresh-process probe runs at the last step only
            assert ("peak_rss_bytes" in metrics) == (step == STEPS)
            assert (TRAINING_METRICS <= metrics) == (step > 0)
        final = cell[(cell["step"] == STEPS) & (cell["metric"] == "achieved_sparsity")]["value"].iloc[0]
        # channel pruning removes whole channels: it reaches the target within 0.05
        assert final == pytest.approx(target, abs=0.05 if method == "nni-structured" else 1e-3)
    out = config.out_dir
    for name in ("config.json", "environment.json", "summary.md", "results.csv"):
        assert (out / name).is_file(), name
    assert len(list((out / "plots").glob("*.png"))) == 8
    assert len(list((out / "baselines").glob("*.pt"))) == 1
    environment = json.loads((out / "environment.json").read_text())
    assert environment["sparse_backend"] == functional.backend_name("cpu")


def test_recorded_units_follow_the_documented_ones(finished_run):
    _, result = finished_run
    table = records.load_table(result.table_path)
    for metric, unit in table[["metric", "unit"]].drop_duplicates().itertuples(index=False):
        if metric.startswith("stored_bytes_") or metric.startswith("latency_batch"):
            assert unit == ("bytes" if metric.startswith("stored") else "ms"), metric
        else:
            assert records.UNITS[metric] == unit, metric


def test_actually_sparse_holds_fewer_bytes_than_the_masks(finished_run):
    _, result = finished_run
    table = records.load_table(result.table_path)
    final = table[(table["step"] == STEPS) & (table["metric"] == "pruned_layers_bytes")].set_index("method")["value"]
    assert final["actuallysparse"] < final["dense"] < final["nni"]
    assert final["torch-prune"] > final["dense"]


def test_rerun_skips_finished_cells_and_runs_only_missing_ones(finished_run, monkeypatch):
    config, _ = finished_run
    ran = []
    real_run_cell = runner.run_cell
    monkeypatch.setattr(runner, "run_cell", lambda cfg, cell, *a, **k: ran.append(cell) or real_run_cell(cfg, cell, *a, **k))
    monkeypatch.setattr(runner, "pretrain", lambda *a, **k: pytest.fail("the cached baseline was retrained"))
    result = runner.run(config, progress=False, make_plots=False, echo=lambda text: None)
    assert ran == [] and set(result.statuses.values()) == {"skipped"}
    removed = Cell("nni", 0.9, 0)
    records.cell_path(config.out_dir, removed).unlink()
    result = runner.run(config, progress=False, make_plots=False, echo=lambda text: None)
    assert ran == [removed] and result.statuses[removed] == "finished"
    assert len(records.load_table(result.table_path)) > 0


def test_rerun_of_other_code_warns_that_kept_cells_were_made_by_another_commit(finished_run, monkeypatch):
    config, _ = finished_run
    said = []
    runner.run(config, progress=False, make_plots=False, echo=said.append)
    assert not [line for line in said if "warning" in line]       # the same code: nothing to say
    real_columns = runner.environment_columns
    monkeypatch.setattr(runner, "environment_columns",
                        lambda *a, **k: {**real_columns(*a, **k), "git_commit": "feedbee"})
    said.clear()
    runner.run(config, progress=False, make_plots=False, echo=said.append)
    warning = [line for line in said if line.startswith("warning")]
    assert len(warning) == 1 and "not by this checkout (feedbee)" in warning[0] and "new --out" in warning[0]


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    from comparison.methods.torch_prune import TorchPrune

    def broken(self, model, target_sparsity, optimizer):
        raise RuntimeError("boom in torch-prune")

    monkeypatch.setattr(TorchPrune, "prune", broken)
    config = tiny_config(tmp_path, methods=("torch-prune", "dense"), steps=1)
    lines = []
    result = runner.run(config, progress=False, make_plots=False, echo=lines.append)
    failed = Cell("torch-prune", 0.9, 0)
    assert result.failed == [failed] and result.statuses[Cell("dense", 0.0, 0)] == "finished"
    table = records.load_table(result.table_path)
    failure = table[table["metric"] == records.FAILED_METRIC]
    assert len(failure) == 1 and failure["method"].iloc[0] == "torch-prune"
    assert failure["note"].iloc[0] == "RuntimeError: boom in torch-prune" and failure["step"].iloc[0] == 1
    assert "boom in torch-prune" in "\n".join(lines)  # the summary names the failure
    # Without --retry-failed the failure stands; with it, the (now fixed) cell runs again.
    monkeypatch.undo()
    monkeypatch.setattr(runner, "probe_process_memory", _fake_probe)
    assert runner.run(config, progress=False, make_plots=False, echo=lambda t: None).statuses[failed] == "skipped"
    result = runner.run(config, progress=False, make_plots=False, retry_failed=True, echo=lambda t: None)
    assert result.statuses[failed] == "finished" and not result.failed


def test_a_nan_loss_fails_only_its_cell(tmp_path, monkeypatch):
    from comparison.methods.dense import Dense

    def poison(self, model, target_sparsity, optimizer):
        with torch.no_grad():
            model.get_submodule("classifier.6").weight.fill_(float("nan"))

    monkeypatch.setattr(Dense, "prune", poison)
    config = tiny_config(tmp_path, methods=("dense", "actuallysparse"), steps=1)
    result = runner.run(config, progress=False, make_plots=False, echo=lambda text: None)
    assert result.failed == [Cell("dense", 0.0, 0)]
    table = records.load_table(result.table_path)
    note = table.loc[table["metric"] == records.FAILED_METRIC, "note"].iloc[0]
    assert note.startswith("NonFiniteLossError: training loss became nan")


def test_init_file_replaces_pretraining(tmp_path, data, monkeypatch):
    config = tiny_config(tmp_path / "out", init=str(tmp_path / "init.pt"))
    source = runner.build_model(config, data.num_classes, seed=5)
    torch.save(source.state_dict(), tmp_path / "init.pt")
    monkeypatch.setattr(runner, "pretrain", lambda *a, **k: pytest.fail("pretrained despite --init"))
    state = runner.load_or_train_baseline(config, 0, data, device=torch.device("cpu"), out_dir=tmp_path / "out",
                                          progress=False)
    for key, value in source.state_dict().items():
        assert torch.equal(state[key], value), key


def test_a_diverging_baseline_fails_the_cells_of_its_seed(tmp_path, monkeypatch):
    from comparison.training import NonFiniteLossError

    def diverge(model, split, config, seed, **kwargs):
        raise NonFiniteLossError("training loss became nan at epoch 0, batch 0")

    monkeypatch.setattr(runner, "pretrain", diverge)
    config = tiny_config(tmp_path, methods=("dense", "nni"))
    result = runner.run(config, progress=False, make_plots=False, echo=lambda text: None)
    assert sorted(result.failed) == sorted(runner.planned_cells(config))
    table = records.load_table(result.table_path)
    assert table["note"].str.startswith("baseline training failed: NonFiniteLossError").all()


def test_a_results_directory_of_other_settings_is_refused(finished_run):
    config, _ = finished_run
    with pytest.raises(ValueError, match="settings differ: width"):
        runner.run(config.replace(width=0.125), progress=False, echo=lambda text: None)


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="cuda.*--device cpu"):
        runner.resolve_device("cuda")


def test_the_dense_reference_is_timed_between_the_cell_s_steps_without_touching_its_random_stream():
    timed = []

    class Reference:
        @staticmethod
        def time_step():
            torch.rand(3)  # a reference step draws dropout masks of its own
            timed.append(len(timed))
            return 10.0 + len(timed)

    between_steps, window = runner._reference_sampler(Reference())
    torch.manual_seed(0)
    for _ in range(2 * runner.REFERENCE_EVERY + 1):
        between_steps()
    assert len(timed) == 2                                 # after every REFERENCE_EVERY-th step
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))               # the cell's random stream is as it was
    assert window() == 11.5                                # the median of the window's samples
    assert window() is None                                # and the window starts afresh
