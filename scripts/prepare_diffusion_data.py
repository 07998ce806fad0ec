"""Simulate 3T diffusion series, 3T T1w and 7T ADC targets from a folder of T1w volumes (VCT demo and training data).

    python scripts/prepare_diffusion_data.py --input_dir ../shared/data/tell7t --output_dir data/tell7t_diffusion

Every argument of ``synth7t.diffusion_phantom.prepare_diffusion_pairs`` is a flag (``--seed 1``,
``--test sub-TELL0106,sub-TELL0107``). The simulation and its literature tissue values are described in that module.
"""

import fire

from synth7t.diffusion_phantom import prepare_diffusion_pairs

if __name__ == "__main__":
    fire.Fire(prepare_diffusion_pairs)
