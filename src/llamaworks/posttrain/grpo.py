"""GRPO (Shao et al., 2024) with verifiable rewards on the procedural tasks (the legacy
arithmetic templates or the suite's training families), on a LoRA policy.

Each step: G sampled rollouts per prompt (tool calls executed during the rollout, their tokens
masked from the loss; by default sampled under the lazy tool-call grammar, so every finished
call parses) -> rewards (answer correct = 1 by the problem's checker, plus a small format reward
for well-formed tool calls and a finished turn, only on a problem that needs a tool) ->
group-normalized advantages -> the clipped policy-ratio objective with an optional k3 KL penalty
to the frozen reference (the same model with the adapter switched off). Losses are averaged over
each sequence's generated tokens, then over sequences (the paper's normalization).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llamaworks.atomic import atomic_path, atomic_write_json
from llamaworks.model import Llama
from llamaworks.posttrain.evaluate import correct, needs_tool, solve
from llamaworks.posttrain.lora import LoraConfig, apply_lora, save_adapter, set_lora_enabled
from llamaworks.posttrain.prefix import prefix_kv, prefixed_hidden, trainable_prefix_len
from llamaworks.posttrain.rollout import Rollout
from llamaworks.posttrain.tasks import Problem
from llamaworks.train import checkpoints as ckpt
from llamaworks.train import skeleton
from llamaworks.train.optim import adamw, lr_scheduler


@dataclass
class GRPOConfig:
    group_size: int = 4
    prompts_per_step: int = 2
    steps: int = 40
    max_minutes: float | None = None
    lr: float = 5e-4
    # the shared AdamW and schedule (train/optim.py) with GRPO's values: beta2 0.99, no weight
    # decay, no warmup and a floor of 1.0 (a constant LR)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    save_every: int = 5  # a checkpoint (adapter + trainer state) every N steps
    keep_last: int = 2
    clip_eps: float = 0.2
    kl_coef: float = 0.02
    inner_epochs: int = 1
    temperature: float = 1.0
    max_new: int = 96  # tokens per rollout (the suite: 384, a <think> plan and up to 3 calls)
    max_tool_calls: int = 2  # tool turns per rollout (the suite: 4, 3 calls and one retry)
    format_reward: float = 0.1
    grammar: bool = True  # sample tool calls under the lazy tool-call grammar
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False  # run the frozen base in bf16 (rollouts and log-probabilities)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=16, dropout=0.0))

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("GRPO needs group_size >= 2 (advantages are relative to the group)")
        if self.temperature <= 0:
            raise ValueError("GRPO samples: temperature must be > 0")
        if self.save_every < 1 or self.keep_last < 1:
            raise ValueError(f"save_every and keep_last must be >= 1, got {self.save_every} and "
                             f"{self.keep_last}")


def well_formed(r: Rollout) -> bool:
    """The rollout ran a tool call and finished (so no call was cut off), and none of its calls
    was broken: none failed to parse, none named an unknown tool or broke the tool's schema."""
    return r.tool_calls > 0 and r.finished and r.malformed_calls == 0 and r.invalid_calls == 0


def reward(p: Problem, r: Rollout, fmt_bonus: float) -> float:
    """1 when the final turn answers `p` exactly (the suite kind's checker for a suite problem,
    `is_correct` for a legacy one), plus `fmt_bonus` for well-formed tool calls on a problem that
    needs a tool (none for calling a tool on a no_tool problem)."""
    return float(correct(p, r.final_text)) + (
        fmt_bonus if needs_tool(p) and well_formed(r) else 0.0)


def group_advantages(rewards: Sequence[float], group: int) -> list[float]:
    """(r - mean) / (std + 1e-4) within each consecutive group of `group` rewards."""
    out = []
    for g in range(0, len(rewards), group):
        rs = torch.tensor(rewards[g:g + group], dtype=torch.float64)
        std = rs.std(unbiased=False) if len(rs) > 1 else torch.tensor(0.0)
        out += ((rs - rs.mean()) / (std + 1e-4)).tolist()
    return out


def sequence_logprobs(model: Llama, seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]]
                      ) -> list[Tensor]:
    """Log-probability of every masked (generated) token of each sequence, under `model`.
    The shared prompt prefix is computed once without gradient."""
    p = trainable_prefix_len(seqs, masks)
    kv = prefix_kv(model, seqs[0][:p])
    t = max(len(s) for s in seqs) - p
    tokens = torch.tensor([list(s[p:]) + [0] * (t - len(s) + p) for s in seqs])
    h = prefixed_hidden(model, kv, tokens)
    out = []
    for b, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        # position j (absolute) predicts token j + 1
        idx = [j for j in range(p, len(s) - 1) if m[j + 1]]
        if not idx:
            out.append(h.new_zeros(0))
            continue
        rows = torch.tensor(idx) - p
        logits = model.lm_head(h[b, rows]).float()
        target = torch.tensor([s[j + 1] for j in idx])
        out.append(torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0])
    return out


class GRPOTrainer:
    def __init__(self, model: Llama, tokenizer: Any, problems: list[Problem], cfg: GRPOConfig):
        self.model, self.tok, self.problems, self.cfg = model, tokenizer, problems, cfg
        if cfg.bf16:  # frozen base in bf16 (fast matmuls); the adapter stays fp32
            model.to(torch.bfloat16)
        apply_lora(model, cfg.lora)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adamw(model, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
        self.sched = lr_scheduler(self.opt, cfg.warmup_steps, max(1, cfg.steps),
                                  cfg.min_lr_ratio)
        self.rng = random.Random(cfg.seed)  # which prompts each step draws

    def state(self, step: int) -> dict[str, Any]:
        """The trainer state at `step` (`train/skeleton.py`); the data position is the prompt
        sampler's random.Random (each step's rollouts are seeded by the step)."""
        return skeleton.trainer_state("grpo", step, self.opt.state_dict(), self.sched, {
            "seed": self.cfg.seed, "rng": skeleton.saved_py_rng(self.rng)})

    def restore(self, folder: Path, state: dict[str, Any]) -> int:
        """Continue from a checkpoint folder (adapter, optimizer, schedule, RNGs); its step."""
        from llamaworks.posttrain.sft import restore_weights

        restore_weights(self.model, self.cfg.lora, folder)
        data = skeleton.restore(state, self.opt, self.sched)
        self.rng.setstate(skeleton.py_rng_state(data["rng"]))
        return int(state["step"])

    def step(self, step: int) -> dict[str, Any]:
        """GRPO step `step` (0-based): rollouts, rewards, the policy update (inner_epochs
        optimizer steps at this step's LR); its metrics row."""
        lr = self.opt.param_groups[0]["lr"]
        row = self._step(step) | {"lr": lr}
        self.sched.step()
        return row

    def _step(self, step: int) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        chosen = self.rng.sample(self.problems, cfg.prompts_per_step)
        batch = [p for p in chosen for _ in range(cfg.group_size)]
        model.eval()
        outs = solve(model, self.tok, batch, tools=True, temperature=cfg.temperature,
                     seed=cfg.seed * 100_003 + step, max_new=cfg.max_new,
                     max_tool_calls=cfg.max_tool_calls, grammar=cfg.grammar)
        rewards = [reward(p, r, cfg.format_reward) for p, r in zip(batch, outs, strict=True)]
        adv = group_advantages(rewards, cfg.group_size)
        seqs = [r.prompt_ids + r.ids for r in outs]
        masks = [[0] * len(r.prompt_ids) + r.mask for r in outs]
        row = {"step": step + 1, "reward": sum(rewards) / len(rewards),
               "accuracy": sum(correct(p, r.final_text)
                               for p, r in zip(batch, outs, strict=True)) / len(batch),
               "tool_call_rate": sum(r.tool_calls > 0 for r in outs) / len(outs),
               "calls": sum(r.tool_calls for r in outs) / len(outs),
               "malformed_calls": sum(r.malformed_calls for r in outs) / len(outs),
               "length": sum(sum(r.mask) for r in outs) / len(outs)}
        live = [i for i, a in enumerate(adv) if abs(a) > 1e-6]
        if not live and cfg.kl_coef == 0:
            return row | {"loss": 0.0, "kl": 0.0, "updated": False}
        with torch.no_grad():
            old = sequence_logprobs(model, seqs, masks)
            ref = None
            if cfg.kl_coef > 0:
                set_lora_enabled(model, False)
                ref = sequence_logprobs(model, seqs, masks)
                set_lora_enabled(model, True)
        model.train()
        kl_val = loss_val = 0.0
        for _ in range(cfg.inner_epochs):
            new = sequence_logprobs(model, seqs, masks)
            losses, kls = [], []
            for i, lp in enumerate(new):
                if lp.numel() == 0:
                    continue
                ratio = torch.exp(lp - old[i])
                a = float(adv[i])
                surr = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
                per_tok = -surr
                if ref is not None:
                    d = ref[i] - lp
                    kl = torch.exp(d) - d - 1
                    per_tok = per_tok + cfg.kl_coef * kl
                    kls.append(float(kl.detach().mean()))
                losses.append(per_tok.mean())
            if not losses:
                break
            loss = torch.stack(losses).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            loss_val, kl_val = float(loss.detach()), (sum(kls) / len(kls) if kls else 0.0)
        return row | {"loss": loss_val, "kl": kl_val, "updated": True}


def plot_rewards(rows: list[dict], path: Path) -> None:
    """Reward and accuracy per step with a moving average, atomically written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color in (("reward", "tab:blue"), ("accuracy", "tab:green")):
        ys = [r[key] for r in rows]
        k = max(1, len(ys) // 8)
        avg = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1])
               for i in range(len(ys))]
        ax.plot(steps, ys, color=color, alpha=0.25, lw=1)
        ax.plot(steps, avg, color=color, lw=2, label=f"{key} (moving avg {k})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean over rollouts")
    ax.set_ylim(-0.05, 1.2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train_grpo(model: Llama, tokenizer: Any, problems: list[Problem], cfg: GRPOConfig,
               out: str | Path, base_model: str | None = None, progress: bool = True,
               resume: bool = False) -> dict[str, Any]:
    """Run GRPO and write the LoRA adapter, metrics.jsonl and reward.png into `out`; every
    `save_every` steps also a checkpoint `checkpoints/step_N/` (adapter + trainer_state.pt, the
    last `keep_last` kept), from which `resume=True` continues bit-exactly (from the newest
    intact one). SIGINT / SIGTERM end the run at the next step boundary with a checkpoint."""
    from tqdm import tqdm

    from llamaworks.train.metrics import MetricsLog

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tr = GRPOTrainer(model, tokenizer, problems, cfg)
    found = skeleton.resume_point(out, "grpo") if resume else None
    start = tr.restore(found[1], found[2]) if found else 0
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if start else None)
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="grpo", disable=not progress, initial=start,
               total=cfg.steps)
    with skeleton.StopFlag() as stop:
        for s in bar:
            row = tr.step(s) | {"elapsed_s": round(time.time() - t0, 1)}
            log.log(row)
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}",
                            kl=f"{row['kl']:.3f}")
            out_of_time = cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60
            stopping = bool(out_of_time) or stop.signum is not None
            if (s + 1) % cfg.save_every == 0 or s + 1 == cfg.steps or stopping:
                plot_rewards(log.rows, out / "reward.png")
                save_adapter(model, cfg.lora, out, base_model=base_model)
                ckpt.write_checkpoint(out, s + 1, tr.state(s + 1), cfg.keep_last,
                                      lambda d: save_adapter(model, cfg.lora, d,
                                                             base_model=base_model))
            if stop.signum is not None:
                print(stop.message(s + 1))
            if stopping:
                break
    bar.close()
    if log.rows:
        plot_rewards(log.rows, out / "reward.png")
    model.eval()
    save_adapter(model, cfg.lora, out, base_model=base_model)
    rows = log.rows
    half = max(1, len(rows) // 2)
    summary = {"steps": len(rows), "minutes": round((time.time() - t0) / 60, 2),
               "reward_first_half": sum(r["reward"] for r in rows[:half]) / half,
               "reward_second_half": sum(r["reward"] for r in rows[half:]) / max(1,
                                                                                len(rows) - half),
               "stopped_by_signal": stop.signum,
               "config": asdict(cfg) | {"lora": asdict(cfg.lora) | {
                   "target_modules": list(cfg.lora.target_modules)}}}
    atomic_write_json(out / "grpo_summary.json", summary)
    return summary


def stack_adapters(first: str | Path, second: str | Path, out: str | Path,
                   base_model: str | None = None) -> Path:
    """One adapter equal to applying `first` then `second` (trained on the first-merged model):
    ranks concatenate, A = [A1; A2], B = [B1 s1, B2 s2] with scaling 1, so B·A = s1 B1A1 + s2 B2A2
    exactly."""
    from safetensors.torch import save_file

    from llamaworks.posttrain.lora import ALL_LINEARS, CONFIG_NAME, WEIGHTS_NAME, read_adapter

    c1, t1, b1 = read_adapter(first)
    c2, t2, _ = read_adapter(second)
    names = sorted({k[:-len(".lora_A.weight")] for k in [*t1, *t2] if k.endswith("lora_A.weight")})
    r = c1.r + c2.r
    tensors = {}
    for n in names:
        a_parts, b_parts = [], []
        for cfg, t in ((c1, t1), (c2, t2)):
            a, b = t.get(f"{n}.lora_A.weight"), t.get(f"{n}.lora_B.weight")
            if a is None:
                ref = (t1 if t is t2 else t2)[f"{n}.lora_A.weight"]
                refb = (t1 if t is t2 else t2)[f"{n}.lora_B.weight"]
                a, b = ref.new_zeros(cfg.r, ref.shape[1]), refb.new_zeros(refb.shape[0], cfg.r)
            a_parts.append(a.float())
            b_parts.append(b.float() * cfg.scaling)
        tensors[f"{n}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
        tensors[f"{n}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    targets = sorted(set(c1.target_modules) | set(c2.target_modules))
    atomic_write_json(out / CONFIG_NAME, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or b1,
        "r": r, "lora_alpha": float(r), "lora_dropout": 0.0,
        "target_modules": [t for t in ALL_LINEARS if t in targets], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False})
    return out
