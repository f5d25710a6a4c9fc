"""cdgmae: the logic behind the Snakemake workflow reproducing CDG-MAE.

Each stage is a module runnable as ``python -m pipeline.<stage> --help``; rules in ``rules/`` are
thin calls into these modules. Heavy imports (torch, timm, diffusers, h5py) happen inside the
stage modules, never here, so parsing the workflow stays cheap.
"""

__version__ = "0.1.0"
