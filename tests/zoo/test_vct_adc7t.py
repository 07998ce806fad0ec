"""The model zoo's unit test of the vct_adc7t bundle, in the form of Project-MONAI/model-zoo
ci/unit_tests/test_<bundle>.py (zoo_utils.BundleWorkflowTests): `make zoo-check` runs it against the unpacked release
archive, not the repository's test suite."""

import unittest

from zoo_utils import BundleWorkflowTests


class TestVctAdc7t(BundleWorkflowTests, unittest.TestCase):
    bundle = "vct_adc7t"
    tiny_network = {"channels": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}
    # one epoch of two iterations (four slices from each training volume), validated once
    tiny_training = {"max_epochs": 1, "slices_per_volume": 4, "batch_size": 4, "val_interval": 1,
                     "validation_slices": 8}  # fmt: skip


if __name__ == "__main__":
    unittest.main()
