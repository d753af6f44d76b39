"""Every enumerated setting of scalemix, in one module that imports nothing heavy.

The command line reads these to declare and validate its options before torch is
imported (``scalemix --help`` stays fast); the modules that implement each setting import
them from here, so there is one list per setting.
"""

from __future__ import annotations

# data
DATASETS = ("digits", "cifar10", "imagenette")
AUGMENTATIONS = ("none", "crop", "crop-flip")  # crop: where a mirror changes the class (digits)
# model axes
NORMS = ("group", "layer", "instance", "none", "public_batch", "batch")
PLACEMENTS = ("standard", "preact")
WS_MODES = ("none", "plain", "scaled")
ACTS = ("relu", "mish", "silu")
BATCH_COUPLED_NORMS = ("batch",)  # norms whose output for one example depends on others
# privacy
ACCOUNTANTS = ("prv", "rdp")
NOISE_MODES = ("secure", "seeded", "seeded-shared")  # seeded-shared: one seed's runs share noise
SAMPLERS = ("poisson", "shuffle")
DP_ENGINES = ("scalemix", "vmap")
PRECISIONS = ("fp32", "bf16")  # bf16: autocast forward/backward; norms, clipping, noise fp32
CANARY_KINDS = ("gradient", "input")
# optimisation, diagnostics, run
OPTIMIZERS = ("sgd", "momentum", "nadam")
SCHEDULES = ("constant", "cosine")
DIAG_SOURCES = ("train", "probe")
DEVICES = ("auto", "cpu", "cuda")
