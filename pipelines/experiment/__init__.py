"""`nlpctr experiment` (DESIGN.md, "Modules in detail", `pipelines/experiment/`).

`command` is the command (flags, the summary), `config` experiment.yaml as a checked
`Protocol`, `protocol` one dataset through the protocol, `students` E4 and `sweep` the simulated
redundancy sweep.
"""
