"""Every notebook in ``notebooks/`` runs top to bottom, with tiny settings, and writes its results.

Each notebook reads its settings from ``DEEPLAB_LIT_NB_*`` environment variables (defaults: the real run)
and writes ``results.json`` and its figures to ``DEEPLAB_LIT_NB_OUT``. The tests execute them with
nbclient in a fresh ``python3`` kernel, in a temporary working directory, on a dozen 48-pixel synthetic
images for one epoch, then check the results each notebook exists to produce.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from deeplab_lit.crf import PRESETS

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
NAMES = [
    "01_quickstart",
    "02_ablation_crf",
    "03_ablation_aspp_output_stride",
    "04_versions",
    "05_trainable_crf",
    "06_losses",
]

#: The tiny run: 12 training and 8 validation images of 48 px, one epoch of batches of 4.
TINY_SETTINGS = {
    "DEEPLAB_LIT_NB_EPOCHS": "1",
    "DEEPLAB_LIT_NB_NUM_TRAIN": "12",
    "DEEPLAB_LIT_NB_NUM_VAL": "8",
    "DEEPLAB_LIT_NB_IMAGE_SIZE": "48",
    "DEEPLAB_LIT_NB_BATCH_SIZE": "4",
    "DEEPLAB_LIT_NB_LIMIT_TRAIN_BATCHES": "2",
    "DEEPLAB_LIT_NB_NUM_WORKERS": "0",
    "DEEPLAB_LIT_NB_SPEED_REPEATS": "1",
    "DEEPLAB_LIT_NB_SPEED_SIZE": "48",
    "DEEPLAB_LIT_NB_N_SHOW": "2",
}


def run_notebook(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rerun_from: str | None = None
) -> tuple[dict, dict | None, nbformat.NotebookNode]:
    """Execute ``notebooks/<name>.ipynb`` with the tiny settings.

    With ``rerun_from``, run again, in the same kernel, the cells from the first one whose source holds
    that text to the end. Returns the ``results.json`` of the first run, that of the second (or None),
    and the executed notebook.
    """
    out_dir = tmp_path / "out"
    for key, value in TINY_SETTINGS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DEEPLAB_LIT_NB_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("DEEPLAB_LIT_NB_OUT", str(out_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One thread per kernel: the suite shares few cores, and oversubscribed torch threads crawl.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel imports this working tree's package, whatever is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    results_file = out_dir / "results.json"
    second = None
    # execute_cell raises CellExecutionError, with the failing cell and its traceback, on any error.
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
        assert results_file.is_file(), f"{name} wrote no {results_file}"
        first = json.loads(results_file.read_text())
        if rerun_from is not None:
            results_file.unlink()
            start = next(i for i, cell in enumerate(notebook.cells) if rerun_from in cell.source)
            for index in range(start, len(notebook.cells)):
                client.execute_cell(notebook.cells[index], index)
            second = json.loads(results_file.read_text())
    return first, second, notebook


def is_score(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_every_notebook_is_executed_here():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs_and_defines_no_models(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name} has outputs: strip them"
        assert "class " not in cell.source and "nn.Module" not in cell.source, (
            f"{name} defines a model of its own; notebooks import the package"
        )
    assert "DEEPLAB_LIT_NB_EPOCHS" in code[0].source, f"{name}'s first code cell must hold the settings"


def test_01_quickstart(tmp_path, monkeypatch):
    results, _, _ = run_notebook("01_quickstart", tmp_path, monkeypatch)
    for key in ("val/mIoU", "val/mIoU_crf_baseline", "val/mIoU_crf"):
        assert is_score(results[key]), (key, results[key])
    # The CRF saw the whole validation set, so its baseline is the module's own mIoU.
    assert results["val/mIoU_crf_baseline"] == pytest.approx(results["val/mIoU"], abs=1e-6)
    assert set(results["trimap"]) == {"2px", "5px", "10px", "20px"}
    for pair in results["trimap"].values():
        assert is_score(pair["before"]) and is_score(pair["after"])
    assert results["settings"]["image_size"] == 48
    for figure in ("curves.png", "predictions.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 0


def test_02_ablation_crf(tmp_path, monkeypatch):
    # Run twice: the second pass loads the checkpoint the first one wrote instead of training.
    results, rerun, notebook = run_notebook("02_ablation_crf", tmp_path, monkeypatch, rerun_from="CKPT =")
    rows = results["rows"]
    widths = {f"{w}px" for w in results["band_widths"]}
    by_group: dict[str, list] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
        assert is_score(row["mIoU"]), row
        assert set(row["trimap"]) == widths and all(is_score(v) for v in row["trimap"].values()), row
    assert [r["value"] for r in by_group["iterations"]] == list(range(11))
    assert len(by_group["bi_xy_std"]) >= 3 and len(by_group["bi_rgb_std"]) >= 3
    assert {r["value"] for r in by_group["preset"]} == {"deeplab_v2", "deeplab_v1_largefov"}
    no_crf = by_group["iterations"][0]
    assert no_crf["crf"] is None and all(r["crf"] for r in rows if r is not no_crf)
    # Each row holds what it says: the deeplab_v2 preset is iterations=10, bi_xy_std=67 and bi_rgb_std=3.
    preset_v2 = next(r for r in by_group["preset"] if r["value"] == "deeplab_v2")
    assert preset_v2["crf"] == dataclasses.asdict(PRESETS["deeplab_v2"])
    for group, value in (("iterations", 10), ("bi_xy_std", 67), ("bi_rgb_std", 3)):
        same = next(r for r in by_group[group] if r["value"] == value)
        assert same["crf"] == preset_v2["crf"]
        assert same["mIoU"] == pytest.approx(preset_v2["mIoU"]) and same["trimap"] == pytest.approx(
            preset_v2["trimap"]
        )
    # "changed" is the fraction of pixels the CRF relabelled (a briefly trained model may give it none).
    assert no_crf["changed"] == 0.0 and all(0.0 <= r["changed"] <= 1.0 for r in rows)
    assert set(results["trimap"]) == {"no CRF", "CRF (deeplab_v2)", "CRF (deeplab_v1_largefov)"}
    for figure in ("sweeps.png", "trimap.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 0
    checkpoint = tmp_path / "out" / "deeplab_v2.ckpt"
    model_cell = next(cell for cell in notebook.cells if "CKPT =" in cell.source)
    assert f"loaded {checkpoint}" in "".join(output.get("text", "") for output in model_cell.outputs)
    # The reloaded model gives the same probabilities, hence the same scores for every setting.
    assert [(r["group"], r["value"], r["changed"]) for r in rerun["rows"]] == [
        (r["group"], r["value"], r["changed"]) for r in rows
    ]
    for before, after in zip(rows, rerun["rows"]):
        assert after["mIoU"] == pytest.approx(before["mIoU"], abs=1e-6)
        assert after["trimap"] == pytest.approx(before["trimap"], abs=1e-6)


def test_03_ablation_aspp_output_stride(tmp_path, monkeypatch):
    results, _, _ = run_notebook("03_ablation_aspp_output_stride", tmp_path, monkeypatch)
    settings = [(r["output_stride"], tuple(r["atrous_rates"])) for r in results["rows"]]
    assert settings == [
        (16, (1, 1, 1)),
        (16, (3, 6, 9)),
        (16, (6, 12, 18)),
        (16, (12, 24, 36)),
        (8, (12, 24, 36)),
    ]
    for row in results["rows"]:
        assert is_score(row["mIoU"]) and row["images_per_s"] > 0 and row["train_s"] > 0, row
    assert (tmp_path / "out" / "aspp_output_stride.png").stat().st_size > 0


def test_04_versions(tmp_path, monkeypatch):
    results, _, _ = run_notebook("04_versions", tmp_path, monkeypatch)
    rows = {r["version"]: r for r in results["rows"]}
    assert list(rows) == ["v1", "v2", "v3", "v3+"]
    assert [r["module"] for r in rows.values()] == ["DeepLabV1", "DeepLabV2", "DeepLabV3", "DeepLabV3Plus"]
    for row in rows.values():
        assert is_score(row["mIoU"]) and row["images_per_s"] > 0 and row["params_M"] > 0, row
    # Same backbone: ASPP-L adds to v1's classifier, and the v3+ decoder adds to the v3 encoder.
    assert rows["v1"]["params_M"] < rows["v2"]["params_M"]
    assert rows["v3"]["params_M"] < rows["v3+"]["params_M"]
    assert (tmp_path / "out" / "versions.png").stat().st_size > 0


def test_05_trainable_crf(tmp_path, monkeypatch):
    results, _, notebook = run_notebook("05_trainable_crf", tmp_path, monkeypatch)
    scores = results["scores"]
    assert set(scores) == {"base", "finetuned", "finetuned_crf_rnn"}
    widths = {f"{w}px" for w in results["band_widths"]}
    for model, predictions in scores.items():
        expected = {"network", "offline CRF"} | ({"trained CRF"} if model == "finetuned_crf_rnn" else set())
        assert set(predictions) == expected, (model, predictions)
        for figures in predictions.values():
            assert is_score(figures["mIoU"]) and set(figures["trimap"]) == widths, (model, figures)
            assert all(is_score(v) for v in figures["trimap"].values()), (model, figures)
    # One fit logs all three figures, and the notebook's own scoring of the same model agrees with them.
    logged, own = results["logged"]["finetuned_crf_rnn"], scores["finetuned_crf_rnn"]
    assert logged["val/mIoU"] == pytest.approx(own["network"]["mIoU"], abs=1e-6)
    assert logged["val/mIoU_crf"] == pytest.approx(own["offline CRF"]["mIoU"], abs=1e-6)
    assert logged["val/mIoU_crf_rnn"] == pytest.approx(own["trained CRF"]["mIoU"], abs=1e-6)
    control = results["logged"]["finetuned"]
    assert control["val/mIoU"] == pytest.approx(scores["finetuned"]["network"]["mIoU"], abs=1e-6)
    assert control["val/mIoU_crf"] == pytest.approx(scores["finetuned"]["offline CRF"]["mIoU"], abs=1e-6)
    assert "val/mIoU_crf_rnn" not in control
    # The CRF started at the Potts model and the preset's weights, and learned: its parameters moved.
    crf = results["crf_rnn"]
    classes = len(crf["class_names"])
    potts = [[0.0 if i == j else 1.0 for j in range(classes)] for i in range(classes)]
    assert crf["compatibility_start"] == potts
    learned = crf["compatibility"]
    assert len(learned) == classes and all(len(row) == classes for row in learned)
    assert max(abs(a - b) for row, start in zip(learned, potts) for a, b in zip(row, start)) > 1e-6
    preset = PRESETS["deeplab_v2"]
    assert crf["kernel_weights_start"] == pytest.approx({"spatial": preset.pos_w, "bilateral": preset.bi_w})
    assert crf["kernel_weights"] != pytest.approx(crf["kernel_weights_start"], abs=1e-9)
    assert results["settings"]["finetune_epochs"] == 1 and results["settings"]["image_size"] == 48
    for figure in ("trimap.png", "compatibility.png", "kernel_weights.png", "predictions.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 0
    checkpoint = tmp_path / "out" / "deeplab_v3plus.ckpt"
    model_cell = next(cell for cell in notebook.cells if "CKPT =" in cell.source)
    assert f"saved {checkpoint}" in "".join(output.get("text", "") for output in model_cell.outputs)


def test_06_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPLAB_LIT_NB_SEEDS", "0,1")  # several seeds, two enough here
    results, _, _ = run_notebook("06_losses", tmp_path, monkeypatch)
    objectives = ["plain", "class_weighted", "bootstrapped", "ohem", "ce_lovasz"]
    assert list(results["summary"]) == objectives
    assert [(r["objective"], r["seed"]) for r in results["rows"]] == [
        (o, s) for s in (0, 1) for o in objectives
    ]
    for row in results["rows"]:
        assert is_score(row["mIoU"]) and row["s_per_step"] > 0 and row["steps"] == 2, row
        assert row["rare_IoU"] is None or is_score(row["rare_IoU"]), row
    # the data are imbalanced as asked, and the auto weights favour the rarer classes
    share = results["class_share"]
    assert share[results["rare_class"]] < share["disc"]
    (weights,) = {tuple(r["class_weights"]) for r in results["rows"] if r["objective"] == "class_weighted"}
    names = list(share)
    assert weights[names.index(results["rare_class"])] > weights[names.index("disc")]
    assert results["settings"]["imbalance"] == 20 and results["settings"]["seeds"] == [0, 1]
    assert (tmp_path / "out" / "losses.png").stat().st_size > 0
