"""jaxturbo's benchmark suite: one package per topic, run from the repository root as
`python -m experiments.<topic>.<script>` (or `jaxturbo bench <topic>[.<script>]`).  Not part of the
installed wheel."""
