"""``diffmem <stage> [hydra overrides]``: one command for every stage."""

from __future__ import annotations

import sys

from diffmem.config import STAGES, stage_module
from diffmem.errors import DiffmemError

USAGE = """usage: diffmem <stage> [key=value ...] [--multirun] [--cfg job]

stages: {stages}
Each stage is a Hydra app: `diffmem <stage> --help` shows its config groups."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(stages=", ".join(STAGES.names())))
        return
    stage, rest = argv[0], argv[1:]
    try:
        module = stage_module(stage)
    except DiffmemError as err:
        print(f"diffmem: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"diffmem-{stage}", *rest]
    module.main()


if __name__ == "__main__":
    main()
