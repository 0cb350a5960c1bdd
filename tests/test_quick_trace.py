"""Quick trace (attribution patching) against the exact causal trace on tiny random models."""
from __future__ import annotations

import pytest
import torch

from editing.tracing.quick import quick_trace
from editing.tracing import KINDS, trace
from tests.test_tracing import PROMPT, SUBJECT, model, one_thread, tok  # noqa: F401 - shared fixtures

SMALL_NOISE = 1e-3  # the constructed case: states differ little between the runs, so first order is nearly exact


@pytest.mark.parametrize("steps", [1, 4])  # 4: gradients averaged along the path (integrated gradients)
def test_with_small_noise_the_quick_trace_matches_the_exact_signs_and_argmax(model, tok, steps) -> None:  # noqa: F811
    exact = trace(model, tok, PROMPT, SUBJECT, noise=SMALL_NOISE, window=2, samples=3, method="fast")
    quick = quick_trace(model, tok, PROMPT, SUBJECT, noise=SMALL_NOISE, window=2, samples=3, steps=steps)
    assert quick.corrupted_prob == pytest.approx(exact.corrupted_prob, abs=1e-6)
    assert quick.answer_id == exact.answer_id and quick.tokens == exact.tokens
    for kind in KINDS:
        e, q = exact.indirect_effect(kind), quick.indirect_effect(kind)
        assert int(q.argmax()) == int(e.argmax()), kind
        clear = e.abs() > 0.1 * e.abs().max()  # the sites that matter, not float noise
        assert clear.sum() >= 2 and torch.equal(torch.sign(q[clear]), torch.sign(e[clear])), kind
        assert float((q - e).abs().max()) < 0.25 * float(e.abs().max()), kind


def test_restoring_before_the_subject_changes_nothing(model, tok) -> None:  # noqa: F811
    quick = quick_trace(model, tok, PROMPT, SUBJECT, noise=1.0, window=2, samples=2)
    before = quick.subject_range[0]
    assert before > 0
    for kind in KINDS:
        assert torch.allclose(quick.scores[kind][:before], torch.tensor(quick.corrupted_prob), atol=1e-7)


def test_weights_hooks_and_gradients_are_left_as_they_were(model, tok) -> None:  # noqa: F811
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quick_trace(model, tok, PROMPT, SUBJECT, noise=1.0, window=2, samples=2, kinds=("mlp",))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # noqa: SLF001


def test_bad_input_raises_as_the_exact_trace_does(model, tok) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="does not occur"):
        quick_trace(model, tok, PROMPT, "louvre", noise=1.0)
    with pytest.raises(ValueError, match="kinds must be"):
        quick_trace(model, tok, PROMPT, SUBJECT, noise=1.0, kinds=("neurons",))
    with pytest.raises(ValueError, match="steps must be"):
        quick_trace(model, tok, PROMPT, SUBJECT, noise=1.0, steps=0)


def test_one_path_point_is_plain_attribution_patching_and_more_points_change_the_estimate(model, tok) -> None:  # noqa: F811
    """Under noise large enough for first order to err, averaging along the path changes the estimate (not
    the corrupted probability); with one point it is the gradient at the corrupted run."""
    one = quick_trace(model, tok, PROMPT, SUBJECT, noise=1.0, window=2, samples=2, kinds=("mlp",))
    again = quick_trace(model, tok, PROMPT, SUBJECT, noise=1.0, window=2, samples=2, kinds=("mlp",), steps=1)
    path = quick_trace(model, tok, PROMPT, SUBJECT, noise=1.0, window=2, samples=2, kinds=("mlp",), steps=8)
    assert torch.equal(one.scores["mlp"], again.scores["mlp"])
    assert path.corrupted_prob == pytest.approx(one.corrupted_prob, abs=1e-6)
    assert not torch.allclose(path.scores["mlp"], one.scores["mlp"], atol=1e-6)


def test_the_locate_tab_offers_the_quick_trace_and_says_it_is_approximate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from chat_app import ui_locate
    from tests.service_helpers import start

    service = start(tmp_path / "l.db")
    prompt, subject = "The Eiffel tower is located in the city of", "The Eiffel tower"
    quiet = lambda *a, **k: None  # noqa: E731
    figure, summary, found = ui_locate.locate(service, prompt, subject, None, 2, quiet, ["mlp"], method="quick")
    assert "Quick approximation" in summary and "quick approximation" in figure._suptitle.get_text()  # noqa: SLF001
    assert found["relation"] == "{} is located in the city of" and 0 <= found["layer"] < service.editor.n_layers
    _, exact, _ = ui_locate.locate(service, prompt, subject, None, 2, quiet, ["mlp"], "float32")
    assert "Quick approximation" not in exact
