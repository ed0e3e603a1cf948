import pytest
import torch

from sidestep.data import collate, load_sample
from sidestep.errors import ConfigError
from sidestep.models import find_model, load_model, resolve_runtime
from sidestep.models.variants import TURBO_SHIFT3_TIMESTEPS, variant_defaults
from sidestep.objective import (
    TimestepKind,
    apply_cfg_dropout,
    flow_matching_loss,
    noise_like,
    parse_focus,
    sampler_for_focus,
    sampler_for_training,
)


def test_logit_normal_uses_variant_parameters():
    sampler = sampler_for_training(None, variant_defaults("base"))
    assert sampler.kind is TimestepKind.LOGIT_NORMAL
    t = sampler.sample(20000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    # median of sigmoid(N(-0.4, 1)) is sigmoid(-0.4)
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(-0.4)).item()) < 0.01


def test_turbo_defaults_to_discrete_schedule():
    t = sampler_for_training(None, variant_defaults("turbo")).sample(500, torch.Generator().manual_seed(0))
    assert set(round(x, 4) for x in t.tolist()) == set(round(x, 4) for x in TURBO_SHIFT3_TIMESTEPS)
    assert sampler_for_training("continuous", variant_defaults("turbo")).kind is TimestepKind.LOGIT_NORMAL
    with pytest.raises(ConfigError, match="--timestep-mode"):
        sampler_for_training("cosine", variant_defaults("base"))


@pytest.mark.parametrize("text, rng", [("texture", (0.0, 0.4)), ("structure", (0.6, 1.0)), ("0.2,0.7", (0.2, 0.7))])
def test_focus_ranges(text, rng):
    label, got = parse_focus(text)
    assert got == rng
    t = sampler_for_focus(label, variant_defaults("base")).sample(2000, torch.Generator().manual_seed(1))
    assert rng[0] <= t.min() and t.max() <= rng[1]


@pytest.mark.parametrize("bad", ["loud", "0.5", "0.7,0.2", "-0.1,0.5", "0.2,1.5", "a,b"])
def test_bad_focus_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="--timestep-focus"):
        parse_focus(bad)


def test_same_generator_seed_same_draws():
    s = sampler_for_focus("balanced", variant_defaults("base"))
    assert torch.equal(s.sample(8, torch.Generator().manual_seed(5)), s.sample(8, torch.Generator().manual_seed(5)))


def test_cfg_dropout_swaps_whole_condition_for_null():
    cond = torch.randn(400, 3, 4)
    null = torch.full((1, 1, 4), 7.0)
    out = apply_cfg_dropout(cond, null, 0.15, torch.Generator().manual_seed(0))
    dropped = (out == 7.0).all(dim=(1, 2))
    kept = (out == cond).all(dim=(1, 2))
    assert bool((dropped | kept).all())
    assert 0.08 < dropped.float().mean().item() < 0.22
    assert torch.equal(apply_cfg_dropout(cond, null, 0.0, torch.Generator()), cond)


def test_loss_matches_the_definition_and_backprops(checkpoint_root, dataset_dir):
    loaded = load_model(find_model(checkpoint_root, "base"), resolve_runtime("cpu", "fp32", True))
    model = loaded.transformer
    model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    batch = collate([load_sample(dataset_dir / "song_00.pt")])
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0.3])
    noise = noise_like(batch.target_latents, gen)
    loss = flow_matching_loss(model, batch, t, noise)
    x_t = 0.3 * noise + 0.7 * batch.target_latents
    with torch.no_grad():
        pred = model(hidden_states=x_t, timestep=t, timestep_r=t, encoder_hidden_states=batch.encoder_hidden_states,
                     context_latents=batch.context_latents).sample
    assert pred.shape == batch.target_latents.shape
    torch.testing.assert_close(loss, torch.mean((pred - (noise - batch.target_latents)) ** 2))
    loss.backward()  # with gradient checkpointing on and only one weight trainable
    grad = model.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_padding_is_masked_out_of_the_loss(checkpoint_root, dataset_dir):
    loaded = load_model(find_model(checkpoint_root, "base"), resolve_runtime("cpu", "fp32", False))
    samples = sorted((load_sample(dataset_dir / f"song_0{i}.pt") for i in range(6)), key=lambda s: -s.length)
    long, short = samples[0], samples[-1]
    assert short.length < long.length
    batch = collate([long, short])  # the short sample is right-padded
    noise = noise_like(batch.target_latents, torch.Generator().manual_seed(0))
    t = torch.tensor([0.5, 0.5])
    per_sample = flow_matching_loss(loaded.transformer, batch, t, noise, reduction="none")
    mean = flow_matching_loss(loaded.transformer, batch, t, noise)

    # The DiT attends to padded frames (neither implementation masks inside it), so the prediction for the
    # short sample is the padded forward's; its loss must equal the plain MSE over its own, unpadded frames.
    x_t = 0.5 * noise + 0.5 * batch.target_latents
    with torch.no_grad():
        pred = loaded.transformer(hidden_states=x_t, timestep=t, timestep_r=t,
                                  encoder_hidden_states=batch.encoder_hidden_states,
                                  context_latents=batch.context_latents).sample
    err = (pred - (noise - batch.target_latents)) ** 2
    n = short.length
    unpadded = err[1, :n].mean()
    torch.testing.assert_close(per_sample[1], unpadded)
    torch.testing.assert_close(per_sample[0], err[0].mean())
    torch.testing.assert_close(mean, (err[0].sum() + err[1, :n].sum()) / ((long.length + n) * err.shape[-1]))
    assert err[1, n:].mean() > 0.1 * unpadded  # the padded frames do carry error: dropping the mask shows
