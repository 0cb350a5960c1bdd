"""Reading corrections from a file: accepted formats, and bad rows reported by line with nothing accepted."""
from __future__ import annotations

import json

import pytest

from chat_app.fact_file import FactFileError, read_facts


def write(tmp_path, name: str, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_our_fields_in_json_jsonl_and_csv(tmp_path) -> None:  # type: ignore[no-untyped-def]
    records = [{"subject": "The Eiffel Tower", "relation": "{} is located in the city of", "target": "Rome"},
               {"subject": "Big Ben", "relation": "{} is in", "target": "Paris", "layer": 5}]  # fmt: skip
    as_json = write(tmp_path, "f.json", json.dumps(records, indent=1))
    as_jsonl = write(tmp_path, "f.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    as_csv = write(tmp_path, "f.csv", "subject,relation,target,layer\n"
                   "The Eiffel Tower,{} is located in the city of,Rome,\nBig Ben,{} is in,Paris,5\n")  # fmt: skip
    for path in (as_json, as_jsonl, as_csv):
        facts = read_facts(path)
        assert [(f.request.subject, f.request.relation, f.request.target, f.request.layer) for f in facts] == [
            ("The Eiffel Tower", "{} is located in the city of", "Rome", None), ("Big Ben", "{} is in", "Paris", 5)]
    assert [f.line for f in read_facts(as_json)] == [2, 7]
    assert [f.line for f in read_facts(as_csv)] == [2, 3]


def test_easyedit_and_fastedit_fields(tmp_path) -> None:  # type: ignore[no-untyped-def]
    records = [
        {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
         "rephrase_prompt": "Where is the Eiffel Tower? It is in", "locality_prompt": "Big Ben is in"},
        {"prompt": "The prime minister of the {} is", "subject": "United Kingdom", "target": "Rishi Sunak"},
        {"prompt": "{} plays the sport of", "subject": "Messi", "target_new": {"str": "tennis", "id": "Q1"}},
    ]  # fmt: skip
    facts = read_facts(write(tmp_path, "f.jsonl", "\n".join(json.dumps(r) for r in records)))
    assert facts[0].request.relation == "{} is located in the city of"
    assert facts[0].paraphrases == ("Where is the Eiffel Tower? It is in",) and facts[0].neighbours == ("Big Ben is in",)
    assert facts[1].request.relation == "The prime minister of the {} is" and facts[1].request.target == "Rishi Sunak"
    assert facts[2].request.target == "tennis"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"subject": "Big Ben", "relation": "is in", "target": "Paris"}', "no {}"),
        ('{"prompt": "Big Ben is in", "subject": "The Colosseum", "target_new": "Paris"}', "not in the prompt"),
        ('{"subject": "Big Ben", "relation": "{} is in", "target": "  "}', "target is empty"),
        ('{"subject": "Big Ben", "target": "Paris"}', "needs subject, relation and target"),
        ('{"subject": "The Eiffel Tower", "relation": "{} is in", "target": "London"}', "same subject and relation as line 1"),
        ('{"subject": "Big Ben", "relation": "{} is in", "target": "Paris", "layer": "x"}', "layer"),
        ('{"subject": "Big Ben", ', "unreadable JSONL"),
    ],
)
def test_bad_rows_refuse_the_file_and_name_their_line(tmp_path, line: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    good = '{"subject": "The Eiffel Tower", "relation": "{} is in", "target": "Rome"}'
    path = write(tmp_path, "f.jsonl", f"{good}\n\n{line}\n")
    with pytest.raises(FactFileError) as err:
        read_facts(path)
    assert err.value.problems[0][0] == 3 and reason in err.value.problems[0][1]
    assert "nothing applied" in str(err.value) and "line 3" in str(err.value)


def test_every_bad_row_is_listed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, "f.csv", "subject,relation,target\nA,{} is,B\nC,no slot,D\nE,{} is,\n")
    with pytest.raises(FactFileError) as err:
        read_facts(path)
    assert [n for n, _ in err.value.problems] == [3, 4]


def test_oversized_empty_and_unknown_files_are_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    row = '{"subject": "S%d", "relation": "{} is in", "target": "Rome"}\n'
    path = write(tmp_path, "many.jsonl", "".join(row % i for i in range(5)))
    with pytest.raises(FactFileError, match="limit is 3"):
        read_facts(path, max_facts=3)
    monkeypatch.setattr("chat_app.fact_file.MAX_FILE_BYTES", 100)
    with pytest.raises(FactFileError, match="bytes; the limit"):
        read_facts(path)
    with pytest.raises(FactFileError, match="no facts"):
        read_facts(write(tmp_path, "empty.json", "[]"))
    with pytest.raises(ValueError, match="use a .json"):
        read_facts(write(tmp_path, "f.txt", "x"))
    with pytest.raises(FactFileError, match="list of facts"):
        read_facts(write(tmp_path, "obj.json", '{"subject": "x"}'))
