"""The speed suite (benchmarks/) runs and reports what it measured: harness, a tiny pair, the entry point."""

import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

from benchmarks import predict_cpu
from benchmarks.contenders import NUM_CLASSES, PAIRS, Model, Pair, ours
from benchmarks.harness import Runner, interleaved_rates
from benchmarks.report import BEGIN, END, targets_markdown, write_report
from benchmarks.sections.pairs import plan_pair
from benchmarks.sections.train import train_section
from benchmarks.settings import Settings, default_settings
from deeplab_lit.models import deeplab_v3plus

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"


def quick_settings(**changes) -> Settings:
    values = {**default_settings("cpu", quick=True), "rounds": 2, "warmup": 1, **changes}
    return Settings(device="cpu", quick=True, amp_dtype="float16", memory=False, ablations=True, threads=1,
                    **values)  # fmt: skip


class Recorder(Runner):
    """A contender that notes when it steps, so the order of the rounds can be read back."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls, self.batch, self.device = name, calls, 2, "cpu"

    def step(self) -> None:
        self.calls.append(self.name)


def test_interleaved_rates_warm_up_every_runner_then_alternate_the_order_of_the_rounds():
    calls: list[str] = []
    runners = {name: Recorder(name, calls) for name in "ABC"}
    rates = interleaved_rates(runners, iterations=2, warmup=1, rounds=3, title="test")
    assert calls == list("ABC" + "AABBCC" + "CCBBAA" + "AABBCC")
    assert {name: len(r) for name, r in rates.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(rate > 0 for r in rates.values() for rate in r)


def test_pairs_run_at_sizes_the_other_library_accepts_and_list_ours_first():
    v3, v3plus = PAIRS
    assert (v3.crop(321), v3.image((375, 500))) == (321, (375, 500))
    assert (v3plus.crop(321), v3plus.image((375, 500))) == (320, (384, 512))
    names = [name for name, _, _ in plan_pair("train", v3plus, quick_settings())]
    assert names == ["ours", "ours separable", "smp plain", "smp tricks"]  # no ablations: v3 only
    names = [name for name, _, _ in plan_pair("infer", v3, quick_settings(compile="default"))]
    assert names == ["ours", "torchvision plain", "torchvision tricks", "ours-compiled", "ours-no-fold",
                     "ours-no-cl"]  # fmt: skip


def test_train_section_times_every_recipe_of_a_tiny_pair_and_sets_its_target(capsys):
    tiny = Pair(
        "tiny", "tiny pair", ours(deeplab_v3plus, backbone="mobilenet_v2"),
        Model(partial(deeplabv3_mobilenet_v3_large, weights=None, weights_backbone=None,
                      num_classes=NUM_CLASSES, aux_loss=True), "torchvision"),
        "torchvision", multiple=16, ablations=True,
    )  # fmt: skip
    targets = []
    lines, step_rates = train_section(quick_settings(train_size=40, profile=True), targets, pairs=(tiny,))
    printed = capsys.readouterr().out
    assert "training step (forward + backward + SGD), batch 2 x 3 x 32 x 32" in printed  # 40 -> 32
    names = ["ours", "torchvision plain", "torchvision tricks", "ours-no-cl", "ours-no-fused"]
    for name in names:  # median, range, ours / this, memory (off), GFLOPs
        row = rf"\| {name} \| [^|]+ \| {NUMBER} \| {NUMBER}-{NUMBER} \| {NUMBER}x \| - \| {NUMBER} \|"
        assert re.search(row, printed), name
        assert re.search(row, "\n".join(lines)), name
    (target,) = targets
    assert target.versus == "torchvision plain" and target.goal == 1.5 and target.ratio > 0
    assert step_rates["ours tiny"] > 0
    ours_rate = float(re.search(rf"\| ours \| [^|]+ \| ({NUMBER}) \|", printed).group(1))
    assert step_rates["ours tiny"] == pytest.approx(ours_rate, abs=0.006)
    report = "\n".join(targets_markdown(targets))
    assert f"| {target.ratio:.2f}x | 1.5x |" in report
    assert [name for name, _ in target.profiles] == ["ours", "torchvision plain"]  # --profile
    assert report.count("one step (torch.profiler, top ops by self time)") == 2 and "convolution" in report


def test_write_report_replaces_its_own_block_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    write_report(path, ["first run"])
    assert path.read_text() == f"# Benchmarks\n\nintro\n\n{BEGIN}\nfirst run\n{END}\n"
    path.write_text(path.read_text() + "\n## CRF\n\nkept\n")
    write_report(path, ["second run"])
    assert path.read_text() == f"# Benchmarks\n\nintro\n\n{BEGIN}\nsecond run\n{END}\n\n## CRF\n\nkept\n"


def test_speed_py_entry_point_runs_the_data_section_and_writes_the_report(tmp_path):
    out = tmp_path / "report.md"
    out.write_text(f"# Mine\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--quick",
               "--sections", "data", "--data-images", "4", "--data-batches", "2", "--threads", "1",
               "--no-memory", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    row = rf"\| data loader \(normalised in the workers, default\) \| {NUMBER} \(range {NUMBER}-{NUMBER}\) \|"
    assert re.search(row, result.stdout)
    text = out.read_text()
    assert text.startswith(f"# Mine\n\n{BEGIN}\n## Speed\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old" not in text and re.search(row, text) and "--quick: tiny sizes" in text


def test_crf_rnn_benchmark_row_reports_times_memory_and_the_targets():
    from benchmarks.crf_rnn_speed import row

    cells = [c.strip() for c in row(17, 2, 3, 2, 1, "cpu").strip("|").split("|")]
    size, batch, offline, forward, both, ratio, logits, saved, lattice, peak, default_peak, target = cells
    assert (size, batch) == ("17", "2")
    assert all(float(v) > 0 for v in (offline, forward, both, ratio))
    assert all(p == "-" or float(p) >= 0 for p in (peak, default_peak))
    assert float(target) >= float(lattice)  # (iterations + 2) x logits + one lattice


def test_backbones_section_times_every_head_and_reports_how_the_backbone_learns(tmp_path):
    from benchmarks.sections.backbones import backbones_section

    family = (("MobileNetV3-L", "mobilenet_v3_large"),)
    lines = backbones_section(quick_settings(learn_steps=2), family, root=str(tmp_path / "synthetic"))
    rows = [line for line in lines if line.startswith("| MobileNetV3-L |")]
    assert [row.split("|")[2].strip() for row in rows[:4]] == ["v1", "v2", "v3", "v3+"]
    assert all(re.search(rf"\| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|", row) for row in rows[:4])
    miou = float(rows[4].split("|")[2])  # the learning table's row
    assert 0.0 <= miou <= 1.0


def test_a_named_report_block_keeps_the_main_block(tmp_path):
    from benchmarks.report import markers

    path = tmp_path / "BENCHMARKS.md"
    write_report(path, ["main tables"])
    write_report(path, ["backbones table"], "backbones")
    write_report(path, ["backbones again"], "backbones")
    text = path.read_text()
    begin, end = markers("backbones")
    assert f"{BEGIN}\nmain tables\n{END}" in text and f"{begin}\nbackbones again\n{end}" in text
    assert "backbones table" not in text


def test_predict_cpu_benchmark_compares_every_contender_on_the_same_weights(capsys):
    results = predict_cpu.main(
        ["--size", "33x41", "--rounds", "1", "--engines", "eager", "--precisions", "bf16"]
    )
    bf16 = "ours, predict_precision=bf16"
    assert [name for name in results if name != bf16] == [
        "torchvision eager", "ours, BatchNorm folded", "ours, predict_engine=eager"
    ]  # fmt: skip
    printed = capsys.readouterr().out
    assert (bf16 in results) != (f"{bf16}: not run, refused here" in printed)  # run, or said why not
    results.pop(bf16, None)
    assert results["torchvision eager"]["speed_up"] == 1.0
    for row in results.values():  # same weights: the labels agree to folding's rounding
        assert row["images_per_s"] > 0 and row["labels_equal"] > 0.999
    assert "torch capability" in printed and "| ours, predict_engine=eager |" in printed


def test_predict_precision_benchmark_reads_a_fit_runs_checkpoint_and_compares_with_fp32(tmp_path, capsys):
    from benchmarks import predict_precision
    from deeplab_lit.cli import main

    quickstart = Path(__file__).parents[1] / "experiments" / "quickstart.yaml"
    main(["fit", "--config", str(quickstart), f"--data.init_args.root={tmp_path / 'data'}",
          "--data.init_args.num_train=16", "--data.init_args.num_val=3", "--data.init_args.num_workers=0",
          "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.callbacks=[]",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu"])  # fmt: skip
    checkpoint = next(tmp_path.glob("**/last.ckpt"))
    results = predict_precision.main(
        [
            "--ckpt_path",
            str(checkpoint),
            "--precisions",
            "bf16",
            "--emulated",
            "--rounds",
            "1",
            "--threads",
            "1",
        ]
    )
    assert list(results) == ["fp32", "bf16"]
    assert results["fp32"]["change_points"] == 0 and results["fp32"]["labels_equal"] == 1
    assert 0 <= results["bf16"]["mIoU"] <= 1 and results["bf16"]["labels_equal"] > 0.9
    printed = capsys.readouterr().out
    assert "torch capability" in printed and "3 validation images" in printed
