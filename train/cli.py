"""``python -m train pretrain|finetune|joint --config FILE.yaml [KEY=VALUE ...]``; the same
command runs under ``accelerate launch [--num_processes N] [--config_file ...] -m train ...``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import textwrap
from typing import Iterator

import yaml

from .config import STAGE_DEFAULTS, describe_fields, load_config

PRETRAIN_GROUP = (
    "The pretrain group (paper wiring): the visual projection clip_proj / clip_proj_norm / visual_proj / "
    "visual_proj_norm, the visual queries visual_query, the visual blocks visual_blocks.*, and the gates of the "
    "early fusion layers layers.<i>.attention.gate (i < visual_layers). Official wiring: also adapter_query and "
    "every gate."
)
FINETUNE_GROUP = (
    "The finetune group (paper wiring): the static adapter prompts adapter_query, the gates of the late layers, "
    "bias and scale of the seven linears layers.*.{attention,feed_forward}.w*.{bias,scale}, the norms "
    "layers.*.attention_norm / ffn_norm and norm, and LoRA (lora_a / lora_b) when configured. Official wiring: "
    "bias, scale, norms and LoRA."
)
STAGES = {
    "pretrain": ("Image-text pairs train the visual branch (the pretrain group)", [PRETRAIN_GROUP]),
    "finetune": ("Instruction data trains the language side (the finetune group)", [FINETUNE_GROUP]),
    "joint": (
        "Both data kinds in one run; each batch updates only its own group",
        [
            "The paper's joint training: image-text (caption) batches update the pretrain group, instruction "
            "batches the finetune group. The groups are disjoint and together cover every adapter tensor.",
            PRETRAIN_GROUP,
            FINETUNE_GROUP,
        ],
    ),
    "all": (
        "Ablation baseline (not the paper's): both data kinds, every batch updates both groups",
        ["Trains the union of the two groups on every batch; compare with joint."],
    ),
}

EPILOG = """\
Examples:
  python -m train finetune --config configs/tiny-cpu.yaml
  python -m train joint --config configs/llama7b-joint.yaml data.batch_size=2 optim.grad_accum=2
  python -m train finetune --config configs/tiny-cpu.yaml --resume          # latest checkpoint
  python -m train finetune --config configs/smollm2-cpu.yaml --base path/to/hf-llama   # another base
  accelerate launch --num_processes 2 --cpu -m train finetune --config configs/tiny-cpu.yaml
  accelerate launch --config_file configs/accelerate/fsdp-8gpu.yaml -m train pretrain \\
      --config configs/llama7b-pretrain.yaml

Evaluation: python -m train.evaluate --help
"""


def _config_table(stage: str) -> str:
    defaults = STAGE_DEFAULTS[stage]
    lines = []
    for key, default, text in describe_fields():
        leaf = key.split(".")[-1]
        if key.startswith("optim.") and leaf in defaults:
            default = f"{defaults[leaf]:g} (official)"
        shown = f"  {key}" + (f" = {default}" if default else "")
        lines.append(shown)
        lines.extend(textwrap.wrap(text, 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train LLaMA-Adapter V2: pretrain, finetune, or the paper's joint training.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, (summary, trains) in STAGES.items():
        p = stages.add_parser(
            stage,
            help=summary,
            description=f"{summary}.\n\n" + "\n\n".join(textwrap.fill(t, 100) for t in trains),
            epilog="Config keys (YAML sections, or KEY=VALUE overrides):\n" + _config_table(stage) + "\n\n" + EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML config (sections as listed below)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.blr=1e-3")
        p.add_argument("--output-dir", metavar="DIR", help="same as output_dir=DIR")
        p.add_argument(
            "--base", metavar="PATH", help="base model (a folder, a .gguf, a hub id, a name): same as model.base=PATH"
        )
        p.add_argument(
            "--resume",
            nargs="?",
            const="auto",
            metavar="CHECKPOINT",
            help="continue from a checkpoint folder, or (no value) the latest one in the output folder",
        )
        p.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps (the schedule is unchanged)")
        p.add_argument("--seed", type=int, help="same as seed=N")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="of the main process")
    return parser


@contextlib.contextmanager
def _plain_errors() -> Iterator[None]:
    """A bad config, data file or checkpoint ends the run with one line and exit status 2 (the
    traceback is logged at DEBUG); a bug elsewhere still shows its traceback."""
    from llama_adapter.errors import LlamaAdapterError

    try:
        yield
    except (LlamaAdapterError, ValueError, OSError, yaml.YAMLError) as e:
        logging.getLogger(__name__).debug("The error in full:", exc_info=True)
        what = "the config is not valid YAML: " if isinstance(e, yaml.YAMLError) else ""
        print(f"error: {what}{' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from e


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come before and after options; argparse takes only the first run of them.
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(args.overrides) + extra
    if args.max_steps is not None:
        overrides.append(f"optim.max_steps={args.max_steps}")
    with _plain_errors():
        cfg = load_config(
            args.config, overrides, stage=args.stage, output_dir=args.output_dir, resume=args.resume, seed=args.seed
        )
    if args.base is not None:
        cfg.model.base = args.base  # as given: a path must not be read as YAML
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=args.log_level if main_process else logging.WARNING,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from .trainer import run  # torch and accelerate load only once the arguments are fine

    with _plain_errors():
        path = run(cfg)
    if main_process:
        print(f"Adapter: {path}")
