"""calibjax as a user installs it: a wheel of this checkout in a fresh virtual environment
outside the checkout, its data files and its console commands."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from experiments import diagnose
from tests.helpers import ROOT, read, run, tiny_run_setup


@pytest.mark.slow  # 21 s: README's test command stays under CI's 8 minutes without it
def test_wheel_installs_and_its_command_writes_what_the_checkout_writes(tmp_path):
  src = tmp_path / "src"  # a copy: building writes build/ beside setup.py
  for name in ("calibjax", "kernels", "experiments"):
    shutil.copytree(os.path.join(ROOT, name), src / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
  shutil.copy(os.path.join(ROOT, "setup.py"), src)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
  (wheel,) = (tmp_path / "dist").iterdir()
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)], check=True,
                 capture_output=True)
  # the dependencies come from this environment (a .pth line: its own .pth files, such as the
  # checkout's editable install, are not read), calibjax itself from the wheel
  site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print("
                         "sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                        text=True).stdout.strip()
  with open(os.path.join(site, "test-dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  where = subprocess.run(
      [str(venv / "bin" / "python"), "-c", "import calibjax, calibjax_experiments, "
       "calibjax_kernels; from calibjax import tasks; print(calibjax.__file__, "
       "calibjax_experiments.__file__, calibjax_kernels.__file__, len(tasks.names()))"],
      cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout.split()
  assert all(p.startswith(site) for p in where[:3]), where
  assert int(where[3]) == 20  # the built-in tasks travel in the wheel

  setup = tiny_run_setup(tmp_path)
  model, task = setup["model"], setup["tasks"][0]
  run(diagnose, setup, tmp_path / "checkout", max_nodes=8)
  out = subprocess.run(
      [str(venv / "bin" / "calibjax-diagnose"), f"--model={model}", f"--task={task}",
       f"--out={tmp_path / 'installed'}", f"--cache_dir={setup['cache_dir']}", "--batch_size=8",
       "--max_nodes=8"], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ("summary.json", "positions.jsonl", "report.md"):
    assert read(tmp_path / "installed" / name) == read(tmp_path / "checkout" / name), name
  manifest = json.loads(read(tmp_path / "installed" / "manifest.json"))
  assert manifest["flags"]["max_nodes"] == 8 and manifest["flags"]["binary"] == "diagnose"
