"""Two processes on localhost (jax.distributed, a local coordinator, CPU collectives) run the
diagnose binary over one 8-device mesh and write what a single process writes."""

import json
import os
import re
import socket
import subprocess
import sys

from experiments import diagnose
from tests.helpers import ROOT, read, run, tiny_run_setup



def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_write_what_one_writes(tmp_path):
  setup = tiny_run_setup(tmp_path)
  model, task = setup["model"], setup["tasks"][0]
  # one process (this one, 8 fake devices, the same mesh); it also fills the caches
  run(diagnose, setup, tmp_path / "one", floor=1e-4, max_nodes=12, mesh="data:8")

  port = _free_port()
  xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
  env = dict(os.environ, XLA_FLAGS=f"{xla} --xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # this process's compiler flags, 4 devices
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.diagnose", f"--model={model}", f"--task={task}",
       f"--out={tmp_path / 'two'}", f"--cache_dir={setup['cache_dir']}", "--batch_size=8",
       "--floor=1e-4", "--max_nodes=12", "--mesh=data:8", "--distributed",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  for name in ("summary.json", "positions.jsonl", "report.md"):
    assert read(tmp_path / "two" / name) == read(tmp_path / "one" / name), name
  manifest = json.loads(read(tmp_path / "two" / "manifest.json"))
  assert len(manifest["devices"]) == 8 and manifest["flags"]["mesh"] == "data:8"
