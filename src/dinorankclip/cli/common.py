"""Help text shared by several subcommands."""

OVERRIDE_HELP = (
    "dotted config overrides KEY=VALUE, e.g. loss.order=3 train.steps=200 data.train=pairs.csv "
    "(values are parsed as YAML: null, true, [1, 2])"
)
