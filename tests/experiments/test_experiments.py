"""The experiment binaries end to end on a tiny GGUF model and tiny task files: outputs parse
and hold their fields, plots are PNGs drawn from the JSON numbers, interrupted runs resume to
identical outputs, bad flags give errors that list the choices."""

import json
import os

import numpy as np
import pytest
from absl.testing import flagsaver

from calibjax import errors, sequence
from calibjax.analysis import diagnostics, plots
from calibjax.testing import tiny
from experiments import diagnose, frontier, sample
from tests.helpers import ROOT, read, run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("experiments")
  model = str(root / "tiny.gguf")
  tiny.write_gguf(model, tiny.model(seed=3))
  task_files = []
  for name, answers in (("tiny_ab", ["ab", "b", "a", "ba"]), ("tiny_ba", ["a", "bb", "aba"])):
    path = root / f"{name}.json"
    path.write_text(json.dumps({"name": name, "description": "test task", "prompts": ["ab"],
                                "answers": answers, "terminators": ["\n", "."]}))
    task_files.append(str(path))
  return {"model": model, "tasks": task_files, "cache_dir": str(root / "cache"), "root": root}




def test_diagnose_outputs(setup):
  out = setup["root"] / "diagnose"
  run(diagnose, setup, out, floor=1e-4, max_nodes=12)
  summary = json.loads(read(out / "summary.json"))
  assert set(summary) == {"tiny_ab", "tiny_ba"}
  lines = [json.loads(l) for l in read(out / "positions.jsonl").splitlines()]
  for task, s in summary.items():
    nodes = [l for l in lines if l["task"] == task]
    assert len(nodes) == s["nodes"] and 1 < len(nodes) <= 12
    assert nodes[0]["path"] == [] and nodes[0]["path_prob"] == 1.0
    assert all(np.isclose(sum(x), 1.0, atol=1e-5) for x in zip(
        nodes[0]["group_over"], nodes[0]["group_under"], nodes[0]["group_invalid"]))
    w = np.array([n["path_prob"] for n in nodes])
    want = np.average([n["valid_mass"] for n in nodes], weights=w)
    assert s["weighted_mean"]["valid_mass"] == pytest.approx(want, rel=1e-6)
  for png in ("shape.png", "order.png"):
    assert (out / png).read_bytes()[:8] == PNG
  # the figures are drawn from summary.json's numbers
  fig = plots.order_figure(summary)
  for ax, s in zip(fig.axes, summary.values()):
    np.testing.assert_allclose(ax.lines[0].get_ydata(), s["weighted_mean"]["cutoff_precision"])
    np.testing.assert_allclose(ax.lines[0].get_xdata(), s["cutoffs"])
  assert "tiny_ab" in read(out / "report.md")
  manifest = json.loads(read(out / "manifest.json"))
  assert manifest["flags"]["binary"] == "diagnose" and manifest["flags"]["floor"] == 1e-4
  assert manifest["versions"]["jax"] and manifest["wall_s"] > 0 and manifest["devices"]


def assert_same_numbers(a, b, where=""):
  """Equal JSON trees: the same keys, strings and counts, floats within 1e-4 relative."""
  assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, where
  if isinstance(a, dict):
    assert a.keys() == b.keys(), where
    for k in a:
      assert_same_numbers(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      assert_same_numbers(x, y, f"{where}[{i}]")
  elif isinstance(a, float):
    assert a == pytest.approx(b, rel=1e-4, abs=1e-30, nan_ok=True), where
  else:
    assert a == b, where


def test_binaries_on_a_data_mesh_write_the_same_numbers(setup):
  """--mesh=data:8 (the 8 fake devices): node batches and metric rows run data-parallel.
  Metrics of given logits are bit-identical (tests/core/test_sharding.py); the model's float32
  matrix products are blocked differently for 1/8 of the batch, so logits move by ~1e-5
  relative and the files agree to that."""
  one, eight = setup["root"] / "mesh1", setup["root"] / "mesh8"
  run(diagnose, setup, one, floor=1e-4, max_nodes=12)
  run(diagnose, setup, eight, floor=1e-4, max_nodes=12, mesh="data:8")
  assert_same_numbers(json.loads(read(one / "summary.json")),
                      json.loads(read(eight / "summary.json")))
  lines = lambda d: [json.loads(l) for l in read(d / "positions.jsonl").splitlines()]
  assert_same_numbers(lines(one), lines(eight))
  flags = dict(samplers=["top_p=0.9", "oracle_set,t=1.5"], temperatures=[1.0], coverage_n=5)
  run(frontier, setup, one / "f", **flags)
  run(frontier, setup, eight / "f", mesh="data:8", **flags)
  assert_same_numbers(json.loads(read(one / "f" / "frontier.json")),
                      json.loads(read(eight / "f" / "frontier.json")))
  with pytest.raises(errors.InputError, match="needs 6 devices"):
    run(diagnose, setup, setup["root"] / "mesh6", mesh="data:6")


def test_diagnose_resume_after_an_interruption_is_identical(setup, monkeypatch):
  whole, broken = setup["root"] / "whole", setup["root"] / "broken"
  run(diagnose, setup, whole, floor=1e-4, max_nodes=6)
  real = diagnostics.diagnose_task
  calls = []

  def dies_on_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt  # as if killed while the second task ran
    return real(*args, **kwargs)

  monkeypatch.setattr(diagnostics, "diagnose_task", dies_on_second)
  with pytest.raises(KeyboardInterrupt):
    run(diagnose, setup, broken, floor=1e-4, max_nodes=6)
  assert os.listdir(broken / "items") == ["tiny_ab.json"]
  with pytest.raises(errors.InputError, match="--resume"):
    run(diagnose, setup, broken, floor=1e-4, max_nodes=6)
  monkeypatch.setattr(diagnostics, "diagnose_task", real)
  run(diagnose, setup, broken, floor=1e-4, max_nodes=6, resume=True)
  for name in ("positions.jsonl", "summary.json", "report.md"):
    assert read(broken / name) == read(whole / name), name


def test_frontier_outputs(setup):
  out = setup["root"] / "frontier"
  samplers = ["t=1", "top_k=2", "top_k=5,t=0.7", "min_p=0.3", "oracle_set,t=1.5",
              "oracle_rank=0.9"]
  run(frontier, setup, out, samplers=samplers, coverage_n=10, mc_samples=300)
  data = json.loads(read(out / "frontier.json"))
  for task, f in data.items():
    assert [p["sampler"] for p in f["points"]] == [str(sequence.as_samplers([s])[0]) for s in samplers]
    assert f["bound_reached"] and f["ideal"][1] == pytest.approx(1 - (1 - 1 / len(f["answers"])) ** 10)
    for p in f["points"]:
      assert p["seq_validity"] + p["invalid_mass"] + p["unexplored_mass"] == pytest.approx(1, abs=1e-5)
    assert set(f["table"]) == {"temperature", "top_k", "min_p", "oracle_set", "oracle_rank"}
    oracle = next(p for p in f["points"] if p["family"] == "oracle_set")
    assert oracle["seq_validity"] == pytest.approx(1.0, abs=2e-3)
    assert f["mc_check"] and all(c["agrees"] for c in f["mc_check"]), f["mc_check"]
  assert (out / "frontier.png").read_bytes()[:8] == PNG
  fig = plots.frontier_figure(data)
  line = fig.axes[0].lines[0]  # the first family drawn as a curve: min_p's Pareto front
  f = data["tiny_ab"]
  front = [next(p for p in f["points"] if p["sampler"] == s) for s in f["pareto"]["min_p"]]
  np.testing.assert_allclose(line.get_xdata(), [p["seq_validity"] for p in front])
  np.testing.assert_allclose(line.get_ydata(), [p["coverage"]["10"] for p in front])
  assert "| top_k |" in read(out / "table.md")


def test_sample_outputs_and_resume(setup, monkeypatch):
  whole, broken = setup["root"] / "sample", setup["root"] / "sample_broken"
  flags = dict(sampler="top_k=5,t=1.5", n=20, max_new_tokens=6)
  metrics = run(sample, setup, whole, **flags)
  lines = [json.loads(l) for l in read(whole / "samples.jsonl").splitlines()]
  assert len(lines) == 40
  for task, m in metrics.items():
    mine = [l for l in lines if l["task"] == task]
    assert m["seq_validity"] == sum(l["reason"] == "valid" for l in mine) / 20
    assert sum(a["count"] for a in m["answers"].values()) == sum(l["answer"] is not None for l in mine)
  real, calls = sequence.sample, []

  def dies_on_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(sequence, "sample", dies_on_third)
  with pytest.raises(KeyboardInterrupt):
    run(sample, setup, broken, **flags)
  monkeypatch.setattr(sequence, "sample", real)
  run(sample, setup, broken, resume=True, **flags)
  assert read(broken / "samples.jsonl") == read(whole / "samples.jsonl")
  assert read(broken / "metrics.json") == read(whole / "metrics.json")


def test_bad_names_list_the_choices(setup, tmp_path):
  with pytest.raises(errors.TaskError, match="us_states"):
    with flagsaver.flagsaver(task=["no_such_task"], out=str(tmp_path / "a")):
      diagnose.run()
  with pytest.raises(errors.InputError, match="top_q"):
    run(frontier, setup, tmp_path / "b", samplers=["top_q=0.9"])
  with pytest.raises(errors.ModelLoadError, match="gemma3-270m"):
    with flagsaver.flagsaver(model="no-such-model", task=setup["tasks"], out=str(tmp_path / "c")):
      diagnose.run()


def test_quickstart_notebook_runs_headless(setup):
  """The notebook, unchanged, executed by a Jupyter kernel on CPU with small settings."""
  import nbclient
  import nbformat
  folder = os.path.join(ROOT, "experiments", "notebooks")
  nb = nbformat.read(os.path.join(folder, "quickstart.ipynb"), as_version=4)
  env = {"CALIBJAX_MODEL": setup["model"], "CALIBJAX_TASK": setup["tasks"][0],
         "CALIBJAX_MAX_NODES": "5", "CALIBJAX_FLOOR": "1e-4", "CALIBJAX_CACHE": setup["cache_dir"],
         "JAX_PLATFORMS": "cpu"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": folder}}).execute()
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
  assert any("tiny_ab" in str(o.get("data", {}).get("text/markdown", "")) for o in outputs)


def test_notebook_install_cell_keeps_an_accelerator_jax():
  """The notebook's install cell, run where calibjax is installed (so it installs nothing): what
  it finds here, and the pip installs it would try on each kind of runtime."""
  import jax
  import nbformat
  nb = nbformat.read(os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb"), 4)
  cell = {}
  exec(next(c for c in nb.cells if c.cell_type == "code").source, cell)
  assert cell["probe"]() == ((jax.__version__, jax.default_backend()), None)
  plans = cell["install_plans"]
  # a jax already on a TPU or GPU (Colab's): that version first, else jax with the extra
  assert plans("/src", ("0.12.0.1", "tpu"), "tpu") == [["/src[plots]", "jax==0.12.0.1"],
                                                       ["/src[plots,tpu]"]]
  assert plans("/src", ("0.11.2", "gpu"), None) == [["/src[plots]", "jax==0.11.2"],
                                                   ["/src[plots,cuda]"]]
  # a CPU-only jax, or none, where there is an accelerator: jax with its plugin
  assert plans("/src", ("0.12.0.1", "cpu"), "cuda") == [["/src[plots,cuda]"]]
  assert plans("https://host/calibjax.git", None, "tpu") == [
      ["calibjax[plots,tpu] @ https://host/calibjax.git"]]
  assert plans("/src", None, None) == [["/src[plots]"]]


def test_sample_survives_kill_9(setup):
  """A real ``kill -9`` in the middle of a run, then ``--resume``: the same samples as an
  uninterrupted run, nothing lost or duplicated."""
  import signal
  import subprocess
  import sys
  import time
  flags = dict(sampler="t=1.5", n=120, max_new_tokens=4)
  whole, killed = setup["root"] / "kill_whole", setup["root"] / "kill_9"
  run(sample, setup, whole, **flags)
  args = [sys.executable, "-m", "experiments.sample", f"--model={setup['model']}",
          f"--cache_dir={setup['cache_dir']}", "--batch_size=8", f"--out={killed}",
          "--sampler=t=1.5", "--n=120", "--max_new_tokens=4"]
  args += [f"--task={t}" for t in setup["tasks"]]
  root = ROOT
  proc = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  items = killed / "items"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if items.is_dir() and len([f for f in os.listdir(items) if f.endswith(".json")]) >= 3:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len([f for f in os.listdir(items) if f.endswith(".json")])
  assert 3 <= done < 30 and not (killed / "samples.jsonl").exists()
  run(sample, setup, killed, resume=True, **flags)
  assert read(killed / "samples.jsonl") == read(whole / "samples.jsonl")
  assert read(killed / "metrics.json") == read(whole / "metrics.json")


def test_train_head_then_use_it(setup):
  """train_head on a train-split task file (eval on the others), then diagnose and frontier
  with --head: the head changes the numbers and the outputs say which head was used."""
  from experiments import train_head
  train_file = setup["root"] / "tiny_train.json"
  train_file.write_text(json.dumps({"name": "tiny_train", "description": "train", "prompts": ["b"],
                                    "answers": ["ab", "ba"], "terminators": ["\n"],
                                    "split": "train"}))
  out = setup["root"] / "head_run"
  with flagsaver.flagsaver(model=setup["model"], task=[str(train_file), setup["tasks"][0]],
                           out=str(out), cache_dir=setup["cache_dir"], batch_size=8, steps=30,
                           eval_every=10, checkpoint_every=10, learning_rate=0.05):
    records = train_head.run()
  assert len(records) == 30 and "eval_loss" in records[9]
  assert records[-1]["loss"] < records[0]["loss"]
  lines = read(out / "metrics.jsonl").splitlines()
  assert [json.loads(l)["step"] for l in lines] == list(range(1, 31))
  assert sorted(os.listdir(out / "checkpoints")) == ["step_10", "step_20", "step_30"]
  manifest = json.loads(read(out / "manifest.json"))
  assert manifest["positions"]["train"] > 0 and manifest["flags"]["head_kind"] == "low_rank"
  assert manifest["prompts"] == {"tiny_train": "b", "tiny_ab": "ab"}  # completion prompts
  samplers = ["t=1", "top_k=2", "top_k=5,t=0.7", "min_p=0.3", "oracle_set,t=1.5",
              "oracle_rank=0.9"]
  plain_dir, tuned_dir = setup["root"] / "frontier_plain", setup["root"] / "frontier_head"
  run(frontier, setup, plain_dir, samplers=samplers, coverage_n=10)
  plain = json.loads(read(plain_dir / "frontier.json"))["tiny_ab"]
  run(frontier, setup, tuned_dir, samplers=samplers, coverage_n=10, head=str(out / "head"))
  tuned = json.loads(read(tuned_dir / "frontier.json"))["tiny_ab"]
  assert tuned["points"][0]["seq_validity"] != plain["points"][0]["seq_validity"]
  assert json.loads(read(tuned_dir / "manifest.json"))["flags"]["head"] == str(out / "head")

  # the held-out report: the same frontier per model, numbers recomputed from its own files
  from calibjax.recalibration import report as hr
  from experiments import head_report
  rep_dir = setup["root"] / "head_report"
  samplers = ["t=1", "top_k=2", "top_k=5,t=0.7", "min_p=0.3", "oracle_set,t=1.5"]
  rep = run(head_report, setup, rep_dir, samplers=samplers, coverage_n=10, level=0.5,
            head_dirs=[f"lr={out / 'head'}"], task=[setup["tasks"][1]])
  assert json.loads(read(rep_dir / "report.json")) == json.loads(json.dumps(rep))
  fr = json.loads(read(rep_dir / "frontiers.json"))["tiny_ba"]
  assert [p["seq_validity"] for p in fr["base"]["points"]] != [
      p["seq_validity"] for p in fr["lr"]["points"]]
  row = rep["tasks"]["tiny_ba"]
  assert row["base_best_heuristic"] == hr.best_coverage(fr["base"], 0.5)
  assert row["lr"]["best_heuristic"] == hr.best_coverage(fr["lr"], 0.5)
  assert row["oracle_set_base"]["sampler"] == "oracle_set,t=1.5"
  assert rep["step_metrics"]["base"]["positions"] == rep["step_metrics"]["lr"]["positions"] > 0
  assert rep["keep_kl"]["lr"] > 0 and set(rep["keep_kl"]) == {"lr"}
  assert "tiny_ba" in read(rep_dir / "report.md")
  assert (rep_dir / "coverage.png").read_bytes()[:8] == PNG
  with pytest.raises(errors.InputError, match="name=path"):
    run(head_report, setup, setup["root"] / "bad_report", head_dirs=["nameless"])


def test_resume_refuses_changed_settings(setup, tmp_path):
  """--resume with a flag, the model or a task file changed is refused, naming what changed,
  and leaves the finished results as they were; unchanged settings resume."""
  out = tmp_path / "frontier"
  flags = dict(samplers=["top_p=0.9"], coverage_n=5)
  run(frontier, setup, out, temperatures=[1.0], bound=2e-2, **flags)
  before = read(out / "frontier.json")
  with pytest.raises(errors.InputError, match=r"bound: 0\.02 then, 0\.1 now.*temperatures"):
    run(frontier, setup, out, temperatures=[1.5], bound=0.1, resume=True, **flags)
  other = tmp_path / "other.gguf"
  tiny.write_gguf(str(other), tiny.model(seed=9))
  with pytest.raises(errors.InputError, match="model: .*other.gguf"):
    run(frontier, setup, out, temperatures=[1.0], bound=2e-2, resume=True, model=str(other),
        **flags)
  assert read(out / "frontier.json") == before
  run(frontier, setup, out, temperatures=[1.0], bound=2e-2, resume=True, **flags)
  assert read(out / "frontier.json") == before
  # sample: a new sampler and n would have mixed greedy and T = 3 samples
  out = tmp_path / "sample"
  run(sample, setup, out, sampler="top_k=1", n=4, max_new_tokens=4)
  with pytest.raises(errors.InputError, match=r"n: 4 then, 8 now.*sampler: 'top_k=1' then"):
    run(sample, setup, out, sampler="t=3", n=8, max_new_tokens=4, resume=True)
  # a task whose file changed between the runs
  task = tmp_path / "task.json"
  spec = {"name": "tiny_c", "description": "t", "prompts": ["ab"], "answers": ["a", "b"]}
  task.write_text(json.dumps(spec))
  out = tmp_path / "diagnose"
  run(diagnose, setup, out, task=[str(task)], floor=1e-3, max_nodes=3)
  task.write_text(json.dumps({**spec, "answers": ["a", "ab"]}))
  with pytest.raises(errors.InputError, match="task tiny_c: its content changed"):
    run(diagnose, setup, out, task=[str(task)], floor=1e-3, max_nodes=3, resume=True)


def test_one_run_per_output_folder(setup, tmp_path, capfd):
  """A second run on a folder a live process holds is refused (its pid named); the lock of
  a process that died is taken over."""
  import subprocess
  import sys
  out = tmp_path / "busy"
  root = ROOT
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom calibjax import results\n"
       "lock = results.OutputLock(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)",
       str(out)], cwd=root, stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(errors.InputError, match=rf"in use by another run \(pid {holder.pid} on "):
      run(diagnose, setup, out, floor=1e-3, max_nodes=3)
    assert not (out / "items").exists()
  finally:
    holder.kill()
    holder.wait()
  capfd.readouterr()
  run(diagnose, setup, out, floor=1e-3, max_nodes=3)
  assert f"taking over {out}/.lock from a run that is no longer running (pid {holder.pid}" in (
      capfd.readouterr().err)
  assert read(out / ".lock") == ""  # released at the end


def test_user_errors_are_one_line(setup, tmp_path):
  """A bad --task: one line on stderr, exit status 1; --verbosity=1 adds the traceback."""
  import subprocess
  import sys
  root = ROOT
  args = [sys.executable, "-m", "experiments.diagnose", "--task=no_such_task",
          f"--out={tmp_path / 'x'}"]
  quiet = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=120)
  assert quiet.returncode == 1
  lines = quiet.stderr.strip().splitlines()
  assert len(lines) == 1 and "error: unknown task 'no_such_task'" in lines[0], quiet.stderr
  loud = subprocess.run(args + ["--verbosity=1"], cwd=root, capture_output=True, text=True,
                        timeout=120)
  assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_figures_skipped_without_matplotlib(setup, tmp_path, monkeypatch, capfd):
  monkeypatch.setattr(plots, "available", lambda: False)
  out = tmp_path / "f"
  run(frontier, setup, out, samplers=["t=1"], coverage_n=5)
  assert json.loads(read(out / "frontier.json")) and (out / "table.md").exists()
  assert not (out / "frontier.png").exists()
  assert "skipped" in capfd.readouterr().err


def test_diagnose_and_frontier_with_chat_prompts(setup, tmp_path):
  """``--prompt_style=chat`` on a tiny chat checkpoint (the random Qwen3 with a chat tokenizer
  and Qwen3's template): diagnose and the exact engine run end to end on a non-Gemma family,
  and every results file and manifest records the rendered prompt."""
  import shutil
  model = tmp_path / "qwen3_chat"
  shutil.copytree(os.path.join(ROOT, "tests", "data", "families", "qwen3"), model)
  chat = os.path.join(ROOT, "tests", "data", "chat", "chat_model")
  for f in os.listdir(chat):
    shutil.copyfile(os.path.join(chat, f), model / f)
  task = tmp_path / "pick.json"
  task.write_text(json.dumps({"name": "pick", "description": "", "prompts": ["Pick:"],
                              "chat_prompts": ["Pick a or b."], "answers": ["a", "b", "ab"]}))
  want = ("<|im_start|>user\nPick a or b.<|im_end|>\n<|im_start|>assistant\n"
          "<think>\n\n</think>\n\n")
  common = dict(model=str(model), task=[str(task)], prompt_style="chat")
  run(diagnose, setup, tmp_path / "d", floor=1e-12, max_nodes=4, **common)
  run(frontier, setup, tmp_path / "f", samplers=["t=1", "top_p=0.9"], rules=[], bound=1e-2,
      temperatures=["1"], oracle_taus=[], chat_template_kwargs='{"enable_thinking": true}',
      **common)
  summary = json.loads(read(tmp_path / "d" / "summary.json"))
  assert summary["pick"]["prompt"] == want and summary["pick"]["prompt_style"] == "chat"
  thinking = want.replace("<think>\n\n</think>\n\n", "")  # the template's own default
  assert json.loads(read(tmp_path / "f" / "frontier.json"))["pick"]["prompt"] == thinking
  assert json.loads(read(tmp_path / "d" / "manifest.json"))["prompts"] == {"pick": want}
  assert json.loads(read(tmp_path / "f" / "manifest.json"))["prompts"] == {"pick": thinking}
