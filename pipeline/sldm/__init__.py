"""The view generator's stage (before the bag of views): train the self-supervised LDM view generator (S-LDM) on the pretraining images.

``python -m pipeline.sldm <command>``: the commands are listed in ``pipeline.cli.COMMANDS``. The
folder it writes (``folder.py``, ``docs/sldm-format.md``) is what the views stage's ``sldm``
generator loads; the classifier-free-guidance DDIM sampler both use is ``sampling.py``.
"""
