"""CriticStepsAdversarialTrainer: WGAN-GP and vanilla PatchGAN updates on tiny data (spec ganunet.md §5)."""

from __future__ import annotations

import pytest
import torch
from monai.engines import PrepareBatchExtraInput
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from monai.utils import AdversarialKeys, CommonKeys
from torch import nn

from synth7t.engines import CriticStepsAdversarialTrainer
from synth7t.losses import WassersteinAdversarialLoss
from synth7t.networks import AttentionResUNet


def _data(n: int, context: bool) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        image = torch.rand(3, 16, 16, generator=generator)
        item = {"image": image, "label": image[1:2] ** 0.8}
        if context:
            item["context"] = torch.rand(4, generator=generator)
        items.append(item)
    return items


def _trainer(
    max_epochs: int = 1,
    critic_steps: int = 5,
    gp_weight: float = 10.0,
    adversarial: nn.Module | None = None,
    context: bool = False,
    n_items: int = 12,
    device: str = "cpu",
    amp: bool = False,
) -> CriticStepsAdversarialTrainer:
    torch.manual_seed(0)
    adversarial = adversarial or WassersteinAdversarialLoss()
    conditioning = dict(cross_attention_stages=(2,), context_dim=4) if context else {}
    g_network = AttentionResUNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, **conditioning)
    d_network = PatchDiscriminator(
        spatial_dims=2, channels=4, in_channels=1, num_layers_d=2, norm=("GROUP", {"num_groups": 1})
    )
    g_network, d_network = g_network.to(device), d_network.to(device)
    extra = {"prepare_batch": PrepareBatchExtraInput(extra_keys={"context": "context"})} if context else {}
    return CriticStepsAdversarialTrainer(
        device=torch.device(device),
        max_epochs=max_epochs,
        train_data_loader=torch.utils.data.DataLoader(_data(n_items, context), batch_size=2),
        g_network=g_network,
        g_optimizer=torch.optim.Adam(g_network.parameters(), 1e-3, betas=(0.9, 0.999)),
        g_loss_function=lambda scores: 0.2 * adversarial(scores, target_is_real=True, for_discriminator=False),
        recon_loss_function=nn.L1Loss(),
        d_network=d_network,
        d_optimizer=torch.optim.Adam(d_network.parameters(), 1e-3, betas=(0.0, 0.9)),
        d_loss_function=lambda real, fake: adversarial(real, True, True) + adversarial(fake, False, True),
        critic_steps=critic_steps,
        gradient_penalty_weight=gp_weight,
        decollate=False,
        amp=amp,
        **extra,
    )


def _count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    counter = [0]
    optimizer.register_step_post_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def test_critic_every_iteration_generator_every_fifth():
    trainer = _trainer(critic_steps=5)  # 6 iterations: the generator steps on iterations 1 and 6
    critic_steps, generator_steps = _count_steps(trainer.state.d_optimizer), _count_steps(trainer.state.g_optimizer)
    trainer.run()
    assert critic_steps[0] == 6
    assert generator_steps[0] == 2
    output = trainer.state.output
    for key in (
        CommonKeys.LOSS,
        AdversarialKeys.RECONSTRUCTION_LOSS,
        AdversarialKeys.DISCRIMINATOR_LOSS,
        "gradient_penalty",
    ):
        assert torch.isfinite(output[key]), key
    assert output["gradient_penalty"] > 0
    assert output[CommonKeys.PRED].shape == output[CommonKeys.LABEL].shape == (2, 1, 16, 16)
    assert output[AdversarialKeys.REALS] is output[CommonKeys.LABEL]  # the 7T target is the real image


def test_vanilla_bce_patchgan_without_penalty_updates_both_every_iteration():
    trainer = _trainer(critic_steps=1, gp_weight=0.0, adversarial=PatchAdversarialLoss(criterion="bce"))
    critic_steps, generator_steps = _count_steps(trainer.state.d_optimizer), _count_steps(trainer.state.g_optimizer)
    before = [p.detach().clone() for p in trainer.state.g_network.parameters()]
    trainer.run()
    assert critic_steps[0] == generator_steps[0] == 6
    assert trainer.state.output["gradient_penalty"].item() == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.state.g_network.parameters()))


def test_generator_gets_the_context_and_the_critic_does_not():
    trainer = _trainer(context=True, critic_steps=2)
    seen = []
    trainer.state.g_network.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("context")), with_kwargs=True
    )
    trainer.run()
    assert seen and all(context is not None and context.shape == (2, 4) for context in seen)


def test_the_critic_learns_to_separate_real_from_fake():
    trainer = _trainer(critic_steps=1000, gp_weight=10.0, max_epochs=4, n_items=16)  # the generator steps once
    trainer.run()
    with torch.no_grad():
        batch = next(iter(trainer.data_loader))
        fake = trainer.state.g_network(batch["image"])
        critic = trainer.state.d_network
        gap = critic(batch["label"])[-1].mean() - critic(fake)[-1].mean()
    assert gap > 0  # Wasserstein estimate: real scores above fake scores


def _checkpoint_items(trainer: CriticStepsAdversarialTrainer) -> dict:
    state = trainer.state
    return {
        "generator": state.g_network,
        "critic": state.d_network,
        "g_optimizer": state.g_optimizer,
        "d_optimizer": state.d_optimizer,
        "trainer": trainer,
    }


def test_checkpoint_round_trip_restores_both_networks_and_optimizers(tmp_path):
    from monai.handlers import CheckpointLoader, CheckpointSaver

    trainer = _trainer(max_epochs=1)
    CheckpointSaver(str(tmp_path), _checkpoint_items(trainer), save_final=True, final_filename="final.pt").attach(
        trainer
    )
    trainer.run()

    resumed = _trainer(max_epochs=2)
    rstate = resumed.state
    load_dict = _checkpoint_items(resumed)
    CheckpointLoader(str(tmp_path / "final.pt"), load_dict).attach(resumed)
    generator_steps = _count_steps(rstate.g_optimizer)
    resumed.run()
    assert resumed.state.epoch == 2 and resumed.state.iteration == 12
    # iterations 7-12 of 5-step cycles: generator steps on 7 (first after the resume) and 11
    assert generator_steps[0] == 2
    assert rstate.d_optimizer.state_dict()["state"][0]["step"].item() == 12


def test_critic_steps_must_be_positive():
    with pytest.raises(ValueError, match="critic_steps must be at least 1"):
        _trainer(critic_steps=0)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.filterwarnings("ignore:.*CUDA is not available:UserWarning")
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_amp_runs_both_networks_through_their_gradient_scalers(device):
    """amp=True gives each network its own GradScaler. On a CPU torch disables them, so this runs the scaler code
    paths with the step schedule unchanged; on CUDA they are live (a step with overflowing float16 gradients may be
    skipped) and the losses stay finite."""
    trainer = _trainer(critic_steps=5, device=device, amp=True)
    state = trainer.state
    generator_steps, critic_steps = _count_steps(state.g_optimizer), _count_steps(state.d_optimizer)
    trainer.run()
    assert state.g_scaler.is_enabled() == state.d_scaler.is_enabled() == (device == "cuda")
    if device == "cpu":
        assert critic_steps[0] == 6 and generator_steps[0] == 2
    losses = [v for v in state.output.values() if torch.is_tensor(v) and v.ndim == 0]
    assert losses and all(torch.isfinite(v) for v in losses)
