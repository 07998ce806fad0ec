"""Engine-side pieces the MONAI engines lack."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from monai.engines import AdversarialTrainer
from monai.utils import AdversarialKeys, CommonKeys
from torch import nn

from synth7t.losses import critic_scores, gradient_penalty

__all__ = ["AutocastNetwork", "CriticStepsAdversarialTrainer", "OnnxRuntimeNetwork"]


class AutocastNetwork(nn.Module):
    """Run a network's forward pass under ``torch.autocast(device_type, dtype)`` and return float32.

    MONAI's engines implement mixed precision as ``torch.autocast("cuda")`` with a CUDA ``GradScaler``, so their
    ``amp=True`` does nothing on a CPU. On CPUs with bfloat16 matrix units (Intel AMX, AVX512-BF16) a bfloat16
    forward is several times faster and needs no loss scaling; wrapping the network in this module lets the
    unchanged engines train and infer that way. Checkpoints should save the wrapped ``module`` so their keys do
    not depend on the wrapper.
    """

    def __init__(self, module: nn.Module, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            output = self.module(*args, **kwargs)
        return output.float()


class CriticStepsAdversarialTrainer(AdversarialTrainer):
    """Image-to-image GAN training with several critic updates per generator update and a gradient penalty.

    MONAI's ``AdversarialTrainer`` updates the generator and the discriminator once each per iteration, scores the
    input image as "real", and has no gradient penalty; WGAN-GP as the thesis ran it (spec ganunet.md §5, with
    Erik Linder-Noren's code) needs all three changed. Every iteration here:

    1. updates the critic on the batch's 7T targets (real) and the generator's detached predictions (fake):
       ``d_loss_function(real_scores, fake_scores) + gradient_penalty_weight * gradient_penalty``;
    2. on every ``critic_steps``-th iteration (the first included, as in Linder-Noren's ``i % n_critic == 0``, and
       the first after a resume), updates the generator with
       ``recon_loss_function(pred, target) + g_loss_function(fake_scores)``, the adversarial weight being part of
       ``g_loss_function``.

    The critic sees 7T slices only (unconditional, spec A12); conditioning arguments from ``prepare_batch`` go to
    the generator only. Critic scores are the last output of networks that return intermediate features (MONAI's
    ``PatchDiscriminator``). The gradient penalty runs in float32 outside autocast. The output dictionary holds
    the latest generator losses, so progress bars and ``StatsHandler`` see a value on every iteration. The trainer's
    own state dict holds the epoch and iteration only.

    Args:
        critic_steps: critic updates per generator update (``n_critic``; 5 in the thesis, 1 for a vanilla GAN).
        gradient_penalty_weight: weight of :func:`synth7t.losses.gradient_penalty`; 10 in the thesis, 0 for none.
        args, kwargs: as ``monai.engines.AdversarialTrainer``.
    """

    def __init__(self, *args: Any, critic_steps: int = 5, gradient_penalty_weight: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # MONAI's AdversarialTrainer puts the networks, optimizers and scalers themselves in the trainer's state
        # dict, which pickles whole modules into checkpoints (and fails to load with weights_only=True). Save them
        # as their own entries of the checkpoint's save_dict instead, as for MONAI's SupervisedTrainer.
        self._state_dict_user_keys.clear()
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be at least 1, got {critic_steps}.")
        self.critic_steps = critic_steps
        self.gradient_penalty_weight = gradient_penalty_weight
        self.state.latest_generator_losses = {}

    def _critic(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The critic's output for ``x`` through ``d_inferer``."""
        return self.d_inferer(x, self.state.d_network)

    def _autocast(self) -> Any:
        return torch.autocast("cuda", **self.amp_kwargs) if self.amp else nullcontext()

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def _critic_step(self, targets: torch.Tensor, fakes: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state
        state.d_network.train()
        state.d_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self._autocast():
            real_scores = critic_scores(self._critic, targets)
            fake_scores = critic_scores(self._critic, fakes)
            loss = state.d_loss_function(real_scores, fake_scores).mean()
        penalty = torch.zeros((), device=loss.device)
        if self.gradient_penalty_weight:
            penalty = gradient_penalty(self._critic, targets.float(), fakes.float())
        self._step(loss + self.gradient_penalty_weight * penalty, state.d_optimizer, state.d_scaler)
        return {
            AdversarialKeys.REAL_LOGITS: real_scores.detach(),
            AdversarialKeys.DISCRIMINATOR_LOSS: loss.detach(),
            "gradient_penalty": penalty.detach(),
        }

    def _generator_step(self, inputs: torch.Tensor, targets: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        state = self.state
        state.g_network.train()
        state.g_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        state.d_network.requires_grad_(False)
        try:
            with self._autocast():
                fakes = self.g_inferer(inputs, state.g_network, *args, **kwargs)
                fake_scores = critic_scores(self._critic, fakes.float())
                reconstruction = state.recon_loss_function(fakes, targets).mean()
                adversarial = state.g_loss_function(fake_scores).mean()
            self._step(reconstruction + adversarial, state.g_optimizer, state.g_scaler)
        finally:
            state.d_network.requires_grad_(True)
        state.latest_generator_losses = {
            CommonKeys.LOSS: (reconstruction + adversarial).detach(),
            AdversarialKeys.RECONSTRUCTION_LOSS: reconstruction.detach(),
            AdversarialKeys.GENERATOR_LOSS: adversarial.detach(),
            AdversarialKeys.FAKE_LOGITS: fake_scores.detach(),
        }
        return fakes.detach()

    def _iteration(self, engine: AdversarialTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        with torch.no_grad(), self._autocast():
            state = engine.state
            state.g_network.eval()
            fakes = self.g_inferer(inputs, state.g_network, *args, **kwargs).float()
        output: dict[str, Any] = {CommonKeys.IMAGE: inputs, CommonKeys.LABEL: targets, AdversarialKeys.REALS: targets}
        output.update(self._critic_step(targets, fakes))
        if (engine.state.iteration - 1) % self.critic_steps == 0 or not engine.state.latest_generator_losses:
            fakes = self._generator_step(inputs, targets, args, kwargs)
        output[CommonKeys.PRED] = output[AdversarialKeys.FAKES] = fakes
        output.update(engine.state.latest_generator_losses)
        return output


class OnnxRuntimeNetwork(nn.Module):
    """An exported ``model.onnx`` run by ONNX Runtime, callable like the PyTorch network it replaces.

    MONAI's engines and inferers call ``network(x)`` on torch tensors (and ``network.eval()``); this module runs
    the ONNX graph on ``x`` and returns a float32 tensor on ``x``'s device, so a bundle's inference and evaluation
    configs switch backend by replacing ``network`` (``configs/inference_onnx.yaml``). The CUDA execution provider is
    used when ``device`` is a CUDA device and ``onnxruntime-gpu`` offers it, the CPU provider otherwise.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu") -> None:
        super().__init__()
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (output,) = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})
        return torch.from_numpy(output).to(x.device)
