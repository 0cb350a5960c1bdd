"""Subject positions with a byte-level BPE tokenizer that adds BOS, built in-test (no cached GPT-2 needed)."""
from __future__ import annotations

import pytest

from editing import EditRequest
from editing.rows import key_row, rewrite_row
from editing.tokens import encode
from tests.bpe import bpe_tokenizer


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return bpe_tokenizer(add_bos=True)


def test_subject_positions_with_bos_and_spaces(tok) -> None:  # type: ignore[no-untyped-def]
    text = "  The Eiffel tower is in"
    enc = encode(tok, text, 2, 2 + len("The Eiffel tower"))
    assert enc.input_ids[0] == tok.bos_token_id  # the BOS shifts every position by one
    assert tok.decode(enc.input_ids[enc.subject_first]).strip() == "The"
    assert tok.decode(enc.input_ids[enc.subject_last]).strip() == "tower"
    assert tok.decode(enc.input_ids[enc.subject_last + 1]).strip() == "is"


@pytest.mark.parametrize("subject", ["東京", "Tokyo 🗼", "Café ☕"])
def test_subject_ending_inside_a_multibyte_character_takes_its_last_token(tok, subject: str) -> None:  # type: ignore[no-untyped-def]
    text = f"{subject} is in"
    enc = encode(tok, text, 0, len(subject))
    last_char = subject[-1]
    pieces = [i for i, (s, e) in enumerate(tok(text, return_offsets_mapping=True)["offset_mapping"])
              if s <= len(subject) - 1 < e]  # fmt: skip
    assert len(pieces) > 1  # the test needs a character split over several byte tokens
    assert enc.subject_last == pieces[-1]
    # the subject's tokens up to subject_last decode to the whole subject, last character included
    assert tok.decode(enc.input_ids[enc.subject_first : enc.subject_last + 1]).endswith(last_char)
    assert not tok.decode(enc.input_ids[enc.subject_last + 1 :]).startswith(last_char)


def test_rows_put_the_delta_after_the_whole_last_character(tok) -> None:  # type: ignore[no-untyped-def]
    request = EditRequest("東京", "{} is in", "paris")
    key, value = key_row(tok, "{}", request), rewrite_row(tok, "Some text here. {}", request)
    for row in (key, value):
        assert tok.decode(row.input_ids[: row.lookup + 1]).endswith("東京")
        assert tok.decode(row.input_ids[row.lookup + 1 : row.lookup + 2]).strip() == "is"
