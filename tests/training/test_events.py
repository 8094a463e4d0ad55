"""Job events: the curves drawn from them, and the progress bar beside the log lines."""

import io
import sys
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.axes import Axes

from training.events import Progress, curves_figure


def _metrics(step: int, **values: float) -> dict[str, Any]:
    return {"type": "metrics", "time": 0.0, "step": step, "message": "", "values": values}


def _lines(axis: Axes) -> dict[str, tuple[list[float], list[float]]]:
    return {
        str(line.get_label()): ([float(x) for x in line.get_xdata()], list(line.get_ydata()))
        for line in axis.lines
    }


def test_curves_show_training_and_validation_loss_and_accuracy() -> None:
    events = [
        _metrics(1, train_loss=2.0, train_accuracy=0.25, learning_rate=0.1),
        _metrics(2, train_loss=1.5, train_accuracy=0.5, learning_rate=0.1),
        _metrics(2, valid_loss=1.6, valid_accuracy=0.4, valid_macro_f1=0.3),
        {"type": "message", "time": 0.0, "step": 2, "message": "done"},
    ]
    figure = curves_figure(events)
    loss_axis, score_axis = figure.axes
    assert loss_axis.get_title() == "Loss" and score_axis.get_title() == "Accuracy"
    assert _lines(loss_axis) == {"training": ([1, 2], [2.0, 1.5]), "validation": ([2], [1.6])}
    assert _lines(score_axis) == {
        "training": ([1, 2], [0.25, 0.5]),
        "validation": ([2], [0.4]),
        "validation macro-F1": ([2], [0.3]),
    }
    legend = score_axis.get_legend()
    assert legend is not None
    assert [text.get_text() for text in legend.get_texts()] == list(_lines(score_axis))
    plt.close(figure)


def test_curves_of_a_causal_lm_show_training_and_validation_perplexity() -> None:
    events = [
        _metrics(1, train_loss=2.0, tokens_per_second=10.0),
        _metrics(2, train_loss=1.0),
        _metrics(2, valid_loss=1.2, valid_perplexity=3.3, valid_token_accuracy=0.4),
    ]
    figure = curves_figure(events)
    loss_axis, score_axis = figure.axes
    assert set(_lines(loss_axis)) == {"training", "validation"}
    assert score_axis.get_title() == "Perplexity" and score_axis.get_yscale() == "log"
    perplexity = _lines(score_axis)
    assert perplexity["training"][1] == pytest.approx([7.389056, 2.718282])
    assert perplexity["validation"] == ([2], [3.3])
    plt.close(figure)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "main_rank", "drawn"),
    [(_Terminal, True, True), (io.StringIO, True, False), (_Terminal, False, False)],
)
def test_progress_bar_is_drawn_only_on_a_terminal_of_the_main_rank(
    monkeypatch: pytest.MonkeyPatch, stream: type[io.StringIO], main_rank: bool, drawn: bool
) -> None:
    stderr = stream()
    monkeypatch.setattr(sys, "stderr", stderr)
    progress = Progress(total=8, initial=2, enabled=main_rank)
    progress.update(3, 0.5)
    progress.update(4, None)
    progress.close()
    written = stderr.getvalue()
    if drawn:
        assert "4/8 [" in written and "step/s, loss=0.5000]" in written
    else:
        assert written == ""
