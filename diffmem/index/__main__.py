"""``python -m diffmem.index``: the index stage."""

from diffmem.index.stage import main

main()
