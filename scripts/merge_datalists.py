"""One datalist over prepared folders of several recipes (``synth7t.prepare.merge_datalists``): the training,
validation and test items of every folder, each tagged with its recipe, paths relative to the new datalist's folder.

    python scripts/merge_datalists.py --output data/tell7t_recipes.json \
        --folders data/tell7t_realistic,data/tell7t_seed001
    # the validation subjects train too (a final model; only the test subjects stay held out)
    python scripts/merge_datalists.py --output data/tell7t_recipes_train5.json \
        --folders data/tell7t_realistic,data/tell7t_seed001 --train_on_validation True
"""

import fire

from synth7t.prepare import merge_datalists

if __name__ == "__main__":
    fire.Fire(merge_datalists)
