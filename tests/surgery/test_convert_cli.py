"""`gmnm convert` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from surgery_models import tiny_transformers
from transformers import GPT2Model

import surgery
from service.cli import main
from surgery.persistence import MANIFEST_FILE


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "gpt2"
    tiny_transformers("gpt2").save_pretrained(directory)
    return directory


def test_dry_run_prints_the_plan_as_a_table(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", str(model_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "h.0.attn:softmax#0" in out and "sites replaced/found per kind" in out


def test_convert_saves_a_loadable_model_and_prints_json(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    code = main(
        [
            "convert",
            str(model_dir),
            "--out",
            str(out_dir),
            "--components",
            "4",
            "--exclude",
            "*.mlp.*",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["report"]["max_abs_diff"] == 0.0 and result["report"]["audit"] == []
    assert result["report"]["sites_replaced"] == {"softmax": 1}
    model = surgery.load(out_dir)
    assert surgery.is_converted(model) and len(surgery.gmnm_parameter_names(model)) == 3


def test_bad_references_and_options_exit_with_status_2(model_dir: Path) -> None:
    assert main(["convert", "https://example.com/model", "--dry-run"]) == 2
    assert main(["convert", "org/a..b", "--dry-run"]) == 2
    assert main(["convert", "org/a--b", "--dry-run"]) == 2
    assert main(["convert", str(model_dir)]) == 2  # no --out
    assert main(["convert", str(model_dir), "--dry-run", "--targets", "everything"]) == 2
    assert main(["convert", str(model_dir), "--dry-run", "--groups", "two"]) == 2


def test_an_include_pattern_that_matches_nothing_exits_2_and_saves_nothing(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out_dir = tmp_path / "out"
    code = main(["convert", str(model_dir), "--out", str(out_dir), "--include", "h.9.*"])
    assert code == 2 and not out_dir.exists()
    assert "'h.9.*' match no site of GPT2Model" in caplog.text


def test_invalid_options_are_reported_together_naming_their_flags(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code = main(
        ["convert", str(model_dir), "--components", "0", "--groups", "0", "--num-labels", "0"]
    )
    assert code == 2
    message = caplog.records[-1].getMessage()
    for flag in ("--out", "--components", "--groups", "--num-labels"):
        assert flag in message, flag
    assert "num_components" not in message


def test_init_include_and_no_pretrained_reach_the_conversion(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    code = main(
        [
            "convert",
            str(model_dir),
            "--out",
            str(out_dir),
            "--init",
            "fit",
            "--include",
            "h.0.mlp.*",
            "--no-pretrained",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["report"]["init"] == "fit" and result["report"]["fit_max_error"] is not None
    assert result["report"]["sites_replaced"] == {"activation": 1}
    assert [s["path"] for s in result["plan"]["sites"] if s["replace"]] == ["h.0.mlp.act"]

    manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    assert [entry["config"]["init"] for entry in manifest["sites"]] == ["fit"]
    # random weights from the config, not the directory's
    original = GPT2Model.from_pretrained(model_dir)
    converted = surgery.load(out_dir)
    assert not torch.equal(converted.h[0].attn.c_attn.weight, original.h[0].attn.c_attn.weight)
