"""Write simulated 3T/7T training pairs and a subject-level datalist from a folder of 7T volumes.

    python scripts/prepare_data.py --input_dir ../shared/data/tell7t --output_dir data/tell7t_realistic
    python scripts/prepare_data.py --input_dir ../shared/data/tell7t --output_dir data/tell7t_seed001 \
        --recipe seed001 --quantize_8bit True

Every argument of ``synth7t.prepare.prepare_pairs`` is a flag (``--snr 15``, ``--test sub-TELL0106,sub-TELL0107``).
"""

import fire

from synth7t.prepare import prepare_pairs

if __name__ == "__main__":
    fire.Fire(prepare_pairs)
