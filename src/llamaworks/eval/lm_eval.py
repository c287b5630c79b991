"""`python -m llamaworks.eval.lm_eval ARGS` (or `llamaworks eval lm-eval ARGS`): lm-eval's own
command line with `--model llamaworks` available. lm-eval 0.4 has no plugin entry point for
models, so this registers ours, then runs lm-eval's CLI."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Register the llamaworks model and run lm-eval's CLI on `argv` (default: sys.argv[1:])."""
    from lm_eval.__main__ import cli_evaluate

    import llamaworks.eval.harness  # noqa: F401  (registers "llamaworks")

    saved = sys.argv
    if argv is not None:
        sys.argv = ["lm_eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as e:  # --help, argument errors
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
