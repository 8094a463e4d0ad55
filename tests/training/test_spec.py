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
    with pytest.raises(SpecError) as caught:
        parse_spec(FineTuneSpec, bad)
    message = caught.value.message
    for expected in (
        "precision: fp16 needs a CUDA device",
        "surprise: Extra inputs are not permitted",
        "hyperparameters.learning_rate",
    ):
        assert expected in message
    assert caught.value.code == "invalid_spec"


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
