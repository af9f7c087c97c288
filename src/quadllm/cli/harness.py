"""``quadllm lm-eval ARGS``: lm-evaluation-harness's own command line, with the ``quadllm`` model type
registered (:mod:`quadllm.integrations.lm_evaluation`). Its arguments are the harness's, untouched."""

from __future__ import annotations

from ..config import ConfigError


def add_parsers(sub) -> None:
    # listed for --help only: :func:`run` receives the arguments before argparse sees them
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness's command line with --model quadllm (e.g. quadllm lm-eval --model "
                        "quadllm --model_args pretrained=CKPT --tasks piqa); its own arguments follow")


def run(argv: list[str]) -> int:
    """The harness's command line on ``argv`` (everything after ``lm-eval``)."""
    try:
        from ..integrations.lm_evaluation import main
    except ImportError as exc:
        raise ConfigError(f"quadllm lm-eval needs lm-evaluation-harness: pip install 'quadllm[tasks]' ({exc})") from exc
    return main(argv)


#: commands whose arguments belong to another tool (argparse does not parse them)
PASSTHROUGH = {"lm-eval": run}
HANDLERS: dict = {}
