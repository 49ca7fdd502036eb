"""The benchmark command runs and reports every variant (no timing is asserted)."""
import csv

import pytest
import torch
from torch import nn

from actuallysparse import bench, timing
from actuallysparse.timing import time_interleaved


def test_the_header_names_the_cpus_family_and_caches_where_linux_says(monkeypatch):
    from pathlib import Path

    from actuallysparse import kernels

    line = bench.header()
    if Path("/sys/devices/system/cpu/cpu0/cache/index2/size").exists():
        size = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        assert f"L2 {size}" in line and "family " in line
    monkeypatch.setattr(kernels, "cpu_caches", lambda: "")
    assert bench.header().startswith(f"CPU: {kernels.cpu_model()}; ")


def test_quick_benchmark_prints_all_variants(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert bench.main(["--quick", "--no-peers", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| shape | sparsity | mode | batch |" in printed
    assert "CPU: " in printed and "threads" in printed
    rows = list(csv.DictReader(out.open()))
    assert {row["mode"] for row in rows} == {"inference", "train", "train_noinput"}
    for row in rows:
        for variant in bench.VARIANTS:
            assert float(row[f"{variant}_ms"]) > 0
        assert float(row["csr_gflops"]) > 0 and row["backend"]
        assert float(row["csr_speedup_lo"]) <= float(row["csr_speedup"]) <= float(row["csr_speedup_hi"])
        # stored bytes: CSR < COO < dense < masked (weight + mask + copy)
        assert (int(row["csr_bytes"]) < int(row["coo_bytes"]) < int(row["dense_bytes"])
                < int(row["masked_bytes"]))


def test_peers_join_the_table_when_installed(capsys):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[peers]')")
    assert bench.main(["--quick"]) == 0
    assert "| openvino × |" in capsys.readouterr().out


def test_targets_are_checked_from_records():
    record = {"shape": "4096x4096", "mode": "train", "batch": 128, "sparsity": 0.9,
              "coo_speedup": 4.5, "csr_speedup": 3.0}
    (line,) = bench.check_targets([record])
    assert "NOT met" in line
    record["csr_speedup"] = 4.2
    assert "-> met" in bench.check_targets([record])[0]
    record.update(sparseprop_ms=2.0, csr_ms=1.0)
    assert "csr ÷ SparseProp 2.00x (met" in bench.check_targets([record])[0]


@pytest.mark.parametrize("argv, message", [(["--sparsities", "1.5"], "--sparsities"),
                                           (["--shapes", "12"], "OUTxIN"),
                                           (["--repeats", "0"], "--repeats")])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_quick_conv_benchmark_prints_the_layer_table(tmp_path, capsys):
    out = tmp_path / "conv.csv"
    assert bench.main(["--conv", "--quick", "--no-peers", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU: " in printed and "| layer | sparsity | mode | batch |" in printed
    rows = list(csv.DictReader(out.open()))
    assert {row["mode"] for row in rows} == {"inference", "train"}
    for row in rows:
        assert float(row["csr_ms"]) > 0 and float(row["masked_ms"]) > 0 and float(row["csr_gflops"]) > 0


def test_conv_targets_are_checked_from_records():
    from actuallysparse import bench_conv

    layers = [{"layer": "128->256 @8x8", "sparsity": 0.9, "mode": "train", "batch": 64, "csr_speedup": 2.5,
               "csr_ms": 1.0, "sparseprop_ms": 1.2},
              {"layer": "64->128 @16x16", "sparsity": 0.9, "mode": "train", "batch": 64, "csr_speedup": 1.0,
               "csr_ms": 1.0}]
    (line,) = bench_conv.check_conv_targets(layers, [])
    assert "lowest 2.50x (128->256 @8x8) -> met" in line          # the 64-channel layer is not a target
    assert "csr ÷ SparseProp lowest 1.20x (NOT met" in line
    model = [{"sparsity": 0.9, "mode": "train", "batch": 64, "csr_speedup": 1.5, "csr_ms": 2.0, "masked_ms": 5.0,
              "csr_train_bytes": 20, "dense_train_bytes": 100}]
    (line,) = bench_conv.check_conv_targets([], model)
    assert "B=64: csr 1.50x dense (target >= 2.8x: NOT met); 2.50x the masked model (NOT met >= 3x)" in line
    assert "0.200 of dense (met" in line
    model[0].update({"layer": "VGG11_bn", "dense_ms": 3.0, "masked_train_bytes": 150, "csr+native_ms": 1.0})
    for name, ratio in (("csr", 1.5), ("masked", 0.6), ("csr+native", 3.0)):
        model[0].update({f"{name}_speedup": ratio, f"{name}_speedup_lo": ratio, f"{name}_speedup_hi": ratio})
    (line,) = bench_conv.check_conv_targets([], model)
    assert "with the library's pooling, batch norm and dropout 3.00x (target >= 2.8x: met); 5.00x the masked model (met" in line
    model.append({**model[0], "mode": "inference", "batch": 1, "openvino_ms": 1.5})
    line = bench_conv.check_conv_targets([], model)[1]
    assert "B=1: csr 1.50x dense, with the library's pooling, batch norm and dropout 3.00x (target >= 4.0x: NOT met)" in line
    assert "; 1.50x OpenVINO's faster mode (NOT met >= 2x)" in line
    model[1].update({"csr+native_block_ms": 0.5, "openvino_sparse_ms": 1.2})   # block against block
    assert "; 2.40x OpenVINO's faster mode (met >= 2x)" in bench_conv.check_conv_targets([], model)[1]
    table = bench_conv.format_conv_tables([], model)
    assert "| csr × | csr+native × |" in table and "| 3.00 " in table


def test_a_round_times_ours_in_a_block_beside_the_peers(monkeypatch):
    monkeypatch.setattr(timing, "PEER_PAUSE_S", 0)
    sequence, built = [], []
    calls = {name: (lambda name=name: sequence.append(name)) for name in ("dense", "csr")}

    def build_peer():
        built.append("peer")
        return lambda: sequence.append("peer")

    times = timing.time_round(calls, {"peer": build_peer}, "csr", repeats=3, warmup=1)
    assert set(times) == {"dense", "csr", "csr_block", "peer"} and built == ["peer"]
    # after the interleaved calls: ours back to back (warm-up and repeats), then the peer
    assert sequence[-8:] == ["csr"] * 4 + ["peer"] * 4
    assert set(timing.time_round(calls, {}, "csr", repeats=2, warmup=0)) == {"dense", "csr"}


def test_a_peer_is_compared_with_ours_block_against_block():
    record = {"sparseprop_ms": 3.0, "csr_ms": 2.0}
    assert timing.versus_peer(record, "sparseprop", "csr") == 1.5    # no block of ours: the interleaved time
    record["csr_block_ms"] = 1.0
    assert timing.versus_peer(record, "sparseprop", "csr") == 3.0
    assert "csr ÷ SparseProp 3.00x" in bench.check_targets([{**record, "shape": "4096x4096", "mode": "train",
                                                             "batch": 128, "sparsity": 0.9, "coo_speedup": 5.0,
                                                             "csr_speedup": 5.0}])[0]


def test_interleaved_timing_varies_each_calls_predecessor():
    # A call slowed by what ran before it must not always follow the same call.
    sequence = []
    calls = {name: (lambda name=name: sequence.append(name)) for name in "abcde"}
    times = time_interleaved(calls, repeats=12, warmup=1)
    assert sorted(times) == list("abcde")
    assert all(sequence.count(name) == 13 for name in "abcde")
    timed = sequence[5:]
    predecessors = {name: {timed[i - 1] for i in range(1, len(timed)) if timed[i] == name} for name in "abcde"}
    assert all(len(before) >= 3 for before in predecessors.values()), predecessors


def test_quick_dynamic_benchmark_prints_its_row_and_targets(tmp_path, capsys):
    out = tmp_path / "dynamic.csv"
    assert bench.main(["--dynamic", "--quick", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Linear 256x512 | 0.9 | 16 | 100 |" in printed and "Targets:" in printed
    (row,) = list(csv.DictReader(out.open()))
    for name in ("sparse", "rigl", "masked_rigl"):
        assert float(row[f"{name}_speedup_lo"]) <= float(row[f"{name}_speedup"]) <= float(row[f"{name}_speedup_hi"])
    assert float(row["rigl_update_ms"]) > 0 and int(row["update_peak_bytes"]) > 0
    # RigL holds what the fixed-pattern layer holds (same nnz); the masked layer more than dense
    assert int(row["rigl_train_bytes"]) == int(row["sparse_train_bytes"]) < int(row["dense_train_bytes"])
    assert int(row["masked_rigl_train_bytes"]) > int(row["dense_train_bytes"])


def test_the_whole_model_training_step_and_bytes_of_the_conv_bench():
    import torch
    from torch import nn

    from actuallysparse.bench_conv import _training_bytes
    from actuallysparse.timing import optimizer_step_call

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([1, 2])
    weights = 3 * 4 * 9 + 4 + 64 * 10 + 10
    # parameters, their gradients, Adam's two moments, and Adam's step count (a scalar per parameter)
    assert _training_bytes(model, x, y) == 4 * weights * 4 + 4 * len(list(model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    optimizer_step_call(model, optimizer, x, y)()
    assert not torch.equal(model[0].weight.detach(), before)


def test_conv_width_scales_vgg11_and_says_which_layer_is_slowest():
    from actuallysparse import bench_conv

    assert bench_conv.vgg11_cifar_convs(0.25)[:3] == ((16, 32, 16), (32, 64, 8), (64, 64, 8))
    with pytest.raises(ValueError, match="width must be > 0, got 0"):
        bench_conv.vgg11_cifar_convs(0)
    layers = [{"layer": "16->32 @16x16", "mode": "inference", "batch": 1, "csr_speedup": 1.4},
              {"layer": "32->64 @8x8", "mode": "inference", "batch": 1, "csr_speedup": 0.8},
              {"layer": "32->64 @8x8", "mode": "train", "batch": 64, "csr_speedup": 2.0}]
    lines = bench_conv.check_layers_against_dense(layers)
    assert lines == ["inference B=1: slowest layer 32->64 @8x8 at 0.80x dense -> slower than dense",
                     "train     B=64: slowest layer 32->64 @8x8 at 2.00x dense -> no layer slower than dense"]


def test_the_narrow_vgg11_bn_scales_as_the_harness_and_has_its_own_target():
    from actuallysparse import bench_conv

    full, narrow = bench_conv.vgg11_bn_cifar(), bench_conv.vgg11_bn_cifar(width=0.25)
    convs = [m for m in narrow.features if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert [(m.in_features, m.out_features) for m in narrow.classifier if isinstance(m, nn.Linear)] == \
        [(128, 1024), (1024, 1024), (1024, 10)]
    assert [(m.in_features, m.out_features) for m in full.classifier if isinstance(m, nn.Linear)] == \
        [(512, 4096), (4096, 4096), (4096, 10)]
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="width must be > 0, got -1"):
        bench_conv.vgg11_bn_cifar(width=-1)
    row = {"layer": "VGG11_bn x0.25 (CIFAR head)", "width": 0.25, "sparsity": 0.9, "mode": "inference", "batch": 1,
           "csr_speedup": 2.2, "csr_ms": 1.0, "openvino_ms": 1.5}
    (line,) = bench_conv.check_conv_targets([], [row])
    assert line == ("VGG11_bn x0.25 s=0.90 inference B=1: csr 2.20x dense (target >= 2.0x: met); "
                    "1.50x OpenVINO's faster mode")
    (line,) = bench_conv.check_conv_targets([], [{**row, "batch": 64}])   # no target there
    assert line.startswith("VGG11_bn x0.25 s=0.90 inference B=64: csr 2.20x dense;")
