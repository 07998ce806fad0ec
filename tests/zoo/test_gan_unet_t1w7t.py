"""The model zoo's unit test of the gan_unet_t1w7t bundle, in the form of Project-MONAI/model-zoo
ci/unit_tests/test_<bundle>.py (zoo_utils.BundleWorkflowTests): `make zoo-check` runs it against the unpacked release
archive, not the repository's test suite. The default training has no perceptual loss, so nothing is downloaded."""

import unittest

from zoo_utils import BundleWorkflowTests


class TestGanUnetT1w7t(BundleWorkflowTests, unittest.TestCase):
    bundle = "gan_unet_t1w7t"
    tiny_network = {"channels": 8, "channel_mult": [1, 2], "norm_num_groups": 4, "num_res_blocks": 1}
    # one epoch of two iterations (two draws of two slabs from each training volume), validated once
    tiny_training = {"max_epochs": 1, "slabs_per_draw": 2, "draws_per_volume": 2, "batch_size": 4,
                     "val_interval": 1, "validation_slices": 8}  # fmt: skip


if __name__ == "__main__":
    unittest.main()
