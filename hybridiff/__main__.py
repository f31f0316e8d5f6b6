"""``python -m hybridiff``: the command line, as torchrun starts it on every node
(``torchrun --nproc-per-node N -m hybridiff run plan.json ...``)."""

from hybridiff.cli import main

main()
