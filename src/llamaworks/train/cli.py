"""`llamaworks pretrain`: preset + recipe + CLI overrides -> prepared data -> training."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from llamaworks.config import get_preset, list_presets
from llamaworks.errors import LlamaworksError
from llamaworks.train.config import TrainConfig

DEMO_RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "demo.toml"

# Training defaults per preset (recipe [train] and CLI flags override them). `tiny` is the CPU
# demo: ~10 minutes on 2 cores on the bundled corpus.
PRESET_TRAIN: dict[str, dict[str, Any]] = {
    "tiny": {"lr": 3e-3, "micro_batch": 16, "seq_len": 128, "max_steps": 1000,
             "eval_every": 250, "save_every": 250, "log_every": 10, "max_minutes": 9.5},
    # the mixture-of-experts demo (8 experts, top-2, Switch aux loss at 0.01): same data
    "tiny-moe": {"lr": 3e-3, "micro_batch": 16, "seq_len": 128, "max_steps": 1000,
                 "eval_every": 250, "save_every": 250, "log_every": 10, "max_minutes": 9.5},
}
# Model-shape overrides per preset for training (the demo widens `tiny` a little; unit tests
# keep using the plain preset).
PRESET_MODEL: dict[str, dict[str, Any]] = {}

_TRAIN_FLAGS = ("lr", "warmup_steps", "micro_batch", "grad_accum", "seq_len", "max_steps",
                "max_minutes", "stop_at", "eval_every", "eval_rows", "log_every", "save_every",
                "keep_last", "seed", "weight_decay", "grad_clip", "router_aux_loss_coef",
                "router_bias_rate", "expert_parallel", "tensor_parallel", "peak_tflops")


_HELP = {
    "lr": "peak learning rate", "warmup_steps": "linear warmup (default: 2000, or max_steps/20 "
    "when smaller)", "micro_batch": "rows per micro-batch per rank", "grad_accum":
    "micro-batches per optimizer step", "seq_len": "tokens per row", "max_steps":
    "optimizer steps (also the cosine schedule's length)", "max_minutes": "stop (and save) "
    "after this wall time", "stop_at": "exit with a checkpoint after this step, schedule "
    "unchanged", "eval_every": "validation loss + bits per byte every N steps", "eval_rows":
    "validation rows per eval", "log_every": "metrics.jsonl line every N steps", "save_every":
    "checkpoint every N steps", "keep_last": "checkpoints kept", "seed": "init + data order",
    "weight_decay": "AdamW weight decay on matrices", "grad_clip": "global grad-norm clip",
    "router_aux_loss_coef": "MoE: load-balancing loss weight (default 0.01; 0 = off)",
    "router_bias_rate": "MoE: DeepSeek-V3 bias update per step (e.g. 1e-3; needs --set "
    "router_bias=true; default 0 = off)",
    "expert_parallel": "MoE under torchrun: shard every MoE layer's experts over N ranks "
    "(all-to-all token dispatch; N = the world size)",
    "tensor_parallel": "under torchrun: split every block's attention heads and MLP over N "
    "ranks (FSDP2 over world / N groups of them; dense models)",
    "peak_tflops": "device peak for MFU (default: a guess)",
}


def _parse_set(items: list[str]) -> dict[str, Any]:
    import json

    out = {}
    for item in items:
        if "=" not in item:
            raise LlamaworksError(f"--set {item!r}: expected KEY=VALUE, e.g. --set dim=128")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def resolve(args: argparse.Namespace) -> tuple[Any, TrainConfig, Any]:
    """(model config, train config, recipe) from preset < recipe < CLI."""
    from llamaworks.data.recipe import load_recipe

    recipe_path = Path(args.config) if args.config else DEMO_RECIPE
    recipe = load_recipe(recipe_path)
    preset = args.preset or recipe.model.get("preset", "tiny")
    model_over = {**PRESET_MODEL.get(preset, {}),
                  **{k: v for k, v in recipe.model.items() if k != "preset"},
                  **_parse_set(args.set or [])}
    try:
        cfg = get_preset(preset, **model_over)
    except KeyError as e:
        raise LlamaworksError(str(e.args[0])) from None
    except TypeError as e:
        raise LlamaworksError(f"bad model override: {e}") from None
    tc = TrainConfig()
    try:
        tc = tc.updated(PRESET_TRAIN.get(preset, {}), "preset defaults")
        tc = tc.updated(recipe.train, f"{recipe_path} [train]")
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    cli = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    if args.precision:
        cli["precision"] = args.precision
    cli.update(compile=args.compile or tc.compile,
               activation_checkpointing=args.activation_checkpointing
               or tc.activation_checkpointing,
               progress=not args.no_progress)
    return cfg, dataclasses.replace(tc, **cli), recipe


def cmd_pretrain(args: argparse.Namespace) -> int:
    from llamaworks.data.pipeline import format_report, prepare
    from llamaworks.data.shards import MANIFEST
    from llamaworks.train.distributed import setup
    from llamaworks.train.loop import train

    cfg, tc, recipe = resolve(args)
    out = Path(args.out or f"out/pretrain-{cfg.name or 'model'}")
    data = Path(args.data) if args.data else out / "data"
    info = setup(args.device)
    if not (data / MANIFEST).exists():
        if info.enabled:
            raise LlamaworksError(f"{data} is not prepared; run `llamaworks data prepare "
                                  f"--config {recipe.path} --out {data}` before torchrun")
        print(f"preparing data from {recipe.path} into {data}")
        print(format_report(prepare(recipe, data, progress=tc.progress)))
    s = train(cfg, tc, data, out, resume=args.resume, device=args.device)
    if info.is_main:
        if s["val_bpb"] is not None:
            gain = 1 - s["val_bpb"] / s["unigram_bpb"]
            rel = f"{gain:.0%} below" if gain >= 0 else f"{-gain:.0%} above"
            print(f"step {s['step']}: val_loss {s['val_loss']:.4f}  val_bpb {s['val_bpb']:.4f}  "
                  f"(unigram {s['unigram_bpb']:.4f}, {rel})  {s['minutes']:.1f} min")
        print(f"wrote {out}; try: llamaworks generate --model {out} -p \"In the beginning\"")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (the LLaMA recipe; torchrun for FSDP2)")
    p.add_argument("--preset", default=None, help=f"model shape: {', '.join(list_presets())} "
                   "(default: the recipe's [model] preset, else tiny)")
    p.add_argument("--config", default=None, help="recipe TOML (data mixture, [model], "
                   "[train]); default recipes/demo.toml")
    p.add_argument("--data", default=None, help="prepared data folder (default OUT/data, "
                   "prepared from the recipe when missing)")
    p.add_argument("--out", default=None, help="output folder (default out/pretrain-PRESET)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest.json")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override, e.g. --set dim=128 --set n_layers=4")
    for name in _TRAIN_FLAGS:
        f = dataclasses.fields(TrainConfig)
        typ = next(x.type for x in f if x.name == name)
        conv = float if "float" in str(typ) else int
        p.add_argument("--" + name.replace("_", "-"), type=conv, default=None,
                       help=_HELP.get(name))
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="auto (default): bf16 autocast on CUDA, float32 on CPU; bf16: autocast "
                   "on any device (fast on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_pretrain)
