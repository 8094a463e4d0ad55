"""Job specs: defaults, inference, and refusals that list every problem with its field path."""

import json

import pytest

from training.errors import SpecError
from training.spec import ConvertSpec, EvaluateSpec, FineTuneSpec, load_spec, parse_spec


def _fine_tune(**changes: object) -> dict:
    spec: dict = {"model": "test_vit", "data": {"train": {"builtin": "digits"}}}
    spec.update(changes)
    return spec


def test_minimal_fine_tune_spec_gets_defaults_and_infers_the_task() -> None:
    spec = parse_spec(FineTuneSpec, _fine_tune())
    assert spec.resolved_task() == "image-classification"
    assert spec.hyperparameters.epochs == 1
    assert spec.hyperparameters.gmnm_lr() == pytest.approx(10 * spec.hyperparameters.learning_rate)
    assert spec.conversion is None and spec.device == "auto"


def test_task_is_inferred_from_file_suffixes() -> None:
    text = parse_spec(FineTuneSpec, _fine_tune(data={"train": {"path": "/d/corpus.txt"}}))
    jsonl = parse_spec(FineTuneSpec, _fine_tune(data={"train": {"path": "/d/a.jsonl"}}))
    archive = parse_spec(FineTuneSpec, _fine_tune(data={"train": {"path": "/d/imgs.tar.gz"}}))
    assert text.resolved_task() == "causal-lm"
    assert jsonl.resolved_task() == "text-classification"
    assert archive.resolved_task() == "image-classification"


def _problems(kind: type, spec: dict) -> list[str]:
    """The lines of the refusal, after the count line."""
    with pytest.raises(SpecError) as caught:
        parse_spec(kind, spec)
    assert caught.value.code == "invalid_spec"
    first, *lines = caught.value.message.splitlines()
    assert first == f"the {kind.__name__} has {len(lines)} problems:"
    return lines


def _assert_each_once(lines: list[str], expected: list[str]) -> None:
    for start in expected:
        assert sum(line.startswith(start) for line in lines) == 1, (start, lines)
    assert len(lines) == len(expected), lines


def test_every_problem_is_reported_at_once_with_its_field_path() -> None:
    bad = _fine_tune(
        device="cpu",
        precision="fp16",
        surprise=1,
        hyperparameters={
            "batch_size": 3,
            "num_processes": 2,
            "warmup_steps": 5,
            "warmup_ratio": 0.1,
            "learning_rate": -1,
        },
    )
    _assert_each_once(
        _problems(FineTuneSpec, bad),
        [
            "precision: fp16 needs a CUDA device",
            "surprise: Extra inputs are not permitted",
            "hyperparameters.learning_rate: Input should be greater than 0",
            "hyperparameters.batch_size: batch_size 3 must be divisible by num_processes 2",
            "hyperparameters.warmup_ratio: set warmup_steps or warmup_ratio, not both",
        ],
    )


def test_combinations_across_the_spec_are_checked_beside_failed_fields() -> None:
    bad = _fine_tune(
        model="",
        device="cuda:0",
        hyperparameters={"num_processes": 2, "max_steps": 50, "learning_rate": -1},
        limits={"max_steps": 20, "max_minutes": -1},
    )
    _assert_each_once(
        _problems(FineTuneSpec, bad),
        [
            "model: String should have at least 1 character",
            "hyperparameters.learning_rate: Input should be greater than 0",
            "limits.max_minutes: Input should be greater than 0",
            "hyperparameters.num_processes: num_processes 2 runs one process per GPU",
            "limits.max_steps: hyperparameters.max_steps 50 is above the limit of 20",
        ],
    )


def test_task_and_data_are_checked_together_beside_failed_fields() -> None:
    bad = _fine_tune(
        task="causal-lm",
        data={"train": {"builtin": "digits"}, "validation_fraction": 2, "labels": ["a"]},
    )
    _assert_each_once(
        _problems(FineTuneSpec, bad),
        [
            "data.validation_fraction: Input should be less than 1",
            "data.train: task causal-lm cannot use built-in set 'digits'",
            "data.labels: causal-lm has no classes",
        ],
    )
    no_train = {"model": "m", "task": "bogus", "data": {"validation": {"builtin": "digits"}}}
    _assert_each_once(
        _problems(FineTuneSpec, no_train),
        ["task: Input should be", "data.train: a fine-tune needs training data"],
    )


def test_data_source_combinations_are_checked_beside_a_failed_column() -> None:
    bad = _fine_tune(
        data={"train": {"builtin": "digits", "path": "a.csv", "split": "x", "text_column": ""}}
    )
    _assert_each_once(
        _problems(FineTuneSpec, bad),
        [
            "data.train.text_column: String should have at least 1 character",
            "data.train: give exactly one of builtin, path or hf_dataset (got builtin, path)",
            "data.train.split: split applies to hf_dataset sources only",
        ],
    )


def test_conversion_problems_are_all_listed() -> None:
    bad = {
        "model": "m",
        "conversion": {
            "calibrate": True,
            "groups": 0,
            "gmnm": {"num_components": 0, "init_range": [3, 1]},
        },
    }
    _assert_each_once(
        _problems(ConvertSpec, bad),
        [
            "conversion.gmnm.num_components: Input should be greater than or equal to 1",
            "conversion.gmnm.init_range: must be (low, high) with low < high",
            "conversion.groups: must be a positive integer or 'channel'",
            "conversion: calibrate needs the job's data",
        ],
    )


def test_max_steps_above_the_limit_is_refused_with_the_spec() -> None:
    bad = _fine_tune(hyperparameters={"max_steps": 50}, limits={"max_steps": 20})
    with pytest.raises(SpecError) as caught:
        parse_spec(FineTuneSpec, bad)
    assert "limits.max_steps: hyperparameters.max_steps 50 is above the limit of 20" in (
        caught.value.message
    )
    within = parse_spec(
        FineTuneSpec, _fine_tune(hyperparameters={"max_steps": 20}, limits={"max_steps": 20})
    )
    assert within.limits.max_steps == 20


def test_combinations_inside_hyperparameters_are_all_listed() -> None:
    bad = _fine_tune(
        hyperparameters={
            "batch_size": 3,
            "num_processes": 2,
            "warmup_steps": 5,
            "warmup_ratio": 0.1,
            "max_steps": 4,
            "gmnm_only_steps": 4,
        },
    )
    with pytest.raises(SpecError) as caught:
        parse_spec(FineTuneSpec, bad)
    message = caught.value.message
    assert (
        "hyperparameters.batch_size: batch_size 3 must be divisible by num_processes 2" in message
    )
    assert "hyperparameters.warmup_ratio: set warmup_steps or warmup_ratio, not both" in message
    assert "hyperparameters.gmnm_only_steps" in message
    assert message.startswith("the FineTuneSpec has 3 problems")


def test_task_that_cannot_use_the_data_is_refused() -> None:
    with pytest.raises(SpecError, match=r"data\.train: task causal-lm cannot use built-in set"):
        parse_spec(FineTuneSpec, _fine_tune(task="causal-lm"))


def test_data_source_needs_exactly_one_origin() -> None:
    with pytest.raises(SpecError, match="give exactly one of builtin, path or hf_dataset"):
        parse_spec(FineTuneSpec, _fine_tune(data={"train": {"builtin": "digits", "path": "a.csv"}}))


def test_hugging_face_data_without_a_task_asks_for_one() -> None:
    with pytest.raises(SpecError, match="cannot infer the task"):
        parse_spec(FineTuneSpec, _fine_tune(data={"train": {"hf_dataset": "imdb"}}))


def test_evaluation_and_conversion_specs_validate(tmp_path) -> None:
    evaluation = parse_spec(
        EvaluateSpec,
        {"model": "m", "compare_to": "n", "data": {"validation": {"builtin": "digits"}}},
    )
    assert evaluation.compare_to == "n"
    path = tmp_path / "spec.json"
    path.write_text(
        json.dumps({"model": "m", "dry_run": True, "conversion": {"targets": ["softmax"]}})
    )
    conversion = load_spec(ConvertSpec, path)
    assert conversion.dry_run and conversion.conversion.targets == ["softmax"]
    with pytest.raises(SpecError, match="give data.validation or data.train"):
        parse_spec(EvaluateSpec, {"model": "m", "data": {}})


def test_spec_file_that_is_not_json_names_the_line(tmp_path) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{"model": "m",\n oops}')
    with pytest.raises(SpecError, match="not valid JSON: .* line 2"):
        load_spec(ConvertSpec, path)


def test_spec_round_trips_through_json() -> None:
    spec = parse_spec(FineTuneSpec, _fine_tune(conversion={"gmnm": {"num_components": 4}}))
    again = parse_spec(FineTuneSpec, json.loads(spec.model_dump_json()))
    assert again == spec


def test_conversion_job_refuses_calibration_it_has_no_data_for() -> None:
    with pytest.raises(SpecError, match="conversion: calibrate needs the job's data"):
        parse_spec(ConvertSpec, {"model": "m", "conversion": {"calibrate": True}})
    with pytest.raises(SpecError, match="conversion.groups"):
        parse_spec(ConvertSpec, {"model": "m", "conversion": {"groups": 0}})
