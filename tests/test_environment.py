"""``python -m calibjax env``: the versions, backend, devices and cache size it reports."""

import json
import os
import subprocess
import sys

import jax

import calibjax
from calibjax import environment
from tests.helpers import ROOT


def _cache(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 1000)
  (tmp_path / "y.json").write_text("{}")                     # 2 bytes
  os.symlink(tmp_path / "a" / "x.bin", tmp_path / "link")     # not counted twice
  return tmp_path


def test_report_fields(tmp_path, monkeypatch):
  monkeypatch.setenv("CALIBJAX_CACHE", str(_cache(tmp_path)))
  env = environment.report()
  assert env["cache_dir"] == str(tmp_path) and env["cache_bytes"] == 1002
  assert env["versions"]["calibjax"] == calibjax.__version__
  assert env["versions"]["jax"] == jax.__version__
  assert env["backend"] == jax.default_backend()
  assert env["devices"] == [str(d) for d in jax.devices()]
  assert environment.folder_size(str(tmp_path / "missing")) == 0
  text = environment.format_report(env)
  assert f"calibjax           {calibjax.__version__}" in text and "(0.0 MiB)" in text


def test_command_line(tmp_path):
  env = dict(os.environ, CALIBJAX_CACHE=str(_cache(tmp_path)), PYTHONPATH=ROOT)
  run = lambda *args: subprocess.run([sys.executable, "-m", "calibjax", *args], env=env,
                                     capture_output=True, text=True, cwd=ROOT)
  out = run("env", "--json")
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["cache_bytes"] == 1002 and report["versions"]["calibjax"] == calibjax.__version__
  bad = run("nonsense")
  assert bad.returncode == 2 and "usage: python -m calibjax env" in bad.stderr
