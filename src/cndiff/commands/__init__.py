"""The commands: each a thin composition of the pipeline's layers.

* :mod:`.extract` — ``extract``, ``extract_many`` (``batch``: a list of files, or a folder);
* :mod:`.runner` — the loop over models every command shares;
* :mod:`.lora` — the Control-LoRA export (``extract(..., format="control-lora")``);
* :mod:`.apply` — ``apply_diff``: a difference model plus a base, baked;
* :mod:`.verify` — ``verify``: rebuild a converted file as the loaders do and compare;
* :mod:`.inspect` — ``inspect_file``: what a file is, from its index alone;
* :mod:`.prune` — ``prune``: a ControlNet's own weights alone;
* :mod:`.convert` — ``convert``: a ControlNet between the ldm and diffusers layouts;
* :mod:`.compat` — what the original script writes, for its drop-in replacement.
"""
