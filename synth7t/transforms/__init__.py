"""MONAI-style transforms shared by the bundles (array and dictionary forms)."""

from synth7t.transforms.conditioning import CONTEXT_FIELDS, SubjectContextd, encode_subject_context
from synth7t.transforms.degradation import (
    HistogramMatch,
    HistogramMatchd,
    KSpaceTruncate,
    KSpaceTruncated,
    Quantize8Bit,
    Quantize8Bitd,
    SimulateRealistic3T,
    SimulateRealistic3Td,
    kspace_truncate,
    seed001_recipe,
)
from synth7t.transforms.diffusion import (
    ADC_METHODS,
    ComputeADC,
    ComputeADCd,
    check_diffusion_series,
    fit_adc,
    read_fsl_bvals,
    read_fsl_bvecs,
)
from synth7t.transforms.gmm import RandGMMIntensity, RandGMMIntensityd
from synth7t.transforms.intensity import NonzeroMask, NonzeroMaskd, PercentileScaleIntensity, PercentileScaleIntensityd
from synth7t.transforms.randomization import QuantileHistogramMatch, RandSimulate3T, RandSimulate3Td
from synth7t.transforms.slabs import SlabToChannels, SlabToChannelsd, slab_to_channels

__all__ = [
    "ADC_METHODS",
    "CONTEXT_FIELDS",
    "ComputeADC",
    "ComputeADCd",
    "HistogramMatch",
    "HistogramMatchd",
    "KSpaceTruncate",
    "KSpaceTruncated",
    "Quantize8Bit",
    "Quantize8Bitd",
    "SimulateRealistic3T",
    "SimulateRealistic3Td",
    "NonzeroMask",
    "NonzeroMaskd",
    "PercentileScaleIntensity",
    "PercentileScaleIntensityd",
    "QuantileHistogramMatch",
    "RandSimulate3T",
    "RandSimulate3Td",
    "RandGMMIntensity",
    "RandGMMIntensityd",
    "SlabToChannels",
    "SlabToChannelsd",
    "SubjectContextd",
    "check_diffusion_series",
    "encode_subject_context",
    "fit_adc",
    "kspace_truncate",
    "read_fsl_bvals",
    "read_fsl_bvecs",
    "seed001_recipe",
    "slab_to_channels",
]
