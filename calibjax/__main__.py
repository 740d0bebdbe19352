"""``python -m calibjax env``: the environment report of :mod:`calibjax.environment`
(``--json`` for the raw fields)."""

import json
import sys


def main(argv: list[str]) -> int:
  if not argv or argv[0] != "env" or any(a not in ("--json",) for a in argv[1:]):
    print("usage: python -m calibjax env [--json]", file=sys.stderr)
    return 2
  from calibjax import environment
  env = environment.report()
  print(json.dumps(env, indent=2) if "--json" in argv else environment.format_report(env))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
