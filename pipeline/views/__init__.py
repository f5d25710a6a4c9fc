"""Stage 1: the bag of views (generators, sharded HDF5 writing, merge, the training reader, figure).

Commands: ``python -m pipeline.views <command> --help``; ``COMMANDS`` maps each to its module
(``pipeline.cli``), and the rules derive their code inputs from it.
"""

COMMANDS = {
    "generate": ("pipeline.views.shards:main", "generate one shard of the bag of views"),
    "merge": ("pipeline.views.merge:main", "validate the shards and merge them into bag.h5"),
    "figure": ("pipeline.views.figure:main", "plot real images beside their generated views"),
    "generators": ("pipeline.views.generators:main", "list the registered view generators"),
}
