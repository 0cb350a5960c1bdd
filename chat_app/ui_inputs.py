"""Input components that check a value's type before Gradio coerces it.

Gradio's own components turn whatever an API client sends into their type: a Textbox passes
``str(payload)``, so ``subject=["a", "b"]`` became the subject ``"['a', 'b']"``, and a Number or
Slider given ``"abc"`` fails deep inside Gradio with no message for the client. These subclasses
look at the raw payload first; a wrong type is refused with ``gr.Error`` naming the field (no
traceback reaches the client or the log, which keeps one line per refused request). The browser
always sends the right types, so it never sees a difference. ``is_template`` makes each one use
its parent's front end.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import gradio as gr
from gradio.data_classes import FileData
from pydantic import ValidationError

log = logging.getLogger(__name__)


def refuse(message: str) -> gr.Error:
    """The error for a refused request, logged as one line."""
    log.warning("refused a request: %s", message)
    return gr.Error(message, print_exception=False)


def kind(value: object) -> str:
    """How a value's type reads in a message: "a list", "a number", "text"."""
    names = {list: "a list", tuple: "a list", dict: "an object", bool: "true/false", int: "a number",
             float: "a number", str: "text"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def text(value: Any, name: str) -> str | None:
    """``value`` if it is text (or absent); else refused."""
    if value is None or isinstance(value, str):
        return value
    raise refuse(f"{name} must be text, got {kind(value)}: {value!r:.80}")


def number(value: Any, name: str) -> float | int | None:
    """``value`` if it is a finite number (or absent); text such as ``"abc"`` or ``"nan"`` is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise refuse(f"{name} must be a number, got {kind(value)}: {value!r:.80}")
    if not math.isfinite(value):
        raise refuse(f"{name} must be a finite number, got {value!r}")
    return value


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise refuse(f"{name} must be true or false, got {kind(value)}: {value!r:.80}")
    return value


def _name(component: gr.components.Component) -> str:
    return str(component.label or "this field").split(" (")[0].lower()


class _Checked:
    """Gradio's own refusals in ``preprocess`` (a value not among the choices, out of bounds) as one log line too."""

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(self.check(payload))  # type: ignore[misc]
        except gr.Error as err:
            if not err.print_exception:
                raise
            raise refuse(str(err.message)) from None

    def check(self, payload: Any) -> Any:
        return text(payload, _name(self))  # type: ignore[arg-type]

    def get_block_name(self) -> str:
        """The Gradio component whose front end this one uses ("textbox"), not this mixin's name.

        Gradio names a template by its class's first base, which here is this mixin: the page
        would ask for a front end called "_checked" and never finish loading.
        """
        return next(c for c in type(self).__mro__ if c.__module__.startswith("gradio.")).__name__.lower()

    def get_block_class(self) -> str:
        return self.get_block_name()


class IdBox(_Checked, gr.Textbox):
    """A text box for an edit id: empty until chosen (a Number would show 0); takes a whole number or its digits."""

    is_template = True

    def check(self, payload: Any) -> Any:
        if isinstance(payload, int) and not isinstance(payload, bool):
            return str(payload)
        if payload is None or (isinstance(payload, str) and (not payload.strip() or payload.strip().isdigit())):
            return payload
        raise refuse(f"{_name(self)} must be a number, got {kind(payload)}: {payload!r:.80}")


class Textbox(_Checked, gr.Textbox):
    is_template = True


class Dropdown(_Checked, gr.Dropdown):
    """A single-choice dropdown (``multiselect`` is not supported)."""

    is_template = True


class Radio(_Checked, gr.Radio):
    is_template = True


class Number(_Checked, gr.Number):
    is_template = True

    def check(self, payload: Any) -> float | int | None:
        return number(payload, _name(self))


class Slider(_Checked, gr.Slider):
    is_template = True

    def check(self, payload: Any) -> float:
        checked = number(payload, _name(self))
        if checked is None:
            raise refuse(f"{_name(self)} is empty; give a number")
        return checked


class CheckboxGroup(_Checked, gr.CheckboxGroup):
    is_template = True

    def check(self, payload: Any) -> Any:
        if payload is not None and (not isinstance(payload, list) or not all(isinstance(v, str) for v in payload)):
            raise refuse(f"{_name(self)} must be a list of choices, got {kind(payload)}: {payload!r:.80}")
        return payload


class File(_Checked, gr.File):
    """A single file input. Gradio validates a file payload before any hook, so the check moves here:
    the API schema is kept, Gradio's own validation is switched off, and ``check`` does it with a message."""

    is_template = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.api_info()  # cached while data_model is still FileData: clients still see a file parameter
        self.data_model = None

    # Gradio builds the page's props from the parameters of ``__init__``: without gr.File's signature the
    # page would get none of them (no label, elem_id, file_types or file_count).
    __init__.__signature__ = inspect.signature(gr.File.__init__)  # type: ignore[attr-defined]

    def check(self, payload: Any) -> FileData | None:
        if payload is None:
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("path"), str):
            raise refuse(f"{_name(self)} must be a file uploaded with the request (gradio_client.handle_file), "
                         f"got {kind(payload)}: {payload!r:.80}")  # fmt: skip
        try:
            return FileData.model_validate(payload)
        except ValidationError as err:
            raise refuse(f"{_name(self)} is not a valid file reference: {err.errors()[0]['msg']}") from None
