"""Task files: the schema's validation errors, the built-in suite's facts, loading by path."""

import json

import pytest

from calibjax import errors, tasks

COUNTS = {"us_states": 50, "integers_1_20": 20, "integers_1_100": 100, "months": 12,
          "weekdays": 7, "planets": 8, "rainbow_colors": 7, "letters": 26,
          "chemical_elements": 118, "eu_countries": 27, "south_american_countries": 12,
          "zodiac_signs": 12, "nato_alphabet": 26, "primes_below_100": 25,
          "us_state_capitals": 50, "continents": 7, "dice_roll": 6, "coin_flip": 2,
          "card_suits": 4, "seasons": 4}


def test_builtin_suite_counts_and_spot_values():
  assert tasks.names() == sorted(COUNTS)
  suite = {t.name: t for t in tasks.load_all()}
  for name, n in COUNTS.items():
    t = suite[name]
    assert len(t.answers) == n, name
    assert sum(t.weights) == pytest.approx(1.0) and len(set(t.weights)) == 1
    assert t.prompts and all(p.rstrip().endswith("Answer:") for p in t.prompts)
  s = suite["us_states"]
  assert {"Texas", "California", "New Hampshire", "West Virginia"} <= set(s.answers)
  assert not s.is_answer("Puerto Rico") and not s.is_answer("texas")
  assert suite["integers_1_20"].answers[:3] == ("1", "2", "3") and "20" in suite["integers_1_20"].answers
  assert suite["primes_below_100"].answers[-1] == "97" and "91" not in suite["primes_below_100"].answers
  assert suite["chemical_elements"].answers[25] == "Iron" and suite["chemical_elements"].answers[-1] == "Oganesson"
  assert dict(zip(suite["us_states"].answers, suite["us_state_capitals"].answers))["Minnesota"] == "Saint Paul"
  assert suite["rainbow_colors"].is_answer("Indigo") and not suite["rainbow_colors"].is_answer("Pink")
  assert "Pluto" not in suite["planets"].answers
  assert {t.split for t in suite.values()} == {"train", "eval"}
  assert len(tasks.load_all("train")) + len(tasks.load_all("eval")) == len(COUNTS)


def write(tmp_path, **fields):
  base = {"name": "t", "description": "d", "prompts": ["Q\nAnswer:"], "answers": ["a", "b"]}
  base.update(fields)
  base = {k: v for k, v in base.items() if v is not None}
  path = tmp_path / "task.json"
  path.write_text(json.dumps(base))
  return str(path)


def test_loads_a_task_file_by_path(tmp_path):
  t = tasks.load(write(tmp_path, target={"a": 3, "b": 1}, split="train", leading=["", " ", "  "]))
  assert t.weights == (0.75, 0.25) and t.split == "train" and t.leading == ("", " ", "  ")
  assert t.terminators == ("\n", ".", ",") and t.end_of_sequence and t.source.endswith("task.json")
  r = tasks.load(write(tmp_path, answers=None, answer_regex=r"[1-9][0-9]?"))
  assert r.answers is None and r.is_answer("42") and not r.is_answer("420")


@pytest.mark.parametrize("fields,match", [
    ({"colour": "red"}, "field 'colour': unknown field"),
    ({"answers": []}, "field 'answers': must not be empty"),
    ({"answers": ["a", "a"]}, "duplicate answer 'a'"),
    ({"answers": ["Ab", "aB"], "case_sensitive": False}, "duplicate answer 'aB'"),
    ({"answers": ["St. Paul"]}, "contains the terminator '.'"),
    ({"answers": ["a", ""]}, "empty string"),
    ({"answers": "a"}, "must be a list of strings"),
    ({"answer_regex": "a+"}, "exactly one of"),
    ({"answers": None}, "exactly one of"),
    ({"answers": None, "answer_regex": "(a"}, "does not compile"),
    ({"target": {"c": 1}}, "'c', which is not an answer"),
    ({"target": {"a": -1, "b": 0}}, "non-negative"),
    ({"split": "test"}, "'train' or 'eval'"),
    ({"name": "Bad Name"}, "must match"),
    ({"prompts": None}, "field 'prompts': is required"),
    ({"prompts": ["Q", ""]}, "field 'prompts': item 1 is empty or only whitespace"),
    ({"chat_prompts": ["  "]}, "field 'chat_prompts': item 0 is empty"),
    ({"case_sensitive": "yes"}, "true or false"),
    ({"terminators": [], "end_of_sequence": False}, "never end"),
])
def test_malformed_task_files_name_file_and_field(tmp_path, fields, match):
  path = write(tmp_path, **fields)
  with pytest.raises(errors.TaskError, match=match) as e:
    tasks.load(path)
  assert path in str(e.value)


def test_bad_json_and_unknown_names(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('{"name": "x",\n "prompts": [}')
  with pytest.raises(errors.TaskError, match=r"broken.json: line 2, column"):
    tasks.load(str(path))
  with pytest.raises(errors.TaskError, match="unknown task 'us_presidents'.*us_states"):
    tasks.load("us_presidents")
