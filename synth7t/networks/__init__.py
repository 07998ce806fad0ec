"""Networks of the synthesis bundles."""

from synth7t.networks.adadm_unet import AdaDM, AdaDMResBlock, AttentionResUNet
from synth7t.networks.basic_cnn import BasicCNN
from synth7t.networks.fourier_conv import FourierConv2d
from synth7t.networks.haar import HaarDWT2d
from synth7t.networks.residual_refiner import ResidualRefiner, plain_cnn
from synth7t.networks.vct import VCT, ViTEncoder, load_vit_checkpoint
from synth7t.networks.watnet import DistillationBlock, WaveletAffineTransform, WATNet

__all__ = [
    "AdaDM",
    "AdaDMResBlock",
    "AttentionResUNet",
    "BasicCNN",
    "DistillationBlock",
    "FourierConv2d",
    "HaarDWT2d",
    "ResidualRefiner",
    "VCT",
    "ViTEncoder",
    "WaveletAffineTransform",
    "WATNet",
    "load_vit_checkpoint",
    "plain_cnn",
]
