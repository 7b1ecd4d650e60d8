"""Packaging: declared dependencies, the console command, its help and version, and light imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

from tools.check_dependencies import problems

ROOT = Path(__file__).resolve().parents[1]


def run(code_or_args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        code_or_args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300
    )


def test_the_project_imports_only_what_it_declares():
    assert problems(ROOT) == []


def fake_project(tmp_path: Path, module_source: str, dependencies: str = '"numpy"') -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [project]
            name = "deeplab-lit"
            dependencies = [{dependencies}]
            [project.optional-dependencies]
            wandb = ["wandb"]
            dev = ["deeplab-lit[wandb]", "pytest"]
            """
        )
    )
    package = tmp_path / "deeplab_lit"
    package.mkdir()
    (package / "a.py").write_text(textwrap.dedent(module_source))
    return tmp_path


def test_a_planted_undeclared_import_is_reported_with_its_file_and_line(tmp_path):
    root = fake_project(tmp_path, "import numpy\nimport yaml\n")
    found = problems(root)
    assert len(found) == 1
    assert "deeplab_lit/a.py:2" in found[0] and "'yaml'" in found[0] and "pyyaml" in found[0]


def test_an_extra_may_be_imported_inside_a_function_but_not_at_module_level(tmp_path):
    lazy = "import numpy\n\ndef log():\n    import wandb\n"
    assert problems(fake_project(tmp_path / "lazy", lazy)) == []
    eager = "import numpy\nimport wandb\n"
    (found,) = problems(fake_project(tmp_path / "eager", eager))
    assert "a.py:2" in found and "module level" in found


def test_optional_and_typing_only_imports_need_no_declaration(tmp_path):
    source = """
        from typing import TYPE_CHECKING
        import numpy
        try:
            import yaml
        except ImportError:
            yaml = None
        if TYPE_CHECKING:
            import matplotlib
    """
    assert problems(fake_project(tmp_path, source)) == []


def test_a_core_dependency_the_package_never_imports_is_reported(tmp_path):
    (found,) = problems(fake_project(tmp_path, "import numpy\n", dependencies='"numpy", "pyyaml"'))
    assert "'pyyaml'" in found and "extra" in found


def test_version_and_help_name_the_program_and_list_every_subcommand():
    result = run([sys.executable, "-m", "deeplab_lit", "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"deeplab-lit {version('deeplab-lit')}"
    result = run([sys.executable, "-m", "deeplab_lit", "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: deeplab-lit")
    for subcommand in ("fit", "validate", "test", "predict", "export"):
        assert f"\n    {subcommand} " in result.stdout
    assert "__main__" not in result.stdout


def test_the_console_command_is_installed_and_runs():
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    command = shutil.which("deeplab-lit", path=search)
    assert command is not None, "pip install -e . installs the deeplab-lit console command"
    result = run([command, "--version"])
    assert result.returncode == 0 and result.stdout.startswith("deeplab-lit ")


def test_subcommand_help_offers_no_optimizer_that_would_bypass_the_papers_schedule():
    result = run([sys.executable, "-m", "deeplab_lit", "fit", "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: deeplab-lit [options] fit")
    assert "--optimizer" not in result.stdout and "--lr_scheduler" not in result.stdout


HEAVY = ("lightning", "wandb", "albumentations", "timm")


@pytest.mark.parametrize(
    "code",
    [
        "import deeplab_lit.models",
        "import deeplab_lit, deeplab_lit.models as m; m.deeplab_v3(num_classes=3, backbone='resnet18')",
    ],
)
def test_the_models_import_and_build_without_lightning_wandb_albumentations_or_timm(code):
    check = f"{code}\nimport sys\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    result = run([sys.executable, "-c", check])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_w_and_b_logger_without_wandb_says_how_to_install_it_or_log_elsewhere():
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "from deeplab_lit.loggers import WandbLogger\n"
        "WandbLogger(offline=True)\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode != 0
    assert "pip install 'deeplab-lit[wandb]'" in result.stderr and "--trainer.logger=false" in result.stderr


def test_the_console_entry_returns_exit_status_zero_whatever_the_cli_returns(monkeypatch):
    """The console script calls sys.exit(main()): an object there (the CLI) would exit with status 1."""
    import deeplab_lit.cli
    from deeplab_lit.command import main

    monkeypatch.setattr(deeplab_lit.cli, "main", lambda words: object())  # what a finished fit returns
    assert main(["fit", "--config", "x.yaml"]) == 0


def test_the_command_line_imports_neither_timm_nor_wandb_for_a_resnet_run():
    """timm (~1 s) only when a timm layer is built or converted, wandb only when a W&B logger is made."""
    result = run(
        [
            sys.executable,
            "-c",
            "import sys, deeplab_lit.cli; print(sorted({'timm', 'wandb'} & set(sys.modules)))",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
