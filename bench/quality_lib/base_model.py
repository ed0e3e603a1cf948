"""Pretrain a tiny model of the real ACE-Step DiT on the base law, cache it, and write it as an ORIGINAL checkpoint.

The checkpoint is `<cache>/base-<key>/acestep-v15-base/` with config.json, model.safetensors (decoder.*,
encoder.*, null_condition_emb) and silence_latent.pt, so the project's own loader, analysis and train read it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from sidestep.models.convert import NULL_CONDITION_KEY, diffusers_key_to_original, diffusers_to_original
from sidestep.models.variants import variant_defaults, with_config
from sidestep.objective import apply_cfg_dropout, flow_matching_loss, noise_like, sampler_for_training
from sidestep.testing.tiny import build_tiny_condition_encoder, build_tiny_transformer, tiny_config

from .synthetic import Law, base_law, random_batch

CACHE_VERSION = 1  # bump when the base law or the pretraining recipe changes
MODEL_FOLDER = "acestep-v15-base"


@dataclass(frozen=True)
class BaseSpec:
    num_layers: int = 4
    hidden: int = 128
    steps: int = 1500
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0  # weights init, batches, noise, timesteps
    law_seed: int = 0  # the base distribution
    cfg_dropout: float = 0.15

    def key(self) -> str:
        text = json.dumps({"v": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def config(self) -> dict:
        return tiny_config(num_layers=self.num_layers, hidden=self.hidden)


@dataclass(frozen=True)
class BaseModel:
    root: Path  # checkpoint root (holds MODEL_FOLDER)
    spec: BaseSpec
    law: Law
    pretrain_seconds: float
    final_loss: float
    cached: bool


def ensure_base(cache: Path, spec: BaseSpec, log: Callable[[str], None] = lambda _: None,
                device: torch.device | str = "cpu") -> BaseModel:
    """The pretrained base checkpoint for `spec`, trained now or read from the cache."""
    config = spec.config()
    law = base_law(spec.law_seed, enc_dim=config["hidden_size"])
    root = Path(cache) / f"base-{spec.key()}"
    info_path = root / "pretrain.json"
    if info_path.is_file() and (root / MODEL_FOLDER / "model.safetensors").is_file():
        info = json.loads(info_path.read_text())
        log(f"base model from cache {root}")
        return BaseModel(root, spec, law, info["seconds"], info["final_loss"], cached=True)
    log(f"pretraining the base model ({spec.steps} steps, {spec.num_layers} layers, hidden {spec.hidden})")
    start = time.perf_counter()
    dit, final_loss = _pretrain(config, law, spec, log, torch.device(device))
    seconds = time.perf_counter() - start
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _write_original(partial / MODEL_FOLDER, config, dit, spec.seed, law)
    (partial / "pretrain.json").write_text(json.dumps({"seconds": seconds, "final_loss": final_loss, **asdict(spec)}))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return BaseModel(root, spec, law, seconds, final_loss, cached=False)


def _pretrain(config: dict, law: Law, spec: BaseSpec, log: Callable[[str], None], device: torch.device):
    dit = build_tiny_transformer(config, spec.seed).to(device).train()
    dit.requires_grad_(True)
    null_emb = build_tiny_condition_encoder(config, spec.seed + 1).state_dict()[NULL_CONDITION_KEY].to(device)
    sampler = sampler_for_training("continuous", with_config(variant_defaults("base"), config))
    opt = torch.optim.AdamW(dit.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))))
    g = torch.Generator().manual_seed(spec.seed)
    ema = None
    for step in range(spec.steps):
        batch = random_batch(law, spec.batch_size, g).to(device, torch.float32)
        t = sampler.sample(batch.size, g)
        noise = noise_like(batch.target_latents, g)
        enc = apply_cfg_dropout(batch.encoder_hidden_states, null_emb, spec.cfg_dropout, g)
        loss = flow_matching_loss(dit, batch, t, noise, encoder_hidden_states=enc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if (step + 1) % max(1, spec.steps // 10) == 0:
            log(f"  pretrain step {step + 1}/{spec.steps}: loss {ema:.4f}")
    return dit.eval().requires_grad_(False), float(ema)


def _write_original(model_dir: Path, config: dict, dit: torch.nn.Module, seed: int, law: Law) -> None:
    """The original ACE-Step layout, as `sidestep.testing.tiny.write_original_checkpoint` writes it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {diffusers_key_to_original(k): v.detach().cpu().contiguous() for k, v in dit.state_dict().items()}
    encoder = build_tiny_condition_encoder(config, seed + 1)
    for key, value in encoder.state_dict().items():
        if key == NULL_CONDITION_KEY:
            tensors[NULL_CONDITION_KEY] = value.contiguous()
        elif key != "silence_latent":
            tensors["encoder." + diffusers_to_original(key)] = value.contiguous()
    save_file(tensors, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.save(law.silence.T[None].contiguous(), model_dir / "silence_latent.pt")
