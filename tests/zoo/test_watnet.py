"""The model zoo's unit test of the watnet bundle, in the form of Project-MONAI/model-zoo ci/unit_tests/test_<bundle>.py
(zoo_utils.BundleWorkflowTests): `make zoo-check` runs it against the unpacked release archive, not the repository's
test suite."""

import unittest

from zoo_utils import BundleWorkflowTests


class TestWatnet(BundleWorkflowTests, unittest.TestCase):
    bundle = "watnet"
    tiny_network = {}  # WATNet's own size is small enough
    # one epoch of two iterations (a draw of four 16 x 16 patches from each training volume), validated once
    tiny_training = {"max_epochs": 1, "patches_per_draw": 4, "draws_per_volume": 1, "batch_size": 4,
                     "patch_size": [16, 16], "val_interval": 1, "validation_slices": 8}  # fmt: skip


if __name__ == "__main__":
    unittest.main()
