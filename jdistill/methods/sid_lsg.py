"""``sid_lsg``: SiD with long and short guidance (Zhou et al., ICLR 2025, arXiv 2406.01561).

The losses are ``methods.sid``'s; what makes it LSG are the four guidance scales: kappa1 (CFG under which the
fake score is trained, with 10% prompt dropout), kappa2 = kappa3 (the fake score's CFG inside the generator
loss) and kappa4 (the teacher's CFG there). The released scripts set all four to 2 and alpha = 1; the paper sweeps 1.5 to 4.5.
"""

from __future__ import annotations

import ml_collections

from jdistill.methods import sid

NETWORKS = sid.NETWORKS
OPTIONAL_NETWORKS = sid.OPTIONAL_NETWORKS
CONFIG_CHOICES = sid.CONFIG_CHOICES
build = sid.build


def default_config() -> ml_collections.ConfigDict:
    config = sid.default_config()
    config.name = "sid_lsg"
    config.alpha = 1.0
    config.teacher_guidance = 2.0  # kappa4
    config.fake_guidance = 2.0  # kappa2 = kappa3
    config.fake_train_guidance = 2.0  # kappa1
    config.fake_cond_dropout = 0.1
    return config
